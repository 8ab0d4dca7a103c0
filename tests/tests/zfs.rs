//! The pool in QEMU: every property and dataset of the profile, zstd
//! compression, the reported host ID in the pool's label, an import without
//! `-f` after the export (reinstalling: reinstall.rs).

use nodeflash_tests::{assert_console, boot_stick, console_json, images_dir, load_profile, Nvme};

/// ZFS prints some values in another spelling than it accepts.
fn canonical(property: &str, value: &str) -> String {
    match (property, value) {
        ("acltype", "posixacl") => "posix".into(),
        _ => value.into(),
    }
}

/// Installs the image on `disk`; the install must succeed.
fn install(image: &str, disk: &Nvme) -> String {
    let console = boot_stick(&images_dir().join(format!("{image}.iso")), disk);
    assert_console(&console, "nodeflash: done in");
    console
}

#[test]
fn creates_the_profiles_pool_and_datasets() {
    let profile = load_profile("qemu");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let console = install("qemu", &disk);

    let hostid = console
        .lines()
        .find_map(|l| l.strip_prefix("host id: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the host ID is printed");
    assert_console(&console, &format!("networking.hostId = \"{hostid}\";"));
    assert_console(
        &console,
        &format!("it imports without -f (pool host id {hostid})"),
    );
    let facts = console_json(&console, "nodeflash-pool: ");
    assert_eq!(
        facts["hostid"], hostid,
        "the label's host ID is the reported one"
    );

    let pool = profile.pool.name.to_string();
    let props = &facts["pool_properties"];
    assert_eq!(props["health"], "ONLINE");
    for (k, v) in &profile.pool.options {
        assert_eq!(props[k.as_str()], v.as_str(), "pool property {k}");
    }
    let datasets = facts["datasets"].as_object().expect("datasets");
    let root = &datasets[&pool];
    for (k, v) in &profile.pool.root_options {
        assert_eq!(
            root[k.as_str()],
            canonical(k, v).as_str(),
            "root property {k}"
        );
    }
    let mut want: Vec<String> = profile
        .pool
        .datasets
        .iter()
        .map(|d| format!("{pool}/{}", d.name.get_ref()))
        .collect();
    want.push(pool.clone());
    want.sort();
    let mut got: Vec<String> = datasets.keys().cloned().collect();
    got.sort();
    assert_eq!(got, want, "exactly the profile's datasets");
    for ds in &profile.pool.datasets {
        let d = &datasets[&format!("{pool}/{}", ds.name.get_ref())];
        assert_eq!(
            d["compression"],
            "zstd",
            "{} is compressed with zstd",
            ds.name.get_ref()
        );
        let mp = ds
            .mountpoint
            .as_ref()
            .map_or("none".to_string(), |m| m.get_ref().to_string());
        assert_eq!(
            d["mountpoint"],
            mp.as_str(),
            "mountpoint of {}",
            ds.name.get_ref()
        );
        for (k, v) in &ds.options {
            assert_eq!(
                d[k.as_str()],
                canonical(k, v).as_str(),
                "{k} of {}",
                ds.name.get_ref()
            );
        }
    }
    let root_ds = profile
        .pool
        .datasets
        .iter()
        .find(|d| d.mountpoint.as_ref().is_some_and(|m| m.get_ref().0 == "/"))
        .expect("the qemu profile has a root dataset");
    assert_eq!(
        props["bootfs"],
        format!("{pool}/{}", root_ds.name.get_ref()).as_str()
    );
}
