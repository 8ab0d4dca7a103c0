//! README's own image: the `alrest` ISO (the seed's cluster profile) installs
//! on a node-sized 1 TB NVMe drive (a sparse image file).

use nodeflash_tests::{assert_console, images_dir, Boot, Nvme, Vm, VmConfig};

/// The byte size of a common 1 TB NVMe drive.
const ONE_TB_DRIVE: u64 = 1_000_204_886_016;

#[test]
fn alrest_installs_on_a_1tb_nvme_drive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = VmConfig::new(images_dir().join("alrest.iso"), Boot::UsbStick);
    cfg.nvme
        .push(Nvme::create(dir.path(), "nvme.img", ONE_TB_DRIVE, "S4EWNX0R123456").expect("disk"));
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    assert_console(&console, "nodeflash 0.1.0 · profile alrest");
    // No node has match rules yet: the generic node of the seed's stick.
    assert_console(
        &console,
        "node: install (no node of the profile matches: generic node)",
    );
    assert_console(&console, "plan: install on nvme0n1 (931.5 GiB");
    assert_console(
        &console,
        "2 swap   Swap sectors 2099200-69208063 (32.0 GiB)",
    );
    assert_console(
        &console,
        "pool rpool created on /dev/nvme0n1p3 with 7 datasets",
    );
    assert_console(&console, "it imports without -f");
    assert_console(&console, "nodeflash: done in");
}
