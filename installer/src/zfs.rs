//! The pool: host ID, `zpool create`, the dataset tree mounted parents
//! first, the facts ZFS reports (parsed from its scripted `-H -p` output),
//! the export, and a check that the pool imports again without `-f`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cmd;
use crate::datasets::{normalise, Mounted};
use crate::facts::Facts;
use crate::profile::{HostId, Pool};

/// The host ID for this machine: the profile's, one derived from the
/// machine's identity (stable across reinstalls), or a random one.
pub fn resolve_hostid(want: HostId, facts: &Facts, disk_serial: Option<&str>) -> Result<u32> {
    match want {
        HostId::Fixed(v) => Ok(v),
        HostId::Derive => {
            let identity = facts
                .dmi
                .product_uuid
                .as_deref()
                .filter(|u| !u.is_empty() && !u.starts_with("00000000-0000"))
                .map(|u| format!("dmi-uuid:{}", u.to_lowercase()))
                .or_else(|| disk_serial.map(|s| format!("disk-serial:{}", s.trim())))
                .context("cannot derive a host ID: the machine has neither a DMI product UUID nor a disk serial; set hostid in the profile")?;
            Ok(derive_hostid(&identity))
        }
        HostId::Random => {
            let b = uuid::Uuid::new_v4().into_bytes();
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]).max(1))
        }
    }
}

/// FNV-1a of the identity, never 0 (ZFS reads 0 as "no host ID").
pub fn derive_hostid(identity: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in identity.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// `/etc/hostid` as glibc's `gethostid()` and ZFS read it: 4 bytes, host order.
pub fn hostid_file(id: u32) -> [u8; 4] {
    id.to_ne_bytes()
}

/// Makes `id` the host ID of the running system (spl and `/etc/hostid`)
/// before any pool is created.
pub fn set_live_hostid(id: u32) -> Result<()> {
    std::fs::create_dir_all("/etc").context("cannot create /etc")?;
    std::fs::write("/etc/hostid", hostid_file(id)).context("cannot write /etc/hostid")?;
    std::fs::write("/sys/module/spl/parameters/spl_hostid", id.to_string())
        .context("cannot set spl_hostid (is the spl module loaded?)")?;
    Ok(())
}

/// The commands that create the pool and its datasets under `altroot`, and
/// mount `mounts` (the plan's [`crate::datasets::mount_order`]) in that
/// order, parents first (a child mounted before its parent would be hidden
/// by it). The pool's root dataset is mounted by `zpool create` itself when
/// it is in `mounts` (and unmounted and mounted again in its turn when it
/// is not first). `bootfs` is the dataset at `/`, whatever its
/// `canmount` (a `noauto` root is mounted here explicitly). Mountpoints are
/// passed normalised ([`crate::datasets::normalise`]).
///
/// `devices` are the ZFS partitions of the pool's disks, the first disk
/// first; with more than one they become one vdev of `pool.vdev`'s type
/// (`mirror A B`, `raidz1 A B C`), as zpoolconcepts(7) writes it. `aux`
/// follows them: the `special`, `log` and `cache` classes' words
/// ([`crate::plan::AuxClass::words`]).
pub fn create_commands(
    pool: &Pool,
    mounts: &[Mounted],
    devices: &[String],
    aux: &[String],
    altroot: &str,
) -> Vec<Vec<String>> {
    let name = pool.name.to_string();
    let prop = |k: &str, v: &str| {
        if k == "mountpoint" {
            format!("{k}={}", normalise(v))
        } else {
            format!("{k}={v}")
        }
    };
    let mut cmds = Vec::new();
    let mut create = vec![
        "zpool".to_string(),
        "create".into(),
        "-R".into(),
        altroot.into(),
    ];
    for (k, v) in &pool.options {
        create.extend(["-o".into(), format!("{k}={v}")]);
    }
    for (k, v) in &pool.root_options {
        create.extend(["-O".into(), prop(k, v)]);
    }
    create.push(name.clone());
    if devices.len() > 1 {
        if let Some(kind) = pool.vdev.keyword() {
            create.push(kind.into());
        }
    }
    create.extend(devices.iter().cloned());
    create.extend(aux.iter().cloned());
    cmds.push(create);
    for ds in &pool.datasets {
        let mut c = vec!["zfs".to_string(), "create".into(), "-u".into()];
        if let Some(mp) = &ds.mountpoint {
            c.extend(["-o".into(), prop("mountpoint", &mp.get_ref().0)]);
        }
        for (k, v) in &ds.options {
            c.extend(["-o".into(), prop(k, v)]);
        }
        let full = format!("{name}/{}", ds.name.get_ref());
        c.push(full.clone());
        cmds.push(c);
        // Before anything is written to it (`-u`: not even mounted yet).
        for snap in &ds.snapshots {
            cmds.push(vec![
                "zfs".into(),
                "snapshot".into(),
                format!("{full}@{snap}"),
            ]);
        }
    }
    for z in &pool.zvols {
        let mut c = vec![
            "zfs".to_string(),
            "create".into(),
            "-V".into(),
            z.volsize.0.to_string(),
        ];
        for (k, v) in &z.options {
            c.extend(["-o".into(), format!("{k}={v}")]);
        }
        c.push(format!("{name}/{}", z.name.get_ref()));
        cmds.push(c);
    }
    // `zpool create` mounted the pool's root dataset already; when a parent
    // path of it is mounted later (the root at `/rpool`, a dataset at `/`),
    // it is unmounted first and mounted again in its turn.
    let root_at = mounts.iter().position(|m| m.dataset == name);
    if root_at.is_some_and(|i| i > 0) {
        cmds.push(vec!["zfs".into(), "unmount".into(), name.clone()]);
    }
    for (i, m) in mounts.iter().enumerate() {
        if m.legacy {
            // `zfs mount` refuses a legacy dataset; [`run_all`] mounts it.
            cmds.push(vec![
                "mount".into(),
                "-t".into(),
                "zfs".into(),
                m.dataset.clone(),
                format!("{altroot}{}", m.mountpoint).replace("//", "/"),
            ]);
        } else if !(m.dataset == name && i == 0) {
            cmds.push(vec!["zfs".into(), "mount".into(), m.dataset.clone()]);
        }
    }
    if let Some(root) = mounts.iter().find(|m| m.mountpoint == "/") {
        cmds.push(vec![
            "zpool".into(),
            "set".into(),
            format!("bootfs={}", root.dataset),
            name,
        ]);
    }
    cmds
}

/// Runs [`create_commands`]' commands in order. `mount -t zfs DATASET
/// TARGET` (a legacy dataset) is done here with mount(2), the directory
/// made first: the image has no mount(8), and the kernel mounts a legacy
/// dataset as any other (the legacy check is mount.zfs's, in user space).
pub fn run_all(cmds: &[Vec<String>]) -> Result<()> {
    for argv in cmds {
        match argv.as_slice() {
            [mount, t, zfs, dataset, target] if mount == "mount" && t == "-t" && zfs == "zfs" => {
                mount_legacy(dataset, Path::new(target))?;
            }
            _ => {
                cmd::run(Command::new(&argv[0]).args(&argv[1..]))?;
            }
        }
    }
    Ok(())
}

/// Mounts the legacy dataset `dataset` on `target` (made if missing). No
/// guard: it stays mounted, like the `zfs mount`s beside it, until `zpool
/// export` unmounts every file system of the pool (mnttab's, legacy too).
pub fn mount_legacy(dataset: &str, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    nix::mount::mount(
        Some(dataset),
        target,
        Some("zfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("cannot mount {dataset} on {}", target.display()))
}

/// The file system that holds `path` according to `/proc/self/mountinfo`
/// text (proc(5)): the mount with the longest mount point that is a prefix
/// of `path` (the last one listed wins, as it covers the earlier ones), as
/// (file system type, source). `path` must be absolute and canonical.
pub fn mount_source(mountinfo: &str, path: &Path) -> Option<(String, String)> {
    let mut best: Option<(usize, String, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mp), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        // Spaces and the like are octal escapes (`\040`).
        let mp = unescape_octal(mp);
        if path.starts_with(&mp) && best.as_ref().is_none_or(|b| mp.len() >= b.0) {
            best = Some((mp.len(), fstype.to_string(), unescape_octal(source)));
        }
    }
    best.map(|(_, t, s)| (t, s))
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` (or, when it does not exist yet, its nearest existing
/// parent) is on a ZFS dataset of `pool`, so that a write there lands on the
/// target disk and not in the installer's RAM. Errors name the path, what
/// holds it, and the pool.
pub fn ensure_on_pool(path: &Path, pool: &str) -> Result<()> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let real = std::fs::canonicalize(existing)
        .with_context(|| format!("cannot resolve {}", existing.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let (fstype, source) = mount_source(&info, &real).unwrap_or_default();
    let on_pool = fstype == "zfs" && (source == pool || source.starts_with(&format!("{pool}/")));
    if !on_pool {
        bail!(
            "{} is on {} {}, not on pool {pool}: a write there would not reach the installed disk, \
             so the install stops here",
            path.display(),
            if fstype.is_empty() { "?" } else { &fstype },
            source
        );
    }
    Ok(())
}

/// One row of `zfs get -H -p` / `zpool get -H -p`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prop {
    pub name: String,
    pub property: String,
    pub value: String,
    pub source: String,
}

/// Parses the scripted output of `zfs get -H -p -o name,property,value,source`
/// or `zpool get -H -p` (tab-separated, 4 columns).
pub fn parse_get(output: &str) -> Result<Vec<Prop>> {
    output
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            match cols.as_slice() {
                [name, property, value, source] => Ok(Prop {
                    name: name.to_string(),
                    property: property.to_string(),
                    value: value.to_string(),
                    source: source.to_string(),
                }),
                _ => bail!("unexpected line in zfs/zpool get output: {l:?}"),
            }
        })
        .collect()
}

/// What ZFS says about the pool: pool properties and every dataset's
/// properties (name → property → value).
#[derive(Debug, Clone, Serialize)]
pub struct PoolFacts {
    pub pool: String,
    pub hostid: Option<String>,
    pub pool_properties: BTreeMap<String, String>,
    pub datasets: BTreeMap<String, BTreeMap<String, String>>,
}

/// The properties worth reporting for a profile's pool: everything it sets,
/// and what booting depends on.
pub fn reported_properties(pool: &Pool) -> (Vec<String>, Vec<String>) {
    let mut zpool: Vec<String> = ["bootfs", "health", "guid"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    zpool.extend(pool.options.keys().cloned());
    let mut zfs: Vec<String> = ["type", "mountpoint", "canmount", "compression"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    zfs.extend(pool.root_options.keys().cloned());
    zfs.extend(pool.datasets.iter().flat_map(|d| d.options.keys().cloned()));
    if !pool.zvols.is_empty() {
        zfs.push("volsize".into());
        zfs.extend(pool.zvols.iter().flat_map(|z| z.options.keys().cloned()));
    }
    for list in [&mut zpool, &mut zfs] {
        list.sort();
        list.dedup();
    }
    (zpool, zfs)
}

/// Reads pool and dataset properties (the pool must be imported) and the
/// host ID in the device's ZFS label.
pub fn pool_facts(pool: &Pool, device: &str) -> Result<PoolFacts> {
    let name = pool.name.to_string();
    let (zpool_props, zfs_props) = reported_properties(pool);
    let zpool = parse_get(&cmd::run(Command::new("zpool").args([
        "get",
        "-H",
        "-p",
        &zpool_props.join(","),
        &name,
    ]))?)?;
    let datasets = dataset_properties(&name, &zfs_props.join(","))?;
    let label = cmd::run(Command::new("zdb").args(["-l", device]))?;
    Ok(PoolFacts {
        pool: name,
        hostid: parse_label_hostid(&label),
        pool_properties: zpool.into_iter().map(|p| (p.property, p.value)).collect(),
        datasets,
    })
}

/// `zfs get -H -p -r` of `properties` (comma-separated) on every dataset of
/// `pool` (imported), grouped: dataset → property → value.
pub fn dataset_properties(
    pool: &str,
    properties: &str,
) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let out = cmd::run(Command::new("zfs").args([
        "get",
        "-H",
        "-p",
        "-r",
        "-o",
        "name,property,value,source",
        properties,
        pool,
    ]))?;
    let mut datasets: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for p in parse_get(&out)? {
        datasets
            .entry(p.name)
            .or_default()
            .insert(p.property, p.value);
    }
    Ok(datasets)
}

/// The `hostid` of the first label in `zdb -l` output, as 8 hex digits.
pub fn parse_label_hostid(zdb: &str) -> Option<String> {
    zdb.lines()
        .find_map(|l| l.trim().strip_prefix("hostid: "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|v| format!("{v:08x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    fn pool() -> Pool {
        let src = r#"
name = "t"
[disk]
select = { serial = "S" }
[pool]
options = { ashift = "12" }
root-options = { compression = "zstd", mountpoint = "none", canmount = "off" }
[[pool.datasets]]
name = "local"
[[pool.datasets]]
name = "local/nix"
mountpoint = "/nix"
[[pool.datasets]]
name = "safe"
[[pool.datasets]]
name = "safe/home"
mountpoint = "/home"
[[pool.datasets]]
name = "safe/root"
mountpoint = "/"
"#;
        Profile::parse(src, "t.toml").expect("profile").pool
    }

    fn commands(pool: &Pool) -> Vec<String> {
        let mounts = crate::datasets::mounts(pool);
        create_commands(pool, &mounts, &["/dev/nvme0n1p3".into()], &[], "/mnt")
            .iter()
            .map(|c| c.join(" "))
            .collect()
    }

    #[test]
    fn a_mirror_a_blank_snapshot_and_a_zvol() {
        let src = r#"
name = "t"
[disk]
select = { serial = "A" }
members = [ { serial = "B" } ]
[pool]
vdev = "mirror"
root-options = { mountpoint = "none", canmount = "off" }
[[pool.datasets]]
name = "root"
mountpoint = "/"
snapshots = ["blank"]
[[pool.datasets]]
name = "vm"
[[pool.zvols]]
name = "vm/disk0"
volsize = "10MiB"
options = { volblocksize = "16K", compression = "lz4" }
"#;
        let pool = Profile::parse(src, "t.toml").expect("profile").pool;
        let mounts = crate::datasets::mounts(&pool);
        let cmds: Vec<String> = create_commands(
            &pool,
            &mounts,
            &["/dev/nvme0n1p3".into(), "/dev/nvme1n1p3".into()],
            &[],
            "/mnt",
        )
        .iter()
        .map(|c| c.join(" "))
        .collect();
        assert_eq!(
            cmds[..5],
            [
                "zpool create -R /mnt -O canmount=off -O mountpoint=none rpool mirror /dev/nvme0n1p3 /dev/nvme1n1p3",
                "zfs create -u -o mountpoint=/ rpool/root",
                "zfs snapshot rpool/root@blank",
                "zfs create -u rpool/vm",
                "zfs create -V 10485760 -o compression=lz4 -o volblocksize=16K rpool/vm/disk0",
            ]
        );
        let (_, zfs) = reported_properties(&pool);
        assert!(zfs.contains(&"volsize".to_string()) && zfs.contains(&"volblocksize".to_string()));
    }

    #[test]
    fn a_legacy_dataset_is_mounted_with_mount_in_its_turn_and_classes_follow_the_vdev() {
        let src = r#"
name = "t"
[disk]
select = { serial = "A" }
[pool]
root-options = { mountpoint = "/" }
[[pool.datasets]]
name = "old"
mountpoint = "legacy"
legacy-mount = "/srv/old"
[[pool.datasets]]
name = "srv"
mountpoint = "/srv"
"#;
        let pool = Profile::parse(src, "t.toml").expect("profile").pool;
        let mounts = crate::datasets::mounts(&pool);
        let cmds: Vec<String> = create_commands(
            &pool,
            &mounts,
            &["/dev/nvme0n1p3".into()],
            &["cache".into(), "/dev/vda1".into()],
            "/mnt",
        )
        .iter()
        .map(|c| c.join(" "))
        .collect();
        assert_eq!(
            cmds,
            [
                "zpool create -R /mnt -O mountpoint=/ rpool /dev/nvme0n1p3 cache /dev/vda1",
                "zfs create -u -o mountpoint=legacy rpool/old",
                "zfs create -u -o mountpoint=/srv rpool/srv",
                "zfs mount rpool/srv",
                "mount -t zfs rpool/old /mnt/srv/old",
                "zpool set bootfs=rpool rpool",
            ]
        );
        for (body, want) in [
            ("mountpoint = \"/x\"\nlegacy-mount = \"/y\"\n", "`legacy-mount` is for a dataset whose mountpoint is `legacy`"),
            ("mountpoint = \"legacy\"\nlegacy-mount = \"y\"\n", "is not an absolute path"),
            ("mountpoint = \"legacy\"\nlegacy-mount = \"/srv\"\n", "mountpoint `/srv` of dataset `rpool/z` is already used"),
            ("mountpoint = \"legacy\"\nlegacy-mount = \"/y\"\noptions = { canmount = \"off\" }\n", "cannot be mounted"),
        ] {
            let e = Profile::parse(&format!("{src}[[pool.datasets]]\nname = \"z\"\n{body}"), "t.toml")
                .expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
            assert!(e.to_string().contains("pool.datasets[2]"), "{e}");
        }
    }

    #[test]
    fn volumes_and_snapshots_are_checked_at_build_time() {
        let base = "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n[pool]\n[[pool.datasets]]\nname = \"vm\"\n";
        let err =
            |extra: &str| Profile::parse(&format!("{base}{extra}"), "t.toml").expect_err("refused");
        let e = err("[[pool.zvols]]\nname = \"vm/swap\"\nvolsize = \"1GiB\"\nswap = true\n");
        assert_eq!(e.key, "pool.zvols[0].swap", "{e}");
        assert!(
            e.message.contains("openzfs/zfs#7734") && e.message.contains("swap-size"),
            "{e}"
        );
        let e = err("[[pool.zvols]]\nname = \"other/d\"\nvolsize = \"1GiB\"\n");
        assert_eq!(e.key, "pool.zvols[0].name", "{e}");
        assert!(e.message.contains("parent dataset `other`"), "{e}");
        let e = err("[[pool.zvols]]\nname = \"vm\"\nvolsize = \"1GiB\"\n");
        assert!(e.message.contains("defined twice"), "{e}");
        let e = err("[[pool.zvols]]\nname = \"vm/d\"\nvolsize = \"1000B\"\n");
        assert_eq!(e.key, "pool.zvols[0].volsize", "{e}");
        let e = err("[[pool.zvols]]\nname = \"vm/d\"\nvolsize = \"1MiB\"\noptions = { volblocksize = \"3K\" }\n");
        assert_eq!(e.key, "pool.zvols[0].options.volblocksize", "{e}");
        let e = err("[[pool.zvols]]\nname = \"vm/d\"\nvolsize = \"1MiB\"\noptions = { mountpoint = \"/x\" }\n");
        assert!(e.message.contains("file system property"), "{e}");
        let e = err("[[pool.zvols]]\nname = \"vm/d\"\nvolsize = \"1MiB\"\noptions = { compression = \"fast\" }\n");
        assert_eq!(e.key, "pool.zvols[0].options.compression", "{e}");
        let e = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n[pool]\n[[pool.datasets]]\nname = \"vm\"\nsnapshots = [\"a@b\"]\n",
            "t.toml",
        )
        .expect_err("bad snapshot");
        assert_eq!(e.key, "pool.datasets[0].snapshots[0]", "{e}");
    }

    #[test]
    fn inherited_and_noauto_datasets_are_mounted_and_the_root_is_bootfs() {
        // Issue 17 cases 1 and 2: `nix` inherits /nix from the pool's root;
        // the noauto root is mounted for the install and is bootfs.
        let src = r#"
name = "t"
[disk]
select = { serial = "S" }
[pool]
root-options = { mountpoint = "/", canmount = "off" }
[[pool.datasets]]
name = "ROOT"
options = { canmount = "off" }
[[pool.datasets]]
name = "ROOT/nixos"
mountpoint = "/"
options = { canmount = "noauto" }
[[pool.datasets]]
name = "nix"
"#;
        let pool = Profile::parse(src, "t.toml").expect("profile").pool;
        let cmds = commands(&pool);
        assert_eq!(
            cmds[4..],
            [
                "zfs mount rpool/ROOT/nixos",
                "zfs mount rpool/nix",
                "zpool set bootfs=rpool/ROOT/nixos rpool",
            ]
        );
    }

    #[test]
    fn a_mounted_pool_root_below_another_dataset_is_mounted_in_its_turn() {
        let src = "name = \"t\"\n[disk]\nselect = { serial = \"S\" }\n[pool]\n\
                   [[pool.datasets]]\nname = \"root\"\nmountpoint = \"/\"\n";
        let cmds = commands(&Profile::parse(src, "t.toml").expect("profile").pool);
        assert_eq!(
            cmds[2..],
            [
                "zfs unmount rpool",
                "zfs mount rpool/root",
                "zfs mount rpool",
                "zpool set bootfs=rpool/root rpool",
            ]
        );
        // First in order: left as `zpool create` mounted it.
        let src = "name = \"t\"\n[disk]\nselect = { serial = \"S\" }\n[pool]\n\
                   [[pool.datasets]]\nname = \"srv\"\n";
        let cmds = commands(&Profile::parse(src, "t.toml").expect("profile").pool);
        assert_eq!(cmds[2..], ["zfs mount rpool/srv"]);
    }

    #[test]
    fn commands_create_then_mount_parents_first() {
        let cmds: Vec<String> = commands(&pool());
        assert_eq!(
            cmds,
            [
                "zpool create -R /mnt -o ashift=12 -O canmount=off -O compression=zstd -O mountpoint=none rpool /dev/nvme0n1p3",
                "zfs create -u rpool/local",
                "zfs create -u -o mountpoint=/nix rpool/local/nix",
                "zfs create -u rpool/safe",
                "zfs create -u -o mountpoint=/home rpool/safe/home",
                "zfs create -u -o mountpoint=/ rpool/safe/root",
                // `/` before `/home` and `/nix`, whatever the profile's order.
                "zfs mount rpool/safe/root",
                "zfs mount rpool/safe/home",
                "zfs mount rpool/local/nix",
                "zpool set bootfs=rpool/safe/root rpool",
            ]
        );
    }

    #[test]
    fn finds_the_file_system_holding_a_path() {
        // Shaped like the installer's /proc/self/mountinfo with the root
        // dataset not mounted: /mnt is still in the initramfs' rootfs.
        let info = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                    20 1 0:5 / /run rw,nosuid - tmpfs tmpfs rw\n\
                    30 1 0:40 / /mnt/nix rw - zfs rpool/nix rw,xattr\n\
                    31 1 0:41 / /mnt/my\\040dir rw - zfs rpool/sp\\040ace rw\n";
        let at = |p: &str| mount_source(info, Path::new(p));
        assert_eq!(at("/mnt/etc"), Some(("rootfs".into(), "rootfs".into())));
        assert_eq!(
            at("/mnt/nix/store"),
            Some(("zfs".into(), "rpool/nix".into()))
        );
        assert_eq!(at("/mnt/nixos"), Some(("rootfs".into(), "rootfs".into())));
        assert_eq!(
            at("/mnt/my dir/x"),
            Some(("zfs".into(), "rpool/sp ace".into()))
        );
        // A later mount on the same point covers the earlier one.
        let info = format!("{info}32 1 0:42 / /mnt rw - zfs rpool/ROOT/nixos rw\n");
        assert_eq!(
            mount_source(&info, Path::new("/mnt/etc")),
            Some(("zfs".into(), "rpool/ROOT/nixos".into()))
        );
    }

    #[test]
    fn a_path_off_the_pool_is_refused() {
        // Any host: a temporary directory is not on a pool of this name.
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ensure_on_pool(&dir.path().join("etc/hostid"), "nodeflash-no-such-pool")
            .expect_err("not on the pool");
        let msg = err.to_string();
        assert!(msg.contains("not on pool nodeflash-no-such-pool"), "{msg}");
        assert!(msg.contains("etc/hostid"), "{msg}");
    }

    #[test]
    fn parses_scripted_get_output() {
        // Captured from `zfs get -H -p -o name,property,value,source all rpool/local`.
        let out = "rpool/local\ttype\tfilesystem\t-\nrpool/local\tcompression\tzstd\tinherited from rpool\nrpool/local\tused\t98304\t-\n";
        let props = parse_get(out).expect("parses");
        assert_eq!(props.len(), 3);
        assert_eq!(props[1].property, "compression");
        assert_eq!(props[1].value, "zstd");
        assert_eq!(props[1].source, "inherited from rpool");
        assert!(parse_get("rpool\tsize\n").is_err());
    }

    #[test]
    fn parses_zdb_label_hostid() {
        let out = "------------------------------------\nLABEL 0\n------------------------------------\n    version: 5000\n    name: 'rpool'\n    state: 1\n    hostid: 1193441748\n    hostname: '(none)'\n";
        assert_eq!(parse_label_hostid(out).as_deref(), Some("472279d4"));
        assert_eq!(parse_label_hostid("name: 'x'"), None);
    }

    #[test]
    fn derived_host_ids_are_stable_and_not_zero() {
        let a = derive_hostid("dmi-uuid:4c4c4544-0042");
        assert_eq!(a, derive_hostid("dmi-uuid:4c4c4544-0042"));
        assert_ne!(a, derive_hostid("dmi-uuid:4c4c4544-0043"));
        let facts = Facts::default();
        assert_eq!(
            resolve_hostid(HostId::Fixed(0x472479d4), &facts, None).expect("fixed"),
            0x472479d4
        );
        assert_eq!(
            resolve_hostid(HostId::Derive, &facts, Some("NFTEST0001")).expect("from serial"),
            derive_hostid("disk-serial:NFTEST0001")
        );
        assert!(resolve_hostid(HostId::Derive, &facts, None).is_err());
        assert_eq!(hostid_file(0x472479d4), [0xd4, 0x79, 0x24, 0x47]);
    }
}
