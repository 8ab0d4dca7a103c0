//! The partitioning code run against plain image files (no root needed), read
//! back with the `gpt` and `fatfs` crates and with util-linux's `sfdisk` and
//! `blkid` for an independent opinion.

use std::path::Path;
use std::process::Command;

use nodeflash_installer::disk::{gpt_names, mark_finished, partition, signatures, UNFINISHED_NAME};
use nodeflash_installer::facts::{BlockDevice, Facts};
use nodeflash_installer::plan::{plan, PartKind, Plan};
use nodeflash_installer::profile::Profile;

const PROFILE: &str = "name = \"t\"\n[disk]\nselect = { serial = \"NFTEST0001\" }\nesp-size = \"512MiB\"\nswap-size = \"256MiB\"\nwipe = \"always\"\n[pool]\n";

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("image file");
    p
}

fn plan_for(size: u64, lbs: u32, signatures: Vec<String>) -> Plan {
    let disk = BlockDevice {
        signatures,
        ..BlockDevice::fixed("nvme0n1", size, lbs, "nvme", "NFTEST0001")
    };
    let facts = Facts {
        block_devices: vec![disk],
        ..Facts::default()
    };
    plan(&Profile::parse(PROFILE, "t.toml").expect("profile"), &facts).expect("plan")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (util-linux)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `blkid` low-level probe of a region of the image.
fn blkid(img: &Path, offset: u64, size: u64) -> String {
    run(Command::new("blkid")
        .args([
            "-p",
            "-o",
            "export",
            "-O",
            &offset.to_string(),
            "-S",
            &size.to_string(),
        ])
        .arg(img))
}

fn check(size: u64, lbs: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), size);
    let plan = plan_for(size, lbs, Vec::new());
    let layout = partition(&plan, &img, &[]).expect("partition");
    let lbs64 = u64::from(lbs);

    // The gpt crate reads back exactly the planned table.
    let block = if lbs == 512 {
        gpt::disk::LogicalBlockSize::Lb512
    } else {
        gpt::disk::LogicalBlockSize::Lb4096
    };
    type Row = (u32, u64, u64, String, String);
    let read_back = || -> (String, Vec<Row>) {
        let disk = gpt::GptConfig::new()
            .logical_block_size(block)
            .only_valid_headers(true)
            .open(&img)
            .expect("GPT reads back, both headers valid");
        let rows = disk
            .partitions()
            .iter()
            .map(|(n, p)| {
                (
                    *n,
                    p.first_lba,
                    p.last_lba,
                    p.part_type_guid.guid.to_string().to_uppercase(),
                    p.name.clone(),
                )
            })
            .collect();
        (disk.guid().to_string().to_uppercase(), rows)
    };
    let want: Vec<Row> = plan
        .partitions
        .iter()
        .map(|p| {
            (
                p.number,
                p.first_lba,
                p.last_lba,
                p.type_guid.to_string(),
                p.name.clone(),
            )
        })
        .collect();
    let head = || {
        let mut b = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut std::fs::File::open(&img).expect("open"), &mut b)
            .expect("read");
        b
    };
    // While the install runs, the ESP carries the mark of an unfinished
    // install, and the disk's look finds it.
    let (guid, got) = read_back();
    assert_eq!(guid, layout.disk_guid);
    let mut marked = want.clone();
    marked[0].4 = UNFINISHED_NAME.to_string();
    assert_eq!(got, marked);
    assert!(gpt_names(&head()).iter().any(|n| n == UNFINISHED_NAME));
    // Once it succeeded, the table is exactly the planned one.
    mark_finished(
        &img,
        lbs64,
        plan.partitions[0].number,
        &plan.partitions[0].name,
    )
    .expect("the mark is cleared");
    let (guid, got) = read_back();
    assert_eq!(guid, layout.disk_guid);
    assert_eq!(got, want);
    let names = gpt_names(&head());
    assert_eq!(names, want.iter().map(|w| w.4.clone()).collect::<Vec<_>>());
    assert!(
        mark_finished(&img, lbs64, 1, "ESP").is_err(),
        "no mark to clear"
    );

    // blkid agrees: GPT with protective MBR (blkid reads files with 512-byte
    // sectors, so only there), a FAT32 ESP, a swap area.
    if lbs == 512 {
        let whole = blkid(&img, 0, size);
        assert!(whole.contains("PTTYPE=gpt"), "{whole}");
    }
    let esp = &plan.partitions[0];
    let fat = blkid(&img, esp.first_lba * lbs64, esp.sectors() * lbs64);
    assert!(
        fat.contains("TYPE=vfat") && fat.contains("VERSION=FAT32") && fat.contains("LABEL=ESP"),
        "{fat}"
    );
    assert!(
        fat.contains(&format!("UUID={}", layout.esp_volume_id)),
        "{fat} vs {}",
        layout.esp_volume_id
    );
    let swap = &plan.partitions[1];
    assert_eq!(swap.kind, PartKind::Swap);
    let sw = blkid(&img, swap.first_lba * lbs64, swap.sectors() * lbs64);
    let swap_guid = layout.partitions[1].guid.to_lowercase();
    assert!(
        sw.contains("TYPE=swap")
            && sw.contains("LABEL=swap")
            && sw.contains(&format!("UUID={swap_guid}")),
        "{sw}"
    );

    if lbs == 512 {
        // sfdisk (512-byte sectors on a file) sees the same table.
        let json: serde_json::Value =
            serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&img)))
                .expect("sfdisk json");
        let table = &json["partitiontable"];
        assert_eq!(table["label"], "gpt");
        let parts = table["partitions"].as_array().expect("partitions");
        for (p, planned) in parts.iter().zip(&plan.partitions) {
            assert_eq!(p["start"].as_u64(), Some(planned.first_lba));
            assert_eq!(p["size"].as_u64(), Some(planned.sectors()));
            assert_eq!(p["type"].as_str(), Some(planned.type_guid));
        }
    }
    // The new disk is not empty any more, as the installer's own probe says.
    let found = signatures(&img, size, &[]).expect("signatures");
    assert_eq!(found, ["GPT partition table"], "{found:?}");
}

#[test]
fn partitions_a_512_byte_image() {
    check(2 << 30, 512);
}

#[test]
fn partitions_a_4kn_image() {
    check(2 << 30, 4096);
}

#[test]
fn wipe_always_clears_old_zfs_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2u64 << 30;
    let img = image(dir.path(), size);
    // An old pool on an old partition at 100 MiB..1100 MiB: uberblocks at both ends.
    let (start, len) = (100u64 << 20, 1000u64 << 20);
    let magic = 0x00ba_b10c_u64.to_le_bytes();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open");
        for off in [start + (128 << 10), start + len - (256 << 10) + (128 << 10)] {
            f.seek(SeekFrom::Start(off))
                .and_then(|_| f.write_all(&magic))
                .expect("write label");
        }
    }
    let plan = plan_for(size, 512, vec!["partitions nvme0n1p1".into()]);
    partition(&plan, &img, &[(start, len)]).expect("partition");
    let bytes = std::fs::read(&img).expect("read image");
    let left = bytes.chunks(1024).filter(|c| c.starts_with(&magic)).count();
    assert_eq!(left, 0, "old ZFS uberblocks survived the wipe");
}
