//! disko's ZFS examples (nix-community/disko, `example/`) translated into
//! profiles in `tests/fixtures/disko/`, each with its verdict in its
//! comments: every one is checked as `profile check` checks it. A fixture
//! whose first line is `# refused: TEXT` must be refused with an error that
//! holds TEXT; every other one must pass. `zfs.toml` is installed in QEMU
//! by `multidisk.rs`.

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
    assert!(files.len() >= 6, "{files:?}");
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
