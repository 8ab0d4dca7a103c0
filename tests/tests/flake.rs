//! Real Nix (Debian's nix-bin): the module `nodeflash nixos-module`
//! generates, evaluated by Nix; a `closure` and a `flake` profile's payload
//! from systems Nix built from the stand-in flake (tests/fixtures/flake).

use std::collections::BTreeSet;
use std::path::Path;

use nodeflash_installer::payload::Payload;
use nodeflash_installer::profile::{HostId, Profile};
use nodeflash_installer::units::mib;
use nodeflash_tests::flake::{eval, nix_store, standin_flake};
use nodeflash_tests::load_profile;

/// A variant of the `qemu` profile in `dir` with `payload` instead of its
/// synthetic store and no boot.
fn variant(dir: &Path, payload: &str) -> (Profile, std::path::PathBuf) {
    let base =
        std::fs::read_to_string(nodeflash_tests::env_path("NODEFLASH_PROFILES").join("qemu.toml"))
            .expect("qemu.toml");
    let text = base
        .replace(
            "synthetic = { files = 300, bytes = \"8MiB\", seed = 1 }",
            payload,
        )
        .replace("[boot]\nsystem = \"check\"", "");
    assert_ne!(text, base);
    let path = dir.join("variant.toml");
    std::fs::write(&path, text).expect("write");
    (Profile::load(&path).expect("variant loads"), path)
}

fn prepare(profile: &Profile, path: &Path, cache: &Path) -> nodeflash_builder::payload::Packed {
    let cache = nodeflash_builder::cache::Cache::at(cache.to_path_buf()).expect("cache");
    nodeflash_builder::payload::prepare(profile, path, &cache, None)
        .expect("the payload is packed")
        .expect("there is a payload")
}

fn manifest(p: &nodeflash_builder::payload::Packed) -> nodeflash_installer::payload::Manifest {
    Payload::open(std::fs::File::open(&p.path).expect("payload"))
        .expect("opens")
        .manifest
}

fn names(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.trim_start_matches("/nix/store/").to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn the_generated_module_evaluates_to_the_profile() {
    let profile = load_profile("qemu");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("nodeflash.nix");
    std::fs::write(
        &file,
        nodeflash_installer::nixos::flake_module(&profile, "qemu.toml"),
    )
    .expect("write");
    let common = eval(&file, "common");
    let fs = &common["fileSystems"];
    // Every dataset the profile mounts, and nothing else from the pool.
    let mut zfs = Vec::new();
    for d in &profile.pool.datasets {
        if let Some(m) = &d.mountpoint {
            let mp = &m.get_ref().0;
            let device = format!("{}/{}", profile.pool.name, d.name.get_ref());
            assert_eq!(fs[mp]["device"], device.as_str(), "{mp}");
            assert_eq!(fs[mp]["fsType"], "zfs");
            assert_eq!(fs[mp]["options"], serde_json::json!(["zfsutil"]));
            zfs.push(mp.clone());
        }
    }
    let all: BTreeSet<&String> = fs.as_object().expect("fileSystems").keys().collect();
    assert_eq!(all.len(), zfs.len() + 1, "{fs:#}");
    assert_eq!(fs["/boot"]["device"], "/dev/disk/by-partlabel/ESP");
    assert_eq!(fs["/boot"]["fsType"], "vfat");
    assert_eq!(
        common["swapDevices"],
        serde_json::json!([{ "device": "/dev/disk/by-partlabel/swap" }])
    );
    assert_eq!(
        common["boot"]["supportedFilesystems"],
        serde_json::json!(["zfs"])
    );
    assert_eq!(common["boot"]["loader"]["systemd-boot"]["enable"], true);
    assert_eq!(
        common["users"]["users"]["root"]["openssh"]["authorizedKeys"]["keys"],
        serde_json::json!(profile.ssh.keys)
    );
    let nodes = eval(&file, "nodes");
    assert_eq!(nodes.as_object().expect("nodes").len(), profile.nodes.len());
    for n in &profile.nodes {
        let name = &n.name.get_ref().0;
        let HostId::Fixed(id) = n.hostid else {
            panic!("the qemu profile's nodes have fixed host IDs")
        };
        assert_eq!(nodes[name]["networking"]["hostName"], name.as_str());
        assert_eq!(nodes[name]["networking"]["hostId"], format!("{id:08x}"));
        let keys = &nodes[name]["users"]["users"]["root"]["openssh"]["authorizedKeys"]["keys"];
        if n.keys.is_empty() {
            assert!(keys.is_null(), "{name}: {keys}");
        } else {
            assert_eq!(*keys, serde_json::json!(n.keys), "{name}");
        }
    }
    // The generic node's system gets `default` when its host ID is fixed.
    let mut fixed = profile.clone();
    fixed.default_node.hostid = HostId::Fixed(0x00c0_ffee);
    std::fs::write(
        &file,
        nodeflash_installer::nixos::flake_module(&fixed, "qemu.toml"),
    )
    .expect("write");
    assert_eq!(
        eval(&file, "default"),
        serde_json::json!({ "networking": { "hostId": "00c0ffee" } })
    );
}

#[test]
fn a_closure_built_by_nix_is_packed_with_nix_registration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flake = standin_flake(&dir.path().join("flake"), &load_profile("qemu"));
    let top = nodeflash_builder::nix::build(
        &flake.display().to_string(),
        &[nodeflash_installer::profile::default_system_attr("alpha")],
    )
    .expect("nix builds alpha")
    .remove(0);
    let (profile, path) = variant(dir.path(), &format!("closure = \"{top}\""));
    let packed = prepare(&profile, &path, &dir.path().join("cache"));
    let m = manifest(&packed);
    let want = names(&nix_store(&["-qR", &top]));
    assert_eq!(m.store_paths(), want);
    let full: Vec<String> = want.iter().map(|p| format!("/nix/store/{p}")).collect();
    let mut args = vec!["--dump-db"];
    args.extend(full.iter().map(String::as_str));
    assert_eq!(m.registration.as_deref(), Some(nix_store(&args).as_str()));
}

#[test]
fn a_flake_profile_builds_every_node_and_packs_shared_paths_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    standin_flake(&dir.path().join("flake"), &load_profile("qemu"));
    let (profile, path) = variant(dir.path(), "flake = \"flake\"");
    let packed = prepare(&profile, &path, &dir.path().join("cache"));
    let m = manifest(&packed);
    assert_eq!(
        packed.systems.keys().collect::<Vec<_>>(),
        ["alpha", "beta", "gamma"]
    );
    let mut union = BTreeSet::new();
    for (name, s) in &packed.systems {
        let top = format!("/nix/store/{}", s.toplevel);
        assert!(s.toplevel.ends_with(&format!("-nixos-system-{name}")));
        assert_eq!(s.closure, names(&nix_store(&["-qR", &top])), "{name}");
        let hostid = std::fs::read_to_string(format!("{top}/hostid")).expect("hostid");
        let node = profile
            .nodes
            .iter()
            .find(|n| n.name.get_ref().0 == *name)
            .expect("node");
        assert_eq!(hostid.trim(), String::from(node.hostid), "{name}");
        union.extend(s.closure.iter().cloned());
        assert!(s.store_bytes > 0 && s.store_bytes < m.bytes());
    }
    // The union, each path once (the shared one included).
    assert_eq!(
        m.store_paths(),
        union.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let shared = m
        .store_paths()
        .into_iter()
        .filter(|p| p.ends_with("-standin-shared"))
        .count();
    assert_eq!(shared, 1);
    let full: Vec<String> = union.iter().map(|p| format!("/nix/store/{p}")).collect();
    let mut args = vec!["--dump-db"];
    args.extend(full.iter().map(String::as_str));
    assert_eq!(m.registration.as_deref(), Some(nix_store(&args).as_str()));
    eprintln!(
        "payload: {} nodes {:.2} MiB of store, one node {:.2} MiB; packed {:.2} MiB",
        packed.systems.len(),
        mib(m.bytes()),
        mib(packed.systems["alpha"].store_bytes),
        mib(packed.bytes)
    );
}

/// Nix's own check of a store as the installer leaves it: one node's
/// closure written out of a flake payload (`keep_only`) into a root, its
/// registration loaded with `nix-store --load-db`, then `nix-store --store
/// ROOT --verify --check-contents` by the host's real Nix. It passes, and
/// fails once one file of the store is changed: the check can fail.
#[test]
fn nix_verifies_a_written_closure_and_finds_a_changed_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    standin_flake(&dir.path().join("flake"), &load_profile("qemu"));
    let (profile, path) = variant(dir.path(), "flake = \"flake\"");
    let packed = prepare(&profile, &path, &dir.path().join("cache"));
    let alpha = &packed.systems["alpha"];
    let mut payload =
        Payload::open(std::fs::File::open(&packed.path).expect("payload")).expect("opens");
    let keep: BTreeSet<String> = alpha.closure.iter().cloned().collect();
    payload.keep_only(keep.clone()).expect("alpha's closure");
    let registration = nodeflash_installer::payload::filter_registration(
        payload
            .manifest
            .registration
            .as_deref()
            .expect("registration"),
        &keep,
    )
    .expect("filters");
    let root = dir.path().join("root");
    let (all_files, written) = (payload.manifest.files() as u64, payload.written());
    let counters = nodeflash_installer::payload::Counters::default();
    payload
        .extract(Some(&root.join("nix/store")), 2, &counters)
        .expect("extracts");
    // Exactly alpha's closure is written; progress counted every file read.
    let scanned = nodeflash_installer::payload::scan(&root.join("nix/store"), 2).expect("scan");
    nodeflash_installer::payload::compare(&written.entries, &scanned, true)
        .expect("the tree is alpha's closure");
    assert_eq!(
        counters.files.load(std::sync::atomic::Ordering::Relaxed),
        all_files
    );
    let store = root.display().to_string();
    let nix = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new("nix-store")
            .args(["--store", &store])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nix-store runs (package nix-bin)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("nix-store");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = nix(&["--load-db"], &registration);
    assert!(ok, "{err}");
    // Nix's database lists exactly the closure, as the build host has it.
    let (ok, db, err) = nix(&["--dump-db"], "");
    assert!(ok, "{err}");
    assert_eq!(db, registration);
    let (ok, _, err) = nix(&["--verify", "--check-contents"], "");
    assert!(ok, "an untouched closure is valid to Nix: {err}");

    // One byte more in one file of the shared path.
    let shared = alpha
        .closure
        .iter()
        .find(|p| p.ends_with("-standin-shared"))
        .expect("the shared path");
    let file = root.join("nix/store").join(shared).join("share/blob7");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes.push(b'x');
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    std::fs::write(&file, bytes).expect("change the file");
    let (ok, _, err) = nix(&["--verify", "--check-contents"], "");
    assert!(!ok, "Nix finds the changed file");
    assert!(
        err.contains(&format!("path '/nix/store/{shared}' was modified")),
        "{err}"
    );
    eprintln!("nix-store --verify --check-contents on the changed store: {err}");
}
