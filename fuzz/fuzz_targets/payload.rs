//! The store payload reader: `Payload::open` (header, manifest and the
//! manifest's checks), then a verify (`extract` without a directory) or an
//! extract into a temporary directory.
//!
//! The first byte chooses how the rest is read:
//! - bit 0 clear: the rest is a payload file as it is (header, manifest,
//!   frames): damage of every kind, but a manifest the fuzzer writes rarely
//!   gets past its sha256;
//! - bit 0 set: the rest is `MANIFEST_JSON 0xff FRAMES`, and this target
//!   packs the manifest as the packer would (zstd, sha256, a header whose
//!   frame size is the manifest's and whose frames length is the length of
//!   FRAMES), so the manifest checks and the extract itself are fuzzed;
//! - bit 1 set: extract into a new temporary directory, else verify only.
//!
//! Inputs are cut at 64 KiB to keep runs fast.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use nodeflash_installer::payload::{
    Counters, Header, Payload, DEFAULT_FRAME_SIZE, FORMAT_VERSION, HEADER_LEN,
};
use sha2::{Digest, Sha256};

fn assemble(rest: &[u8]) -> Vec<u8> {
    let (json, frames) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let frame_size = serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("frame_size")?.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(DEFAULT_FRAME_SIZE);
    let manifest = zstd::bulk::compress(json, 1).expect("zstd compresses");
    let header = Header {
        version: FORMAT_VERSION,
        frame_size,
        manifest_len: manifest.len() as u64,
        manifest_sha256: Sha256::digest(&manifest).into(),
        frames_len: frames.len() as u64,
    };
    let mut file = Vec::with_capacity(HEADER_LEN + manifest.len() + frames.len());
    file.extend_from_slice(&header.to_bytes());
    file.extend_from_slice(&manifest);
    file.extend_from_slice(frames);
    file
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(64 << 10)];
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 1 {
        assemble(rest)
    } else {
        rest.to_vec()
    };
    let Ok(payload) = Payload::open(Cursor::new(file)) else {
        return;
    };
    let _ = payload.header.total_len();
    let _ = payload.manifest_sha256();
    let _ = payload.manifest.store_paths();
    let counters = Counters::default();
    if mode & 2 == 2 {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let dest = dir.path().join("store");
        let _ = payload.extract(Some(&dest), 2, &counters);
    } else {
        let _ = payload.extract(None, 2, &counters);
    }
});
