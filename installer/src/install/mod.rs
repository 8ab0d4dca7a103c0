//! The install, phase by phase. Everything that can fail without writing
//! (machine identity, disk choice, network and keys, the payload's header,
//! manifest and frames) is settled before the disk is touched; the pool is
//! checked by exporting and importing it again and reading the store back;
//! the boot loader's entry is the last thing written to the ESP; the
//! install report records each phase.
//!
//! [`Install`] is the context: the profile, the image, the target root
//! (where the pools are mounted while they are written) and the phases
//! timed so far. Which phases run, in which order, is [`sequence`], a pure
//! function of the install's [`Shape`]; [`Install::start`] refuses a phase
//! that the sequence does not have next, so the order that the unit tests
//! check is the order that runs.

mod store;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::MsFlags;

use crate::cmd::run;
use crate::facts::Facts;
use crate::image::{ImageInfo, SYSTEMD_BOOT_PATH};
use crate::mount::Mounts;
use crate::profile::Profile;
use crate::report::{InstallReport, Phases};
use crate::say;

use store::{Copied, Source, Store};

/// Where the installed system is mounted while it is written: the pools'
/// altroot (`zpool create -R`).
const TARGET_ROOT: &str = "/mnt";

/// The install, from loading the kernel modules to the final export; an
/// error says what failed and whether anything was written.
pub(crate) fn install(profile: &Profile, info: &ImageInfo, started: Instant) -> Result<()> {
    Install::new(profile, info, Path::new(TARGET_ROOT), started).run()
}

/// A phase of the install, as the install report and the console name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    KernelModules,
    BootMediumAndDisks,
    IdentityAndPlan,
    NetworkAndKeys,
    PayloadCheck,
    PayloadPreRead,
    Partitioning,
    Pool,
    StoreCopy,
    Settings,
    ExportAndImport,
    StoreReadBack,
    PayloadReadTest,
    BootLoader,
    Report,
    FinalExport,
}

impl Phase {
    /// The phase's name in the report (`install_phases`) and on the console.
    fn name(self) -> &'static str {
        match self {
            Phase::KernelModules => "kernel modules",
            Phase::BootMediumAndDisks => "boot medium and disks",
            Phase::IdentityAndPlan => "identity and plan",
            Phase::NetworkAndKeys => "network and keys",
            Phase::PayloadCheck => "payload check",
            Phase::PayloadPreRead => "payload pre-read",
            Phase::Partitioning => "partitioning",
            Phase::Pool => "pool",
            Phase::StoreCopy => "store copy",
            Phase::Settings => "keys, settings and boot files",
            Phase::ExportAndImport => "export and import",
            Phase::StoreReadBack => "store read back",
            Phase::PayloadReadTest => "payload read test",
            Phase::BootLoader => "boot loader",
            Phase::Report => "report",
            Phase::FinalExport => "final export",
        }
    }
}

/// What decides which phases an install runs, known once the plan is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shape {
    /// The image carries a store payload (`[payload]`).
    store: bool,
    /// The image installs a boot loader (`[boot]`: systemd-boot and the
    /// system's kernel, or a NixOS system's own).
    boot_loader: bool,
    /// A dataset is mounted at `/`, so keys, settings and the report can
    /// be written.
    root_mounted: bool,
}

/// The phases common to every install, before the plan is known.
const BEFORE_PLAN: [Phase; 3] = [
    Phase::KernelModules,
    Phase::BootMediumAndDisks,
    Phase::IdentityAndPlan,
];

/// The phases of an install of this shape, in order: the checks (nothing
/// written), then the disks, then the checks of what was written, the boot
/// loader's entry and the report, and the final export last.
fn sequence(shape: Shape) -> Vec<Phase> {
    let mut s = BEFORE_PLAN.to_vec();
    s.extend([Phase::NetworkAndKeys, Phase::PayloadCheck]);
    if shape.store {
        s.push(Phase::PayloadPreRead);
    }
    s.extend([Phase::Partitioning, Phase::Pool]);
    if shape.store {
        s.push(Phase::StoreCopy);
    }
    s.extend([Phase::Settings, Phase::ExportAndImport]);
    if shape.store {
        s.extend([Phase::StoreReadBack, Phase::PayloadReadTest]);
    }
    if shape.boot_loader {
        s.push(Phase::BootLoader);
    }
    if shape.root_mounted {
        s.push(Phase::Report);
    }
    s.push(Phase::FinalExport);
    s
}

/// One install: what it reads, where it writes, how far it got.
struct Install<'a> {
    profile: &'a Profile,
    /// The image as built; [`Ready::info`] is this node's view of it.
    image: &'a ImageInfo,
    /// Where the new system is mounted while it is written (the altroot).
    root: &'a Path,
    /// When PID 1 started (the phases count from there).
    started: Instant,
    phases: Phases,
    /// The phases still to run ([`sequence`]), the next first.
    next: std::collections::VecDeque<Phase>,
    /// Warnings so far: on the console when they happen, then in the report.
    warnings: Vec<String>,
}

/// Everything settled before the disk is touched.
struct Ready {
    /// This node's view of the image ([`ImageInfo::for_node`]).
    info: ImageInfo,
    /// Which phases the install runs ([`sequence`]).
    shape: Shape,
    identity: crate::nodes::Identity,
    plan: crate::plan::Plan,
    hostid: u32,
    keys: crate::net::KeySet,
    /// The payload, checked whole; `None` when the image has none.
    store: Option<Store>,
    /// The pre-read's speed, MB/s (0 without a payload).
    read_mb_s: f64,
}

/// The disks as partitioned, in the plan's order: the root pool's members,
/// then every whole disk (root pool classes, data pools).
struct Written {
    /// The root pool's members (the plan of each).
    members: Vec<crate::plan::Plan>,
    /// Every whole disk with its pool's name.
    whole: Vec<(String, crate::plan::Plan)>,
    /// The layout of each disk, members first.
    layouts: Vec<crate::disk::Layout>,
    /// The ZFS partition of each member.
    zfs_devs: Vec<String>,
    /// The ESP of each member, the first disk's first.
    esp_devs: Vec<String>,
}

impl<'a> Install<'a> {
    fn new(profile: &'a Profile, image: &'a ImageInfo, root: &'a Path, started: Instant) -> Self {
        Install {
            profile,
            image,
            root,
            started,
            phases: Phases::new(started),
            next: BEFORE_PLAN.into(),
            warnings: Vec::new(),
        }
    }

    /// Starts timing `phase`; an error (nothing more is done) when the
    /// sequence does not have it next.
    fn start(&mut self, phase: Phase) -> Result<()> {
        match self.next.pop_front() {
            Some(next) if next == phase => {
                self.phases.start(phase.name());
                Ok(())
            }
            next => bail!(
                "internal error: the install reached phase {:?} where its sequence has {:?}",
                phase.name(),
                next.map(Phase::name)
            ),
        }
    }

    /// A warning: on the console now, and in the report.
    fn warn(&mut self, msg: impl Into<String>) {
        warn(&mut self.warnings, msg);
    }

    /// The whole install, phase by phase.
    fn run(mut self) -> Result<()> {
        let mut ready = self.prepare()?;
        let written = self.partition(&ready)?;
        self.start(Phase::Pool)?;
        self.create_pools(&ready, &written.zfs_devs)?;
        let copied = match ready.store.take() {
            Some(store) => {
                self.start(Phase::StoreCopy)?;
                Some(self.copy_store(store, ready.read_mb_s)?)
            }
            None => None,
        };
        self.start(Phase::Settings)?;
        let staged = self.write_settings(&ready, copied.as_ref())?;
        let mut report = self.report(&ready, &written);
        self.start(Phase::ExportAndImport)?;
        self.reimport(&ready.plan, &written, &mut report)?;
        // On a failure the pool stays imported: PID 1 saves the console on
        // it, then exports it.
        self.finish(
            &ready,
            &mut report,
            Finishing {
                copied: copied.as_ref(),
                staged: staged.as_deref(),
                esp_devs: &written.esp_devs,
            },
        )?;
        self.start(Phase::FinalExport)?;
        self.final_export(&written)?;
        let (list, total) = self.phases.finish();
        report.phases = list;
        report.total_secs = total;
        say!("{}", report.summary().trim_end());
        Ok(())
    }

    /// From the kernel modules to the payload pre-read: everything that can
    /// fail before the disk is touched. Nothing is written.
    fn prepare(&mut self) -> Result<Ready> {
        let (profile, image) = (self.profile, self.image);
        self.start(Phase::KernelModules)?;
        // Before the unsigned ZFS modules and before any disk is opened.
        crate::secureboot::refuse_if_enforced(image)?;
        crate::devices::load_modules(image);
        crate::devices::links_up();
        self.start(Phase::BootMediumAndDisks)?;
        let timeout = Duration::from_secs(profile.image.device_timeout_secs.into());
        // Netbooted: the payload comes over HTTP and there is no boot medium.
        let payload_url = store::payload_url();
        let boot = match &payload_url {
            Some(url) => {
                say!("boot medium: none (network boot; the store payload is at {url})");
                None
            }
            None => crate::devices::wait_for_boot_medium(image, timeout),
        };
        crate::devices::settle_block_devices(Duration::from_secs(3));
        let facts = crate::devices::wait_for_target(profile, boot.as_deref(), timeout);
        say!(
            "inventory after {:.1}s:\n{}",
            self.started.elapsed().as_secs_f64(),
            facts.inventory().trim_end()
        );
        if boot.is_none() && payload_url.is_none() {
            self.warn(format!(
                "the boot medium (volume set {}) was not found within {}s",
                image.volume_set_id(),
                timeout.as_secs()
            ));
        }
        say!(
            "nodeflash-facts: {}",
            serde_json::to_string(&facts).context("cannot serialize the facts")?
        );

        // Who this machine is and everything else that can fail is settled
        // before the disk is touched.
        self.start(Phase::IdentityAndPlan)?;
        let identity = crate::nodes::identify(profile, &facts)?;
        // With a system per node (a flake): this node's system and closure.
        let (info, system) = image.for_node(identity.node.as_deref());
        let select = identity
            .disk_select
            .as_ref()
            .unwrap_or(&profile.disk.select);
        let plan = crate::plan::plan_with(profile, select, &facts)?;
        let hostid =
            crate::zfs::resolve_hostid(identity.hostid, &facts, plan.disk.serial.as_deref())?;
        say!("node: {} ({})", identity.hostname, identity.reason);
        say!(
            "host id: {hostid:08x} (for a Morph/colmena manifest: networking.hostName = \"{}\"; networking.hostId = \"{hostid:08x}\";)",
            identity.hostname
        );
        say!("{}", plan.to_string().trim_end());
        // A flake built no system for a machine it did not know.
        image.refuse_generic_without_system(identity.node.as_deref(), &facts, hostid)?;
        let shape = Shape {
            store: info.payload.is_some(),
            boot_loader: info.boot.is_some(),
            root_mounted: plan.root().is_some(),
        };
        self.next = sequence(shape)
            .into_iter()
            .skip(BEFORE_PLAN.len())
            .collect();

        self.start(Phase::NetworkAndKeys)?;
        let keys = ssh_keys(profile, &identity)?;
        if keys.is_empty() {
            self.warn("no SSH keys: nobody can log in to this node over SSH");
        }
        self.start(Phase::PayloadCheck)?;
        if let Some(s) = &system {
            say!(
                "system: {} ({} store paths of its own closure)",
                s.toplevel,
                s.closure.len()
            );
        }
        let store = match &payload_url {
            Some(url) => store::open_store_http(profile, &info, url, system.as_ref())?,
            None => store::open_store(profile, &info, boot.as_deref(), system.as_ref())?,
        };
        let mut read_mb_s = 0.0;
        if let Some(store) = &store {
            self.start(Phase::PayloadPreRead)?;
            let checked = store::preread_store(store)?;
            read_mb_s = crate::units::mb_per_s(checked.bytes, checked.secs);
            self.phases.end_bytes(checked.bytes);
        }
        if info.boot.is_none() {
            self.warn("the profile has no [boot]: no boot loader is written");
        }
        Ok(Ready {
            info,
            identity,
            plan,
            hostid,
            keys,
            store,
            read_mb_s,
            shape,
        })
    }

    /// Checks that every planned disk is still the disk that was chosen
    /// (same kernel name, serial, model and size), opens each exclusively,
    /// then partitions them (phase "partitioning"). A disk that changed, is
    /// busy or is gone stops the install with nothing written.
    fn partition(&mut self, ready: &Ready) -> Result<Written> {
        let plan = &ready.plan;
        let now = Facts::read(Path::new("/sys"));
        // The root pool's disks first, then every whole disk (the root
        // pool's special, log and cache; the data pools).
        let members = plan.each_disk();
        let whole = plan.whole_disks();
        let all: Vec<&crate::plan::Plan> =
            members.iter().chain(whole.iter().map(|(_, p)| p)).collect();
        for d in &all {
            let same = now.block_devices.iter().any(|n| {
                n.name == d.disk.name
                    && n.serial == d.disk.serial
                    && n.model == d.disk.model
                    && n.size_bytes == d.disk.size_bytes
            });
            if !same {
                bail!(
                    "{} is no longer the disk that was planned for (serial {:?}); nothing was written. Boot the stick again",
                    d.disk.name,
                    d.disk.serial.as_deref().unwrap_or("")
                );
            }
        }
        // Every disk opened exclusively before the first is written.
        let opened = all
            .iter()
            .map(|d| crate::disk::open_for_writing(&Path::new("/dev").join(&d.disk.name)))
            .collect::<Result<Vec<_>>>()
            .context("nothing was written")?;
        self.start(Phase::Partitioning)?;
        let mut layouts = Vec::new();
        for (d, file) in all.iter().zip(opened) {
            let dev = Path::new("/dev").join(&d.disk.name);
            let old: Vec<(u64, u64)> = crate::disk::old_partitions(Path::new("/sys"), &d.disk.name)
                .into_iter()
                .map(|(_, start, len)| (start, len))
                .collect();
            let layout = crate::disk::partition_file(d, &dev, file, &old)?;
            let esp = if layout.esp_volume_id.is_empty() {
                String::new()
            } else {
                format!(", ESP FAT32 volume {}", layout.esp_volume_id)
            };
            say!(
                "partitioned {}: GPT disk GUID {}{esp}",
                dev.display(),
                layout.disk_guid
            );
            for p in &layout.partitions {
                say!("  {} {:?} partition GUID {}", p.device, p.kind, p.guid);
            }
            layouts.push(layout);
        }
        let part = |kind: crate::plan::PartKind, what: &str| -> Result<Vec<String>> {
            layouts[..members.len()]
                .iter()
                .map(|l| {
                    l.partitions
                        .iter()
                        .find(|p| p.kind == kind)
                        .map(|p| p.device.clone())
                        .with_context(|| format!("the plan has no {what}"))
                })
                .collect()
        };
        let zfs_devs = part(crate::plan::PartKind::Zfs, "ZFS partition")?;
        let esp_devs = part(crate::plan::PartKind::Esp, "ESP")?;
        Ok(Written {
            members,
            whole,
            layouts,
            zfs_devs,
            esp_devs,
        })
    }

    /// The root pool on `zfs_devs` and every data pool ([`create_pool`],
    /// [`create_data_pool`]).
    fn create_pools(&mut self, ready: &Ready, zfs_devs: &[String]) -> Result<()> {
        self.create_pool(ready, zfs_devs)?;
        for (pool, p) in self.profile.pools.iter().zip(&ready.plan.data_pools) {
            self.create_data_pool(pool, p)?;
        }
        Ok(())
    }

    /// The store into the new datasets ([`store::copy_store`]).
    fn copy_store(&mut self, store: Store, read_mb_s: f64) -> Result<Copied> {
        let store_dir = self.root.join(store::STORE_DIR);
        std::fs::create_dir_all(&store_dir)
            .with_context(|| format!("cannot create {}", store_dir.display()))?;
        crate::zfs::ensure_on_pool(&store_dir, &self.profile.pool.name.to_string())?;
        let mut copied = store::copy_store(store, self.root)?;
        copied.preread_mb_s = read_mb_s;
        self.phases.end_bytes(copied.manifest.bytes());
        Ok(copied)
    }

    /// Root's `authorized_keys`, `/etc/nixos/nodeflash.nix` and the store
    /// manifest on the root dataset (with a warning instead when no dataset
    /// is mounted at `/`); the system's kernel and initrd staged for the
    /// ESP. Returns where they were staged.
    fn write_settings(
        &mut self,
        ready: &Ready,
        copied: Option<&Copied>,
    ) -> Result<Option<PathBuf>> {
        let (root, pool) = (self.root, self.profile.pool.name.to_string());
        if ready.shape.root_mounted {
            for dir in ["root", "etc/nixos"] {
                crate::zfs::ensure_on_pool(&root.join(dir), &pool)?;
            }
            crate::net::keys::write_authorized_keys(root, &ready.keys)?;
            let data_pools: Vec<String> = self
                .profile
                .pools
                .iter()
                .map(|p| p.name.to_string())
                .collect();
            crate::nixos::write_module(
                root,
                &ready.identity.hostname,
                ready.hostid,
                &ready.keys,
                &data_pools,
            )?;
            say!(
                "wrote /root/.ssh/authorized_keys ({} keys) and {}",
                ready.keys.len(),
                crate::nixos::MODULE_PATH
            );
            if let Some(c) = copied {
                // For checking the store on the installed system later.
                crate::check::save_manifest(root, &c.manifest)?;
            }
        } else {
            self.warn("no dataset is mounted at /: no SSH keys or NixOS settings were written");
        }
        // A NixOS system installs its own kernel and initrd.
        ready
            .info
            .boot
            .as_ref()
            .filter(|b| b.nixos.is_none())
            .map(|b| stage_boot_files(b, root))
            .transpose()
    }

    /// The install report as far as it is known before the pool is
    /// imported again (the warnings so far are moved into it).
    fn report(&mut self, ready: &Ready, w: &Written) -> InstallReport {
        let info = &ready.info;
        let pool = self.profile.pool.name.to_string();
        let layout = &w.layouts[0];
        let disk = |d: &crate::plan::Plan| crate::report::DiskReport {
            name: d.disk.name.clone(),
            model: d.disk.model.clone(),
            serial: d.disk.serial.clone(),
            size_bytes: d.disk.size_bytes,
        };
        let pools = w
            .members
            .iter()
            .map(|_| &pool)
            .chain(w.whole.iter().map(|(name, _)| name));
        let disks = w.members.iter().chain(w.whole.iter().map(|(_, p)| p));
        InstallReport {
            nodeflash_version: info.version.clone(),
            profile: info.profile.clone(),
            image_id: info.image_id.clone(),
            kernel: info.kernel(),
            openzfs: info.openzfs().to_string(),
            node: crate::report::NodeReport {
                hostname: ready.identity.hostname.clone(),
                matched_by: ready.identity.reason.clone(),
            },
            hostid: format!("{:08x}", ready.hostid),
            disk: disk(&ready.plan),
            gpt_disk_guid: layout.disk_guid.to_string(),
            partitions: layout.partitions.iter().map(Into::into).collect(),
            esp_volume_id: layout.esp_volume_id.to_string(),
            disks: pools
                .zip(disks)
                .zip(&w.layouts)
                .map(|((pool, d), l)| crate::report::WrittenDisk {
                    pool: pool.clone(),
                    disk: disk(d),
                    gpt_disk_guid: l.disk_guid.to_string(),
                    partitions: l.partitions.iter().map(Into::into).collect(),
                })
                .collect(),
            pool: crate::report::PoolReport {
                name: pool.clone(),
                ..Default::default()
            },
            ssh_keys: ready.keys.keys.iter().map(Into::into).collect(),
            warnings: std::mem::take(&mut self.warnings),
            ..Default::default()
        }
    }

    /// The root pool exported and imported again, as the installed system
    /// will import it, with its special, log and cache partitions (a pool
    /// without its log device does not import without -m, one without its
    /// special device not at all); its GUID and datasets into the report.
    /// The pool stays imported.
    fn reimport(
        &mut self,
        plan: &crate::plan::Plan,
        w: &Written,
        report: &mut InstallReport,
    ) -> Result<()> {
        let root_devs: Vec<String> = w
            .zfs_devs
            .iter()
            .cloned()
            .chain(
                plan.aux
                    .iter()
                    .flat_map(|c| &c.disks)
                    .map(|m| m.zfs_device()),
            )
            .collect();
        let facts = check_pool(self.profile, &root_devs)?;
        report.pool.guid = facts
            .pool_properties
            .get("guid")
            .cloned()
            .unwrap_or_default();
        report.pool.datasets = facts.datasets;
        Ok(())
    }

    /// The pool exported; last, each disk marked finished in its GPT (the
    /// whole disks' ZFS partition, the members' ESP get their planned names).
    fn final_export(&mut self, w: &Written) -> Result<()> {
        run(Command::new("zpool").args(["export", &self.profile.pool.name.to_string()]))?;
        // Last: the disks no longer count as an unfinished install.
        for (pool, d) in &w.whole {
            let dev = Path::new("/dev").join(&d.disk.name);
            crate::disk::mark_finished(&dev, d.logical_block_size.into(), 1, pool)?;
            say!(
                "install finished: partition 1 of {} is named {pool:?} in the GPT (it was {:?})",
                dev.display(),
                crate::disk::UNFINISHED_NAME
            );
        }
        for d in &w.members {
            let dev = Path::new("/dev").join(&d.disk.name);
            let esp = d
                .partitions
                .iter()
                .find(|p| p.kind == crate::plan::PartKind::Esp)
                .context("the plan has no ESP")?;
            crate::disk::mark_finished(&dev, d.logical_block_size.into(), esp.number, &esp.name)?;
            say!(
                "install finished: the ESP of {} is named {:?} in the GPT (it was {:?})",
                dev.display(),
                esp.name,
                crate::disk::UNFINISHED_NAME
            );
        }
        Ok(())
    }

    /// With the pool imported again: the store read back, the payload's
    /// read speed, the boot loader (its entry last) and the install report,
    /// which covers everything but the final export.
    fn finish(&mut self, ready: &Ready, report: &mut InstallReport, f: Finishing) -> Result<()> {
        let (profile, root, info) = (self.profile, self.root, &ready.info);
        if let Some(c) = f.copied {
            self.start(Phase::StoreReadBack)?;
            let digest = store::check_store(profile, &c.manifest, root)?;
            self.start(Phase::PayloadReadTest)?;
            // Over the network, the pre-read was the plain read.
            let raw = match &c.source {
                Source::File(file) => store::raw_read_speed(file)?,
                Source::Http(_) => c.preread_mb_s,
            };
            report.payload = Some(store::report_store(c, raw, digest)?);
        }
        if let Some(toplevel) = info.boot.as_ref().and_then(|b| b.nixos.as_deref()) {
            self.start(Phase::BootLoader)?;
            say!("boot loader: the NixOS system {toplevel} installs its own");
            let mounted = self.mount_system()?;
            let done = crate::nixos::set_system_profile(root, toplevel).and_then(|()| {
                crate::nixos::install_boot_loader(root, Path::new(&f.esp_devs[0]), &|l| {
                    say!("  {l}")
                })
            });
            // The other disks' ESPs get the same files: any disk boots.
            let done = done.and_then(|w| {
                crate::nixos::mirror_esp(&f.esp_devs[0], &f.esp_devs[1..], &|l| say!("  {l}"))?;
                Ok(w)
            });
            let unmounted = mounted.unmount();
            for w in done? {
                warn(&mut report.warnings, w);
            }
            unmounted?;
            say!(
                "boot loader: installed by {toplevel}'s switch-to-configuration on {}",
                f.esp_devs.join(", ")
            );
        }
        if let (Some(bi), Some(staged)) = (&info.boot, f.staged) {
            self.start(Phase::BootLoader)?;
            let mut cmdline = bi.cmdline.clone();
            if bi.check {
                cmdline.push_str(&format!(" nodeflash.hostid={:08x}", ready.hostid));
            }
            let entry = crate::boot::BootEntry {
                id: "nodeflash".into(),
                title: format!("{} (installed by nodeflash)", report.node.hostname),
                kernel: staged.join("vmlinuz"),
                initrd: staged.join("initrd"),
                cmdline,
            };
            // On every disk's ESP, so that the node boots from any of them.
            let mut first = None;
            for esp in f.esp_devs {
                let files = crate::boot::install_systemd_boot(
                    Path::new(esp),
                    Path::new(SYSTEMD_BOOT_PATH),
                    &entry,
                )
                .with_context(|| format!("cannot install the boot loader on {esp}"))?;
                say!(
                    "boot loader: systemd-boot and entry {:?} on {esp} ({} files)",
                    entry.title,
                    files.files.len()
                );
                first.get_or_insert(files);
            }
            report.boot = first;
        }
        if ready.shape.root_mounted {
            self.start(Phase::Report)?;
            // Everything until now; the final export is only on the console.
            let mut list = self.phases.done().to_vec();
            let total = self.phases.elapsed();
            let sum: f64 = list.iter().map(|p| p.secs).sum();
            list.push(crate::report::phase(
                "report and other".into(),
                (total - sum).max(0.0),
                None,
            ));
            report.phases = list;
            report.total_secs = total.max(sum);
            self.write_report(report)?;
        }
        Ok(())
    }

    /// Host ID, root pool, datasets (the plan's mounts, under the target
    /// root), and `/etc/hostid` and `/etc/hostname` on the target when a
    /// dataset is mounted at `/`.
    fn create_pool(&mut self, ready: &Ready, devices: &[String]) -> Result<()> {
        use crate::zfs;
        let (profile, plan, root) = (self.profile, &ready.plan, self.root);
        zfs::set_live_hostid(ready.hostid)?;
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let aux: Vec<String> = plan.aux.iter().flat_map(|c| c.words()).collect();
        zfs::run_all(&zfs::create_commands(
            &profile.pool,
            &plan.mounts,
            devices,
            &aux,
            &root.to_string_lossy(),
        ))?;
        if ready.shape.root_mounted {
            let etc = root.join("etc");
            zfs::ensure_on_pool(&etc, &profile.pool.name.to_string())?;
            std::fs::create_dir_all(&etc)
                .with_context(|| format!("cannot create {} on the root dataset", etc.display()))?;
            for (name, text) in [
                ("hostid", zfs::hostid_file(ready.hostid).to_vec()),
                (
                    "hostname",
                    format!("{}\n", ready.identity.hostname).into_bytes(),
                ),
            ] {
                let path = etc.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        say!(
            "pool {} created on {}{} with {} datasets",
            profile.pool.name,
            match (devices.len(), plan.vdev.keyword()) {
                (2.., Some(kind)) => format!("{kind} "),
                _ => String::new(),
            },
            devices.join(" "),
            profile.pool.datasets.len()
        );
        Ok(())
    }

    /// A data pool (`[[pools]]`): created with its datasets, snapshots and
    /// volumes (its datasets mounted under the target root as they will be), exported,
    /// imported again without `-f` from its own partitions only (as the
    /// installed system will import it: the host ID in its labels is the
    /// node's, set before the root pool was created), its facts printed as a
    /// `nodeflash-pool:` line, and exported. Errors name the pool.
    fn create_data_pool(
        &self,
        pool: &crate::profile::Pool,
        p: &crate::plan::PoolPlan,
    ) -> Result<()> {
        let devices = p.zfs_devices();
        let aux: Vec<String> = p.aux.iter().flat_map(|c| c.words()).collect();
        crate::zfs::run_all(&crate::zfs::create_commands(
            pool,
            &p.mounts,
            &devices,
            &aux,
            &self.root.to_string_lossy(),
        ))
        .with_context(|| format!("cannot create data pool {}", p.name))?;
        say!(
            "data pool {} created on {}{}{} with {} datasets",
            p.name,
            match (devices.len(), p.vdev.keyword()) {
                (2.., Some(kind)) => format!("{kind} "),
                _ => String::new(),
            },
            devices.join(" "),
            if aux.is_empty() {
                String::new()
            } else {
                format!(" {}", aux.join(" "))
            },
            pool.datasets.len()
        );
        run(Command::new("zpool").args(["export", &p.name]))?;
        let mut import = Command::new("zpool");
        import.args(["import", "-N", "-o", "cachefile=none"]);
        let aux_devices = p.aux.iter().flat_map(|c| &c.disks).map(|m| m.zfs_device());
        for d in devices.iter().cloned().chain(aux_devices) {
            import.args(["-d", &d]);
        }
        run(import.arg(&p.name))
            .with_context(|| format!("the new data pool {} does not import without -f", p.name))?;
        let facts = crate::zfs::pool_facts(pool, &devices[0]);
        let exported = run(Command::new("zpool").args(["export", &p.name]));
        let facts = facts?;
        exported?;
        say!(
            "data pool {} exported; it imports without -f (pool host id {})",
            p.name,
            facts.hostid.as_deref().unwrap_or("?")
        );
        say!(
            "nodeflash-pool: {}",
            serde_json::to_string(&facts).context("cannot serialize the pool facts")?
        );
        Ok(())
    }

    /// Mounts what the installed system mounts under the target root, in its order
    /// ([`crate::datasets::mounts`]; the pool is imported without mounting);
    /// returns the guard of those mounts.
    fn mount_system(&self) -> Result<Mounts> {
        let mut mounts = Mounts::default();
        for crate::datasets::Mounted {
            dataset,
            mountpoint,
            ..
        } in crate::datasets::mounts(&self.profile.pool)
        {
            let target = self.root.join(mountpoint.trim_start_matches('/'));
            mounts.zfs(&dataset, target, MsFlags::empty())?;
        }
        Ok(mounts)
    }

    /// Writes the install report on the root dataset (the pool is imported).
    fn write_report(&self, report: &InstallReport) -> Result<()> {
        let (profile, root) = (self.profile, self.root);
        let (dataset, _) = dataset_holding(profile, "/").context("no dataset is mounted at /")?;
        let mut mounts = Mounts::default();
        mounts.zfs(&dataset, root, MsFlags::empty())?;
        let written = crate::zfs::ensure_on_pool(root, &profile.pool.name.to_string())
            .and_then(|()| report.write(root))
            .and_then(|()| {
                let log = crate::console::log();
                crate::report::write_log(root, crate::report::INSTALL_LOG, &log).map(drop)
            });
        let unmounted = mounts.unmount();
        written.context("cannot write the install report")?;
        unmounted?;
        say!(
            "install report: /{}/{}",
            crate::report::LOG_DIR,
            crate::report::REPORT_JSON
        );
        Ok(())
    }
}

/// What [`Install::finish`] needs from the install.
struct Finishing<'a> {
    copied: Option<&'a Copied>,
    staged: Option<&'a Path>,
    /// The ESP of every disk of the pool, the first disk's first.
    esp_devs: &'a [String],
}

/// A warning: on the console now, and in `warnings` (the report's).
fn warn(warnings: &mut Vec<String>, msg: impl Into<String>) {
    let msg = msg.into();
    say!("warning: {msg}");
    warnings.push(msg);
}

/// Exports the pool and imports it again as the installed system will
/// (without -f); returns its facts. The pool stays imported.
fn check_pool(profile: &Profile, devices: &[String]) -> Result<crate::zfs::PoolFacts> {
    let pool = profile.pool.name.to_string();
    run(Command::new("zpool").args(["export", &pool]))?;
    let mut import = Command::new("zpool");
    import.args(["import", "-N", "-o", "cachefile=none"]);
    // Look only at the new partitions: another disk may hold a pool of the same name.
    for d in devices {
        import.args(["-d", d]);
    }
    run(import.arg(&pool)).context("the new pool does not import without -f")?;
    let facts = crate::zfs::pool_facts(&profile.pool, &devices[0]);
    let facts = match facts {
        Ok(f) => f,
        Err(e) => {
            let _ = run(Command::new("zpool").args(["export", &pool]));
            return Err(e);
        }
    };
    say!(
        "pool {pool} exported; it imports without -f (pool host id {})",
        facts.hostid.as_deref().unwrap_or("?")
    );
    say!(
        "nodeflash-pool: {}",
        serde_json::to_string(&facts).context("cannot serialize the pool facts")?
    );
    Ok(facts)
}

/// The mounted dataset whose mountpoint holds `path` (the longest prefix),
/// and that mountpoint, from [`crate::datasets::mounts`].
fn dataset_holding(profile: &Profile, path: &str) -> Option<(String, String)> {
    crate::datasets::holding(&crate::datasets::mounts(&profile.pool), path)
        .map(|m| (m.dataset.clone(), m.mountpoint.clone()))
}

/// After a failure: when the pool is imported, writes the console (the
/// failure included) to `/var/log/nodeflash/install-failed.log` on its
/// root dataset and exports the pool, so that the disk holds the reason and
/// the pool imports without `-f` on the next attempt. Returns the log's
/// path on the pool; an error when the pool was there but the log could
/// not be written. Nothing is made bootable here.
pub(crate) fn keep_failure_log(profile: &Profile) -> Result<Option<String>> {
    let pool = profile.pool.name.to_string();
    // Without the ZFS module no pool can be imported (a refusal before the
    // modules were loaded): `zpool` would only try to load it.
    if !Path::new("/dev/zfs").exists() {
        return Ok(None);
    }
    // A data pool left imported by the failure: exported, so that it is
    // not held (it imports without -f again anyway: same host ID).
    for p in &profile.pools {
        let name = p.name.to_string();
        if run(Command::new("zpool").args(["list", "-H", "-o", "name", &name])).is_ok() {
            let _ = run(Command::new("zpool").args(["export", &name]));
        }
    }
    // Fails when the pool is not imported (it was exported, or never made).
    if run(Command::new("zpool").args(["list", "-H", "-o", "name", &pool])).is_err() {
        return Ok(None);
    }
    let written = write_failure_log(profile);
    let exported = run(Command::new("zpool").args(["export", &pool]));
    let path = written?;
    exported?;
    Ok(Some(path))
}

/// The console on the root dataset of the imported pool, mounted for it
/// when it is not; returns where it is on the pool.
fn write_failure_log(profile: &Profile) -> Result<String> {
    let (root, mountpoint) = dataset_holding(profile, "/").context("no dataset is mounted at /")?;
    let out =
        run(Command::new("zfs").args(["get", "-H", "-o", "value", "mounted,mountpoint", &root]))?;
    let mut values = out.lines();
    let (mounted, at) = (values.next() == Some("yes"), values.next().unwrap_or(""));
    // A legacy root is mounted where the profile says, not at a property.
    let mounted = mounted && at.starts_with('/');
    let mut mounts = Mounts::default();
    let dir = if mounted {
        PathBuf::from(at)
    } else {
        let dir = PathBuf::from("/run/nodeflash/failed");
        mounts.zfs(&root, &dir, MsFlags::empty())?;
        dir
    };
    let path = crate::report::write_log(&dir, crate::report::FAILED_LOG, &crate::console::log());
    mounts.unmount()?;
    path?;
    Ok(format!(
        "{root}:{}",
        Path::new(&mountpoint)
            .join(crate::report::LOG_DIR)
            .join(crate::report::FAILED_LOG)
            .display()
    ))
}

/// Copies the system's kernel and initrd out of the store under `root`
/// before the pool is exported, for the ESP; returns the directory.
fn stage_boot_files(boot: &crate::image::BootInfo, root: &Path) -> Result<PathBuf> {
    let dir = PathBuf::from("/run/nodeflash/boot");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, path) in [("vmlinuz", &boot.kernel), ("initrd", &boot.initrd)] {
        let src = root.join(store::STORE_DIR).join(path);
        std::fs::copy(&src, dir.join(name)).with_context(|| {
            format!("cannot copy the installed system's {name} /nix/store/{path}")
        })?;
    }
    Ok(dir)
}

/// Root's SSH keys: the profile's and the node's inline keys, and the
/// users' keys fetched over HTTPS (network up first), all before the disk
/// is touched.
fn ssh_keys(profile: &Profile, identity: &crate::nodes::Identity) -> Result<crate::net::KeySet> {
    let mut ssh = profile.ssh.clone();
    ssh.keys.extend(identity.keys.iter().cloned());
    let cas = ca_certificates()?;
    let not_before = std::time::UNIX_EPOCH + Duration::from_secs(crate::image::NOT_BEFORE_UNIX);
    let keys = crate::net::fetch_keys(&ssh, &cas, not_before, |l| say!("{l}"))
        .context("the SSH keys could not be fetched; nothing was written")?;
    Ok(keys)
}

/// The profile's CA certificates (PEM) that the builder put in the image.
fn ca_certificates() -> Result<Vec<Vec<u8>>> {
    let mut cas: Vec<PathBuf> = std::fs::read_dir(crate::image::CA_DIR)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    cas.sort();
    cas.iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{sequence, Phase, Shape, BEFORE_PLAN};

    /// Every shape an install can have.
    fn shapes() -> Vec<Shape> {
        (0..8)
            .map(|bits| Shape {
                store: bits & 1 != 0,
                boot_loader: bits & 2 != 0,
                root_mounted: bits & 4 != 0,
            })
            .collect()
    }

    /// Whether a phase writes to a disk: all but the checks.
    fn writes(p: &Phase) -> bool {
        !matches!(
            p,
            Phase::KernelModules
                | Phase::BootMediumAndDisks
                | Phase::IdentityAndPlan
                | Phase::NetworkAndKeys
                | Phase::PayloadCheck
                | Phase::PayloadPreRead
        )
    }

    fn position(s: &[Phase], phase: Phase) -> Option<usize> {
        s.iter().position(|&p| p == phase)
    }

    #[test]
    fn every_check_comes_before_the_first_write() {
        for shape in shapes() {
            let s = sequence(shape);
            let first_write = s.iter().position(writes).expect("a phase writes");
            assert_eq!(s[first_write], Phase::Partitioning, "{shape:?}");
            assert!(s[first_write..].iter().all(writes), "{shape:?}: {s:?}");
            assert_eq!(s[..BEFORE_PLAN.len()], BEFORE_PLAN, "{shape:?}");
            for check in [Phase::NetworkAndKeys, Phase::PayloadCheck] {
                assert!(
                    position(&s, check).is_some_and(|i| i < first_write),
                    "{shape:?}"
                );
            }
            // The payload is read whole and checked before the disk.
            assert_eq!(
                position(&s, Phase::PayloadPreRead).map(|i| i < first_write),
                shape.store.then_some(true),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn the_boot_loader_comes_after_the_pool_and_the_store_are_checked() {
        for shape in shapes() {
            let s = sequence(shape);
            let Some(boot) = position(&s, Phase::BootLoader) else {
                assert!(!shape.boot_loader, "{shape:?}");
                continue;
            };
            assert!(
                position(&s, Phase::ExportAndImport) < Some(boot),
                "{shape:?}"
            );
            if shape.store {
                assert!(position(&s, Phase::StoreCopy) < Some(boot), "{shape:?}");
                assert!(position(&s, Phase::StoreReadBack) < Some(boot), "{shape:?}");
            } else {
                assert_eq!(position(&s, Phase::StoreCopy), None, "{shape:?}");
            }
        }
    }

    #[test]
    fn the_report_is_written_only_on_a_root_dataset_and_the_final_export_is_last() {
        for shape in shapes() {
            let s = sequence(shape);
            assert_eq!(s.last(), Some(&Phase::FinalExport), "{shape:?}");
            assert_eq!(position(&s, Phase::Report).is_some(), shape.root_mounted);
            if let Some(report) = position(&s, Phase::Report) {
                assert_eq!(report, s.len() - 2, "{shape:?}: everything but the export");
            }
            // No phase twice, so its time in the report is its own.
            let mut names: Vec<&str> = s.iter().map(|p| p.name()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), s.len(), "{shape:?}");
        }
    }

    #[test]
    fn the_full_sequence_is_the_documented_one() {
        let s = sequence(Shape {
            store: true,
            boot_loader: true,
            root_mounted: true,
        });
        let names: Vec<&str> = s.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "kernel modules",
                "boot medium and disks",
                "identity and plan",
                "network and keys",
                "payload check",
                "payload pre-read",
                "partitioning",
                "pool",
                "store copy",
                "keys, settings and boot files",
                "export and import",
                "store read back",
                "payload read test",
                "boot loader",
                "report",
                "final export",
            ]
        );
    }
}
