//! The payload format on the host: pack a tree with every kind of store
//! entry, extract it, compare; damaged, truncated and inconsistent payloads
//! are refused with an error that names what is wrong.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nodeflash_installer::payload::{
    compare, digest, pack, scan, Counters, FrameCache, Header, Manifest, PackOptions, PackStats,
    Payload, HEADER_LEN,
};
use sha2::{Digest, Sha256};

const FRAME: u32 = 4096;

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A store with nested directories, executables, an empty file, files
/// larger than a frame, long names and relative, absolute and dangling links.
fn sample_store(root: &Path) {
    let a = root.join("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12");
    std::fs::create_dir_all(a.join("share/doc/hello")).expect("mkdir");
    std::fs::create_dir_all(a.join("bin")).expect("mkdir");
    write(
        &a.join("bin/hello"),
        &[0x7f, b'E', b'L', b'F', 1, 2, 3],
        0o555,
    );
    write(
        &a.join("share/doc/hello/README"),
        b"hello world\n".repeat(100).as_slice(),
        0o444,
    );
    write(&a.join("share/empty"), b"", 0o444);
    let big: Vec<u8> = (0..3 * FRAME as usize + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    write(&a.join("share/big"), &big, 0o444);
    let exact: Vec<u8> = (0..FRAME as usize).map(|i| (i % 13) as u8).collect();
    write(&a.join("share/exactly-one-frame"), &exact, 0o444);
    write(
        &a.join(format!("share/{}", "n".repeat(255))),
        b"long name",
        0o444,
    );
    std::os::unix::fs::symlink("../share/doc", a.join("bin/doc")).expect("symlink");
    std::os::unix::fs::symlink("/nix/store/zzz-missing/bin/x", a.join("bin/dangling"))
        .expect("symlink");
    let b = root.join("abcdfghijklmnpqrsvwxyz0123456789-lib");
    std::fs::create_dir_all(b.join("lib")).expect("mkdir");
    for i in 0..40 {
        write(
            &b.join(format!("lib/f{i:02}")),
            format!("{i}\n").repeat(i * 20).as_bytes(),
            0o444,
        );
    }
    std::os::unix::fs::symlink(
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12/bin/hello",
        b.join("hello"),
    )
    .expect("symlink");
    // A store path first by its whole name, last by its name without the
    // hash: the packer's order is not the walk's.
    let c = root.join("00000000000000000000000000000000-zz-hook");
    std::fs::create_dir_all(c.join("nix-support")).expect("mkdir");
    write(&c.join("nix-support/setup-hook"), b"export X=1\n", 0o444);
    // A store path that is a single file.
    write(
        &root.join("zzzzfghijklmnpqrsvwxyz0123456789-script.sh"),
        b"#!/bin/sh\n",
        0o555,
    );
    for d in [
        a.join("share/doc/hello"),
        a.join("share/doc"),
        a.join("share"),
        a.join("bin"),
        a.clone(),
        b.join("lib"),
        b.clone(),
        c.join("nix-support"),
        c.clone(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    }
}

fn opts() -> PackOptions {
    PackOptions {
        level: 3,
        frame_size: FRAME,
        threads: 3,
        registration: Some("/nix/store/x\n\n\n0\n".into()),
        only: None,
        cache: None,
    }
}

fn packed(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).expect("mkdir");
    sample_store(&src);
    let out = dir.join("store.nfp");
    pack(&src, &out, &opts(), &Counters::default()).expect("pack");
    out
}

fn extract(payload: &Path, dest: Option<&Path>) -> anyhow::Result<()> {
    let p = Payload::open(File::open(payload)?)?;
    p.extract(dest, 3, &Counters::default()).map(drop)
}

#[test]
fn round_trip_keeps_every_file_mode_and_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    sample_store(&src);
    let out = dir.path().join("store.nfp");
    let counters = Counters::default();
    let stats = pack(&src, &out, &opts(), &counters).expect("pack");
    assert_eq!(stats.files, 48);
    assert_eq!(counters.snapshot().1, 48);
    assert_eq!(
        std::fs::metadata(&out).expect("stat").len(),
        stats.payload_bytes
    );

    let payload = Payload::open(File::open(&out).expect("open")).expect("opens");
    assert_eq!(payload.manifest_sha256(), stats.manifest_sha256);
    assert_eq!(
        payload.manifest.registration.as_deref(),
        Some("/nix/store/x\n\n\n0\n")
    );
    assert_eq!(payload.manifest.store_paths().len(), 4);
    // Store paths in the packer's order: by name without the hash.
    let top: Vec<&str> = payload
        .manifest
        .entries
        .iter()
        .map(|e| e.path())
        .filter(|p| !p.contains('/'))
        .collect();
    assert_eq!(
        top,
        [
            "0123456789abcdfghijklmnpqrsvwxyz-hello-2.12",
            "abcdfghijklmnpqrsvwxyz0123456789-lib",
            "zzzzfghijklmnpqrsvwxyz0123456789-script.sh",
            "00000000000000000000000000000000-zz-hook",
        ]
    );
    let manifest = payload.manifest.clone();
    let dest = dir.path().join("dest/nix/store");
    let counters = Counters::default();
    let x = payload
        .extract(Some(&dest), 3, &counters)
        .expect("extracts");
    assert_eq!((x.files, counters.snapshot().1), (48, 48));
    assert_eq!(counters.snapshot().0, manifest.bytes());

    // Extracted tree = manifest, including mtime 1; and = the source tree.
    let got = scan(&dest, 2).expect("scan");
    compare(&manifest.entries, &got, true).expect("extracted tree matches");
    // Nix's `.links` (made by every Nix that opens the store) is not part
    // of the tree; a store path named like it elsewhere would be.
    std::fs::create_dir_all(dest.join(".links")).expect("mkdir");
    std::fs::write(dest.join(".links/0abc"), b"x").expect("write");
    let with_links = scan(&dest, 2).expect("scan");
    assert_eq!(with_links, got);
    std::fs::remove_dir_all(dest.join(".links")).expect("rm");
    let source = scan(&src, 2).expect("scan");
    compare(&manifest.entries, &source, false).expect("source matches");
    assert_eq!(digest(got.iter().map(|e| &e.0)), stats.tree_digest);

    let a = dest.join("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12");
    assert_eq!(
        std::fs::read_link(a.join("bin/doc"))
            .expect("link")
            .to_str(),
        Some("../share/doc")
    );
    let meta = std::fs::symlink_metadata(a.join("bin/dangling")).expect("dangling link");
    assert_eq!(meta.mtime(), 1);
    assert_eq!(
        std::fs::metadata(&a).expect("dir").permissions().mode() & 0o7777,
        0o555
    );
    assert_eq!(
        std::fs::metadata(a.join("bin/hello"))
            .expect("f")
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
    assert_eq!(
        std::fs::read(a.join("share/big")).expect("big"),
        std::fs::read(src.join("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12/share/big"))
            .expect("big")
    );

    // A changed file is found by the tree check.
    let f = a.join("share/doc/hello/README");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(&f, b"changed").expect("write");
    let err =
        compare(&manifest.entries, &scan(&dest, 2).expect("scan"), true).expect_err("differs");
    assert!(
        format!("{err:#}").contains("share/doc/hello/README"),
        "{err:#}"
    );
}

#[test]
fn packing_is_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = packed(dir.path());
    let first = std::fs::read(&one).expect("read");
    let two = dir.path().join("again.nfp");
    let mut o = opts();
    o.threads = 1;
    pack(&dir.path().join("src"), &two, &o, &Counters::default()).expect("pack");
    assert!(
        first == std::fs::read(&two).expect("read"),
        "same tree, same bytes"
    );
}

/// Adds `n` small store paths (a file of a few hundred bytes each) named
/// from `tag`, so that they share buckets.
fn small_paths(root: &Path, tag: &str, n: usize) {
    for i in 0..n {
        let name = format!(
            "{:0>32}-small-{tag}-{i}",
            hex::encode(Sha256::digest(format!("{tag}{i}")))[..32].to_string()
        );
        let d = root.join(name);
        std::fs::create_dir(&d).expect("mkdir");
        write(
            &d.join("unit.conf"),
            format!("[Unit]\nDescription={tag} {i}\n")
                .repeat(8)
                .as_bytes(),
            0o444,
        );
    }
}

fn pack_with(src: &Path, out: &Path, cache: Option<&Path>) -> (Vec<u8>, PackStats) {
    let mut o = opts();
    o.cache = cache.map(|dir| FrameCache {
        dir: dir.to_path_buf(),
        names_are_content: false,
    });
    let stats = pack(src, out, &o, &Counters::default()).expect("pack");
    (std::fs::read(out).expect("read"), stats)
}

#[test]
fn packing_from_the_frame_cache_is_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    sample_store(&src);
    small_paths(&src, "v1", 40);
    let cache = dir.path().join("frames");
    let out = dir.path().join("out.nfp");

    let (scratch, s0) = pack_with(&src, &out, None);
    assert!(s0.units > 3, "{s0:?}");
    assert!(s0.units < 40, "small paths share units: {s0:?}");
    let (filled, s1) = pack_with(&src, &out, Some(&cache));
    assert!(filled == scratch, "filling the cache changes nothing");
    assert_eq!((s1.units_reused, s1.bytes_compressed), (0, s1.bytes));
    let entries = std::fs::read_dir(&cache).expect("ls").count();
    assert_eq!(entries, s1.units, "one entry per unit");
    let (reused, s2) = pack_with(&src, &out, Some(&cache));
    assert!(reused == scratch, "a pack from the cache is the same bytes");
    assert_eq!((s2.units_reused, s2.bytes_compressed), (s2.units, 0));
    extract(&out, None).expect("the cached payload reads back");

    // v2: one file of a large store path changes, one small path is added.
    let lib = src.join("abcdfghijklmnpqrsvwxyz0123456789-lib");
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(lib.join("lib"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let f = lib.join("lib/f07");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(&f, b"7 changed\n").expect("write");
    small_paths(&src, "v2", 1);
    let (scratch2, s3) = pack_with(&src, &out, None);
    assert!(scratch2 != scratch);
    let (cached2, s4) = pack_with(&src, &out, Some(&cache));
    assert!(
        cached2 == scratch2,
        "v2 from the cache is the same bytes as v2 from scratch"
    );
    assert_eq!(s4.units, s3.units);
    // The changed unit, the bucket that got the new path (or two, if it
    // moved a bucket's end) are compressed; the rest comes from the cache.
    assert!(
        s4.units_reused >= s4.units - 3 && s4.units_reused < s4.units,
        "{s4:?}"
    );
    // The unchanged large store path is not compressed again.
    let hello: u64 = scan(&src.join("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"), 1)
        .expect("scan")
        .iter()
        .map(|(e, _)| match e {
            nodeflash_installer::payload::Entry::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    assert!(hello > 16 * 1024);
    assert!(s4.bytes_compressed <= s4.bytes - hello, "{s4:?}");

    // A damaged entry is found, compressed again and replaced.
    let mut names: Vec<_> = std::fs::read_dir(&cache)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let mut bytes = std::fs::read(&names[0]).expect("read");
    bytes[3] ^= 0x55;
    std::fs::write(&names[0], &bytes).expect("write");
    let (repaired, s5) = pack_with(&src, &out, Some(&cache));
    assert!(repaired == scratch2);
    assert_eq!(s5.cache_damaged, 1, "{s5:?}");
    assert_eq!(s5.units_reused, s5.units - 1, "{s5:?}");
    let (_, s6) = pack_with(&src, &out, Some(&cache));
    assert_eq!((s6.cache_damaged, s6.units_reused), (0, s6.units));
}

#[test]
fn extraction_needs_an_empty_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let dest = dir.path().join("dest");
    std::fs::create_dir(&dest).expect("mkdir");
    std::fs::write(dest.join("old"), b"x").expect("write");
    let err = extract(&out, Some(&dest)).expect_err("not empty");
    assert!(format!("{err:#}").contains("is not empty"), "{err:#}");
}

/// Where the frames start.
fn frames_offset(bytes: &[u8]) -> usize {
    let h = Header::parse(bytes[..HEADER_LEN].try_into().expect("header")).expect("header");
    HEADER_LEN + h.manifest_len as usize
}

#[test]
fn a_damaged_frame_is_found_and_names_the_store_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let mut bytes = std::fs::read(&out).expect("read");
    let at = frames_offset(&bytes) + 20;
    bytes[at] ^= 0xff;
    std::fs::write(&out, &bytes).expect("write");
    // Checking without writing finds it too.
    let err = extract(&out, None).expect_err("damaged");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("payload frame ") && msg.contains("is damaged"),
        "{msg}"
    );
    assert!(
        msg.contains("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"),
        "{msg}"
    );
}

/// The check of every frame before anything is written: one sequential read,
/// no decompression; a damaged frame is named with its store paths, and
/// truncation and trailing data are found too.
#[test]
fn check_frames_finds_a_damaged_frame_without_decompressing() {
    use std::io::{Seek, SeekFrom};
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let check = |path: &Path| -> anyhow::Result<nodeflash_installer::payload::FramesChecked> {
        let p = Payload::open(File::open(path)?)?;
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(p.frames_offset()))?;
        p.check_frames(f, 2, &Counters::default())
    };
    let ok = check(&out).expect("an intact payload passes");
    let bytes = std::fs::read(&out).expect("read");
    let h = Header::parse(bytes[..HEADER_LEN].try_into().expect("header")).expect("header");
    assert_eq!(ok.bytes, h.frames_len);
    assert!(ok.frames > 1, "{ok:?}");

    // Byte 20 of the frames: the frame that holds it, by the manifest's lengths.
    let p = Payload::open(File::open(&out).expect("open")).expect("opens");
    let mut end = 0;
    let hit = p
        .manifest
        .frames
        .iter()
        .position(|f| {
            end += f.len;
            end > 20
        })
        .expect("a frame holds byte 20");
    let mut damaged = bytes.clone();
    damaged[frames_offset(&bytes) + 20] ^= 0xff;
    std::fs::write(&out, &damaged).expect("write");
    let msg = format!("{:#}", check(&out).expect_err("damaged"));
    assert!(
        msg.starts_with(&format!("payload frame {hit} of {} ", ok.frames))
            && msg.contains("is damaged (store path")
            && msg.contains("0123456789abcdfghijklmnpqrsvwxyz-hello-2.12")
            && msg.contains("sha256 does not match"),
        "{msg}"
    );

    std::fs::write(&out, &bytes[..bytes.len() - 10]).expect("write");
    let msg = format!("{:#}", check(&out).expect_err("truncated"));
    assert!(
        msg.contains("the payload is truncated or unreadable"),
        "{msg}"
    );
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(&out, &longer).expect("write");
    let msg = format!("{:#}", check(&out).expect_err("trailing"));
    assert!(msg.contains("data after its last frame"), "{msg}");
}

#[test]
fn a_truncated_payload_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let bytes = std::fs::read(&out).expect("read");
    std::fs::write(&out, &bytes[..bytes.len() - 10]).expect("write");
    let err = extract(&out, Some(&dir.path().join("dest"))).expect_err("truncated");
    assert!(
        format!("{err:#}").contains("the payload is truncated: cannot read frame"),
        "{err:#}"
    );
    std::fs::write(&out, &bytes[..100]).expect("write");
    let err = extract(&out, None).expect_err("truncated");
    assert!(
        format!("{err:#}").contains("is the payload truncated"),
        "{err:#}"
    );
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(&out, &longer).expect("write");
    let err = extract(&out, None).expect_err("trailing data");
    assert!(
        format!("{err:#}").contains("data after its last frame"),
        "{err:#}"
    );
}

/// Rewrites the manifest of a payload (and its header hash), keeping the frames.
fn with_manifest(bytes: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let h = Header::parse(bytes[..HEADER_LEN].try_into().expect("header")).expect("header");
    let start = frames_offset(bytes);
    let json = zstd::stream::decode_all(&bytes[HEADER_LEN..start]).expect("manifest");
    let mut m: Manifest = serde_json::from_slice(&json).expect("json");
    edit(&mut m);
    let z = zstd::bulk::compress(&serde_json::to_vec(&m).expect("json"), 3).expect("zstd");
    let h = Header {
        manifest_len: z.len() as u64,
        manifest_sha256: Sha256::digest(&z).into(),
        ..h
    };
    [&h.to_bytes()[..], &z, &bytes[start..]].concat()
}

#[test]
fn a_manifest_that_does_not_match_the_data_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let bytes = std::fs::read(&out).expect("read");

    let wrong_hash = with_manifest(&bytes, |m| {
        for e in &mut m.entries {
            if let nodeflash_installer::payload::Entry::File { path, sha256, .. } = e {
                if path.ends_with("f07") {
                    *sha256 = "0".repeat(64);
                }
            }
        }
    });
    std::fs::write(&out, wrong_hash).expect("write");
    let dest = dir.path().join("dest");
    let err = extract(&out, Some(&dest)).expect_err("mismatch");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("lib/f07: content does not match the payload manifest"),
        "{msg}"
    );
    assert!(
        !dest
            .join("abcdfghijklmnpqrsvwxyz0123456789-lib/lib/f07")
            .exists(),
        "never written"
    );

    let escape = with_manifest(&bytes, |m| {
        if let nodeflash_installer::payload::Entry::Symlink { path, .. } = &mut m.entries[2] {
            *path = "../escape".into();
        }
    });
    std::fs::write(&out, escape).expect("write");
    let err = extract(&out, None).expect_err("unsafe");
    assert!(format!("{err:#}").contains("unsafe path"), "{err:#}");

    let mut damaged = bytes.clone();
    damaged[HEADER_LEN + 5] ^= 1;
    std::fs::write(&out, damaged).expect("write");
    let err = extract(&out, None).expect_err("manifest damaged");
    assert!(
        format!("{err:#}").contains("manifest is damaged"),
        "{err:#}"
    );
}

/// Found while writing the `payload` fuzz target (docs/fuzzing.md), and
/// reproduced with it: manifests whose frames the header's length cannot hold
/// (lengths that add up only by overflowing) or that are empty (an extract
/// then waited forever for entries that do not exist) are refused up front.
#[test]
fn impossible_frames_are_refused_before_anything_is_read() {
    use nodeflash_installer::payload::Frame;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let bytes = std::fs::read(&out).expect("read");
    let total: u64 = Header::parse(bytes[..HEADER_LEN].try_into().expect("header"))
        .expect("header")
        .frames_len;

    // Frame lengths that wrap around to the header's length.
    let wrapping = with_manifest(&bytes, |m| {
        m.frames[0].len = u64::MAX;
        let rest: u64 = m.frames[1..].iter().map(|f| f.len).sum();
        m.frames[1].len += total - rest + 1;
    });
    // One empty frame and no entries: all the data, belonging to nothing.
    let empty = with_manifest(&bytes, |m| {
        m.frames = vec![Frame {
            len: total,
            size: 0,
            sha256: "0".repeat(64),
        }];
        m.entries.clear();
    });
    // A compressed length no frame of that size can have, which the header
    // agrees with (the reader would allocate it before reading).
    let mut huge = with_manifest(&bytes, |m| m.frames[0].len += 1 << 40);
    huge[56..64].copy_from_slice(&(total + (1 << 40)).to_le_bytes());
    for (name, payload, want) in [
        ("wrapping", wrapping, "do not add up"),
        ("empty", empty, "frame 0 has an impossible size"),
        ("huge", huge, "has an impossible size"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, payload).expect("write");
        let dest = dir.path().join(format!("{name}.out"));
        // A hang is a failure too, not a test that never ends.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(extract(&path, Some(&dest)).map_err(|e| format!("{e:#}")));
        });
        let result = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{name}: the extract did not end within 60 s")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{name}: the extract panicked")
            }
        };
        let err = result.expect_err(name);
        assert!(err.contains(want), "{name}: {err}");
    }
}

/// One node's closure out of a payload that holds several: only its store
/// paths are written, the rest is read and checked but not written.
#[test]
fn keep_only_writes_just_the_given_store_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = packed(dir.path());
    let mut payload = Payload::open(File::open(&out).expect("open")).expect("opens");
    let keep: std::collections::BTreeSet<String> = [
        "abcdfghijklmnpqrsvwxyz0123456789-lib",
        "zzzzfghijklmnpqrsvwxyz0123456789-script.sh",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let err = payload
        .keep_only(["nothere-x".to_string()].into_iter().collect())
        .expect_err("not in the payload");
    assert!(err.to_string().contains("nothere-x"), "{err}");
    payload.keep_only(keep.clone()).expect("in the payload");
    let written = payload.written();
    assert_eq!(
        written.store_paths().into_iter().collect::<Vec<_>>(),
        keep.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let dest = dir.path().join("dest");
    payload
        .extract(Some(&dest), 3, &Counters::default())
        .expect("extracts");
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(&dest)
        .expect("dest")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, keep);
    compare(&written.entries, &scan(&dest, 2).expect("scan"), true).expect("the kept paths");
}
