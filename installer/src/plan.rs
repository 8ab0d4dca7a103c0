//! The plan: which disk, which partitions at which sectors, what is wiped.
//! Computed from the profile and the machine's facts only (pure), printed
//! before anything is written, and testable on captured facts.

use std::fmt::{self, Write as _};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::datasets::{Effective, Mounted};
use crate::facts::{human_bytes, BlockDevice, Facts, ZfsPoolLabel};
use crate::profile::{Bus, DiskSelect, Profile, Vdev, Wipe};

/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN_BYTES: u64 = 1 << 20;
/// ZFS refuses vdevs smaller than 64 MiB.
pub const MIN_ZFS_BYTES: u64 = 64 << 20;

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const SWAP_TYPE: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
/// The type `zpool create` gives a ZFS partition on Linux (Solaris /usr, BF01).
pub const ZFS_TYPE: &str = "6A898CC3-1DD2-11B2-99A6-080020736631";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    Esp,
    Swap,
    Zfs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedPartition {
    pub number: u32,
    pub name: String,
    pub kind: PartKind,
    pub type_guid: &'static str,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl PlannedPartition {
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub disk: BlockDevice,
    /// What is on the disk and will be wiped (`wipe = "always"`).
    pub wipe: Vec<String>,
    pub logical_block_size: u32,
    pub partitions: Vec<PlannedPartition>,
    /// Every dataset with the mountpoint and canmount ZFS will give it
    /// ([`crate::datasets::effective`]), the pool's root first.
    pub datasets: Vec<Effective>,
    /// What the install mounts under its altroot and the installed system
    /// mounts, parents first ([`crate::datasets::mount_order`]).
    pub mounts: Vec<Mounted>,
    /// ZFS pools on the other disks (none may have the profile's pool name).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_pools: Vec<ZfsPoolLabel>,
    /// How the root pool's disks are joined (`[pool] vdev`).
    pub vdev: Vdev,
    /// The root pool's other disks (`[disk] members`, in profile order),
    /// each with the same layout as `disk`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Member>,
    /// Snapshots taken right after their dataset's creation (`POOL/DS@NAME`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// Volumes: full name and volsize in bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zvols: Vec<(String, u64)>,
    /// The root pool's `special`, `log` and `cache` disks (whole disks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aux: Vec<AuxClass>,
    /// The data pools (`[[pools]]`), in profile order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data_pools: Vec<PoolPlan>,
}

/// One class of a pool's devices beside its data vdev (`special`, `log`,
/// `cache`, zpoolconcepts(7)), on whole disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuxClass {
    pub class: &'static str,
    pub disks: Vec<Member>,
}

impl AuxClass {
    /// The words `zpool create` takes for this class: `special mirror A B`,
    /// `log A`, `cache A B` (cache devices are never mirrored).
    pub fn words(&self) -> Vec<String> {
        let mut w = vec![self.class.to_string()];
        if self.disks.len() > 1 && self.class != "cache" {
            w.push("mirror".into());
        }
        w.extend(self.disks.iter().map(Member::zfs_device));
        w
    }
}

/// A data pool (`[[pools]]`) on whole disks: each disk gets one GPT
/// partition with all of it (a pool on a whole disk needs udev to
/// partition it, which the installer does not run; disko makes the same
/// one partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolPlan {
    pub name: String,
    pub vdev: Vdev,
    pub disks: Vec<Member>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aux: Vec<AuxClass>,
    pub datasets: Vec<Effective>,
    pub mounts: Vec<Mounted>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zvols: Vec<(String, u64)>,
}

impl PoolPlan {
    /// The data vdev's partitions as `/dev/…` paths, in profile order.
    pub fn zfs_devices(&self) -> Vec<String> {
        self.disks.iter().map(Member::zfs_device).collect()
    }
}

/// Another disk of the root pool, with its own layout (same partitions as
/// the first disk, at this disk's sector size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub disk: BlockDevice,
    /// What is on the disk and will be wiped.
    pub wipe: Vec<String>,
    pub logical_block_size: u32,
    pub partitions: Vec<PlannedPartition>,
}

impl Member {
    /// The ZFS partition as a `/dev/…` path.
    pub fn zfs_device(&self) -> String {
        let n = self
            .partitions
            .iter()
            .find(|p| p.kind == PartKind::Zfs)
            .map_or(1, |p| p.number);
        format!("/dev/{}", crate::disk::partition_name(&self.disk.name, n))
    }

    /// This disk alone as a plan, for [`crate::disk::partition_file`].
    pub fn as_plan(&self, base: &Plan) -> Plan {
        Plan {
            disk: self.disk.clone(),
            wipe: self.wipe.clone(),
            logical_block_size: self.logical_block_size,
            partitions: self.partitions.clone(),
            members: Vec::new(),
            aux: Vec::new(),
            data_pools: Vec::new(),
            ..base.clone()
        }
    }
}

impl Plan {
    /// Every whole disk: the root pool's `special`, `log` and `cache`, then
    /// each data pool's disks and classes, each as a plan of its own (one
    /// ZFS partition), with the pool it belongs to.
    pub fn whole_disks(&self) -> Vec<(String, Plan)> {
        let root = self.pool_name().to_string();
        let mut all = Vec::new();
        for c in &self.aux {
            for m in &c.disks {
                all.push((root.clone(), m.as_plan(self)));
            }
        }
        for p in &self.data_pools {
            for m in p.disks.iter().chain(p.aux.iter().flat_map(|c| &c.disks)) {
                all.push((p.name.clone(), m.as_plan(self)));
            }
        }
        all
    }

    /// One single-disk plan per disk of the root pool, the first disk first:
    /// what [`crate::disk::partition`] writes on each. Datasets and mounts are
    /// the pool's, shared.
    pub fn each_disk(&self) -> Vec<Plan> {
        let first = Plan {
            members: Vec::new(),
            aux: Vec::new(),
            data_pools: Vec::new(),
            ..self.clone()
        };
        let mut all = vec![first.clone()];
        for m in &self.members {
            all.push(Plan {
                disk: m.disk.clone(),
                wipe: m.wipe.clone(),
                logical_block_size: m.logical_block_size,
                partitions: m.partitions.clone(),
                ..first.clone()
            });
        }
        all
    }

    /// The pool's name (its root dataset's).
    pub fn pool_name(&self) -> &str {
        self.datasets.first().map_or("", |d| d.name.as_str())
    }

    /// The kernel names of every disk of the root pool, the first first.
    pub fn disk_names(&self) -> Vec<&str> {
        std::iter::once(self.disk.name.as_str())
            .chain(self.members.iter().map(|m| m.disk.name.as_str()))
            .collect()
    }

    /// The dataset mounted at `/` (the boot file system), if any.
    pub fn root(&self) -> Option<&Mounted> {
        self.mounts.iter().find(|m| m.mountpoint == "/")
    }
}

/// Why no disk (or the wrong number of disks) was chosen.
#[derive(Debug)]
pub struct SelectError {
    /// How many disks matched (0 or several).
    pub matching: usize,
    pub message: String,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SelectError {}

fn describe(d: &BlockDevice) -> String {
    format!(
        "{} ({}, model {:?}, serial {:?}, bus {})",
        d.name,
        human_bytes(d.size_bytes),
        d.model.as_deref().unwrap_or(""),
        d.serial.as_deref().unwrap_or(""),
        d.bus
    )
}

/// The first rule of `sel` that `d` fails, or None when it matches.
fn failed_rule(sel: &DiskSelect, d: &BlockDevice) -> Option<String> {
    if d.boot_medium {
        return Some("it is the boot medium".into());
    }
    if d.hidden {
        return Some(
            "it is hidden in sysfs (a per-path node of a multipath disk, not a disk of its own)"
                .into(),
        );
    }
    // USB and removable disks only when the rule names their bus.
    if (d.bus == "usb" || d.removable) && sel.bus.map(Bus::facts_name) != Some(d.bus.as_str()) {
        let what = if d.bus == "usb" {
            "it is on USB"
        } else {
            "it is removable"
        };
        return Some(format!(
            "{what}, and the rules do not name its bus (add bus = \"{}\" to choose it)",
            if d.bus == "ata" {
                "sata"
            } else {
                d.bus.as_str()
            }
        ));
    }
    if d.read_only {
        return Some("it is read-only".into());
    }
    if d.size_bytes == 0 {
        return Some("it has no medium".into());
    }
    let eq = |want: &Option<String>, have: &Option<String>, what: &str| match want {
        Some(w) if have.as_deref().map(str::trim) != Some(w.trim()) => Some(format!(
            "{what} {:?} is not {w:?}",
            have.as_deref().unwrap_or("")
        )),
        _ => None,
    };
    eq(&sel.serial, &d.serial, "serial")
        .or_else(|| eq(&sel.wwn, &d.wwn, "wwn"))
        .or_else(|| eq(&sel.model, &d.model, "model"))
        .or_else(|| match sel.min_size {
            Some(min) if d.size_bytes < min.0 => Some(format!("it is smaller than min-size {min}")),
            _ => None,
        })
        .or_else(|| match sel.max_size {
            Some(max) if d.size_bytes > max.0 => Some(format!("it is larger than max-size {max}")),
            _ => None,
        })
        .or_else(|| match sel.bus {
            Some(bus) => {
                let want = bus.facts_name();
                (d.bus != want).then(|| format!("bus {} is not {want}", d.bus))
            }
            None => None,
        })
        .or_else(|| match &sel.device {
            Some(name) if *name != d.name && format!("/dev/{}", d.name) != *name => {
                Some(format!("it is not {name}"))
            }
            _ => None,
        })
}

/// The one disk the profile's rules select; every candidate and the rule it
/// failed are in the error otherwise.
pub fn select_disk<'a>(sel: &DiskSelect, facts: &'a Facts) -> Result<&'a BlockDevice, SelectError> {
    select_disk_named(sel, "[disk] select", facts)
}

/// Every selection of the profile, with the key each comes from: the root
/// pool's first disk (`select`, or a node's own), `[disk] members`, the
/// root pool's `special`, `log` and `cache`, then each data pool's
/// `disks`, `special`, `log` and `cache`. [`plan_with`] takes the chosen
/// disks in this order.
pub fn selections<'a>(
    profile: &'a Profile,
    select: &'a DiskSelect,
) -> Vec<(String, &'a DiskSelect)> {
    let mut all = vec![("[disk] select".to_string(), select)];
    for (i, m) in profile.disk.members.iter().enumerate() {
        all.push((format!("[disk] members[{i}]"), m));
    }
    for (class, list) in profile.pool.aux_classes() {
        for (i, m) in list.iter().enumerate() {
            all.push((format!("[pool] {class}[{i}]"), m));
        }
    }
    for pool in &profile.pools {
        for (i, m) in pool.disks.iter().enumerate() {
            all.push((format!("[[pools]] {} disks[{i}]", pool.name), m));
        }
        for (class, list) in pool.aux_classes() {
            for (i, m) in list.iter().enumerate() {
                all.push((format!("[[pools]] {} {class}[{i}]", pool.name), m));
            }
        }
    }
    all
}

/// One disk for each selection of [`selections`], all resolved before any
/// disk is touched: each set of rules must match exactly one disk, and no
/// disk may be matched by two sets (the pool would hold it twice). The
/// first error names the rules (`[disk] members[1]`) and every disk.
pub fn select_all<'a>(
    profile: &Profile,
    select: &DiskSelect,
    facts: &'a Facts,
) -> Result<Vec<&'a BlockDevice>, SelectError> {
    let mut chosen: Vec<(String, &BlockDevice)> = Vec::new();
    for (label, sel) in selections(profile, select) {
        let d = select_disk_named(sel, &label, facts)?;
        if let Some((other, _)) = chosen.iter().find(|(_, c)| c.name == d.name) {
            return Err(SelectError {
                matching: 1,
                message: format!(
                    "disk {} is chosen by both the profile's {other} and {label} rules; the \
                     profile needs {} different disks: give each disk rules that match only it \
                     (a serial or wwn)",
                    describe(d),
                    selections(profile, select).len()
                ),
            });
        }
        chosen.push((label, d));
    }
    Ok(chosen.into_iter().map(|(_, d)| d).collect())
}

fn select_disk_named<'a>(
    sel: &DiskSelect,
    label: &str,
    facts: &'a Facts,
) -> Result<&'a BlockDevice, SelectError> {
    let mut matching = Vec::new();
    let mut report = String::new();
    for d in &facts.block_devices {
        match failed_rule(sel, d) {
            None => matching.push(d),
            Some(why) => {
                let _ = writeln!(report, "  {}: not chosen, {why}", describe(d));
            }
        }
    }
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(SelectError {
            matching: 0,
            message: format!(
                "no disk matches the profile's {label} rules; the disks here:\n{}",
                if report.is_empty() {
                    "  (none)\n".to_string()
                } else {
                    report
                }
            ),
        }),
        several => {
            for d in several {
                let _ = writeln!(report, "  {}: matches", describe(d));
            }
            Err(SelectError {
                matching: several.len(),
                message: format!(
                    "{} disks match the profile's {label} rules, refusing to guess; \
                     add a serial or wwn rule to pick one:\n{report}",
                    several.len()
                ),
            })
        }
    }
}

/// The plan for this profile on this machine.
pub fn plan(profile: &Profile, facts: &Facts) -> Result<Plan> {
    plan_with(profile, &profile.disk.select, facts)
}

/// The plan with other disk rules (a node's own) than `[disk] select` for
/// the first disk; `[disk] members` are the profile's. Every disk is
/// chosen ([`select_all`]) and checked (empty unless `wipe = "always"`,
/// sector size, room for the layout) before the plan is returned: any
/// refusal comes before anything is written to any disk.
pub fn plan_with(profile: &Profile, select: &DiskSelect, facts: &Facts) -> Result<Plan> {
    let mut chosen: Vec<BlockDevice> = select_all(profile, select, facts)?
        .into_iter()
        .cloned()
        .collect();
    // `zpool import NAME` on the installed system must find one pool of
    // each name.
    let pool_name = profile.pool.name.to_string();
    let all_names: Vec<String> = std::iter::once(pool_name.clone())
        .chain(profile.pools.iter().map(|p| p.name.to_string()))
        .collect();
    let other_pools: Vec<ZfsPoolLabel> = facts
        .block_devices
        .iter()
        .filter(|d| !chosen.iter().any(|c| c.name == d.name))
        .flat_map(|d| d.zfs_pools.iter().cloned())
        .collect();
    if let Some(old) = other_pools
        .iter()
        .find(|l| all_names.contains(&l.pool) && l.importable())
    {
        let holder = facts
            .block_devices
            .iter()
            .find(|d| d.zfs_pools.contains(old))
            .map_or(old.device.clone(), describe);
        let targets: Vec<String> = chosen.iter().map(describe).collect();
        let name = &old.pool;
        bail!(
            "{holder} holds an old ZFS pool named {name} on /dev/{} (pool GUID {}), the name of a pool \
             to be created on {}; the installed system imports {name} by name and would find two \
             (\"more than one matching pool\"), so nothing was written. Wipe the old pool from that disk \
             (`zpool labelclear -f /dev/{}`, or `wipefs -a` on its partitions), unplug it, or choose \
             another name in the profile's [pool] name (or [[pools]] name)",
            old.device,
            old.guid.as_deref().unwrap_or("?"),
            targets.join(" and "),
            old.device
        );
    }
    let root_disks = 1 + profile.disk.members.len();
    let mut whole = chosen.split_off(root_disks).into_iter();
    let mut take = |n: usize, pool: &str| -> Result<Vec<Member>> {
        let mut group = Vec::new();
        for disk in whole.by_ref().take(n) {
            let (wipe, partitions) = whole_layout(profile, &disk, pool)?;
            group.push(Member {
                wipe,
                logical_block_size: disk.logical_block_size,
                partitions,
                disk,
            });
        }
        // Members of one vdev (a mirror, a raidz) the same size.
        equal_zfs_partitions(&mut group);
        Ok(group)
    };
    let aux_of = |pool: &crate::profile::Pool,
                  take: &mut dyn FnMut(usize, &str) -> Result<Vec<Member>>|
     -> Result<Vec<AuxClass>> {
        let mut out = Vec::new();
        for (class, list) in pool.aux_classes() {
            if !list.is_empty() {
                out.push(AuxClass {
                    class,
                    disks: take(list.len(), &pool.name.to_string())?,
                });
            }
        }
        Ok(out)
    };
    let aux = aux_of(&profile.pool, &mut take)?;
    let mut data_pools = Vec::new();
    for pool in &profile.pools {
        let name = pool.name.to_string();
        let disks = take(pool.disks.len(), &name)?;
        let aux = aux_of(pool, &mut take)?;
        let datasets = crate::datasets::tree(pool)
            .map_err(|e| anyhow::anyhow!("profile key {}: {}", e.key, e.message))?;
        let (snapshots, zvols) = snapshots_and_zvols(pool);
        check_room(&name, pool.vdev, &disks, &zvols)?;
        data_pools.push(PoolPlan {
            name,
            vdev: pool.vdev,
            disks,
            aux,
            mounts: crate::datasets::mount_order(&datasets),
            datasets,
            snapshots,
            zvols,
        });
    }
    let datasets = crate::datasets::tree(&profile.pool)
        .map_err(|e| anyhow::anyhow!("profile key {}: {}", e.key, e.message))?;
    let mounts = crate::datasets::mount_order(&datasets);
    let mut disks = Vec::new();
    for (i, disk) in chosen.into_iter().enumerate() {
        let (wipe, partitions) = layout(profile, &disk, i)?;
        disks.push(Member {
            wipe,
            logical_block_size: disk.logical_block_size,
            partitions,
            disk,
        });
    }
    equal_zfs_partitions(&mut disks);
    check_room(
        &pool_name,
        profile.pool.vdev,
        &disks,
        &snapshots_and_zvols(&profile.pool).1,
    )?;
    let mut disks = disks.into_iter();
    let first = disks.next().context("no disk was chosen")?;
    Ok(Plan {
        disk: first.disk,
        wipe: first.wipe,
        logical_block_size: first.logical_block_size,
        partitions: first.partitions,
        datasets,
        mounts,
        other_pools,
        vdev: profile.pool.vdev,
        members: disks.collect(),
        snapshots: snapshots_and_zvols(&profile.pool).0,
        zvols: snapshots_and_zvols(&profile.pool).1,
        aux,
        data_pools,
    })
}

/// Refuses volumes that cannot fit in the pool, before anything is
/// written: their `volsize`s together (each reserves at least its volsize,
/// `refreservation`, zfsprops(7)) against an upper bound of the pool's
/// space: the data vdev's capacity (a mirror: one member; raidzN: all but
/// N members; the ZFS partitions, all of one size) less ZFS's slop space:
/// 1/32 of it, at most 128 GiB, and at least 128 MiB or half a smaller
/// pool (`spa_get_slop_space`: `spa_slop_shift`, `spa_max_slop`,
/// `spa_min_slop` in OpenZFS 2.1's `module/zfs/spa_misc.c`). Metadata and raidz padding
/// take more, so this refuses only what can never fit; `zfs create` still
/// has the last word.
fn check_room(pool: &str, vdev: Vdev, disks: &[Member], zvols: &[(String, u64)]) -> Result<()> {
    let wanted: u64 = zvols.iter().map(|(_, size)| size).sum();
    if wanted == 0 {
        return Ok(());
    }
    let member = disks
        .iter()
        .filter_map(|m| {
            m.partitions
                .iter()
                .find(|p| p.kind == PartKind::Zfs)
                .map(|p| p.sectors() * u64::from(m.logical_block_size))
        })
        .min()
        .unwrap_or(0);
    let n = disks.len() as u64;
    let raw = match vdev {
        Vdev::Single => member * n,
        Vdev::Mirror => member,
        Vdev::Raidz1 => member * n.saturating_sub(1),
        Vdev::Raidz2 => member * n.saturating_sub(2),
    };
    let slop = (raw / 32).min(128 << 30).max((raw / 2).min(128 << 20));
    let room = raw.saturating_sub(slop);
    if wanted > room {
        bail!(
            "the volumes of pool {pool} need {} ({wanted} bytes: {}) and the pool has at most {} \
             ({room} bytes: {} of ZFS partitions less ZFS's slop space); nothing was written. \
             Make the volumes smaller or the disks larger",
            human_bytes(wanted),
            zvols
                .iter()
                .map(|(n, s)| format!("{n} {}", human_bytes(*s)))
                .collect::<Vec<_>>()
                .join(", "),
            human_bytes(room),
            human_bytes(raw)
        );
    }
    Ok(())
}

/// A pool's snapshots (`POOL/DS@NAME`) and volumes (full name, volsize in
/// bytes), in profile order.
fn snapshots_and_zvols(pool: &crate::profile::Pool) -> (Vec<String>, Vec<(String, u64)>) {
    let name = pool.name.to_string();
    let snapshots = pool
        .datasets
        .iter()
        .flat_map(|d| {
            d.snapshots
                .iter()
                .map(|s| format!("{name}/{}@{s}", d.name.get_ref()))
                .collect::<Vec<_>>()
        })
        .collect();
    let zvols = pool
        .zvols
        .iter()
        .map(|z| (format!("{name}/{}", z.name.get_ref()), z.volsize.0))
        .collect();
    (snapshots, zvols)
}

/// A whole disk's checks and layout (a data pool's disk, or a `special`,
/// `log` or `cache` disk): empty unless `wipe = "always"`, as [`layout`]
/// checks, and one ZFS partition named after `pool` from 1 MiB to the last
/// 1 MiB boundary before the backup GPT.
fn whole_layout(
    profile: &Profile,
    disk: &BlockDevice,
    pool: &str,
) -> Result<(Vec<String>, Vec<PlannedPartition>)> {
    check_disk(profile, disk)?;
    let lbs = u64::from(disk.logical_block_size);
    let total = disk.size_bytes / lbs;
    let align = ALIGN_BYTES / lbs;
    let last_usable = total.saturating_sub(1 + 16384 / lbs + 1);
    let end = ((last_usable + 1) / align) * align;
    if end <= align || (end - align) * lbs < MIN_ZFS_BYTES {
        bail!(
            "disk {} is too small for pool {pool}: {} ({} bytes), ZFS needs at least {}; nothing was written",
            disk.name,
            human_bytes(disk.size_bytes),
            disk.size_bytes,
            human_bytes(MIN_ZFS_BYTES + 2 * ALIGN_BYTES)
        );
    }
    let partitions = vec![PlannedPartition {
        number: 1,
        name: pool.to_string(),
        kind: PartKind::Zfs,
        type_guid: ZFS_TYPE,
        first_lba: align,
        last_lba: end - 1,
    }];
    Ok((wipe_list(profile, disk), partitions))
}

/// What is wiped on `disk`: everything found, with `wipe = "always"` or an
/// unfinished install; nothing otherwise (an empty disk).
fn wipe_list(profile: &Profile, disk: &BlockDevice) -> Vec<String> {
    if profile.disk.wipe == Wipe::Always || disk.unfinished_install {
        disk.signatures.clone()
    } else {
        Vec::new()
    }
}

/// The checks of every disk: empty unless `wipe = "always"` (a disk that
/// holds nothing but an unfinished nodeflash install counts as empty), and
/// 512- or 4096-byte sectors.
fn check_disk(profile: &Profile, disk: &BlockDevice) -> Result<()> {
    // A disk that holds nothing but an unfinished nodeflash install (its
    // GPT carries the mark, `disk::UNFINISHED_NAME`) counts as empty.
    if !disk.signatures.is_empty() && profile.disk.wipe == Wipe::IfEmpty && !disk.unfinished_install
    {
        bail!(
            "disk {} is not empty ({}); nothing was written. Set `wipe = \"always\"` in the profile's [disk] to reinstall it",
            disk.name,
            disk.signatures.join(", ")
        );
    }
    let lbs = u64::from(disk.logical_block_size);
    if !(lbs == 512 || lbs == 4096) {
        bail!(
            "disk {} has a logical block size of {lbs} bytes; only 512 and 4096 are supported",
            disk.name
        );
    }
    Ok(())
}

/// Cuts every disk's ZFS partition to the bytes of the smallest one: the
/// pool's members are then the same size, as `zpool create` wants of a
/// mirror or raidz (it refuses members that differ by more than 16 MiB,
/// `ZPOOL_FUZZ` in OpenZFS's `cmd/zpool/zpool_vdev.c`), and the space a
/// larger disk would add is not usable in such a vdev anyway. Every ZFS
/// partition starts and ends on 1 MiB, so the cut keeps that alignment.
fn equal_zfs_partitions(disks: &mut [Member]) {
    let zfs_bytes = |m: &Member| {
        m.partitions
            .iter()
            .find(|p| p.kind == PartKind::Zfs)
            .map(|p| (p.last_lba + 1 - p.first_lba) * u64::from(m.logical_block_size))
    };
    let Some(smallest) = disks.iter().filter_map(zfs_bytes).min() else {
        return;
    };
    for m in disks.iter_mut() {
        let lbs = u64::from(m.logical_block_size);
        for p in m.partitions.iter_mut().filter(|p| p.kind == PartKind::Zfs) {
            p.last_lba = p.first_lba + smallest / lbs - 1;
        }
    }
}

/// The GPT name of the ESP or swap partition on the pool's disk `index`
/// (0 first): `ESP`, `ESP2`, `ESP3`…, so that every name is unique on the
/// machine and the installed system finds each by its partition label
/// (`/dev/disk/by-partlabel/ESP2`).
pub fn part_name(base: &str, index: usize) -> String {
    if index == 0 {
        base.to_string()
    } else {
        format!("{base}{}", index + 1)
    }
}

/// One disk's checks and layout: what is wiped, and the partitions (ESP,
/// swap, ZFS with the rest) at this disk's sector size; `index` is the
/// disk's place in the pool (names, [`part_name`]).
fn layout(
    profile: &Profile,
    disk: &BlockDevice,
    index: usize,
) -> Result<(Vec<String>, Vec<PlannedPartition>)> {
    check_disk(profile, disk)?;
    let lbs = u64::from(disk.logical_block_size);
    // The profile check refused what no disk can take; this disk's sector
    // size decides the rest (33 MiB with 512-byte sectors, 257 MiB with 4096).
    if let Some(why) = crate::disk::esp_fat32_problem(profile.disk.esp_size.0, lbs) {
        bail!(
            "the ESP ({}) cannot be FAT32 on disk {}, which has {lbs}-byte sectors: {why}; \
             nothing was written. Make `esp-size` in the profile's [disk] at least {}",
            profile.disk.esp_size,
            disk.name,
            crate::profile::Size(crate::disk::min_esp_bytes(lbs))
        );
    }
    let total = disk.size_bytes / lbs;
    let align = ALIGN_BYTES / lbs;
    // The backup GPT: header plus 16 KiB of entries at the end.
    let last_usable = total.saturating_sub(1 + 16384 / lbs + 1);
    let mut partitions = Vec::new();
    let mut next = align;
    let mut add = |name: &str, kind, type_guid, bytes: u64| {
        let first = next;
        let last = first + bytes.div_ceil(lbs) - 1;
        next = (last + 1).div_ceil(align) * align;
        partitions.push(PlannedPartition {
            number: u32::try_from(partitions.len() + 1).unwrap_or(u32::MAX),
            name: name.to_string(),
            kind,
            type_guid,
            first_lba: first,
            last_lba: last,
        });
    };
    add(
        &part_name("ESP", index),
        PartKind::Esp,
        ESP_TYPE,
        profile.disk.esp_size.0,
    );
    if let Some(swap) = profile.disk.swap_size {
        add(&part_name("swap", index), PartKind::Swap, SWAP_TYPE, swap.0);
    }
    // ZFS takes the rest, ending on a 1 MiB boundary.
    let first = next;
    let end = ((last_usable + 1) / align) * align;
    let zfs_bytes = end.saturating_sub(first) * lbs;
    if end <= first || zfs_bytes < MIN_ZFS_BYTES {
        let needed = first * lbs + MIN_ZFS_BYTES + ALIGN_BYTES;
        bail!(
            "disk {} is too small: {} ({} bytes), the layout needs at least {} (ESP {}, swap {}, ZFS at least {}); nothing was written",
            disk.name,
            human_bytes(disk.size_bytes),
            disk.size_bytes,
            human_bytes(needed),
            profile.disk.esp_size,
            profile.disk.swap_size.map_or("none".to_string(), |s| s.to_string()),
            human_bytes(MIN_ZFS_BYTES)
        );
    }
    let number = u32::try_from(partitions.len() + 1).unwrap_or(u32::MAX);
    partitions.push(PlannedPartition {
        number,
        name: profile.pool.name.to_string(),
        kind: PartKind::Zfs,
        type_guid: ZFS_TYPE,
        first_lba: first,
        last_lba: end - 1,
    });
    Ok((wipe_list(profile, disk), partitions))
}

impl Plan {
    /// The ZFS partition of each disk, as `/dev/…` paths, the first disk first.
    pub fn zfs_devices(&self) -> Vec<String> {
        self.each_disk()
            .iter()
            .filter_map(|p| {
                p.partitions
                    .iter()
                    .find(|x| x.kind == PartKind::Zfs)
                    .map(|x| {
                        format!(
                            "/dev/{}",
                            crate::disk::partition_name(&p.disk.name, x.number)
                        )
                    })
            })
            .collect()
    }

    /// The one disk's lines of the plan: the disk, what is wiped, the GPT.
    fn fmt_disk(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lbs = u64::from(self.logical_block_size);
        writeln!(f, "plan: install on {}", describe(&self.disk))?;
        if self.disk.unfinished_install {
            writeln!(
                f,
                "plan: the disk holds an unfinished nodeflash install (its GPT names the ESP {:?}): \
                 it counts as empty, even with `wipe = \"if-empty\"`, and is installed again",
                crate::disk::UNFINISHED_NAME
            )?;
        }
        if !self.wipe.is_empty() {
            writeln!(f, "plan: wipe what is there: {}", self.wipe.join(", "))?;
        } else if self.disk.contents_read {
            writeln!(f, "plan: the disk is empty")?;
        } else {
            // Never "empty" without having looked (captured facts without
            // the disk's contents).
            writeln!(
                f,
                "plan: what the disk holds is not known: these facts do not record its contents \
                 (`nodeflash facts` run as root does); the stick looks before it writes, and \
                 with `wipe = \"if-empty\"` refuses a disk that holds anything"
            )?;
        }
        writeln!(
            f,
            "plan: GPT, {} byte sectors, partitions aligned to 1 MiB:",
            lbs
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "plan:   {} {:<6} {:>4?} sectors {}-{} ({})",
                p.number,
                p.name,
                p.kind,
                p.first_lba,
                p.last_lba,
                human_bytes(p.sectors() * lbs)
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.members.is_empty() {
            self.fmt_disk(f)?;
        } else {
            let all = self.each_disk();
            for (i, p) in all.iter().enumerate() {
                writeln!(
                    f,
                    "plan: disk {} of {} of pool {}:",
                    i + 1,
                    all.len(),
                    self.pool_name()
                )?;
                p.fmt_disk(f)?;
            }
            writeln!(
                f,
                "plan: pool {}: one {} vdev of {} (the pool survives {} of {} disks lost); \
                 an ESP with the boot files on every disk, so that any of them boots",
                self.pool_name(),
                self.vdev.keyword().unwrap_or("single"),
                self.zfs_devices().join(", "),
                self.vdev.tolerates(all.len()),
                all.len()
            )?;
        }
        let root_whole: Vec<&Member> = self.aux.iter().flat_map(|c| &c.disks).collect();
        for (i, m) in root_whole.iter().enumerate() {
            writeln!(
                f,
                "plan: pool {} whole disk {} of {}:",
                self.pool_name(),
                i + 1,
                root_whole.len()
            )?;
            m.as_plan(self).fmt_disk(f)?;
        }
        for c in &self.aux {
            fmt_aux(f, c)?;
        }
        fmt_tree(
            f,
            &self.datasets,
            &self.mounts,
            &self.snapshots,
            &self.zvols,
        )?;
        if self.mounts.is_empty() {
            writeln!(f, "plan: no dataset is mounted")?;
        } else {
            writeln!(
                f,
                "plan: mounts, parents first: {}",
                mount_list(&self.mounts)
            )?;
        }
        for p in &self.data_pools {
            for (i, m) in p
                .disks
                .iter()
                .chain(p.aux.iter().flat_map(|c| &c.disks))
                .enumerate()
            {
                writeln!(
                    f,
                    "plan: data pool {} whole disk {} of {}:",
                    p.name,
                    i + 1,
                    p.disks.len() + p.aux.iter().map(|c| c.disks.len()).sum::<usize>()
                )?;
                m.as_plan(self).fmt_disk(f)?;
            }
            writeln!(
                f,
                "plan: data pool {}: one {} vdev of {} (the pool survives {} of {} disks lost); \
                 imported by the installed system",
                p.name,
                p.vdev.keyword().unwrap_or("single"),
                p.zfs_devices().join(", "),
                p.vdev.tolerates(p.disks.len()),
                p.disks.len()
            )?;
            for c in &p.aux {
                fmt_aux(f, c)?;
            }
            fmt_tree(f, &p.datasets, &p.mounts, &p.snapshots, &p.zvols)?;
            if !p.mounts.is_empty() {
                writeln!(
                    f,
                    "plan: pool {} mounts, parents first: {}",
                    p.name,
                    mount_list(&p.mounts)
                )?;
            }
        }
        for l in &self.other_pools {
            writeln!(
                f,
                "plan: another disk holds ZFS pool {} on /dev/{} (left alone)",
                l.pool, l.device
            )?;
        }
        Ok(())
    }
}

/// `plan:   special: mirror of A, B` and the like.
fn fmt_aux(f: &mut fmt::Formatter<'_>, c: &AuxClass) -> fmt::Result {
    let devices: Vec<String> = c.disks.iter().map(Member::zfs_device).collect();
    writeln!(
        f,
        "plan:   {}: {}{}",
        c.class,
        if devices.len() > 1 && c.class != "cache" {
            "mirror of "
        } else {
            ""
        },
        devices.join(", ")
    )
}

/// `/ (rpool), /nix (rpool/nix)`.
fn mount_list(mounts: &[Mounted]) -> String {
    let order: Vec<String> = mounts
        .iter()
        .map(|m| format!("{} ({})", m.mountpoint, m.dataset))
        .collect();
    order.join(", ")
}

/// A pool's datasets (effective values), snapshots and volumes.
fn fmt_tree(
    f: &mut fmt::Formatter<'_>,
    datasets: &[Effective],
    mounts: &[Mounted],
    snapshots: &[String],
    zvols: &[(String, u64)],
) -> fmt::Result {
    for d in datasets {
        let mounted = mounts.iter().any(|m| m.dataset == d.name);
        writeln!(
            f,
            "plan:   dataset {} mountpoint={}{} canmount={}{}",
            d.name,
            d.mountpoint,
            d.inherited_from
                .as_ref()
                .map_or(String::new(), |from| format!(" (inherited from {from})")),
            match d.canmount {
                crate::datasets::CanMount::On => "on",
                crate::datasets::CanMount::Off => "off",
                crate::datasets::CanMount::Noauto => "noauto",
            },
            match (&d.legacy_mount, mounted) {
                (Some(at), true) => format!(", mounted at {at} (mount -t zfs)"),
                (None, true) => ", mounted".to_string(),
                _ => String::new(),
            }
        )?;
    }
    for snap in snapshots {
        writeln!(
            f,
            "plan:   snapshot {snap}, taken before anything is written to it"
        )?;
    }
    for (name, size) in zvols {
        writeln!(
            f,
            "plan:   zvol {name} volsize={} ({size} bytes)",
            human_bytes(*size)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64, serial: &str) -> BlockDevice {
        BlockDevice {
            model: Some("QEMU NVMe Ctrl".into()),
            ..BlockDevice::fixed(name, gib << 30, 512, "nvme", serial)
        }
    }

    fn stick() -> BlockDevice {
        BlockDevice {
            bus: "usb".into(),
            removable: true,
            boot_medium: true,
            ..disk("sda", 1, "")
        }
    }

    fn profile() -> Profile {
        Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"NFTEST0001\" }\nesp-size = \"512MiB\"\nswap-size = \"256MiB\"\n[pool]\n",
            "t.toml",
        )
        .expect("profile")
    }

    fn facts(disks: Vec<BlockDevice>) -> Facts {
        Facts {
            block_devices: disks,
            ..Facts::default()
        }
    }

    #[test]
    fn layout_on_a_512_byte_disk() {
        let plan = plan(
            &profile(),
            &facts(vec![stick(), disk("nvme0n1", 2, "NFTEST0001")]),
        )
        .expect("plan");
        assert_eq!(plan.disk.name, "nvme0n1");
        let parts: Vec<(u32, PartKind, u64, u64)> = plan
            .partitions
            .iter()
            .map(|p| (p.number, p.kind, p.first_lba, p.last_lba))
            .collect();
        // 2 GiB = 4194304 sectors; the last 1 MiB holds the backup GPT.
        assert_eq!(
            parts,
            [
                (1, PartKind::Esp, 2048, 2048 + 1048576 - 1),
                (2, PartKind::Swap, 1050624, 1050624 + 524288 - 1),
                (3, PartKind::Zfs, 1574912, 4192255),
            ]
        );
        let text = plan.to_string();
        assert!(text.contains("plan: install on nvme0n1 (2.0 GiB"), "{text}");
    }

    #[test]
    fn layout_on_a_4kn_disk() {
        let mut d = disk("nvme0n1", 2, "NFTEST0001");
        d.logical_block_size = 4096;
        let plan = plan(&profile(), &facts(vec![d])).expect("plan");
        let p = &plan.partitions;
        assert_eq!((p[0].first_lba, p[0].last_lba), (256, 256 + 131072 - 1));
        assert_eq!(p[2].last_lba, 524288 - 256 - 1);
        assert!(p.iter().all(|p| (p.first_lba * 4096) % ALIGN_BYTES == 0
            && ((p.last_lba + 1) * 4096) % ALIGN_BYTES == 0));
    }

    #[test]
    fn no_swap_gives_two_partitions() {
        let mut prof = profile();
        prof.disk.swap_size = None;
        let plan = plan(&prof, &facts(vec![disk("nvme0n1", 2, "NFTEST0001")])).expect("plan");
        assert_eq!(
            plan.partitions.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [PartKind::Esp, PartKind::Zfs]
        );
    }

    #[test]
    fn ambiguous_match_is_refused_listing_every_candidate() {
        let err = plan(
            &profile(),
            &facts(vec![
                disk("nvme0n1", 2, "NFTEST0001"),
                disk("nvme1n1", 2, "NFTEST0001"),
            ]),
        )
        .expect_err("ambiguous");
        let msg = err.to_string();
        assert!(msg.contains("2 disks match"), "{msg}");
        assert!(msg.contains("nvme0n1") && msg.contains("nvme1n1"), "{msg}");
    }

    #[test]
    fn no_match_names_the_failed_rule_and_never_the_boot_medium() {
        let mut boot = disk("nvme1n1", 2, "NFTEST0001");
        boot.boot_medium = true;
        let err = plan(&profile(), &facts(vec![disk("nvme0n1", 2, "OTHER"), boot]))
            .expect_err("no match");
        let msg = err.to_string();
        assert!(
            msg.contains("nvme0n1") && msg.contains("serial \"OTHER\" is not \"NFTEST0001\""),
            "{msg}"
        );
        assert!(
            msg.contains("nvme1n1") && msg.contains("it is the boot medium"),
            "{msg}"
        );
    }

    #[test]
    fn the_plan_says_empty_only_after_looking() {
        let d = disk("nvme0n1", 8, "NFTEST0001");
        let text = plan(&profile(), &facts(vec![d.clone()]))
            .expect("plan")
            .to_string();
        assert!(!text.contains("is empty"), "{text}");
        assert!(
            text.contains("plan: what the disk holds is not known"),
            "{text}"
        );
        let looked = BlockDevice {
            contents_read: true,
            ..d
        };
        let text = plan(&profile(), &facts(vec![looked]))
            .expect("plan")
            .to_string();
        assert!(text.contains("plan: the disk is empty\n"), "{text}");
    }

    #[test]
    fn non_empty_disk_is_refused_unless_wipe_always() {
        let mut d = disk("nvme0n1", 2, "NFTEST0001");
        d.signatures = vec!["gpt partition table".into()];
        let err = plan(&profile(), &facts(vec![d.clone()])).expect_err("not empty");
        assert!(
            err.to_string().contains("not empty (gpt partition table)"),
            "{err}"
        );
        let mut prof = profile();
        prof.disk.wipe = Wipe::Always;
        let plan = plan(&prof, &facts(vec![d])).expect("wipe always");
        assert_eq!(plan.wipe, ["gpt partition table"]);
    }

    #[test]
    fn an_unfinished_nodeflash_install_counts_as_empty() {
        let mut d = disk("nvme0n1", 2, "NFTEST0001");
        d.signatures = vec![
            "GPT partition table".into(),
            "ZFS pool rpool on nvme0n1p3".into(),
        ];
        d.contents_read = true;
        d.unfinished_install = true;
        let plan = plan(&profile(), &facts(vec![d])).expect("if-empty installs it");
        assert_eq!(
            plan.wipe,
            ["GPT partition table", "ZFS pool rpool on nvme0n1p3"]
        );
        let text = plan.to_string();
        assert!(
            text.contains(
                "plan: the disk holds an unfinished nodeflash install (its GPT names the ESP \"nodeflash unfinished install\"): it counts as empty"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_esp_too_small_for_fat32_on_this_disks_sectors_is_refused_before_writing() {
        // 64 MiB passes the profile check (FAT32 with 512-byte sectors)...
        let prof = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"NFTEST0001\" }\nesp-size = \"64MiB\"\n",
            "t.toml",
        )
        .expect("64 MiB is FAT32 on 512-byte sectors");
        plan(&prof, &facts(vec![disk("nvme0n1", 2, "NFTEST0001")])).expect("512-byte disk");
        // ...and is refused on a 4Kn disk, naming the disk and the minimum.
        let mut d = disk("nvme0n1", 2, "NFTEST0001");
        d.logical_block_size = 4096;
        let err = plan(&prof, &facts(vec![d])).expect_err("4Kn disk");
        let msg = err.to_string();
        assert!(
            msg.contains("cannot be FAT32 on disk nvme0n1, which has 4096-byte sectors")
                && msg.contains("at least 257MiB")
                && msg.contains("nothing was written"),
            "{msg}"
        );
    }

    #[test]
    fn too_small_disk_is_refused() {
        let mut d = disk("nvme0n1", 0, "NFTEST0001");
        d.size_bytes = 512 << 20;
        let err = plan(&profile(), &facts(vec![d])).expect_err("too small");
        assert!(err.to_string().contains("too small"), "{err}");
    }

    #[test]
    fn size_and_bus_rules() {
        let sel = DiskSelect {
            bus: Some(Bus::Nvme),
            min_size: Some(crate::profile::Size(900_000_000_000)),
            max_size: Some(crate::profile::Size(1_100_000_000_000)),
            ..DiskSelect::default()
        };
        let mut big = disk("nvme0n1", 0, "A");
        big.size_bytes = 1_000_204_886_016;
        let mut sata = big.clone();
        sata.name = "sda".into();
        sata.bus = "ata".into();
        let f = facts(vec![big, sata, disk("nvme1n1", 256, "B")]);
        assert_eq!(select_disk(&sel, &f).expect("one disk").name, "nvme0n1");
    }

    #[test]
    fn an_old_pool_of_the_same_name_on_another_disk_is_refused() {
        // Issue 17 case 3: the new NVMe and an old SATA disk whose third
        // partition holds an exported rpool.
        let mut old = disk("sda", 2, "OLD");
        old.bus = "ata".into();
        old.zfs_pools = vec![ZfsPoolLabel {
            device: "sda3".into(),
            pool: "rpool".into(),
            guid: Some("42".into()),
            state: Some(1),
        }];
        let f = facts(vec![disk("nvme0n1", 2, "NFTEST0001"), old.clone()]);
        let msg = plan(&profile(), &f).expect_err("same name").to_string();
        for want in [
            "sda",
            "nvme0n1",
            "/dev/sda3",
            "rpool",
            "labelclear",
            "[pool] name",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        // Another name, or a destroyed pool, is only shown.
        old.zfs_pools[0].pool = "tank".into();
        let p = plan(
            &profile(),
            &facts(vec![disk("nvme0n1", 2, "NFTEST0001"), old.clone()]),
        )
        .expect("other name");
        assert!(
            p.to_string()
                .contains("another disk holds ZFS pool tank on /dev/sda3"),
            "{p}"
        );
        old.zfs_pools[0] = ZfsPoolLabel {
            pool: "rpool".into(),
            state: Some(2),
            ..old.zfs_pools[0].clone()
        };
        plan(
            &profile(),
            &facts(vec![disk("nvme0n1", 2, "NFTEST0001"), old]),
        )
        .expect("destroyed");
        // The pool on the disk being installed on is wiped, not a conflict.
        let mut target = disk("nvme0n1", 2, "NFTEST0001");
        target.zfs_pools = vec![ZfsPoolLabel {
            device: "nvme0n1p3".into(),
            pool: "rpool".into(),
            guid: None,
            state: Some(0),
        }];
        target.signatures = vec!["ZFS pool rpool on nvme0n1p3".into()];
        let mut prof = profile();
        prof.disk.wipe = Wipe::Always;
        plan(&prof, &facts(vec![target])).expect("own pool is wiped");
    }

    #[test]
    fn hidden_multipath_nodes_are_not_disks() {
        // Issue 17 case 7: nvme0c0n1 is a hidden path of nvme0n1.
        let mut path = disk("nvme0c0n1", 2, "NFTEST0001");
        path.hidden = true;
        path.wwn = Some("eui.0001".into());
        let mut whole = disk("nvme0n1", 2, "NFTEST0001");
        whole.wwn = Some("eui.0001".into());
        let p = plan(&profile(), &facts(vec![path.clone(), whole])).expect("one disk");
        assert_eq!(p.disk.name, "nvme0n1");
        let err = plan(&profile(), &facts(vec![path])).expect_err("only hidden");
        assert!(err.to_string().contains("hidden in sysfs"), "{err}");
    }

    #[test]
    fn usb_and_removable_disks_only_when_the_rule_names_their_bus() {
        // Issue 17 case 8: a size-only rule and an external USB SSD.
        let sel = DiskSelect {
            min_size: Some(crate::profile::Size(900_000_000_000)),
            ..DiskSelect::default()
        };
        let mut usb = disk("sdb", 0, "USBSSD");
        usb.size_bytes = 1_000_204_886_016;
        usb.bus = "usb".into();
        let f = facts(vec![usb.clone()]);
        let err = select_disk(&sel, &f).expect_err("usb refused");
        assert!(err.message.contains("it is on USB"), "{err}");
        assert!(err.message.contains("bus = \"usb\""), "{err}");
        let usb_rule = DiskSelect {
            bus: Some(Bus::Usb),
            ..sel.clone()
        };
        assert_eq!(select_disk(&usb_rule, &f).expect("named").name, "sdb");
        // A removable SD card needs bus = "mmc".
        let mut sd = usb.clone();
        sd.name = "mmcblk0".into();
        sd.bus = "mmc".into();
        sd.removable = true;
        let f = facts(vec![sd]);
        assert!(select_disk(&sel, &f).is_err());
        let mmc = DiskSelect {
            bus: Some(Bus::Mmc),
            ..sel
        };
        assert_eq!(select_disk(&mmc, &f).expect("mmc").name, "mmcblk0");
    }

    fn mirror_profile(extra: &str) -> Profile {
        Profile::parse(
            &format!(
                "name = \"t\"\n[disk]\nselect = {{ serial = \"A\" }}\nmembers = [ {{ serial = \"B\" }} ]\n\
                 esp-size = \"512MiB\"\nswap-size = \"256MiB\"\n[pool]\nvdev = \"mirror\"\n{extra}"
            ),
            "t.toml",
        )
        .expect("profile")
    }

    #[test]
    fn a_mirror_plans_the_same_layout_and_an_esp_on_every_disk() {
        let mut b = disk("nvme1n1", 3, "B");
        b.logical_block_size = 4096;
        let p = plan(
            &mirror_profile(""),
            &facts(vec![stick(), disk("nvme0n1", 2, "A"), b]),
        )
        .expect("plan");
        assert_eq!(p.disk_names(), ["nvme0n1", "nvme1n1"]);
        assert_eq!(p.vdev, Vdev::Mirror);
        let each = p.each_disk();
        let names: Vec<Vec<(&str, PartKind)>> = each
            .iter()
            .map(|d| {
                d.partitions
                    .iter()
                    .map(|x| (x.name.as_str(), x.kind))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            [
                vec![
                    ("ESP", PartKind::Esp),
                    ("swap", PartKind::Swap),
                    ("rpool", PartKind::Zfs)
                ],
                vec![
                    ("ESP2", PartKind::Esp),
                    ("swap2", PartKind::Swap),
                    ("rpool", PartKind::Zfs)
                ],
            ]
        );
        // Each disk's own sector size: the 4Kn disk's ESP starts at 256.
        assert_eq!(each[1].logical_block_size, 4096);
        assert_eq!(each[1].partitions[0].first_lba, 256);
        assert_eq!(p.zfs_devices(), ["/dev/nvme0n1p3", "/dev/nvme1n1p3"]);
        // A 2 GiB and a 3 GiB disk: both ZFS partitions the smaller's bytes.
        let zfs_bytes: Vec<u64> = each
            .iter()
            .map(|d| {
                let z = d.partitions.last().expect("zfs");
                (z.last_lba + 1 - z.first_lba) * u64::from(d.logical_block_size)
            })
            .collect();
        assert_eq!(zfs_bytes[0], zfs_bytes[1], "{zfs_bytes:?}");
        assert_eq!(zfs_bytes[0] % (1 << 20), 0);
        let z = plan(
            &mirror_profile("[[pool.datasets]]\nname = \"root\"\nsnapshots = [\"blank\"]\n[[pool.zvols]]\nname = \"root/vm\"\nvolsize = \"1GiB\"\n"),
            &facts(vec![disk("nvme0n1", 2, "A"), disk("nvme1n1", 2, "B")]),
        )
        .expect("plan")
        .to_string();
        assert!(
            z.contains(
                "plan:   snapshot rpool/root@blank, taken before anything is written to it\n"
            ),
            "{z}"
        );
        assert!(
            z.contains("plan:   zvol rpool/root/vm volsize=1.0 GiB (1073741824 bytes)\n"),
            "{z}"
        );
        let text = p.to_string();
        for want in [
            "plan: disk 1 of 2 of pool rpool:\nplan: install on nvme0n1",
            "plan: disk 2 of 2 of pool rpool:\nplan: install on nvme1n1",
            "plan: pool rpool: one mirror vdev of /dev/nvme0n1p3, /dev/nvme1n1p3 (the pool survives 1 of 2 disks lost); an ESP with the boot files on every disk",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
    }

    fn vdisk(name: &str, mib: u64, serial: &str) -> BlockDevice {
        BlockDevice::fixed(name, mib << 20, 512, "virtio", serial)
    }

    #[test]
    fn a_data_pool_plans_whole_disks_with_one_partition_each() {
        let prof = mirror_profile(
            "[[pools]]\nname = \"tank\"\nvdev = \"mirror\"\n\
             disks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n\
             special = [ { serial = \"S1\" }, { serial = \"S2\" } ]\ncache = [ { serial = \"C1\" } ]\n\
             [[pools.datasets]]\nname = \"media\"\nmountpoint = \"/srv/media\"\n\
             [[pools.zvols]]\nname = \"vm0\"\nvolsize = \"64MiB\"\n",
        );
        let machine = facts(vec![
            disk("nvme0n1", 2, "A"),
            disk("nvme1n1", 2, "B"),
            vdisk("vda", 600, "D1"),
            vdisk("vdb", 500, "D2"),
            vdisk("vdc", 200, "S1"),
            vdisk("vdd", 200, "S2"),
            vdisk("vde", 100, "C1"),
        ]);
        let p = plan(&prof, &machine).expect("plan");
        let tank = &p.data_pools[0];
        assert_eq!(tank.zfs_devices(), ["/dev/vda1", "/dev/vdb1"]);
        let words: Vec<Vec<String>> = tank.aux.iter().map(AuxClass::words).collect();
        assert_eq!(
            words,
            [
                vec!["special", "mirror", "/dev/vdc1", "/dev/vdd1"],
                vec!["cache", "/dev/vde1"]
            ]
        );
        // One partition from 1 MiB, the mirror's two the same size (the
        // smaller disk's), marked as an unfinished install while writing.
        let parts: Vec<(u64, u64)> = tank
            .disks
            .iter()
            .map(|m| (m.partitions[0].first_lba, m.partitions[0].last_lba))
            .collect();
        assert_eq!(parts[0], parts[1]);
        assert_eq!(parts[0].0, 2048);
        assert_eq!((parts[0].1 + 1) % 2048, 0);
        let whole: Vec<(String, String)> = p
            .whole_disks()
            .into_iter()
            .map(|(pool, d)| (pool, d.disk.name))
            .collect();
        assert_eq!(whole.len(), 5);
        assert!(whole.iter().all(|(pool, _)| pool == "tank"), "{whole:?}");
        assert_eq!(p.each_disk().len(), 2);
        let text = p.to_string();
        for want in [
            "plan: data pool tank whole disk 1 of 5:\nplan: install on vda",
            "plan: data pool tank: one mirror vdev of /dev/vda1, /dev/vdb1 (the pool survives 1 of 2 disks lost); imported by the installed system\n",
            "plan:   special: mirror of /dev/vdc1, /dev/vdd1\n",
            "plan:   cache: /dev/vde1\n",
            "plan:   dataset tank/media mountpoint=/srv/media canmount=on, mounted\n",
            "plan:   zvol tank/vm0 volsize=64.0 MiB (67108864 bytes)\n",
            "plan: pool tank mounts, parents first: /tank (tank), /srv/media (tank/media)\n",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
        // Every selection resolves before anything is planned: a data
        // disk missing, or matched by two rules, refuses the whole plan.
        let mut missing = machine.clone();
        missing.block_devices.retain(|d| d.name != "vdd");
        let e = plan(&prof, &missing).expect_err("S2 missing").to_string();
        assert!(
            e.contains("no disk matches the profile's [[pools]] tank special[1] rules"),
            "{e}"
        );
        let mut full = machine.clone();
        full.block_devices[4].signatures = vec!["ext4".into()];
        full.block_devices[4].contents_read = true;
        let e = plan(&prof, &full).expect_err("vdc holds ext4").to_string();
        assert!(e.contains("disk vdc is not empty (ext4)"), "{e}");
        let mut small = machine.clone();
        small.block_devices[6].size_bytes = 32 << 20;
        let e = plan(&prof, &small).expect_err("vde too small").to_string();
        assert!(e.contains("disk vde is too small for pool tank"), "{e}");
        let ambiguous = mirror_profile(
            "[[pools]]\nname = \"tank\"\ndisks = [ { bus = \"virtio\", min-size = \"150MiB\" } ]\n",
        );
        let e = plan(&ambiguous, &machine).expect_err("several").to_string();
        assert!(
            e.contains(
                "disks match the profile's [[pools]] tank disks[0] rules, refusing to guess"
            ),
            "{e}"
        );
    }

    #[test]
    fn volumes_larger_than_the_pool_are_refused_before_writing() {
        let prof = |size: &str| {
            mirror_profile(&format!(
                "[[pool.zvols]]\nname = \"vm\"\nvolsize = \"{size}\"\n"
            ))
        };
        let machine = facts(vec![disk("nvme0n1", 2, "A"), disk("nvme1n1", 3, "B")]);
        // 2 GiB disks less ESP and swap: about 1.2 GiB of mirror.
        plan(&prof("1GiB"), &machine).expect("fits");
        let e = plan(&prof("2GiB"), &machine)
            .expect_err("too big")
            .to_string();
        assert!(
            e.contains("the volumes of pool rpool need 2.0 GiB")
                && e.contains("rpool/vm 2.0 GiB")
                && e.contains("nothing was written"),
            "{e}"
        );
    }

    #[test]
    fn every_selection_resolves_or_nothing_is_planned() {
        let prof = mirror_profile("");
        // The member's disk is missing.
        let err = plan(&prof, &facts(vec![disk("nvme0n1", 2, "A")])).expect_err("no B");
        let msg = err.to_string();
        assert!(
            msg.contains("no disk matches the profile's [disk] members[0] rules")
                && msg.contains("serial \"A\" is not \"B\""),
            "{msg}"
        );
        // A member's rules match two disks.
        let prof = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { bus = \"nvme\", min-size = \"3GiB\" } ]\n[pool]\nvdev = \"mirror\"\n",
            "t.toml",
        )
        .expect("profile");
        let err = plan(
            &prof,
            &facts(vec![
                disk("nvme0n1", 2, "A"),
                disk("nvme1n1", 4, "B"),
                disk("nvme2n1", 4, "C"),
            ]),
        )
        .expect_err("ambiguous");
        assert!(
            err.to_string()
                .contains("2 disks match the profile's [disk] members[0] rules"),
            "{err}"
        );
        // One disk matched by two sets of rules.
        let err = plan(
            &prof,
            &facts(vec![disk("nvme0n1", 4, "A"), disk("nvme1n1", 2, "B")]),
        )
        .expect_err("same disk twice");
        assert!(
            err.to_string().contains(
                "disk nvme0n1 (4.0 GiB, model \"QEMU NVMe Ctrl\", serial \"A\", bus nvme) is chosen by both the profile's [disk] select and [disk] members[0] rules"
            ),
            "{err}"
        );
        // A member that is not empty is refused like the first disk.
        let mut b = disk("nvme1n1", 2, "B");
        b.signatures = vec!["ext4 file system".into()];
        let err = plan(
            &mirror_profile(""),
            &facts(vec![disk("nvme0n1", 2, "A"), b]),
        )
        .expect_err("B not empty");
        assert!(
            err.to_string()
                .contains("disk nvme1n1 is not empty (ext4 file system)"),
            "{err}"
        );
    }

    #[test]
    fn an_old_pool_on_a_member_is_wiped_and_one_elsewhere_refused() {
        let mut b = disk("nvme1n1", 2, "B");
        b.zfs_pools = vec![ZfsPoolLabel {
            device: "nvme1n1p3".into(),
            pool: "rpool".into(),
            guid: None,
            state: Some(0),
        }];
        b.signatures = vec!["ZFS pool rpool on nvme1n1p3".into()];
        let prof = mirror_profile("");
        let mut always = prof.clone();
        always.disk.wipe = Wipe::Always;
        let f = facts(vec![disk("nvme0n1", 2, "A"), b.clone()]);
        assert_eq!(
            plan(&always, &f).expect("member wiped").members[0].wipe,
            b.signatures
        );
        let mut c = b.clone();
        c.name = "sda".into();
        c.serial = Some("C".into());
        c.zfs_pools[0].device = "sda3".into();
        let f = facts(vec![disk("nvme0n1", 2, "A"), disk("nvme1n1", 2, "B"), c]);
        let msg = plan(&prof, &f).expect_err("old pool elsewhere").to_string();
        assert!(
            msg.contains("/dev/sda3") && msg.contains("nvme0n1") && msg.contains("nvme1n1"),
            "{msg}"
        );
    }

    #[test]
    fn the_plan_shows_effective_mountpoints_and_the_mount_order() {
        let prof = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"NFTEST0001\" }\n[pool]\n\
             root-options = { canmount = \"off\", mountpoint = \"none\" }\n\
             [[pool.datasets]]\nname = \"root\"\nmountpoint = \"/\"\n\
             [[pool.datasets]]\nname = \"root/nix\"\n",
            "t.toml",
        )
        .expect("profile");
        let p = plan(&prof, &facts(vec![disk("nvme0n1", 2, "NFTEST0001")])).expect("plan");
        assert_eq!(p.root().map(|m| m.dataset.as_str()), Some("rpool/root"));
        let text = p.to_string();
        assert!(
            text.contains("dataset rpool/root/nix mountpoint=/nix (inherited from rpool/root) canmount=on, mounted"),
            "{text}"
        );
        assert!(
            text.contains("mounts, parents first: / (rpool/root), /nix (rpool/root/nix)"),
            "{text}"
        );
    }
}
