//! disko's ZFS examples (nix-community/disko, `example/`) translated into
//! profiles in `tests/fixtures/disko/`, each with its verdict in its
//! comments: every one is checked as `profile check` checks it. A fixture
//! whose first line is `# refused: TEXT` must be refused with an error that
//! holds TEXT; every other one must pass. `zfs.toml`, with the data pools
//! of `non-root-zfs.toml`, and `zfs-impermanence.toml` are installed in
//! QEMU by `multidisk.rs`.

use std::path::PathBuf;

use nodeflash_installer::profile::Profile;

#[test]
fn every_translated_disko_example_gets_its_verdict() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/disko");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/disko")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read fixture");
        let parsed = Profile::parse(&text, &path.display().to_string());
        match text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# refused: "))
        {
            Some(want) => {
                let e = parsed.expect_err(&format!("{} is refused", path.display()));
                assert!(e.to_string().contains(want), "{}: {e}", path.display());
            }
            None => {
                parsed.unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// What the verdicts say each fixture expresses, as the parsed profile has
/// it: the data pools, the classes beside the root vdev, the legacy mount.
#[test]
fn the_data_pool_fixtures_hold_what_their_verdicts_say() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/disko");
    let load = |name: &str| {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).expect("read fixture");
        Profile::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"))
    };
    let p = load("non-root-zfs.toml");
    let pools: Vec<(String, usize)> = p
        .pools
        .iter()
        .map(|x| (x.name.to_string(), x.disks.len()))
        .collect();
    assert_eq!(pools, [("storage".into(), 2), ("storage2".into(), 1)]);
    let p = load("zfs-with-vdevs.toml");
    let classes: Vec<(&str, usize)> = p
        .pool
        .aux_classes()
        .iter()
        .map(|(c, l)| (*c, l.len()))
        .collect();
    assert_eq!(classes, [("special", 2), ("log", 2), ("cache", 1)]);
    let p = load("zfs.toml");
    let legacy: Vec<_> = nodeflash_installer::datasets::mounts(&p.pool)
        .into_iter()
        .filter(|m| m.legacy)
        .map(|m| (m.dataset, m.mountpoint))
        .collect();
    assert_eq!(
        legacy,
        [(
            "zroot/zfs_legacy_fs".to_string(),
            "/zfs_legacy_fs".to_string()
        )]
    );
    let p = load("zfs-over-legacy.toml");
    assert_eq!(p.pools[0].name.to_string(), "zroot");
}
