//! The install, step by step. Everything that can fail without writing
//! (machine identity, disk choice, network and keys, the payload's header
//! and manifest) is settled before the disk is touched; the pool is checked
//! by exporting and importing it again and reading the store back; the boot
//! loader's entry is the last thing written to the ESP; the install report
//! records each phase.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::cmd::run;
use crate::facts::Facts;
use crate::image::{ImageInfo, SYSTEMD_BOOT_PATH};
use crate::mount::Mounts;
use crate::payload::Payload;
use crate::profile::Profile;
use crate::progress::{Output, Progress};
use crate::report::{InstallReport, Phases};
use crate::say;

/// The install, from loading the kernel modules to the final export.
pub(crate) fn install(profile: &Profile, info: &ImageInfo, started: Instant) -> Result<()> {
    let mut phases = Phases::new(started);
    phases.start("kernel modules");
    // Before the unsigned ZFS modules and before any disk is opened.
    crate::secureboot::refuse_if_enforced(info)?;
    crate::devices::load_modules(info);
    crate::devices::links_up();
    phases.start("boot medium and disks");
    let timeout = Duration::from_secs(profile.image.device_timeout_secs.into());
    // Netbooted: the payload comes over HTTP and there is no boot medium.
    let payload_url = payload_url();
    let boot = match &payload_url {
        Some(url) => {
            say!("boot medium: none (network boot; the store payload is at {url})");
            None
        }
        None => crate::devices::wait_for_boot_medium(info, timeout),
    };
    crate::devices::settle_block_devices(Duration::from_secs(3));
    let facts = crate::devices::wait_for_target(profile, boot.as_deref(), timeout);
    say!(
        "inventory after {:.1}s:\n{}",
        started.elapsed().as_secs_f64(),
        facts.inventory().trim_end()
    );
    let mut warnings = Vec::new();
    if boot.is_none() && payload_url.is_none() {
        warn(
            &mut warnings,
            format!(
                "the boot medium (volume set {}) was not found within {}s",
                info.volume_set_id(),
                timeout.as_secs()
            ),
        );
    }
    say!(
        "nodeflash-facts: {}",
        serde_json::to_string(&facts).context("cannot serialize the facts")?
    );

    // Who this machine is and everything else that can fail is settled
    // before the disk is touched.
    phases.start("identity and plan");
    let identity = crate::nodes::identify(profile, &facts)?;
    // With a system per node (a flake): this node's system and closure.
    let (node_info, system) = info.for_node(identity.node.as_deref());
    let image = info;
    let info = &node_info;
    let select = identity
        .disk_select
        .as_ref()
        .unwrap_or(&profile.disk.select);
    let plan = crate::plan::plan_with(profile, select, &facts)?;
    let hostid = crate::zfs::resolve_hostid(identity.hostid, &facts, plan.disk.serial.as_deref())?;
    say!("node: {} ({})", identity.hostname, identity.reason);
    say!(
        "host id: {hostid:08x} (for a Morph/colmena manifest: networking.hostName = \"{}\"; networking.hostId = \"{hostid:08x}\";)",
        identity.hostname
    );
    say!("{}", plan.to_string().trim_end());
    // A flake built no system for a machine it did not know.
    image.refuse_generic_without_system(identity.node.as_deref(), &facts, hostid)?;
    phases.start("network and keys");
    let keys = ssh_keys(profile, &identity)?;
    if keys.is_empty() {
        warn(
            &mut warnings,
            "no SSH keys: nobody can log in to this node over SSH",
        );
    }
    phases.start("payload check");
    if let Some(s) = &system {
        say!(
            "system: {} ({} store paths of its own closure)",
            s.toplevel,
            s.closure.len()
        );
    }
    let mut read_mb_s = 0.0;
    let store = match &payload_url {
        Some(url) => open_store_http(profile, info, url, system.as_ref())?,
        None => open_store(profile, info, boot.as_deref(), system.as_ref())?,
    };
    if let Some(store) = &store {
        phases.start("payload pre-read");
        let checked = preread_store(store)?;
        read_mb_s = crate::units::mb_per_s(checked.bytes, checked.secs);
        phases.end_bytes(checked.bytes);
    }
    if info.boot.is_none() {
        warn(
            &mut warnings,
            "the profile has no [boot]: no boot loader is written",
        );
    }

    // The plan names the disk by its kernel name: make sure that name still
    // is the disk that was chosen (same serial, model and size) right before writing.
    // Every disk of the pool, before the first is written.
    let now = Facts::read(Path::new("/sys"));
    let disks = plan.each_disk();
    // The root pool's disks first, then every whole disk (the root pool's
    // special, log and cache; the data pools).
    let whole = plan.whole_disks();
    let all: Vec<&crate::plan::Plan> = disks.iter().chain(whole.iter().map(|(_, p)| p)).collect();
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
    // Every disk opened exclusively before the first is written: one that
    // is busy or gone stops the install with nothing written.
    let opened = all
        .iter()
        .map(|d| crate::disk::open_for_writing(&Path::new("/dev").join(&d.disk.name)))
        .collect::<Result<Vec<_>>>()
        .context("nothing was written")?;
    phases.start("partitioning");
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
    let part = |layout: &crate::disk::Layout, kind: crate::plan::PartKind| {
        layout
            .partitions
            .iter()
            .find(|p| p.kind == kind)
            .map(|p| p.device.clone())
    };
    let zfs_devs: Vec<String> = layouts[..disks.len()]
        .iter()
        .map(|l| part(l, crate::plan::PartKind::Zfs).context("the plan has no ZFS partition"))
        .collect::<Result<_>>()?;
    let esp_devs: Vec<String> = layouts[..disks.len()]
        .iter()
        .map(|l| part(l, crate::plan::PartKind::Esp).context("the plan has no ESP"))
        .collect::<Result<_>>()?;
    let layout = &layouts[0];

    phases.start("pool");
    let pool = profile.pool.name.to_string();
    let root_mounted = create_pool(profile, &plan, &identity.hostname, hostid, &zfs_devs)?;
    for (pool, p) in profile.pools.iter().zip(&plan.data_pools) {
        create_data_pool(pool, p)?;
    }
    let copied = match store {
        Some(store) => {
            phases.start("store copy");
            std::fs::create_dir_all(STORE_DIR)
                .with_context(|| format!("cannot create {STORE_DIR}"))?;
            crate::zfs::ensure_on_pool(Path::new(STORE_DIR), &pool)?;
            let mut copied = copy_store(store)?;
            copied.preread_mb_s = read_mb_s;
            phases.end_bytes(copied.manifest.bytes());
            Some(copied)
        }
        None => None,
    };
    phases.start("keys, settings and boot files");
    if root_mounted {
        for dir in ["/mnt/root", "/mnt/etc/nixos"] {
            crate::zfs::ensure_on_pool(Path::new(dir), &pool)?;
        }
        crate::net::keys::write_authorized_keys(Path::new("/mnt"), &keys)?;
        let data_pools: Vec<String> = profile.pools.iter().map(|p| p.name.to_string()).collect();
        crate::nixos::write_module(
            Path::new("/mnt"),
            &identity.hostname,
            hostid,
            &keys,
            &data_pools,
        )?;
        say!(
            "wrote /root/.ssh/authorized_keys ({} keys) and {}",
            keys.len(),
            crate::nixos::MODULE_PATH
        );
    } else {
        warn(
            &mut warnings,
            "no dataset is mounted at /: no SSH keys or NixOS settings were written",
        );
    }
    if let (true, Some(c)) = (root_mounted, &copied) {
        // For checking the store on the installed system later.
        crate::check::save_manifest(Path::new("/mnt"), &c.manifest)?;
    }
    // A NixOS system installs its own kernel and initrd.
    let staged = info
        .boot
        .as_ref()
        .filter(|b| b.nixos.is_none())
        .map(stage_boot_files)
        .transpose()?;

    let mut report = InstallReport {
        nodeflash_version: info.version.clone(),
        profile: info.profile.clone(),
        image_id: info.image_id.clone(),
        kernel: info.kernel(),
        openzfs: info.openzfs().to_string(),
        node: crate::report::NodeReport {
            hostname: identity.hostname.clone(),
            matched_by: identity.reason.clone(),
        },
        hostid: format!("{hostid:08x}"),
        disk: crate::report::DiskReport {
            name: plan.disk.name.clone(),
            model: plan.disk.model.clone(),
            serial: plan.disk.serial.clone(),
            size_bytes: plan.disk.size_bytes,
        },
        gpt_disk_guid: layout.disk_guid.to_string(),
        partitions: layout.partitions.iter().map(Into::into).collect(),
        esp_volume_id: layout.esp_volume_id.to_string(),
        disks: all
            .iter()
            .zip(&layouts)
            .enumerate()
            .map(|(i, (d, l))| crate::report::WrittenDisk {
                pool: match i.checked_sub(disks.len()) {
                    None => pool.clone(),
                    Some(w) => whole[w].0.clone(),
                },
                disk: crate::report::DiskReport {
                    name: d.disk.name.clone(),
                    model: d.disk.model.clone(),
                    serial: d.disk.serial.clone(),
                    size_bytes: d.disk.size_bytes,
                },
                gpt_disk_guid: l.disk_guid.to_string(),
                partitions: l.partitions.iter().map(Into::into).collect(),
            })
            .collect(),
        pool: crate::report::PoolReport {
            name: pool.clone(),
            ..Default::default()
        },
        ssh_keys: keys.keys.iter().map(Into::into).collect(),
        warnings,
        ..Default::default()
    };

    // From here on the pool is imported again, as the installed system will
    // import it, and exported at the end whatever happens.
    phases.start("export and import");
    // The special, log and cache disks too: a pool without its log device
    // does not import without -m, one without its special device not at all.
    let root_devs: Vec<String> = zfs_devs
        .iter()
        .cloned()
        .chain(
            plan.aux
                .iter()
                .flat_map(|c| &c.disks)
                .map(|m| m.zfs_device()),
        )
        .collect();
    let facts = check_pool(profile, &root_devs)?;
    report.pool.guid = facts
        .pool_properties
        .get("guid")
        .cloned()
        .unwrap_or_default();
    report.pool.datasets = facts.datasets.clone();
    let finished = finish(
        profile,
        info,
        &mut phases,
        &mut report,
        Finishing {
            copied: copied.as_ref(),
            staged: staged.as_deref(),
            esp_devs: &esp_devs,
            hostid,
            root_mounted,
        },
    );
    // On a failure the pool stays imported: PID 1 saves the console on it,
    // then exports it.
    finished?;
    phases.start("final export");
    run(Command::new("zpool").args(["export", &pool]))?;
    // Last: the disks no longer count as an unfinished install.
    for (pool, d) in &whole {
        let dev = Path::new("/dev").join(&d.disk.name);
        crate::disk::mark_finished(&dev, d.logical_block_size.into(), 1, pool)?;
        say!(
            "install finished: partition 1 of {} is named {pool:?} in the GPT (it was {:?})",
            dev.display(),
            crate::disk::UNFINISHED_NAME
        );
    }
    for d in &disks {
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
    let (list, total) = phases.finish();
    report.phases = list;
    report.total_secs = total;
    say!("{}", report.summary().trim_end());
    Ok(())
}

/// What [`finish`] needs from the install.
struct Finishing<'a> {
    copied: Option<&'a Copied>,
    staged: Option<&'a Path>,
    /// The ESP of every disk of the pool, the first disk's first.
    esp_devs: &'a [String],
    hostid: u32,
    root_mounted: bool,
}

/// With the pool imported again: the store read back, the payload's read
/// speed, the boot loader (its entry last) and the install report, which
/// covers everything but the final export.
fn finish(
    profile: &Profile,
    info: &ImageInfo,
    phases: &mut Phases,
    report: &mut InstallReport,
    f: Finishing,
) -> Result<()> {
    if let Some(c) = f.copied {
        phases.start("store read back");
        let digest = check_store(profile, &c.manifest)?;
        phases.start("payload read test");
        // Over the network, the pre-read was the plain read.
        let raw = match &c.source {
            Source::File(file) => raw_read_speed(file)?,
            Source::Http(_) => c.preread_mb_s,
        };
        report.payload = Some(report_store(c, raw, digest)?);
    }
    if let Some(toplevel) = info.boot.as_ref().and_then(|b| b.nixos.as_deref()) {
        phases.start("boot loader");
        say!("boot loader: the NixOS system {toplevel} installs its own");
        let mounted = mount_system(profile)?;
        let done = crate::nixos::set_system_profile(Path::new("/mnt"), toplevel).and_then(|()| {
            crate::nixos::install_boot_loader(Path::new("/mnt"), Path::new(&f.esp_devs[0]), &|l| {
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
        phases.start("boot loader");
        let mut cmdline = bi.cmdline.clone();
        if bi.check {
            cmdline.push_str(&format!(" nodeflash.hostid={:08x}", f.hostid));
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
    if f.root_mounted {
        phases.start("report");
        // Everything until now; the final export is only on the console.
        let mut list = phases.done().to_vec();
        let total = phases.elapsed();
        let sum: f64 = list.iter().map(|p| p.secs).sum();
        list.push(crate::report::phase(
            "report and other".into(),
            (total - sum).max(0.0),
            None,
        ));
        report.phases = list;
        report.total_secs = total.max(sum);
        write_report(profile, report)?;
    }
    Ok(())
}

/// A warning: on the console now, and in the report.
fn warn(warnings: &mut Vec<String>, msg: impl Into<String>) {
    let msg = msg.into();
    say!("warning: {msg}");
    warnings.push(msg);
}

/// Host ID, pool, datasets (the plan's mounts, under /mnt), `/etc/hostid`
/// and `/etc/hostname` on the target. True when a dataset is mounted at `/`.
fn create_pool(
    profile: &Profile,
    plan: &crate::plan::Plan,
    hostname: &str,
    hostid: u32,
    devices: &[String],
) -> Result<bool> {
    use crate::zfs;
    zfs::set_live_hostid(hostid)?;
    std::fs::create_dir_all("/mnt").context("cannot create /mnt")?;
    let aux: Vec<String> = plan.aux.iter().flat_map(|c| c.words()).collect();
    zfs::run_all(&zfs::create_commands(
        &profile.pool,
        &plan.mounts,
        devices,
        &aux,
        "/mnt",
    ))?;
    let root_mounted = plan.root().is_some();
    if root_mounted {
        zfs::ensure_on_pool(Path::new("/mnt/etc"), &profile.pool.name.to_string())?;
        std::fs::create_dir_all("/mnt/etc")
            .context("cannot create /mnt/etc on the root dataset")?;
        std::fs::write("/mnt/etc/hostid", zfs::hostid_file(hostid))
            .context("cannot write /mnt/etc/hostid")?;
        std::fs::write("/mnt/etc/hostname", format!("{hostname}\n"))
            .context("cannot write /mnt/etc/hostname")?;
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
    Ok(root_mounted)
}

/// A data pool (`[[pools]]`): created with its datasets, snapshots and
/// volumes (its datasets mounted under `/mnt` as they will be), exported,
/// imported again without `-f` from its own partitions only (as the
/// installed system will import it: the host ID in its labels is the
/// node's, set before the root pool was created), its facts printed as a
/// `nodeflash-pool:` line, and exported. Errors name the pool.
fn create_data_pool(pool: &crate::profile::Pool, p: &crate::plan::PoolPlan) -> Result<()> {
    let devices = p.zfs_devices();
    let aux: Vec<String> = p.aux.iter().flat_map(|c| c.words()).collect();
    crate::zfs::run_all(&crate::zfs::create_commands(
        pool, &p.mounts, &devices, &aux, "/mnt",
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

/// Mounts what the installed system mounts under /mnt, in its order
/// ([`crate::datasets::mounts`]; the pool is imported without mounting);
/// returns the guard of those mounts.
fn mount_system(profile: &Profile) -> Result<Mounts> {
    let mut mounts = Mounts::default();
    for crate::datasets::Mounted {
        dataset,
        mountpoint,
        ..
    } in crate::datasets::mounts(&profile.pool)
    {
        let target = Path::new("/mnt").join(mountpoint.trim_start_matches('/'));
        mounts.zfs(&dataset, target, MsFlags::empty())?;
    }
    Ok(mounts)
}

/// Writes the install report on the root dataset (the pool is imported).
fn write_report(profile: &Profile, report: &InstallReport) -> Result<()> {
    let (root, _) = dataset_holding(profile, "/").context("no dataset is mounted at /")?;
    let mut mounts = Mounts::default();
    mounts.zfs(&root, "/mnt", MsFlags::empty())?;
    let written = crate::zfs::ensure_on_pool(Path::new("/mnt"), &profile.pool.name.to_string())
        .and_then(|()| report.write(Path::new("/mnt")))
        .and_then(|()| {
            let log = crate::console::log();
            crate::report::write_log(Path::new("/mnt"), crate::report::INSTALL_LOG, &log).map(drop)
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

/// Copies the system's kernel and initrd out of the store before the pool
/// is exported, for the ESP.
fn stage_boot_files(boot: &crate::image::BootInfo) -> Result<PathBuf> {
    let dir = PathBuf::from("/run/nodeflash/boot");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, path) in [("vmlinuz", &boot.kernel), ("initrd", &boot.initrd)] {
        let src = Path::new(STORE_DIR).join(path);
        std::fs::copy(&src, dir.join(name)).with_context(|| {
            format!("cannot copy the installed system's {name} /nix/store/{path}")
        })?;
    }
    Ok(dir)
}

/// The store's line for the console and its part of the report.
fn report_store(c: &Copied, raw: f64, digest: String) -> Result<crate::report::PayloadReport> {
    let bytes = c.manifest.bytes();
    let payload_bytes: u64 = c.manifest.frames.iter().map(|f| f.len).sum();
    let line = crate::report::PayloadReport {
        manifest_sha256: c.manifest_sha256.clone(),
        files: c.manifest.files(),
        bytes,
        payload_bytes,
        copy_secs: c.secs,
        copy_mb_s: crate::units::mb_per_s(bytes, c.secs),
        raw_read_mb_s: raw,
        copy_to_read_ratio: c.secs / (crate::units::mb(payload_bytes) / raw.max(1e-6)).max(1e-6),
        verified: digest == crate::payload::digest(&c.manifest.entries),
        tree_digest: digest,
    };
    if !line.verified {
        bail!(
            "the store read back from the pool (digest {}) is not the payload's (digest {})",
            line.tree_digest,
            crate::payload::digest(&c.manifest.entries)
        );
    }
    say!(
        "store verified on the pool: {} files; copy {:.1}s ({:.1} MB/s of store), plain read of the payload {:.1} MB/s, ratio {:.2}",
        line.files,
        line.copy_secs,
        line.copy_mb_s,
        line.raw_read_mb_s,
        line.copy_to_read_ratio
    );
    say!(
        "nodeflash-store: {}",
        serde_json::to_string(&line).context("cannot serialize the store report")?
    );
    Ok(line)
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

/// Where the store goes on the target (under the pool's altroot).
const STORE_DIR: &str = "/mnt/nix/store";
/// Where the boot medium is mounted.
const MEDIUM_DIR: &str = "/run/nodeflash/medium";

/// The store payload on the boot medium, opened and checked (length,
/// header, manifest and that it belongs to this image) before the disk is touched.
struct Store {
    source: Source,
    payload: Payload<Box<dyn Read + Send>>,
    workers: usize,
}

/// Where the store payload is read from.
#[derive(Debug, Clone)]
enum Source {
    /// The file on the mounted boot medium.
    File(PathBuf),
    /// A URL (`nodeflash.payload=` on the kernel command line, a network
    /// boot), read with range requests ([`crate::net::stream::RangeReader`]).
    Http(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Http(u) => write!(f, "{u}"),
        }
    }
}

use crate::image::PAYLOAD_URL_WORD;

/// The payload URL of the kernel command line, if any.
fn payload_url() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    payload_url_of(&cmdline)
}

/// `nodeflash.payload=URL` of a kernel command line (the last one wins, as
/// the kernel does for its own parameters).
fn payload_url_of(cmdline: &str) -> Option<String> {
    crate::image::cmdline_values(cmdline, PAYLOAD_URL_WORD)
        .rfind(|u| !u.is_empty())
        .map(str::to_string)
}

/// The stream policy, with `nodeflash.payload-stall=SECONDS` of the kernel
/// command line as its stall bound when given (the last one wins).
fn stream_policy_of(cmdline: &str) -> crate::net::stream::StreamPolicy {
    let mut policy = crate::net::stream::StreamPolicy::default();
    if let Some(secs) = crate::image::cmdline_values(cmdline, crate::image::PAYLOAD_STALL_WORD)
        .rev()
        .find_map(|s| s.parse::<u64>().ok())
    {
        policy.stall = Duration::from_secs(secs);
    }
    policy
}

/// The HTTP client and reader settings of a payload stream.
fn payload_stream(url: &str, range: (u64, u64, u64)) -> Result<crate::net::stream::RangeReader> {
    let cas = ca_certificates()?;
    let not_before = std::time::UNIX_EPOCH + Duration::from_secs(crate::image::NOT_BEFORE_UNIX);
    let client = crate::net::Client::new(&cas, true, not_before)?;
    crate::net::stream::RangeReader::new(
        client,
        url,
        range,
        stream_policy_of(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()),
        |l| say!("{l}"),
    )
}

/// The store payload of a network boot: the network up, then the payload's
/// header and manifest read with range requests and checked as from the
/// stick (length, header, manifest, that it belongs to this image) before
/// the disk is touched. The frames are read later, by the pre-read and by
/// the copy, each with its own stream.
fn open_store_http(
    profile: &Profile,
    info: &ImageInfo,
    url: &str,
    system: Option<&crate::image::NodeSystem>,
) -> Result<Option<Store>> {
    let Some(want) = &info.payload else {
        return Ok(None);
    };
    let lease = crate::net::up(&|l| say!("{l}")).with_context(|| {
        format!("no network, so the store payload {url} cannot be read; nothing was written")
    })?;
    say!(
        "store: payload over the network from {url} ({} bytes, to this node at {})",
        want.bytes,
        lease.describe()
    );
    let refused = "nothing was written. Check that `nodeflash serve` runs with this image";
    let total = want.bytes;
    let mut head = [0u8; crate::payload::HEADER_LEN];
    payload_stream(url, (0, head.len() as u64, total))?
        .read_exact(&mut head)
        .with_context(|| format!("cannot read the store payload's header from {url}; {refused}"))?;
    let header = crate::payload::Header::parse(&head)
        .with_context(|| format!("{url} is not this image's store payload; {refused}"))?;
    if header.total_len() != total {
        bail!(
            "the store payload at {url} says it is {} bytes instead of {total}; {refused}",
            header.total_len()
        );
    }
    let frames_at = crate::payload::HEADER_LEN as u64 + header.manifest_len;
    let manifest = payload_stream(url, (head.len() as u64, frames_at, total))?;
    let frames = payload_stream(url, (frames_at, total, total))?;
    let reader: Box<dyn Read + Send> =
        Box::new(std::io::Cursor::new(head).chain(manifest).chain(frames));
    let payload = Payload::open(reader).with_context(|| format!("{url}: {refused}"))?;
    finish_open(
        profile,
        payload,
        Source::Http(url.to_string()),
        system,
        want,
        refused,
    )
}

fn open_store(
    profile: &Profile,
    info: &ImageInfo,
    boot: Option<&str>,
    system: Option<&crate::image::NodeSystem>,
) -> Result<Option<Store>> {
    let Some(want) = &info.payload else {
        return Ok(None);
    };
    let Some(boot) = boot else {
        bail!(
            "the boot medium (volume set {}) was not found, so the store cannot be copied; nothing was written. \
             Check that the stick is plugged in and was written with this image",
            info.volume_set_id()
        );
    };
    let dev = Path::new("/dev").join(boot);
    std::fs::create_dir_all(MEDIUM_DIR).with_context(|| format!("cannot create {MEDIUM_DIR}"))?;
    match mount(
        Some(&dev),
        MEDIUM_DIR,
        Some("iso9660"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => bail!(
            "cannot mount the boot medium {} on {MEDIUM_DIR}: {e}",
            dev.display()
        ),
    }
    let file = Path::new(MEDIUM_DIR).join(want.path.trim_start_matches('/'));
    let len = std::fs::metadata(&file)
        .with_context(|| {
            format!(
                "cannot find the store payload {} on {}",
                want.path,
                dev.display()
            )
        })?
        .len();
    let damaged = "the stick is damaged or was not written completely: write the image to it again";
    if len != want.bytes {
        bail!(
            "the store payload on {} is {len} bytes instead of {}; {damaged}",
            dev.display(),
            want.bytes
        );
    }
    let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let reader: Box<dyn Read + Send> = Box::new(f);
    let payload = Payload::open(reader)
        .with_context(|| format!("{} on {}: {damaged}", want.path, dev.display()))?;
    say!("store: payload from the boot medium {}", dev.display());
    finish_open(profile, payload, Source::File(file), system, want, damaged)
}

/// The checks and settings common to both sources: the manifest is this
/// image's, the workers, this node's closure.
fn finish_open(
    profile: &Profile,
    mut payload: Payload<Box<dyn Read + Send>>,
    source: Source,
    system: Option<&crate::image::NodeSystem>,
    want: &crate::image::PayloadInfo,
    damaged: &str,
) -> Result<Option<Store>> {
    let len = want.bytes;
    if payload.manifest_sha256() != want.manifest_sha256 {
        bail!("the store payload {source} does not belong to this image; {damaged}");
    }
    let workers = profile.payload.workers.map_or_else(
        // At least two, so that one writes while another waits on the disk.
        || std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        |w| w as usize,
    );
    say!(
        "store: {} files, {:.1} MiB in {} store paths ({:.1} MiB packed on {}), {workers} workers",
        payload.manifest.files(),
        crate::units::mib(payload.manifest.bytes()),
        payload.manifest.store_paths().len(),
        crate::units::mib(len),
        source
    );
    if let Some(system) = system {
        payload
            .keep_only(system.closure.iter().cloned().collect())
            .with_context(|| {
                format!(
                    "the payload {source} lacks part of {}'s closure; {damaged}",
                    system.toplevel
                )
            })?;
        let written = payload.written();
        say!(
            "store: this node's closure is {} files, {:.1} MiB in {} store paths",
            written.files(),
            crate::units::mib(written.bytes()),
            written.store_paths().len()
        );
    }
    Ok(Some(Store {
        source,
        payload,
        workers,
    }))
}

/// Reads the whole payload once, sequentially, and checks every frame
/// against its sha256 in the manifest ([`Payload::check_frames`]) before
/// the disk is touched. When the payload fits in the memory to spare, the
/// copy then reads it from the page cache; when it does not, the copy reads
/// the stick a second time, and checks every file again either way (so a
/// stick that fails between the two reads is still caught, after
/// partitioning). Errors name the damaged frame and its store paths.
fn preread_store(store: &Store) -> Result<crate::payload::FramesChecked> {
    use std::io::{Seek, SeekFrom};
    let len = store.payload.header.total_len();
    let available = mem_available();
    say!(
        "store: checking every frame of the payload ({:.1} MiB) before the disk is touched",
        crate::units::mib(len)
    );
    let damaged = || match &store.source {
        Source::File(file) => format!(
            "the store payload {} on the stick is damaged; nothing was written to any disk. \
             Write the image to the stick again (use another stick if this happens again)",
            file.display()
        ),
        Source::Http(url) => format!(
            "the store payload {url} could not be read whole or is damaged; nothing was written \
             to any disk. Check the server (`nodeflash serve`) and the network, then boot again"
        ),
    };
    let f: Box<dyn Read + Send> = match &store.source {
        Source::File(file) => {
            let mut f =
                File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
            f.seek(SeekFrom::Start(store.payload.frames_offset()))
                .with_context(|| format!("cannot read {}", file.display()))?;
            Box::new(f)
        }
        Source::Http(url) => Box::new(payload_stream(
            url,
            (store.payload.frames_offset(), len, len),
        )?),
    };
    let counters = crate::payload::Counters::default();
    let frames_len = store.payload.header.frames_len;
    let checked = with_progress(
        &counters,
        |c| {
            let (_, _, read) = c.snapshot();
            format!(
                "store: checked {:.1}/{:.1} MiB of the payload",
                crate::units::mib(read),
                crate::units::mib(frames_len)
            )
        },
        || {
            store.payload.check_frames(
                std::io::BufReader::with_capacity(1 << 20, f),
                store.workers,
                &counters,
            )
        },
    )
    .with_context(damaged)?;
    let cached = match (&store.source, available) {
        (Source::Http(_), _) => {
            "the copy reads it from the server a second time, and checks every file again as it writes"
                .to_string()
        }
        (_, Some(a)) if len <= a / 2 => format!(
            "it fits in the memory to spare ({:.0} MiB available), so the copy reads it from the page cache",
            crate::units::mib(a)
        ),
        (_, Some(a)) => format!(
            "it is larger than the memory to spare ({:.0} MiB available): the copy reads the stick \
             a second time, and checks every file again as it writes",
            crate::units::mib(a)
        ),
        (_, None) => "the memory available is not known (no /proc/meminfo)".to_string(),
    };
    say!(
        "store: payload checked before the disk is touched: {} frames, {:.1} MiB in {:.1}s ({:.1} MB/s); {cached}",
        checked.frames,
        crate::units::mib(checked.bytes),
        checked.secs,
        crate::units::mb_per_s(checked.bytes, checked.secs)
    );
    Ok(checked)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs `f` while a thread prints `line(counters)` every 5 s.
fn with_progress<T>(
    counters: &crate::payload::Counters,
    line: impl Fn(&crate::payload::Counters) -> String + Sync + Send,
    f: impl FnOnce() -> T,
) -> T {
    Progress::bytes("store", None, Output::Log(crate::console::say))
        .lines(Duration::from_secs(5), |_, _| line(counters))
        .watch(|| 0, f)
}

/// Writes the store into the mounted datasets, every file checked against
/// the manifest, with a plain progress line every few seconds.
fn copy_store(store: Store) -> Result<Copied> {
    let Store {
        source,
        payload,
        workers,
    } = store;
    // What is written: the whole payload, or this node's closure.
    let mut manifest = payload.written();
    if let Some(reg) = &manifest.registration {
        let keep = manifest
            .store_paths()
            .into_iter()
            .map(String::from)
            .collect();
        manifest.registration = Some(crate::payload::filter_registration(reg, &keep)?);
    }
    let manifest_sha256 = payload.manifest_sha256();
    // Progress counts every file read and checked, kept or not.
    let (total, files) = (payload.manifest.bytes(), payload.manifest.files() as u64);
    let counters = crate::payload::Counters::default();
    let t = Instant::now();
    let result = with_progress(
        &counters,
        |c| format!("store: {}", c.line(total, files, t.elapsed())),
        || payload.extract(Some(Path::new(STORE_DIR)), workers, &counters),
    );
    result.with_context(|| match &source {
        Source::File(_) => "the store was not copied completely, so the disk was not made bootable; if the payload is damaged, write the image to the stick again".to_string(),
        Source::Http(url) => format!("the store was not copied completely from {url}, so the disk was not made bootable; check the server and boot the node again"),
    })?;
    let secs = t.elapsed().as_secs_f64();
    // As Nix has it: sticky and group-writable.
    std::fs::set_permissions(
        STORE_DIR,
        std::os::unix::fs::PermissionsExt::from_mode(0o1775),
    )
    .with_context(|| format!("cannot set the mode of {STORE_DIR}"))?;
    say!(
        "store copied in {secs:.1}s: {}",
        counters.line(total, files, t.elapsed())
    );
    if let Some(reg) = &manifest.registration {
        register(&manifest, reg)?;
    }
    Ok(Copied {
        manifest,
        manifest_sha256,
        source,
        secs,
        preread_mb_s: 0.0,
    })
}

/// What [`copy_store`] copied.
struct Copied {
    manifest: crate::payload::Manifest,
    manifest_sha256: String,
    /// Where the payload was read from.
    source: Source,
    secs: f64,
    /// The pre-read's speed, MB/s: over the network, the plain read.
    preread_mb_s: f64,
}

/// Loads the closure's registration into the installed Nix database with
/// the store's own `nix-store`, as `nixos-install` does.
fn register(manifest: &crate::payload::Manifest, registration: &str) -> Result<()> {
    let nix_store = manifest.entries.iter().find_map(|e| {
        let p = e.path();
        (p.ends_with("/bin/nix-store") && p.matches('/').count() == 2).then_some(p)
    });
    let Some(nix_store) = nix_store else {
        say!("store: no nix-store in the closure, so the registration is not loaded");
        return Ok(());
    };
    // The new root has no /etc/passwd yet (activation writes it), and Nix
    // asks who runs it (`getUserName`, src/libutil/util.cc): root, told.
    let nix = || {
        let mut c = Command::new(format!("/nix/store/{nix_store}"));
        c.env("USER", "root");
        c
    };
    crate::cmd::run_with_input(
        crate::cmd::in_root(&mut nix(), Path::new("/mnt")).arg("--load-db"),
        registration.as_bytes(),
    )
    .context("cannot register the store paths with the installed Nix")?;
    say!(
        "store: registered {} store paths",
        manifest.store_paths().len()
    );
    // Nix's own view of what it was given: its database, and the files
    // against their NAR hashes.
    let run = |args: &[&str]| {
        crate::cmd::run(crate::cmd::in_root(&mut nix(), Path::new("/mnt")).args(args))
    };
    // Without arguments: every path the database holds, in Nix's order
    // (by name, as the registration is), so equal means exactly these.
    let db = run(&["--dump-db"]).context("the installed Nix cannot list its database")?;
    run(&["--verify", "--check-contents"]).context(
        "the installed Nix finds the store invalid (`nix-store --verify --check-contents`)",
    )?;
    say!(
        "nodeflash-nixdb: {}",
        serde_json::json!({
            "paths": manifest.store_paths().len(),
            "dump_db_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(db.as_bytes())),
            "same_as_registration": db == registration,
            "verify_check_contents": "ok",
        })
    );
    Ok(())
}

/// Reads the tree back from the freshly imported pool (after an export
/// dropped its caches) and checks it against the manifest: mounts just the
/// dataset that holds the store, read-only, on /mnt.
fn check_store(profile: &Profile, manifest: &crate::payload::Manifest) -> Result<String> {
    let (dataset, mountpoint) =
        dataset_holding(profile, "/nix/store").context("no dataset holds /nix/store")?;
    let mut mounts = Mounts::default();
    mounts.zfs(&dataset, "/mnt", MsFlags::MS_RDONLY)?;
    let dir = Path::new("/mnt").join(
        Path::new("/nix/store")
            .strip_prefix(&mountpoint)
            .unwrap_or(Path::new("")),
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let result = crate::payload::scan(&dir, threads).and_then(|scanned| {
        crate::payload::compare(&manifest.entries, &scanned, true)
            .context("the store read back from the pool is not what was written")?;
        Ok(crate::payload::digest(scanned.iter().map(|e| &e.0)))
    });
    mounts.unmount()?;
    result
}

/// MB/s of a plain sequential read of (at most 256 MiB of) `file`, page cache dropped.
fn raw_read_speed(file: &Path) -> Result<f64> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot drop the page cache")?;
    let mut f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut n, t) = (0u64, Instant::now());
    while n < 256 << 20 {
        let r = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", file.display()))?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok(crate::units::mb_per_s(n, t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_payload_url_is_read_from_the_kernel_command_line() {
        assert_eq!(super::payload_url_of("console=ttyS0 quiet"), None);
        assert_eq!(super::payload_url_of("nodeflash.payload= quiet"), None);
        assert_eq!(
            super::payload_url_of(
                "quiet nodeflash.payload=http://10.0.0.1:8080/p nodeflash.payload=http://h/q?mac=52:54:00:00:00:01 x"
            )
            .as_deref(),
            Some("http://h/q?mac=52:54:00:00:00:01")
        );
    }

    #[test]
    fn the_payload_stall_bound_is_read_from_the_kernel_command_line() {
        let default = crate::net::stream::StreamPolicy::default();
        assert_eq!(super::stream_policy_of("quiet"), default);
        assert_eq!(
            super::stream_policy_of("nodeflash.payload-stall=x"),
            default
        );
        let p = super::stream_policy_of("nodeflash.payload-stall=5 nodeflash.payload-stall=30");
        assert_eq!(p.stall, std::time::Duration::from_secs(30));
        assert_eq!(p.per_read, default.per_read);
    }
}
