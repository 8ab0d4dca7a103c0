//! The cross-key rules of a profile, one function per rule group, run by
//! [`Profile::validate`] after serde has checked each value on its own.
//! Each returns the first [`Problem`] it finds: the key at fault, the
//! message, and the span when the rule knows it; [`Profile::parse`] turns it
//! into a [`super::ProfileError`] with its line and column.

use std::collections::{BTreeMap, BTreeSet};

use super::error::Problem;
use super::{BootSystem, DiskSelect, HostId, OnSuccess, Pool, Profile, Size, Ssh, Vdev, Wipe};

impl Profile {
    /// Checks that span several keys, one rule group after the other, in
    /// this order (the first problem found is the one reported). Returns
    /// that problem: its key, message and, when known, its span.
    pub(super) fn validate(&self) -> Result<(), Problem> {
        self.check_root_pool()?;
        self.check_data_pools()?;
        self.check_sizes()?;
        self.check_root_disks()?;
        self.check_finish()?;
        self.check_payload_source()?;
        self.check_boot()?;
        self.check_payload_target()?;
        self.check_nodes()?;
        self.ssh.check().map_err(|p| p.under("ssh"))
    }

    /// The root pool (`[pool]`): its tree as [`check_pool_tree`] checks it,
    /// and no `disks` (the root pool is on `[disk]`'s disks; `disks` is a
    /// data pool's).
    fn check_root_pool(&self) -> Result<(), Problem> {
        check_pool_tree(&self.pool, "pool")?;
        if !self.pool.disks.is_empty() {
            return Err(Problem::at(
                "pool.disks",
                "the root pool's disks are [disk] `select` and `members`; `disks` is for a data \
                 pool ([[pools]])",
            ));
        }
        Ok(())
    }

    /// The data pools (`[[pools]]`) and every pool's whole-disk devices:
    /// names unique among all pools, each tree as [`check_pool_tree`]
    /// checks it, enough disks for the vdev (`zpool create` refuses fewer:
    /// `is_grouping` in OpenZFS's `cmd/zpool/zpool_vdev.c`), a `special`
    /// class as redundant as a redundant pool (zpool refuses a single
    /// special device beside a mirror or raidz with "mismatched replication
    /// level", and losing it loses the pool), no rules given twice in the
    /// whole profile, no data pool dataset at `/` and no mountpoint shared
    /// between pools.
    fn check_data_pools(&self) -> Result<(), Problem> {
        let mut names = vec![self.pool.name.0.clone()];
        let mut mounts: Vec<(String, String)> = crate::datasets::mounts(&self.pool)
            .into_iter()
            .map(|m| (m.mountpoint, "[pool]".to_string()))
            .collect();
        let mut rules: Vec<(String, &DiskSelect)> =
            vec![("disk.select".to_string(), &self.disk.select)];
        for (i, m) in self.disk.members.iter().enumerate() {
            rules.push((format!("disk.members[{i}]"), m));
        }
        let mut all_pools = vec![("pool".to_string(), &self.pool)];
        for (n, pool) in self.pools.iter().enumerate() {
            all_pools.push((format!("pools[{n}]"), pool));
        }
        for (prefix, pool) in &all_pools {
            let data = *prefix != "pool";
            if data {
                check_pool_tree(pool, prefix)?;
                let name = &pool.name.0;
                if names.contains(name) {
                    return Err(Problem::at(
                        format!("{prefix}.name"),
                        format!(
                            "pool name `{name}` is used twice: give each [[pools]] entry a \
                             `name` of its own (the root pool is `{}`)",
                            self.pool.name
                        ),
                    ));
                }
                names.push(name.clone());
                let disks = pool.disks.len();
                if disks == 0 {
                    return Err(Problem::at(
                        format!("{prefix}.disks"),
                        "a data pool needs `disks`: the rules of each disk it is made of",
                    ));
                }
                if pool.vdev == Vdev::Single && disks > 1 {
                    return Err(Problem::at(
                        format!("{prefix}.vdev"),
                        format!(
                            "`disks` names {disks} disks and the vdev is `single`: say how they \
                             are joined, `mirror`, `raidz1` or `raidz2` (a stripe, which loses \
                             the pool with any one disk, is not offered)"
                        ),
                    ));
                }
                if disks < pool.vdev.min_disks() {
                    return Err(Problem::at(
                        format!("{prefix}.vdev"),
                        format!(
                            "a {} needs at least {} disks and `disks` names {disks}",
                            pool.vdev.keyword().unwrap_or("single"),
                            pool.vdev.min_disks()
                        ),
                    ));
                }
                for m in crate::datasets::mounts(pool) {
                    if m.mountpoint == "/" {
                        return Err(Problem::at(
                            prefix.to_string(),
                            format!(
                                "dataset {} of data pool {name} is mounted at /: the root file \
                                 system comes from the root pool ([pool])",
                                m.dataset
                            ),
                        ));
                    }
                    // What the installed system needs from the root pool;
                    // a data pool mounted over it hides it once imported.
                    let covers = |sys: &str| {
                        sys == m.mountpoint
                            || sys.starts_with(&format!("{}/", m.mountpoint))
                            || m.mountpoint.starts_with(&format!("{sys}/"))
                    };
                    if let Some(sys) = ["/boot", "/etc", "/nix/store"]
                        .into_iter()
                        .find(|s| covers(s))
                    {
                        return Err(Problem::at(
                            prefix.to_string(),
                            format!(
                                "dataset {} of data pool {name} is mounted at {}, over {sys}, \
                                 which the installed system needs from the root pool ([pool])",
                                m.dataset, m.mountpoint
                            ),
                        ));
                    }
                    if let Some((_, other)) = mounts.iter().find(|(mp, _)| *mp == m.mountpoint) {
                        return Err(Problem::at(
                            prefix.to_string(),
                            format!(
                                "dataset {} is mounted at {}, where a dataset of {other} is \
                                 mounted too",
                                m.dataset, m.mountpoint
                            ),
                        ));
                    }
                    mounts.push((m.mountpoint, format!("[[pools]] {name}")));
                }
                for (i, d) in pool.disks.iter().enumerate() {
                    rules.push((format!("{prefix}.disks[{i}]"), d));
                }
            }
            if pool.vdev != Vdev::Single && pool.special.len() == 1 {
                return Err(Problem::at(
                    format!("{prefix}.special"),
                    format!(
                        "one `special` disk beside a {} vdev: the special class holds the \
                         pool's metadata and losing it loses the pool, so it needs the pool's \
                         redundancy (zpool refuses it: \"mismatched replication level\"); \
                         give two or more disks (a mirror)",
                        pool.vdev.keyword().unwrap_or("single")
                    ),
                ));
            }
            for (class, list) in pool.aux_classes() {
                for (i, d) in list.iter().enumerate() {
                    rules.push((format!("{prefix}.{class}[{i}]"), d));
                }
            }
        }
        for (i, (key, sel)) in rules.iter().enumerate() {
            sel.check().map_err(|p| p.under(key))?;
            if let Some((other, _)) = rules[..i].iter().find(|(_, o)| o == sel) {
                return Err(Problem::at(
                    key.clone(),
                    format!(
                        "these rules are given twice (also as {other}): each disk needs rules \
                         of its own (a serial or wwn each)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sizes of `[disk]` against what the firmware, the kernel and ZFS
    /// accept on any disk: an ESP that is FAT32 with 512- or 4096-byte
    /// sectors ([`crate::disk::esp_fat32_problem`]; the plan checks the
    /// disk's own sector size), a swap partition of 10 to 2^32 pages of
    /// 4 KiB (mkswap's minimum, and the header's 32-bit page count), and a
    /// `max-size` that leaves room for the layout.
    fn check_sizes(&self) -> Result<(), Problem> {
        let esp = self.disk.esp_size;
        let problems: Vec<String> = [512, 4096]
            .iter()
            .filter_map(|&lbs| crate::disk::esp_fat32_problem(esp.0, lbs))
            .collect();
        if problems.len() == 2 {
            return Err(Problem::at(
                "disk.esp-size",
                format!(
                    "an ESP of {esp} cannot be FAT32 (UEFI firmware reads FAT32 from a disk): {}",
                    problems.join("; ")
                ),
            ));
        }
        if let Some(swap) = self.disk.swap_size {
            const PAGE: u64 = 4096;
            if swap.0 < 10 * PAGE {
                return Err(Problem::at(
                    "disk.swap-size",
                    format!(
                        "a swap partition of {swap} is too small: Linux needs at least 40KiB \
                         (10 pages); leave `swap-size` out for no swap"
                    ),
                ));
            }
            if swap.0 / PAGE > u64::from(u32::MAX) {
                return Err(Problem::at(
                    "disk.swap-size",
                    format!("a swap partition of {swap} is larger than Linux can use (16TiB)"),
                ));
            }
        }
        for (key, secs, what) in [
            (
                "image.device-timeout-secs",
                self.image.device_timeout_secs,
                "the stick and the disks need a moment to appear after the kernel starts",
            ),
            (
                "ssh.fetch-timeout-secs",
                self.ssh.fetch_timeout_secs,
                "no attempt to fetch keys could be made",
            ),
        ] {
            if secs == 0 {
                return Err(Problem::at(
                    key,
                    format!("0 seconds: {what}; use at least 1"),
                ));
            }
        }
        let mib = |s: Size| s.0.div_ceil(crate::plan::ALIGN_BYTES) * crate::plan::ALIGN_BYTES;
        let needed = crate::plan::ALIGN_BYTES
            + mib(esp)
            + self.disk.swap_size.map_or(0, mib)
            + crate::plan::MIN_ZFS_BYTES
            + crate::plan::ALIGN_BYTES;
        let mut selects = vec![("disk.select".to_string(), &self.disk.select, None)];
        for (i, m) in self.disk.members.iter().enumerate() {
            selects.push((format!("disk.members[{i}]"), m, None));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(sel) = &node.disk {
                selects.push((format!("nodes[{i}].disk"), sel, Some(node.name.span())));
            }
        }
        for (key, sel, span) in selects {
            if let Some(max) = sel.max_size {
                if max.0 < needed {
                    return Err(Problem::at(
                        format!("{key}.max-size"),
                        format!(
                            "no disk of at most {max} can hold the layout, which needs at least \
                             {} (ESP {esp}, swap {}, ZFS at least {})",
                            Size(needed),
                            self.disk.swap_size.map_or("none".into(), |s| s.to_string()),
                            Size(crate::plan::MIN_ZFS_BYTES)
                        ),
                    )
                    .spanned(span));
                }
            }
        }
        Ok(())
    }

    /// The disks of the root pool (`[disk]`): `select` and each of `members`
    /// as [`DiskSelect::check`] checks them, no rules given twice, and as many
    /// disks as the pool's vdev needs: a `single` vdev takes one (a stripe is
    /// not offered), a mirror or raidz at least its minimum (`zpool create`
    /// refuses fewer: `is_grouping` in OpenZFS's `cmd/zpool/zpool_vdev.c`).
    fn check_root_disks(&self) -> Result<(), Problem> {
        self.disk
            .select
            .check()
            .map_err(|p| p.under("disk.select"))?;
        for (i, m) in self.disk.members.iter().enumerate() {
            m.check()
                .map_err(|p| p.under(&format!("disk.members[{i}]")))?;
            let same = std::iter::once(&self.disk.select).chain(&self.disk.members[..i]);
            if same.clone().any(|o| o == m) {
                return Err(Problem::at(
                    format!("disk.members[{i}]"),
                    "these rules are given twice: each disk of the pool needs rules of its own \
                     (a serial or wwn each)",
                ));
            }
        }
        let disks = 1 + self.disk.members.len();
        let vdev = self.pool.vdev;
        if vdev == Vdev::Single && disks > 1 {
            return Err(Problem::at(
                "pool.vdev",
                format!(
                    "[disk] names {disks} disks (select and members) and the pool's vdev is \
                     `single`: say how they are joined, `mirror`, `raidz1` or `raidz2` \
                     (a stripe, which loses the pool with any one disk, is not offered)"
                ),
            ));
        }
        if disks < vdev.min_disks() {
            return Err(Problem::at(
                "pool.vdev",
                format!(
                    "a {} needs at least {} disks and [disk] names {disks} (select and members); \
                     add disks to `members`",
                    vdev.keyword().unwrap_or("single"),
                    vdev.min_disks()
                ),
            ));
        }
        Ok(())
    }

    /// `[finish]`: no `reboot` after an install that wipes always, which
    /// would install again at every boot while the stick is in.
    fn check_finish(&self) -> Result<(), Problem> {
        if self.disk.wipe == Wipe::Always && self.finish.on_success == OnSuccess::Reboot {
            return Err(Problem::at(
                "finish.on-success",
                "`reboot` with `disk.wipe = \"always\"` installs again at every boot while the \
                 stick is in (a reboot loop): use `poweroff` or `halt`, or `wipe = \"if-empty\"`",
            ));
        }
        Ok(())
    }

    /// Where the payload comes from (`[payload]`): at most one of `closure`,
    /// `flake`, `store` and `synthetic`; a node's or the default node's
    /// `system` (a flake attribute) only with a `flake`, and the default
    /// node's only with a fixed host ID, since its system is built before the
    /// machine is seen (docs/flake.md); `registration` only with `store`; a
    /// `closure` that is a /nix/store path.
    fn check_payload_source(&self) -> Result<(), Problem> {
        let p = &self.payload;
        let sources = [
            p.closure.is_some(),
            p.flake.is_some(),
            p.store.is_some(),
            p.synthetic.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(Problem::at(
                "payload",
                "give one of `closure`, `flake`, `store` or `synthetic`, not several",
            ));
        }
        if p.flake.is_none() {
            if let Some(i) = self.nodes.iter().position(|n| n.system.is_some()) {
                return Err(Problem::at(
                    format!("nodes[{i}].system"),
                    "a node's `system` is a flake attribute: it needs `flake` in [payload]",
                )
                .spanned(self.nodes[i].name.span()));
            }
            if self.default_node.system.is_some() {
                return Err(Problem::at("default-node.system", "the default node's `system` is a flake attribute: it needs `flake` in [payload]"));
            }
        }
        // The generic node's system is built before any machine is seen:
        // it can only hold a host ID the profile fixes (docs/flake.md).
        if self.default_node.system.is_some()
            && !matches!(self.default_node.hostid, HostId::Fixed(_))
        {
            return Err(Problem::at(
                "default-node.hostid",
                "a default node with its own `system` needs a fixed `hostid` (8 hex digits): \
                 its system is built before the machine is seen, so it cannot hold a host ID \
                 derived there; put the same ID into that system's networking.hostId \
                 (`nodeflash nixos-module` writes it as `default`)",
            ));
        }
        if p.registration.is_some() && p.store.is_none() {
            return Err(Problem::at(
                "payload.registration",
                "`registration` goes with `store` (a closure brings its own)",
            ));
        }
        if let Some(c) = &p.closure {
            if !c.starts_with("/nix/store/") {
                return Err(Problem::at(
                    "payload.closure",
                    format!(
                        "{c:?} is not a /nix/store path: give the store path itself \
                         (for `./result`, what `readlink -f result` prints); `store` is for \
                         a directory of store paths copied from another machine"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[boot]` against the payload: a `generic` system needs `kernel` and
    /// `initrd` from the payload; a `nixos` one installs its own (with a
    /// `flake`, each node's system is its flake attribute and `[boot]` names
    /// none; else `toplevel` or the closure is a store path name); the
    /// `check` system goes with a synthetic store or none; `kernel` and
    /// `initrd` are paths in the store ([`crate::payload::check_path`]).
    fn check_boot(&self) -> Result<(), Problem> {
        let p = &self.payload;
        if let Some(boot) = &self.boot {
            match boot.system {
                BootSystem::Generic => {
                    if boot.kernel.is_none() || boot.initrd.is_none() || p.is_empty() {
                        return Err(Problem::at(
                            "boot",
                            "a `generic` system needs `kernel` and `initrd` from the payload",
                        ));
                    }
                }
                BootSystem::Nixos if p.flake.is_some() => {
                    if boot.toplevel.is_some() || boot.kernel.is_some() || boot.initrd.is_some() {
                        return Err(Problem::at(
                            "boot",
                            "with a `flake`, each node's system is its own flake attribute \
                             (`system` of [[nodes]]): give no `toplevel`, `kernel` or `initrd`",
                        ));
                    }
                }
                BootSystem::Nixos => {
                    if boot.kernel.is_some() || boot.initrd.is_some() {
                        return Err(Problem::at(
                            "boot",
                            "a `nixos` system installs its own kernel and initrd: \
                             give `toplevel` (or a `closure`), not `kernel` or `initrd`",
                        ));
                    }
                    let toplevel = boot.nixos_toplevel(p).unwrap_or_default();
                    if p.is_empty()
                        || toplevel.contains('/')
                        || crate::payload::check_path(&toplevel).is_err()
                    {
                        return Err(Problem::at(
                            "boot.toplevel",
                            format!(
                                "{toplevel:?} is not a store path name (`HASH-nixos-system-…`); \
                                 a `nixos` system needs `toplevel` or a `closure` in [payload]"
                            ),
                        ));
                    }
                }
                BootSystem::Check => {
                    if p.closure.is_some() || p.store.is_some() || p.flake.is_some() {
                        return Err(Problem::at(
                            "boot.system",
                            "the `check` system goes with a synthetic store or none",
                        ));
                    }
                }
            }
            for (key, path) in [("kernel", &boot.kernel), ("initrd", &boot.initrd)] {
                if let Some(path) = path {
                    if crate::payload::check_path(path).is_err() {
                        return Err(Problem::at(
                            format!("boot.{key}"),
                            format!("{path:?} is not a path in the store (`HASH-NAME/…`)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Where the payload goes and how it is packed: a dataset of the root
    /// pool mounted at /, /nix or /nix/store to hold the store (as the
    /// install mounts them: inherited mountpoints and canmount count), a
    /// zstd level from 1 to 22 (zstd's `ZSTD_maxCLevel`), at least one
    /// worker.
    fn check_payload_target(&self) -> Result<(), Problem> {
        let p = &self.payload;
        // As mounted by the install (inherited mountpoints and canmount count).
        let holds_store = crate::datasets::mounts(&self.pool)
            .iter()
            .any(|m| ["/", "/nix", "/nix/store"].contains(&m.mountpoint.as_str()));
        if !p.is_empty() && !holds_store {
            return Err(Problem::at(
                "payload",
                "no dataset is mounted at /, /nix or /nix/store to hold the store",
            ));
        }
        if !(1..=22).contains(&p.level) {
            return Err(Problem::at(
                "payload.level",
                format!("zstd level {} is out of range (1 to 22)", p.level),
            ));
        }
        if p.workers == Some(0) {
            return Err(Problem::at(
                "payload.workers",
                "at least one worker is needed",
            ));
        }
        Ok(())
    }

    /// `[[nodes]]`: each node's inline keys parse as `authorized_keys` lines
    /// ([`crate::net::keys::parse_line`]), its `disk` rules as
    /// [`DiskSelect::check`] checks them; names, fixed host IDs and match
    /// rules are unique among the nodes.
    fn check_nodes(&self) -> Result<(), Problem> {
        for (i, node) in self.nodes.iter().enumerate() {
            for (k, key) in node.keys.iter().enumerate() {
                crate::net::keys::parse_line(key, "").map_err(|e| {
                    Problem::at(format!("nodes[{i}].keys[{k}]"), e).spanned(node.name.span())
                })?;
            }
            if let Some(sel) = &node.disk {
                sel.check().map_err(|p| {
                    p.under(&format!("nodes[{i}].disk"))
                        .spanned(node.name.span())
                })?;
            }
        }
        // Nodes: unique names, host IDs and match rules.
        let mut seen_names = BTreeSet::new();
        let mut seen_ids = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let name = &node.name.get_ref().0;
            let key = format!("nodes[{i}]");
            if !seen_names.insert(name.clone()) {
                return Err(Problem::at(
                    format!("{key}.name"),
                    format!("node `{name}` is defined twice"),
                )
                .spanned(node.name.span()));
            }
            if let HostId::Fixed(id) = node.hostid {
                if let Some(other) = seen_ids.insert(id, name.clone()) {
                    return Err(Problem::at(
                        format!("{key}.hostid"),
                        format!("host ID {id:08x} is also given to node `{other}`"),
                    )
                    .spanned(node.name.span()));
                }
            }
            if !node.matches.is_empty() {
                if let Some(other) = self.nodes[..i].iter().find(|n| n.matches == node.matches) {
                    return Err(Problem::at(
                        format!("{key}.match"),
                        format!(
                            "node `{name}` has the same match rules as node `{}`",
                            other.name.get_ref()
                        ),
                    )
                    .spanned(node.name.span()));
                }
            }
        }
        Ok(())
    }
}

/// The checks of one pool's own tree, `[pool]` or `[[pools]]` N (`prefix`
/// is `pool` or `pools[N]`): dataset parents defined first, unique names,
/// unique mountpoints, ZFS names and properties ([`crate::zprop`]),
/// snapshots and volumes. Returns the dataset names.
fn check_pool_tree(pool: &Pool, prefix: &str) -> Result<BTreeSet<String>, Problem> {
    // Datasets: parents defined first, names unique, mountpoints unique.
    let mut names = BTreeSet::new();
    for (i, ds) in pool.datasets.iter().enumerate() {
        let key = format!("{prefix}.datasets[{i}]");
        let name = &ds.name.get_ref().0;
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !names.contains(parent) {
                return Err(Problem::at(
                    format!("{key}.name"),
                    format!("parent dataset `{parent}` of `{name}` is not defined before it"),
                )
                .spanned(ds.name.span()));
            }
        }
        if !names.insert(name.clone()) {
            return Err(Problem::at(
                format!("{key}.name"),
                format!("dataset `{name}` is defined twice"),
            )
            .spanned(ds.name.span()));
        }
    }
    // Mountpoints as ZFS will have them (inherited, normalised) are unique.
    crate::datasets::tree(pool).map_err(|e| {
        let ds = e.dataset.and_then(|i| pool.datasets.get(i));
        let span = ds.map(|d| match &d.mountpoint {
            Some(m) if e.key.ends_with("].mountpoint") => m.span(),
            _ => d.name.span(),
        });
        let key = match e.key.strip_prefix("pool.") {
            Some(rest) => format!("{prefix}.{rest}"),
            None => e.key,
        };
        Problem::at(key, e.message).spanned(span)
    })?;
    // ZFS names and property values as the node's ZFS checks them
    // (`crate::zprop`, from OpenZFS 2.1.11's own tables).
    let pool_name = &pool.name.0;
    for (i, ds) in pool.datasets.iter().enumerate() {
        crate::zprop::check_full_dataset_name(pool_name, &ds.name.get_ref().0).map_err(|e| {
            Problem::at(format!("{prefix}.datasets[{i}].name"), e).spanned(ds.name.span())
        })?;
    }
    for (k, v) in &pool.options {
        crate::zprop::check_pool_property(k, v)
            .map_err(|e| Problem::at(format!("{prefix}.options.{k}"), e))?;
    }
    let mut dataset_options = vec![(format!("{prefix}.root-options"), &pool.root_options)];
    for (i, ds) in pool.datasets.iter().enumerate() {
        dataset_options.push((format!("{prefix}.datasets[{i}].options"), &ds.options));
    }
    for &(ref key, options) in &dataset_options {
        for (k, v) in options {
            crate::zprop::check_dataset_property(k, v)
                .map_err(|e| Problem::at(format!("{key}.{k}"), e))?;
        }
        crate::zprop::check_encryption(options)
            .map_err(|(k, e)| Problem::at(format!("{key}.{k}"), e))?;
    }
    crate::zprop::check_features(
        &pool.options,
        dataset_options.iter().map(|(k, o)| (k.clone(), *o)),
    )
    .map_err(|(k, e)| Problem::at(k, e))?;
    check_snapshots_and_zvols(pool, prefix, &names)?;
    Ok(names)
}

/// Snapshot names (one component, as `zfs snapshot` takes it) and the
/// volumes: a parent that exists (`names`: the datasets), a unique name,
/// a `volsize` that is a positive multiple of `volblocksize` (a power of
/// two from 512 to 128K; `zfs_prop.c`, and libzfs's "volume size must
/// be a multiple of volume block size"), properties as for datasets, no
/// `mountpoint`/`canmount` (filesystem properties), and no swap.
fn check_snapshots_and_zvols(
    pool: &Pool,
    prefix: &str,
    names: &BTreeSet<String>,
) -> Result<(), Problem> {
    for (i, ds) in pool.datasets.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, snap) in ds.snapshots.iter().enumerate() {
            let key = format!("{prefix}.datasets[{i}].snapshots[{j}]");
            crate::zprop::check_dataset_name(snap)
                .and_then(|()| {
                    if snap.contains('/') {
                        Err(format!(
                            "snapshot name `{snap}` has a `/`: give the name after the `@` only"
                        ))
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| Problem::at(key.clone(), e).spanned(ds.name.span()))?;
            if !seen.insert(snap) {
                return Err(
                    Problem::at(key, format!("snapshot `{snap}` is given twice"))
                        .spanned(ds.name.span()),
                );
            }
        }
    }
    let pool_name = &pool.name.0;
    let mut taken = names.clone();
    for (i, z) in pool.zvols.iter().enumerate() {
        let key = format!("{prefix}.zvols[{i}]");
        let span = Some(z.name.span());
        let name = &z.name.get_ref().0;
        if z.swap {
            return Err(Problem::at(
                format!("{key}.swap"),
                "swap on a ZFS volume can deadlock the machine under memory pressure (ZFS \
                 needs memory to write the pages the kernel is swapping out to free memory; \
                 openzfs/zfs#7734, open): use `[disk] swap-size`, a swap partition on \
                 every disk of the pool",
            )
            .spanned(span));
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !names.contains(parent) {
                return Err(Problem::at(format!("{key}.name"), format!("parent dataset `{parent}` of volume `{name}` is not among the pool's datasets")).spanned(span));
            }
        }
        if !taken.insert(name.clone()) {
            return Err(
                Problem::at(format!("{key}.name"), format!("`{name}` is defined twice"))
                    .spanned(span),
            );
        }
        crate::zprop::check_full_dataset_name(pool_name, name)
            .map_err(|e| Problem::at(format!("{key}.name"), e).spanned(span.clone()))?;
        let block = match z.options.get("volblocksize") {
            Some(v) => match crate::zprop::parse_number(v) {
                Some(b) if b.is_power_of_two() && (512..=128 << 10).contains(&b) => b,
                _ => {
                    return Err(Problem::at(
                        format!("{key}.options.volblocksize"),
                        format!("volblocksize `{v}` is not a power of two from 512 to 128K"),
                    )
                    .spanned(span))
                }
            },
            None => 8 << 10,
        };
        if z.volsize.0 == 0 || z.volsize.0 % block != 0 {
            return Err(Problem::at(
                format!("{key}.volsize"),
                format!(
                    "volsize {} is not a positive multiple of the volume's block size ({})",
                    z.volsize,
                    Size(block)
                ),
            )
            .spanned(span));
        }
        for (k, v) in &z.options {
            if k == "volblocksize" {
                continue;
            }
            if matches!(k.as_str(), "mountpoint" | "canmount" | "recordsize") {
                return Err(Problem::at(
                    format!("{key}.options.{k}"),
                    format!("`{k}` is a file system property; a volume does not take it"),
                )
                .spanned(span));
            }
            crate::zprop::check_dataset_property(k, v)
                .map_err(|e| Problem::at(format!("{key}.options.{k}"), e).spanned(span.clone()))?;
        }
        crate::zprop::check_encryption(&z.options)
            .map_err(|(k, e)| Problem::at(format!("{key}.options.{k}"), e).spanned(span.clone()))?;
    }
    Ok(())
}

impl DiskSelect {
    /// The rules that choose one disk (`[disk] select`, each of `members`,
    /// a data pool's `disks`, `special`/`log`/`cache`, a node's `disk`): at
    /// least one rule; a device name only with a size range (a kernel name
    /// can change from boot to boot); a sane range. On error: a problem
    /// whose key is below the selector's (`.device`, or empty for the
    /// selector itself); the caller puts it [`Problem::under`] its own.
    fn check(&self) -> Result<(), Problem> {
        if *self == Self::default() {
            return Err(Problem::at(
                "",
                "give at least one rule (serial, wwn, model, min-size/max-size, bus)",
            ));
        }
        if self.device.is_some() && (self.min_size.is_none() || self.max_size.is_none()) {
            return Err(Problem::at(
                ".device",
                "a device name is not a safe selector on its own: add min-size and max-size",
            ));
        }
        if let (Some(lo), Some(hi)) = (self.min_size, self.max_size) {
            if lo > hi {
                return Err(Problem::at(
                    "",
                    format!("min-size {lo} is larger than max-size {hi}"),
                ));
            }
        }
        Ok(())
    }
}

impl Ssh {
    /// `[ssh]`: the key URL (https, or http when `allow-http` says so; a
    /// valid URL, [`crate::net::url::check_url`]; a `{user}` to replace
    /// when `github-users` are given), the user names (letters,
    /// digits, `-`, `_`, `.`), the inline keys (`authorized_keys` lines,
    /// [`crate::net::keys::parse_line`]) and the CA file names. On error: a
    /// problem whose key is below `ssh` (`.key-url`).
    fn check(&self) -> Result<(), Problem> {
        let url = &self.key_url;
        if url.starts_with("http://") && !self.allow_http {
            return Err(Problem::at(
                ".key-url",
                "keys over plain http are refused: use https, or set `allow-http = true`",
            ));
        }
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(Problem::at(
                ".key-url",
                format!("`{url}` is not an https:// URL"),
            ));
        }
        if let Err(e) = crate::net::url::check_url(&url.replace("{user}", "user")) {
            return Err(Problem::at(".key-url", format!("`{url}`: {e}")));
        }
        if !self.github_users.is_empty() && !url.contains("{user}") {
            return Err(Problem::at(
                ".key-url",
                format!("`{url}` has no `{{user}}` to replace with each of `github-users`"),
            ));
        }
        for (i, user) in self.github_users.iter().enumerate() {
            let ok = !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(Problem::at(
                    format!(".github-users[{i}]"),
                    format!("`{user}` is not a user name (letters, digits, `-`, `_`, `.`)"),
                ));
            }
        }
        for (i, key) in self.keys.iter().enumerate() {
            crate::net::keys::parse_line(key, "")
                .map_err(|e| Problem::at(format!(".keys[{i}]"), e))?;
        }
        for (i, path) in self.ca_certificates.iter().enumerate() {
            if path.trim().is_empty() {
                return Err(Problem::at(
                    format!(".ca-certificates[{i}]"),
                    "empty file name",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{err, refused, MINIMAL};
    use super::super::*;

    #[test]
    fn several_disks_need_a_vdev_type_and_enough_disks() {
        let two = "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"B\" } ]\n[pool]\n";
        let e = err(two);
        assert_eq!(e.key, "pool.vdev", "{e}");
        assert!(
            e.message.contains("names 2 disks")
                && e.message.contains("`mirror`, `raidz1` or `raidz2`"),
            "{e}"
        );
        let e = err(&format!("{two}vdev = \"raidz2\"\n"));
        assert_eq!(e.key, "pool.vdev", "{e}");
        assert!(
            e.message
                .contains("a raidz2 needs at least 3 disks and [disk] names 2"),
            "{e}"
        );
        let e =
            err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n[pool]\nvdev = \"mirror\"\n");
        assert!(e.message.contains("a mirror needs at least 2 disks"), "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"A\" } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0]", "{e}");
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("given twice"), "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0]", "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"B\", max-size = \"100MiB\" } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0].max-size", "{e}");
        let p = Profile::parse(&format!("{two}vdev = \"mirror\"\n"), "t.toml").expect("mirror");
        assert_eq!(p.pool.vdev, Vdev::Mirror);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.disk.members, p.disk.members);
    }

    #[test]
    fn data_pools_are_checked_with_their_line_and_key() {
        let base = "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n";
        let tank = |body: &str| format!("{base}[[pools]]\nname = \"tank\"\n{body}");
        // A whole data pool: mirror, special mirror, log, cache, datasets, a volume.
        let src = tank(
            "vdev = \"mirror\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n\
             special = [ { serial = \"S1\" }, { serial = \"S2\" } ]\nlog = [ { serial = \"L1\" } ]\n\
             cache = [ { serial = \"C1\" } ]\nroot-options = { compression = \"zstd\" }\n\
             [[pools.datasets]]\nname = \"media\"\nmountpoint = \"/srv/media\"\n\
             [[pools.zvols]]\nname = \"vm0\"\nvolsize = \"1GiB\"\n",
        );
        let p = Profile::parse(&src, "t.toml").expect("data pool");
        assert_eq!(p.pools[0].disks.len(), 2);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.pools[0].special, p.pools[0].special);
        refused(
            &tank("disks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n"),
            "pools[0].vdev",
            "[[pools]]",
            "`disks` names 2 disks and the vdev is `single`",
        );
        refused(
            &tank("vdev = \"raidz2\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n"),
            "pools[0].vdev",
            "vdev = ",
            "a raidz2 needs at least 3 disks",
        );
        refused(
            &tank(""),
            "pools[0].disks",
            "[[pools]]",
            "a data pool needs `disks`",
        );
        refused(
            &format!("{base}[[pools]]\ndisks = [ {{ serial = \"D1\" }} ]\n"),
            "pools[0].name",
            "[[pools]]",
            "pool name `rpool` is used twice",
        );
        refused(
            &tank("disks = [ { serial = \"A\" } ]\n"),
            "pools[0].disks[0]",
            "disks = ",
            "given twice (also as disk.select)",
        );
        refused(
            &tank("vdev = \"mirror\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\nspecial = [ { serial = \"S1\" } ]\n"),
            "pools[0].special",
            "special = ",
            "mismatched replication level",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\nroot-options = { mountpoint = \"/\" }\n"),
            "pools[0]",
            "[[pools]]",
            "the root file system comes from the root pool",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\nroot-options = { mountpoint = \"/nix\" }\n"),
            "pools[0]",
            "[[pools]]",
            "mounted at /nix, over /nix/store, which the installed system needs from the root pool",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\n[[pools.datasets]]\nname = \"a/b\"\n"),
            "pools[0].datasets[0].name",
            "name = \"a/b\"",
            "parent dataset `a` of `a/b` is not defined before it",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\n[[pools.datasets]]\nname = \"x\"\noptions = { compresion = \"lz4\" }\n"),
            "pools[0].datasets[0].options.compresion",
            "options = { compresion",
            "compresion",
        );
        refused(
            &format!(
                "{base}[pool]\nroot-options = {{ mountpoint = \"/srv\" }}\n[[pools]]\nname = \"tank\"\n\
                 disks = [ {{ serial = \"D1\" }} ]\nroot-options = {{ mountpoint = \"/srv\" }}\n"
            ),
            "pools[0]",
            "[[pools]]",
            "where a dataset of [pool] is mounted too",
        );
        refused(
            &format!("{base}[pool]\ndisks = [ {{ serial = \"D1\" }} ]\n"),
            "pool.disks",
            "disks = ",
            "`disks` is for a data pool",
        );
    }

    #[test]
    fn payload_sources_are_checked() {
        let with =
            |payload: &str, datasets: &str| format!("{MINIMAL}{datasets}\n[payload]\n{payload}\n");
        let root = "[[pool.datasets]]\nname = \"root\"\nmountpoint = \"/\"";
        let e = err(&with(
            "store = \"s\"\nsynthetic = { files = 1, bytes = \"1KiB\" }",
            root,
        ));
        assert!(e.message.contains("not several"), "{e}");
        let e = err(&with("store = \"s\"", ""));
        assert!(
            e.message
                .contains("no dataset is mounted at /, /nix or /nix/store"),
            "{e}"
        );
        let e = err(&with("closure = \"./result\"", root));
        assert_eq!(e.key, "payload.closure", "{e}");
        assert!(e.message.contains("readlink -f result"), "{e}");
        let e = err(&with(
            "registration = \"r\"\nsynthetic = { files = 1, bytes = \"1KiB\" }",
            root,
        ));
        assert_eq!(e.key, "payload.registration", "{e}");
        let e = err(&with("store = \"s\"\nlevel = 30", root));
        assert!(e.message.contains("zstd level 30"), "{e}");
        let p = Profile::parse(&with("store = \"s\"\nworkers = 4", root), "t.toml").expect("valid");
        assert_eq!(
            (p.payload.level, p.payload.workers),
            (crate::payload::DEFAULT_LEVEL, Some(4))
        );
    }

    #[test]
    fn flake_rules_are_checked() {
        let root = "[[pool.datasets]]\nname = \"r\"\nmountpoint = \"/\"\n";
        let with =
            |payload: &str, rest: &str| format!("{MINIMAL}{root}\n[payload]\n{payload}\n{rest}");
        let e = err(&with("flake = \"f\"\nclosure = \"/nix/store/a-b\"", ""));
        assert_eq!(e.key, "payload", "{e}");
        let e = err(&with(
            "flake = \"f\"",
            "[boot]\nsystem = \"nixos\"\ntoplevel = \"a-nixos-system-x\"\n",
        ));
        assert_eq!(e.key, "boot", "{e}");
        let e = err(&with(
            "synthetic = { files = 1, bytes = \"1KiB\" }",
            "[[nodes]]\nname = \"n\"\nsystem = \"x\"\n",
        ));
        assert_eq!(e.key, "nodes[0].system", "{e}");
        let p = Profile::parse(
            &with(
                "flake = \"f\"",
                "[boot]\nsystem = \"nixos\"\n[[nodes]]\nname = \"n\"\nsystem = \"x\"\n",
            ),
            "t.toml",
        )
        .expect("a flake profile");
        assert_eq!(p.nodes[0].system.as_deref(), Some("x"));
        // The generic node's own system goes with a fixed host ID only.
        let e = err(&with(
            "flake = \"f\"",
            "[boot]\nsystem = \"nixos\"\n[default-node]\nsystem = \"d\"\n",
        ));
        assert_eq!(e.key, "default-node.hostid", "{e}");
        assert!(e.message.contains("needs a fixed `hostid`"), "{e}");
        let p = Profile::parse(
            &with(
                "flake = \"f\"",
                "[boot]\nsystem = \"nixos\"\n[default-node]\nsystem = \"d\"\nhostid = \"00c0ffee\"\n",
            ),
            "t.toml",
        )
        .expect("a default system with a fixed host ID");
        assert_eq!(p.default_node.system.as_deref(), Some("d"));
        assert_eq!(
            default_system_attr("kos-mos"),
            "nixosConfigurations.\"kos-mos\".config.system.build.toplevel"
        );
    }

    #[test]
    fn missing_parent_dataset() {
        let src = format!("{MINIMAL}[[pool.datasets]]\nname = \"local/nix\"\n");
        let e = err(&src);
        assert_eq!(e.key, "pool.datasets[0].name");
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("parent dataset `local`"), "{e}");
    }

    #[test]
    fn duplicate_mountpoint_and_relative_mountpoint() {
        let src = format!(
            "{MINIMAL}[[pool.datasets]]\nname = \"a\"\nmountpoint = \"/x\"\n[[pool.datasets]]\nname = \"b\"\nmountpoint = \"/x\"\n"
        );
        assert!(err(&src).message.contains("already used"));
        let src = format!("{MINIMAL}[[pool.datasets]]\nname = \"a\"\nmountpoint = \"x\"\n");
        assert_eq!(err(&src).key, "pool.datasets[0].mountpoint");
    }

    #[test]
    fn device_name_needs_size_range() {
        let e = err(&MINIMAL.replace("serial = \"S1\"", "device = \"nvme0n1\""));
        assert!(e.message.contains("not a safe selector"), "{e}");
    }

    #[test]
    fn a_nodes_disk_rules_are_checked_like_the_profiles() {
        let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\ndisk = {{}}\n");
        let e = err(&src);
        assert_eq!(e.key, "nodes[0].disk", "{e}");
        assert!(e.message.contains("at least one rule"), "{e}");
    }

    #[test]
    fn duplicate_host_ids_refused() {
        let src = format!(
            "{MINIMAL}[[nodes]]\nname = \"a\"\nhostid = \"472479d4\"\n[[nodes]]\nname = \"b\"\nhostid = \"472479D4\"\n"
        );
        assert!(err(&src).message.contains("also given"));
    }

    #[test]
    fn unknown_zfs_property_is_refused_with_its_line() {
        let src = MINIMAL.replace(
            "[pool]",
            "[pool]\nroot-options = { compression = \"zstd\", compresion = \"zstd\" }",
        );
        let e = err(&src);
        assert_eq!(e.key, "pool.root-options.compresion", "{e}");
        assert_eq!((e.line, e.column), (6, 40), "{e}");
        // User properties and pool features are accepted.
        let ok = MINIMAL.replace("[pool]", "[pool]\noptions = { \"feature@zstd_compress\" = \"enabled\" }\nroot-options = { \"com.example:tag\" = \"x\" }");
        Profile::parse(&ok, "t.toml").expect("valid");
    }

    #[test]
    fn ssh_section_is_checked() {
        let with = |ssh: &str| MINIMAL.replace("[pool]", &format!("[ssh]\n{ssh}\n[pool]"));
        let ok = with(
            "github-users = [\"alice\", \"bob-2\"]\nkey-url = \"https://keys.example:8443/u/{user}\"\nca-certificates = [\"ca.pem\"]",
        );
        let p = Profile::parse(&ok, "t.toml").expect("valid");
        assert_eq!(p.ssh.ca_certificates, ["ca.pem"]);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.ssh.ca_certificates, ["ca.pem"]);
        for (ssh, key, want) in [
            (
                "key-url = \"http://x/{user}\"",
                "ssh.key-url",
                "plain http are refused",
            ),
            (
                "key-url = \"ftp://x/{user}\"",
                "ssh.key-url",
                "not an https:// URL",
            ),
            (
                "key-url = \"https://:9/{user}\"",
                "ssh.key-url",
                "no valid host name",
            ),
            (
                "github-users = [\"a\"]\nkey-url = \"https://x/keys\"",
                "ssh.key-url",
                "no `{user}`",
            ),
            (
                "github-users = [\"a/../b\"]",
                "ssh.github-users[0]",
                "not a user name",
            ),
            (
                "keys = [\"ssh-ed25519 !!\"]",
                "ssh.keys[0]",
                "not valid base64",
            ),
            (
                "ca-certificates = [\"\"]",
                "ssh.ca-certificates[0]",
                "empty file name",
            ),
        ] {
            let src = with(ssh);
            let e = err(&src);
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(want), "{e}");
            // The error points at the line that sets the key.
            let field = key["ssh.".len()..].split('[').next().unwrap_or_default();
            let line = src
                .lines()
                .position(|l| l.starts_with(field))
                .expect("key set");
            assert_eq!(e.line, line + 1, "{e}");
        }
        // Plain http when allowed; no `{user}` needed without users.
        Profile::parse(
            &with("allow-http = true\nkey-url = \"http://10.0.2.2:8080/keys\""),
            "t.toml",
        )
        .expect("valid");
    }

    #[test]
    fn zfs_property_values_are_checked_with_their_line() {
        let with = |pool: &str| MINIMAL.replace("[pool]", &format!("[pool]\n{pool}"));
        // The example: ashift 99 passed every check before.
        refused(
            &with("options = { ashift = \"99\", autotrim = \"on\" }"),
            "pool.options.ashift",
            "ashift",
            "out of range: use 9 to 16",
        );
        refused(
            &with("root-options = { compression = \"zstd-42\" }"),
            "pool.root-options.compression",
            "compression",
            "not a value of `compression`",
        );
        refused(
            &with("root-options = { xattr = \"sa\", acltype = \"posix1e\" }"),
            "pool.root-options.acltype",
            "acltype",
            "not a value",
        );
        // A dataset's option is found in that dataset's table, not in an
        // earlier one that sets the same property well.
        let src = format!(
            "{MINIMAL}[[pool.datasets]]\nname = \"a\"\noptions = {{ recordsize = \"1M\" }}\n\
             [[pool.datasets]]\nname = \"b\"\noptions = {{ recordsize = \"96K\" }}\n"
        );
        refused(
            &src,
            "pool.datasets[1].options.recordsize",
            "96K",
            "power of two from 512 to 1M",
        );
        // The encryption example is refused, saying why.
        refused(
            &with(
                "root-options = { encryption = \"aes-256-gcm\", keyformat = \"passphrase\", keylocation = \"prompt\" }",
            ),
            "pool.root-options.keylocation",
            "keylocation",
            "an unattended install has nobody to answer",
        );
        refused(
            &with("root-options = { encryption = \"on\" }"),
            "pool.root-options.encryption",
            "encryption",
            "needs `keyformat`",
        );
        // A value that needs a pool feature the pool options turn off.
        refused(
            &with(
                "options = { \"feature@zstd_compress\" = \"disabled\" }\nroot-options = { compression = \"zstd\" }",
            ),
            "pool.root-options.compression",
            "compression",
            "needs the pool feature zstd_compress",
        );
        // Good values still pass.
        Profile::parse(
            &with(
                "options = { ashift = \"12\", autotrim = \"on\", \"feature@zstd_compress\" = \"enabled\" }\n\
                 root-options = { compression = \"zstd\", acltype = \"posixacl\", xattr = \"sa\", \
                 dnodesize = \"auto\", normalization = \"formD\", recordsize = \"128K\", atime = \"off\", \
                 canmount = \"off\", mountpoint = \"none\", \"com.example:tag\" = \"x\" }",
            ),
            "t.toml",
        )
        .expect("valid");
    }

    #[test]
    fn esp_swap_and_size_fields_are_checked() {
        let disk = |extra: &str| MINIMAL.replace("select =", &format!("{extra}\nselect ="));
        // The examples: 32 MiB is FAT16 everywhere; 0B panicked
        // inside the gpt crate on the node.
        for esp in ["32MiB", "0B", "1MiB"] {
            refused(
                &disk(&format!("esp-size = \"{esp}\"")),
                "disk.esp-size",
                "esp-size",
                "cannot be FAT32",
            );
        }
        refused(
            &disk("esp-size = \"20TiB\""),
            "disk.esp-size",
            "esp-size",
            "cannot be FAT32",
        );
        // FAT32 with 512-byte sectors: accepted here, the plan decides.
        Profile::parse(&disk("esp-size = \"64MiB\""), "t.toml").expect("64MiB");
        Profile::parse(&disk("esp-size = \"260MiB\""), "t.toml").expect("260MiB");
        refused(
            &disk("swap-size = \"0B\""),
            "disk.swap-size",
            "swap-size",
            "leave `swap-size` out",
        );
        refused(
            &MINIMAL.replace("serial = \"S1\"", "bus = \"nvme\", max-size = \"0B\""),
            "disk.select.max-size",
            "max-size",
            "no disk of at most 0B can hold the layout",
        );
        refused(
            &format!("{MINIMAL}[image]\ndevice-timeout-secs = 0\n"),
            "image.device-timeout-secs",
            "device-timeout-secs",
            "0 seconds",
        );
        refused(
            &format!("{MINIMAL}[ssh]\nfetch-timeout-secs = 0\n"),
            "ssh.fetch-timeout-secs",
            "fetch-timeout-secs",
            "0 seconds",
        );
        let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\ndisk = {{ serial = \"X\", max-size = \"512MiB\" }}\n");
        refused(
            &src,
            "nodes[0].disk.max-size",
            "name = \"a\"",
            "hold the layout",
        );
    }
}
