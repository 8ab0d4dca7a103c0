//! The write and the read-back: `O_DIRECT` on a disk, the page cache
//! dropped on a file, progress, and the image's sha256.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nodeflash_installer::progress::{Output, Progress};
use nodeflash_installer::units::{human_bytes, human_rate};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::steps;

/// Writes and reads in blocks of this size.
const BLOCK: usize = 4 << 20;

/// Alignment of the buffers, enough for `O_DIRECT` on any logical block size.
const ALIGN: usize = 4096;

/// A buffer of `len` bytes aligned for `O_DIRECT`, kept in an owning Vec.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { buf, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Reads until `buf` is full or the end of the file; returns the count.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Progress of one pass: a bar when stderr is a terminal, else a plain
/// line every few seconds (and nothing when quiet).
fn pass_progress(what: &str, total: u64) -> Progress<'static> {
    let name = what.to_string();
    Progress::bytes(what, Some(total), Output::stderr(steps::quiet())).lines(
        Duration::from_secs(5),
        move |done, took| {
            format!(
                "    {name}: {} of {} ({:.0}%), {}",
                human_bytes(done),
                human_bytes(total),
                done as f64 * 100.0 / total.max(1) as f64,
                human_rate(done, took)
            )
        },
    )
}

/// The sha256 of a file.
pub fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Checks the ISO against `NAME.iso.sha256` beside it (the builder writes
/// one); returns the ISO's sha256 and whether a sha256 file was there.
pub fn check_image(iso: &Path) -> Result<(String, bool)> {
    let sha = sha256_of(iso)?;
    let mut side = iso.as_os_str().to_owned();
    side.push(".sha256");
    let side = PathBuf::from(side);
    let text = match fs::read_to_string(&side) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((sha, false)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", side.display())),
    };
    let want = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} does not hold a sha256 (64 hex digits)", side.display());
    }
    if want != sha {
        bail!(
            "{} does not match {}: its sha256 is {sha}, the file says {want}; the image is damaged or was changed since it was built: build it again",
            iso.display(),
            side.display()
        );
    }
    Ok((sha, true))
}

/// How a pass went.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    pub bytes: u64,
    pub secs: f64,
}

/// A disk as checked: its logical block size and device number.
#[derive(Debug, Clone, Copy)]
pub struct Direct {
    pub logical_block_size: u32,
    pub rdev: u64,
}

/// Writes `iso` onto `target` in 4 MiB blocks and syncs it. On a disk
/// (`direct`), the writes bypass the page cache, the disk is opened
/// exclusively and must still be the device that was checked; the tail is
/// padded with zeros to a whole logical block.
pub fn write_image(iso: &Path, target: &Path, direct: Option<Direct>) -> Result<Pass> {
    let mut src = File::open(iso).with_context(|| format!("cannot open {}", iso.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("cannot inspect {}", iso.display()))?
        .len();
    let mut opts = OpenOptions::new();
    opts.write(true);
    if direct.is_some() {
        opts.custom_flags((nix::fcntl::OFlag::O_DIRECT | nix::fcntl::OFlag::O_EXCL).bits());
    } else {
        opts.create(true);
    }
    let mut dst = opts.open(target).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            anyhow::anyhow!(
                "{} is in use (mounted, swap or held since it was checked): unmount it and try again",
                target.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open {} for writing", target.display()))
        }
    })?;
    if let Some(d) = direct {
        let rdev = dst
            .metadata()
            .with_context(|| format!("cannot inspect {}", target.display()))?
            .rdev();
        if rdev != d.rdev {
            bail!(
                "{} changed since it was checked (device {}:{} instead of {}:{}): run the command again",
                target.display(),
                nix::sys::stat::major(rdev),
                nix::sys::stat::minor(rdev),
                nix::sys::stat::major(d.rdev),
                nix::sys::stat::minor(d.rdev)
            );
        }
    }
    let mut buf = Aligned::new(BLOCK);
    let mut progress = pass_progress(&format!("writing {}", target.display()), len);
    let mut done = 0u64;
    loop {
        let n = read_full(&mut src, buf.get())
            .with_context(|| format!("cannot read {}", iso.display()))?;
        if n == 0 {
            break;
        }
        let mut chunk = n;
        if let Some(d) = direct {
            let lbs = d.logical_block_size.max(512) as usize;
            if n % lbs != 0 {
                chunk = n.div_ceil(lbs) * lbs;
                buf.get()[n..chunk].fill(0);
            }
        }
        dst.write_all(&buf.get()[..chunk])
            .with_context(|| format!("cannot write {} at byte {done}", target.display()))?;
        done += n as u64;
        progress.set(done);
        if n < BLOCK {
            break;
        }
    }
    if done != len {
        bail!(
            "{} changed while it was written ({done} of {len} bytes read)",
            iso.display()
        );
    }
    if direct.is_none() {
        dst.set_len(len)
            .with_context(|| format!("cannot truncate {}", target.display()))?;
    }
    dst.sync_all()
        .with_context(|| format!("cannot sync {}", target.display()))?;
    let took = progress.finish();
    Ok(Pass {
        bytes: len,
        secs: took.as_secs_f64(),
    })
}

/// Reads the first `len` bytes of `target` back (with `O_DIRECT` when
/// `direct`, else after dropping its cached pages), compares them with
/// `iso` and checks their sha256 against `iso_sha256`. A difference is an
/// error naming the first differing byte.
pub fn verify(iso: &Path, target: &Path, iso_sha256: &str, direct: bool) -> Result<Pass> {
    let mut src = File::open(iso).with_context(|| format!("cannot open {}", iso.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("cannot inspect {}", iso.display()))?
        .len();
    let mut opts = OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    }
    let mut dst = opts
        .open(target)
        .with_context(|| format!("cannot open {} to read it back", target.display()))?;
    if !direct {
        // Best effort: the clean pages of a synced file are dropped, so the
        // reads below go to the storage (not possible on tmpfs).
        let _ = nix::fcntl::posix_fadvise(
            &dst,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    let mut want = vec![0u8; BLOCK];
    let mut got = Aligned::new(BLOCK);
    let mut h = Sha256::new();
    let mut progress = pass_progress(&format!("verifying {}", target.display()), len);
    let mut done = 0u64;
    while done < len {
        let n = read_full(&mut src, &mut want)
            .with_context(|| format!("cannot read {}", iso.display()))?;
        if n == 0 {
            bail!("{} got shorter while it was verified", iso.display());
        }
        // With O_DIRECT, read whole blocks (the device is larger than the image).
        let ask = if direct { n.div_ceil(ALIGN) * ALIGN } else { n };
        let k = read_full(&mut dst, &mut got.get()[..ask])
            .with_context(|| format!("cannot read {} back at byte {done}", target.display()))?;
        let got = &got.get()[..k.min(n)];
        if let Some(i) = got.iter().zip(&want[..n]).position(|(a, b)| a != b) {
            let at = done + i as u64;
            bail!(
                "{} does not hold the image: first difference at byte {at} (0x{at:x}); the stick may be failing or fake: write it again or use another stick",
                target.display()
            );
        }
        if got.len() < n {
            let at = done + got.len() as u64;
            bail!(
                "{} does not hold the image: it ends at byte {at}, the image has {len} bytes",
                target.display()
            );
        }
        h.update(got);
        done += n as u64;
        progress.set(done);
    }
    let sha = hex::encode(h.finalize());
    if sha != iso_sha256 {
        bail!(
            "{} reads back with sha256 {sha}, the image's is {iso_sha256}",
            target.display()
        );
    }
    let took = progress.finish();
    Ok(Pass {
        bytes: len,
        secs: took.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::{flash, Target};

    #[test]
    fn round_trip_on_a_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("x.iso");
        // Not a multiple of the block size, and more than one block.
        let data: Vec<u8> = (0..(BLOCK + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&iso, &data).expect("write iso");
        let out = t.path().join("stick.img");
        fs::write(&out, vec![0xffu8; BLOCK * 3]).expect("an old, larger image");
        let r = flash(&iso, &Target::File(out.clone())).expect("flash");
        assert_eq!(fs::read(&out).expect("read"), data);
        assert_eq!(r.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(
            (r.write.bytes, r.verify.bytes),
            (data.len() as u64, data.len() as u64)
        );
        assert!(!r.sha256_file_checked);
        assert_eq!(r.read_back, "fadvise");
    }

    #[test]
    fn verify_names_the_first_difference() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("x.iso");
        let data: Vec<u8> = (0..(BLOCK * 2 + 100)).map(|i| (i % 253) as u8).collect();
        fs::write(&iso, &data).expect("write iso");
        let sha = sha256_of(&iso).expect("sha");
        let bad = t.path().join("bad.img");
        let mut copy = data.clone();
        let at = BLOCK + 4242;
        copy[at] ^= 0x40;
        fs::write(&bad, &copy).expect("write");
        let e = format!(
            "{:#}",
            verify(&iso, &bad, &sha, false).expect_err("mismatch")
        );
        assert!(
            e.contains(&format!("first difference at byte {at} (0x{at:x})")),
            "{e}"
        );
        assert!(e.contains(&bad.display().to_string()), "{e}");
        // A target that stops short.
        fs::write(&bad, &data[..BLOCK + 7]).expect("write");
        let e = format!("{:#}", verify(&iso, &bad, &sha, false).expect_err("short"));
        assert!(e.contains(&format!("ends at byte {}", BLOCK + 7)), "{e}");
        // The same bytes verify.
        fs::write(&bad, &data).expect("write");
        verify(&iso, &bad, &sha, false).expect("equal bytes verify");
    }

    #[test]
    fn the_sha256_file_is_checked_first() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("n.iso");
        fs::write(&iso, b"image").expect("write");
        let good = hex::encode(Sha256::digest(b"image"));
        fs::write(t.path().join("n.iso.sha256"), format!("{good}  n.iso\n")).expect("write");
        assert_eq!(check_image(&iso).expect("matches"), (good, true));
        fs::write(
            t.path().join("n.iso.sha256"),
            format!("{}  n.iso\n", "0".repeat(64)),
        )
        .expect("write");
        let out = t.path().join("out.img");
        let e = format!(
            "{:#}",
            flash(&iso, &Target::File(out.clone())).expect_err("damaged")
        );
        assert!(
            e.contains("does not match") && e.contains("n.iso.sha256"),
            "{e}"
        );
        assert!(!out.exists(), "nothing written");
    }
}
