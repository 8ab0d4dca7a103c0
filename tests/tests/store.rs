//! The store in QEMU: the `qemu` profile's synthetic store is copied from the
//! stick into the pool and read back after an export and import. The
//! payload on the ISO must hold the very tree the host generates from the
//! same spec, and the pool the very tree of the payload.

use nodeflash_builder::synthetic;
use nodeflash_installer::payload;
use nodeflash_tests::{
    assert_console, boot_to_poweroff, console_json, extract_from_iso, images_dir, load_profile,
    Boot, Nvme, Vm, VmConfig,
};

#[test]
fn copies_the_store_and_reads_it_back_from_the_pool() {
    let profile = load_profile("qemu");
    let s = profile
        .payload
        .synthetic
        .as_ref()
        .expect("the qemu profile has a synthetic store");
    let dir = tempfile::tempdir().expect("tempdir");

    // The host's own copy of the tree, from the generator alone.
    let store = dir.path().join("store");
    synthetic::generate(
        &store,
        &synthetic::Spec {
            files: s.files,
            bytes: s.bytes.0,
            seed: s.seed,
        },
    )
    .expect("generate");
    let tree = payload::scan(&store, 2).expect("scan");

    // The payload on the ISO holds exactly that tree, plus the check system.
    let packed = dir.path().join("store.nfp");
    extract_from_iso(
        &images_dir().join("qemu.iso"),
        "/nodeflash/store.nfp",
        &packed,
    );
    let manifest = payload::Payload::open(std::fs::File::open(&packed).expect("payload"))
        .expect("payload opens")
        .manifest;
    let generated: Vec<payload::Entry> = manifest
        .entries
        .iter()
        .filter(|e| !e.store_path().ends_with("-nodeflash-check-system"))
        .cloned()
        .collect();
    payload::compare(&generated, &tree, false).expect("the payload holds the generated store");
    let files = manifest.files();
    let digest = payload::digest(&manifest.entries);

    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk);
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "nodeflash: done in");
    assert_console(&console, "store copied in");
    let report = console_json(&console, "nodeflash-store: ");
    assert_eq!(report["verified"], true);
    assert_eq!(report["files"], files as u64);
    assert_eq!(
        report["tree_digest"], digest,
        "the tree read back from the pool is the payload's"
    );
    eprintln!(
        "store copy: {} s, {} MB/s; plain read of the payload {} MB/s; ratio {}",
        report["copy_secs"],
        report["copy_mb_s"],
        report["raw_read_mb_s"],
        report["copy_to_read_ratio"]
    );
}

/// Issue 19's hang (once in about 35 boots the store test stopped after
/// `store copied` with `task init:1 blocked for more than 120 seconds`):
/// the store scenario again and again, outside the default suite, until a
/// boot does not power off in time; that boot's console (with the stall
/// watchdog's report of the kernel's blocked tasks) is printed and the test
/// fails. `NODEFLASH_LOOP_BOOTS` boots (default 30), `NODEFLASH_TEST_CPUS`
/// vCPUs. Run it with
/// `cargo test -p nodeflash-tests --test store -- --ignored --nocapture store_scenario_in_a_loop`
/// and the environment `cargo xtask test` sets (see tests/src/lib.rs).
#[test]
#[ignore = "dozens of boots: run by hand to reproduce issue 19's hang"]
fn store_scenario_in_a_loop() {
    let boots: u32 = std::env::var("NODEFLASH_LOOP_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 1..=boots {
        let disk =
            Nvme::create(dir.path(), &format!("nvme{i}.img"), 2 << 30, "NFTEST0001").expect("disk");
        let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
        cfg.nvme.push(disk.clone());
        cfg.timeout = std::time::Duration::from_secs(420);
        let t = std::time::Instant::now();
        let mut vm = Vm::start(&cfg).expect("qemu starts");
        let console = match vm.wait_for_poweroff() {
            Ok(c) => c,
            // The whole console: the stall watchdog's report is longer than a tail.
            Err(e) => panic!(
                "boot {i} of {boots} did not power off: {e:#}\nwhole console:\n{}",
                vm.console()
            ),
        };
        let copied = console
            .lines()
            .find(|l| l.starts_with("store copied in"))
            .unwrap_or("no store copied line");
        eprintln!(
            "boot {i}/{boots}: {:.0}s, {}, {copied}",
            t.elapsed().as_secs_f64(),
            if console.contains("nodeflash: done in") {
                "done"
            } else {
                "NOT done"
            }
        );
        assert_console(&console, "nodeflash: done in");
        assert!(
            !console.contains("stall: nothing happened"),
            "boot {i}: the stall watchdog fired:\n{console}"
        );
        std::fs::remove_file(&disk.image).expect("remove the disk image");
    }
}
