//! Debian's archive read directly, without the host's `apt` or `dpkg`:
//! the signed `InRelease` of each suite (checked with `gpgv` against the
//! keyring shipped in `builder/keys`), the `Packages` indices it lists
//! (checked by the sha256 it gives), `.deb` files fetched over HTTP, and
//! their `data.tar` unpacked in Rust.
//!
//! The chain of trust is apt's (apt's `acquire-item.cc`): the archive's
//! OpenPGP signature covers `InRelease`, which holds the sha256 of every
//! index, which holds the sha256 of every package. A package pinned in
//! the lock is checked against the lock's sha256 instead.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::cache::Cache;

/// Debian's archive keyring (package `debian-archive-keyring`
/// 2023.3+deb12u2: the automatic signing keys and stable release keys of
/// Debian 11, 12 and 13), the trust anchor when `NODEFLASH_DEBIAN_KEYRING`
/// does not name another.
const KEYRING: &[u8] = include_bytes!("../keys/debian-archive-keyring.gpg");

/// The architecture whose indices are read.
pub const ARCH: &str = "amd64";

/// The OpenPGP keyring (binary, as `gpgv --keyring` takes it) that
/// `InRelease` signatures are checked against: `NODEFLASH_DEBIAN_KEYRING`,
/// else [`KEYRING`] written once into the cache.
pub fn keyring(cache: &Cache) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NODEFLASH_DEBIAN_KEYRING") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "NODEFLASH_DEBIAN_KEYRING names {}, which is not a file",
                path.display()
            );
        }
        return std::path::absolute(&path)
            .with_context(|| format!("cannot resolve {}", path.display()));
    }
    let key = hex::encode(Sha256::digest(KEYRING));
    let path = cache.file("keyrings", &format!("{key}.gpg"), |dest| {
        std::fs::write(dest, KEYRING).with_context(|| format!("cannot write {}", dest.display()))
    })?;
    // The trust anchor is checked on every use, not only when written.
    if crate::cache::sha256_file(&path)? != key {
        bail!(
            "the cached keyring {} is not the one nodeflash carries: remove it",
            path.display()
        );
    }
    Ok(path)
}

/// An HTTP client for the mirror. Only `http://` URIs: the content is
/// trusted through signatures and sha256, as apt does by default.
pub struct Http {
    agent: ureq::Agent,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Http")
    }
}

impl Http {
    pub fn new() -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(std::time::Duration::from_secs(30)))
            .timeout_recv_body(Some(std::time::Duration::from_secs(300)))
            .build();
        Self {
            agent: config.into(),
        }
    }

    /// Writes the body of `url` to `out` and returns its sha256 (hex).
    /// Errors name the URL: an unreachable host, or a status other than 2xx.
    pub fn get(&self, url: &str, out: &mut dyn Write) -> Result<String> {
        if !url.starts_with("http://") {
            bail!(
                "cannot fetch {url}: only http:// mirrors are supported (the archive's \
                 signature and sha256 protect what is fetched, as with apt)"
            );
        }
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            match self.agent.get(url).call() {
                Ok(resp) => {
                    let mut body = resp.into_body().into_reader();
                    let mut hasher = Sha256::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = body
                            .read(&mut buf)
                            .with_context(|| format!("cannot read {url}"))?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        out.write_all(&buf[..n])
                            .with_context(|| format!("cannot write what {url} sent"))?;
                    }
                    return Ok(hex::encode(hasher.finalize()));
                }
                Err(ureq::Error::StatusCode(code)) if code < 500 => {
                    bail!("cannot fetch {url}: HTTP status {code}")
                }
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e).with_context(|| format!("cannot fetch {url} (tried 3 times)")),
            None => bail!("cannot fetch {url}"),
        }
    }

    /// The body of `url` in memory.
    pub fn get_vec(&self, url: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.get(url, &mut out)?;
        Ok(out)
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

/// What `gpgv --status-fd` said about a signed file: the fingerprints of
/// the good signatures, and whether any signature was bad.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    valid: Vec<String>,
    bad: bool,
}

/// Parses gpgv's status lines (GnuPG's `doc/DETAILS`). Each signature's
/// lines start at `NEWSIG`; a signature is good when it has both `GOODSIG`
/// (gpg's verdict: valid, and the key neither expired nor revoked) and
/// `VALIDSIG` (its fingerprint). `EXPSIG`, `EXPKEYSIG`, `REVKEYSIG` and
/// `ERRSIG` (with `VALIDSIG` for the first three: the maths checks out)
/// and `NO_PUBKEY` (Debian signs with several keys) count for nothing, as
/// apt requires `GOODSIG`; `BADSIG` anywhere refuses the file.
fn parse_status(status: &str) -> Verdict {
    let mut v = Verdict::default();
    let (mut good, mut fingerprint) = (false, None::<String>);
    let end_of_signature = |v: &mut Verdict, good: &mut bool, fp: &mut Option<String>| {
        if std::mem::take(good) {
            v.valid.extend(fp.take());
        }
        *fp = None;
    };
    for line in status.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("[GNUPG:]") {
            continue;
        }
        match words.next() {
            Some("NEWSIG") => end_of_signature(&mut v, &mut good, &mut fingerprint),
            Some("GOODSIG") => good = true,
            Some("VALIDSIG") => fingerprint = words.next().map(str::to_string),
            Some("BADSIG") => v.bad = true,
            _ => {}
        }
    }
    end_of_signature(&mut v, &mut good, &mut fingerprint);
    v
}

/// The signed text of an `InRelease` file (`url`, for messages), when at
/// least one of its signatures is good by a key of `keyring` and none is
/// bad. Only that text is parsed afterwards, never the file as fetched.
pub fn verify_inrelease(keyring: &Path, url: &str, signed: &[u8]) -> Result<String> {
    let dir = tempfile::tempdir().context("cannot create a directory for gpgv")?;
    let input = dir.path().join("InRelease");
    let output = dir.path().join("Release");
    std::fs::write(&input, signed).with_context(|| format!("cannot write {}", input.display()))?;
    let out = Command::new("gpgv")
        .arg("--status-fd")
        .arg("1")
        .arg("--keyring")
        .arg(keyring)
        .arg("--output")
        .arg(&output)
        .arg(&input)
        .output()
        .context("cannot run gpgv (GnuPG's signature checker; package gpgv, or gnupg)")?;
    let verdict = parse_status(&String::from_utf8_lossy(&out.stdout));
    if verdict.bad || verdict.valid.is_empty() {
        bail!(
            "the signature of {url} is not good by any key of {}: refusing its package lists\n{}",
            keyring.display(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    std::fs::read_to_string(&output)
        .with_context(|| format!("cannot read the signed text of {url}"))
}

/// One file an `InRelease` lists under `SHA256:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    pub sha256: String,
    pub size: u64,
    pub path: String,
}

/// A `Release` file's fields that matter here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Release {
    pub suite: String,
    pub codename: String,
    /// `Valid-Until` in seconds since the epoch (UTC), if present.
    pub valid_until: Option<i64>,
    /// `Acquire-By-Hash: yes`: indices can be fetched by their sha256.
    pub by_hash: bool,
    pub sha256: Vec<Indexed>,
}

/// Parses a `Release` text (the format of Debian's wiki `DebianRepository/Format`).
pub fn parse_release(text: &str) -> Result<Release> {
    let mut r = Release::default();
    let mut in_sha256 = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(' ') {
            if in_sha256 {
                let w: Vec<&str> = rest.split_whitespace().collect();
                if let [sha, size, path] = w[..] {
                    r.sha256.push(Indexed {
                        sha256: sha.to_string(),
                        size: size
                            .parse()
                            .with_context(|| format!("bad size in Release line `{line}`"))?,
                        path: path.to_string(),
                    });
                }
            }
            continue;
        }
        in_sha256 = false;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Suite" => r.suite = value.to_string(),
            "Codename" => r.codename = value.to_string(),
            "Valid-Until" => r.valid_until = Some(parse_date(value)?),
            "Acquire-By-Hash" => r.by_hash = value == "yes",
            "SHA256" => in_sha256 = true,
            _ => {}
        }
    }
    Ok(r)
}

/// Seconds since the epoch of a `Release` date (RFC 2822 in UTC, as
/// Debian writes it: `Sat, 05 Dec 2026 02:53:00 UTC`).
fn parse_date(text: &str) -> Result<i64> {
    let bad = || format!("cannot read the date `{text}`");
    let w: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, zone] = w[..] else {
        bail!("{}", bad());
    };
    if zone != "UTC" && zone != "+0000" && zone != "GMT" {
        bail!("{}: not in UTC", bad());
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| *x == month).with_context(bad)? as i64 + 1;
    let d: i64 = day.parse().with_context(bad)?;
    let y: i64 = year.parse().with_context(bad)?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let [h, mi, s] = hms[..] else {
        bail!("{}", bad());
    };
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    // `days_from_civil`).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Ok(days * 86400 + h * 3600 + mi * 60 + s)
}

/// Compares two Debian versions as dpkg does (deb-version(5): epoch, then
/// upstream version and revision, each by alternating non-digit parts,
/// where `~` sorts before anything, and numeric parts).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn part(a: &str, b: &str) -> std::cmp::Ordering {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            // Non-digit prefixes, character by character.
            while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit())
            {
                let ac = order(a.get(i).copied().filter(|c| !c.is_ascii_digit()));
                let bc = order(b.get(j).copied().filter(|c| !c.is_ascii_digit()));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                if i < a.len() && !a[i].is_ascii_digit() {
                    i += 1;
                }
                if j < b.len() && !b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            // Numeric parts, by value.
            let num = |s: &[u8], k: &mut usize| {
                let mut n: u128 = 0;
                while *k < s.len() && s[*k].is_ascii_digit() {
                    n = n
                        .saturating_mul(10)
                        .saturating_add(u128::from(s[*k] - b'0'));
                    *k += 1;
                }
                n
            };
            let (x, y) = (num(a, &mut i), num(b, &mut j));
            if x != y {
                return x.cmp(&y);
            }
        }
        std::cmp::Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua, ub))
        .then_with(|| part(ra, rb))
}

/// Unpacks the files of a `.deb` (its `data.tar`, compressed with xz,
/// zstd or not at all) into `into`, as `dpkg-deb -x` does: permission
/// bits and modification times kept, ownership not changed. An entry whose
/// path has a `..` or is absolute is an error (the `tar` crate alone would
/// skip it quietly); `unpack_in` keeps links from leading outside `into`.
pub fn extract_deb(deb: &Path, into: &Path) -> Result<()> {
    let file =
        std::fs::File::open(deb).with_context(|| format!("cannot open {}", deb.display()))?;
    let mut ar = ar::Archive::new(std::io::BufReader::new(file));
    while let Some(member) = ar.next_entry() {
        let member = member.with_context(|| format!("{} is not a .deb (ar)", deb.display()))?;
        let name = String::from_utf8_lossy(member.header().identifier()).to_string();
        let Some(compression) = name.strip_prefix("data.tar") else {
            continue;
        };
        let reader: Box<dyn Read> = match compression {
            "" => Box::new(member),
            ".xz" => Box::new(liblzma::read::XzDecoder::new(member)),
            ".zst" => Box::new(
                zstd::stream::read::Decoder::new(member)
                    .with_context(|| format!("cannot read {name} of {}", deb.display()))?,
            ),
            other => bail!(
                "{} has a data member compressed as `{other}`, which nodeflash does not read \
                 (xz, zstd or none)",
                deb.display()
            ),
        };
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(true);
        tar.set_preserve_mtime(true);
        tar.set_unpack_xattrs(false);
        tar.set_overwrite(true);
        let fail = || format!("cannot unpack {} into {}", deb.display(), into.display());
        // Directories last, as `tar::Archive::unpack` does, so that their
        // modification times survive the files written into them.
        let mut directories = Vec::new();
        for entry in tar.entries().with_context(fail)? {
            let mut entry = entry.with_context(fail)?;
            let path = entry.path().with_context(fail)?.into_owned();
            if path.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::RootDir
                )
            }) {
                bail!(
                    "{} has an entry outside its tree: {}",
                    deb.display(),
                    path.display()
                );
            }
            if entry.header().entry_type().is_dir() {
                directories.push(entry);
            } else {
                entry.unpack_in(into).with_context(fail)?;
            }
        }
        for mut dir in directories {
            dir.unpack_in(into).with_context(fail)?;
        }
        return Ok(());
    }
    bail!("{} has no data.tar member", deb.display())
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use super::*;

    #[test]
    fn versions_compare_as_dpkg_does() {
        // Examples of deb-version(5) and dpkg's own test suite.
        for (a, b, want) in [
            ("1.0", "1.0", Ordering::Equal),
            ("1.0~rc1", "1.0", Ordering::Less),
            ("1.0", "1.0+b1", Ordering::Less),
            ("1:0.1", "2.0", Ordering::Greater),
            ("6.1.192-2", "6.1.192-3", Ordering::Less),
            ("6.1.176-1", "6.1.192-3", Ordering::Less),
            ("2.1.11-1+deb12u1", "2.1.11-1", Ordering::Greater),
            ("1.10", "1.9", Ordering::Greater),
            ("1.0a", "1.0", Ordering::Greater),
            ("1.0-1", "1.0", Ordering::Greater),
            ("252.39-1~deb12u1", "252.39-1", Ordering::Less),
            ("1.0.", "1.0", Ordering::Greater),
            ("a", "+", Ordering::Less),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn release_fields_and_index_list() {
        let text = "Origin: Debian\nSuite: oldstable-security\nCodename: bookworm-security\n\
                    Date: Sat, 28 Nov 2026 02:53:01 UTC\nValid-Until: Sat, 05 Dec 2026 02:53:00 UTC\n\
                    MD5Sum:\n 00 1 main/binary-amd64/Packages\nSHA256:\n \
                    aa 12 main/binary-amd64/Packages\n bb 3 main/binary-amd64/Packages.xz\n";
        let r = parse_release(text).expect("parsed");
        assert_eq!(r.codename, "bookworm-security");
        assert_eq!(r.suite, "oldstable-security");
        // date -d 'Sat, 05 Dec 2026 02:53:00 UTC' +%s
        assert_eq!(r.valid_until, Some(1_796_439_180));
        assert_eq!(
            r.sha256,
            vec![
                Indexed {
                    sha256: "aa".into(),
                    size: 12,
                    path: "main/binary-amd64/Packages".into()
                },
                Indexed {
                    sha256: "bb".into(),
                    size: 3,
                    path: "main/binary-amd64/Packages.xz".into()
                },
            ]
        );
        assert_eq!(
            parse_date("Thu, 01 Jan 1970 00:00:00 UTC").expect("epoch"),
            0
        );
        assert!(parse_date("Thu, 01 Jan 1970 00:00:00 +0100").is_err());
    }

    #[test]
    fn a_signature_counts_only_when_valid_and_none_is_bad() {
        let good_and_unknown = "[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG 6ED0E7B82643E131 1 8 01 1783765031 9 4CB5\n\
            [GNUPG:] NO_PUBKEY 6ED0E7B82643E131\n[GNUPG:] NEWSIG\n\
            [GNUPG:] GOODSIG F8D2585B8783D481 Debian Stable Release Key (12/bookworm)\n\
            [GNUPG:] VALIDSIG 4D64FEC119C2029067D6E791F8D2585B8783D481 2026-07-11 1783765141 0 4 0 22 8 01 4D64\n";
        assert_eq!(
            parse_status(good_and_unknown),
            Verdict {
                valid: vec!["4D64FEC119C2029067D6E791F8D2585B8783D481".into()],
                bad: false
            }
        );
        // Valid maths by an expired or revoked key: no GOODSIG, not good.
        for spoiled in ["EXPKEYSIG", "EXPSIG", "REVKEYSIG"] {
            let status = format!(
                "[GNUPG:] NEWSIG\n[GNUPG:] {spoiled} F8D2585B8783D481 Debian\n\
                 [GNUPG:] VALIDSIG 4D64FEC119C2029067D6E791F8D2585B8783D481 x\n"
            );
            assert_eq!(parse_status(&status), Verdict::default(), "{spoiled}");
        }
        // A GOODSIG of one signature does not lend itself to the next.
        let mixed = "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG AAAA a\n[GNUPG:] NEWSIG\n\
            [GNUPG:] EXPKEYSIG BBBB b\n[GNUPG:] VALIDSIG BBBBFPR x\n";
        assert!(parse_status(mixed).valid.is_empty());
        let bad = "[GNUPG:] BADSIG F8D2585B8783D481 Debian\n[GNUPG:] VALIDSIG 4D64 x\n";
        assert!(parse_status(bad).bad);
        assert!(parse_status("[GNUPG:] NO_PUBKEY 6ED0\n").valid.is_empty());
    }

    /// A clearsigned `Release` made here with a fresh key (GnuPG's `gpg`):
    /// good with that key's keyring, refused with Debian's, refused once a
    /// signed line is changed; only the signed text comes back.
    #[test]
    fn inrelease_is_checked_by_gpgv() {
        let t = tempfile::tempdir().expect("tempdir");
        let home = t.path().join("gnupg");
        std::fs::create_dir(&home).expect("home");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let gpg = |args: &[&str]| {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(args)
                .output()
                .expect("gpg (package gnupg) runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        gpg(&[
            "--quick-gen-key",
            "nodeflash test <test@nodeflash.invalid>",
            "ed25519",
            "sign",
            "never",
        ]);
        let keyring = t.path().join("test.gpg");
        std::fs::write(&keyring, gpg(&["--export"])).expect("keyring");
        let text =
            "Origin: Debian\nCodename: bookworm\nSHA256:\n aa 1 main/binary-amd64/Packages\n";
        let release = t.path().join("Release");
        std::fs::write(&release, text).expect("release");
        let signed_path = t.path().join("InRelease");
        gpg(&[
            "--clearsign",
            "--output",
            signed_path.to_str().expect("utf-8"),
            release.to_str().expect("utf-8"),
        ]);
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&home)
            .args(["--kill", "gpg-agent"])
            .status();
        let signed = std::fs::read(&signed_path).expect("signed");
        assert_eq!(
            verify_inrelease(&keyring, "http://m/InRelease", &signed).expect("good"),
            text
        );
        let debian = t.path().join("debian.gpg");
        std::fs::write(&debian, KEYRING).expect("debian keyring");
        let err = verify_inrelease(&debian, "http://m/InRelease", &signed).expect_err("no key");
        assert!(
            err.to_string()
                .starts_with("the signature of http://m/InRelease is not good by any key of"),
            "{err:#}"
        );
        let tampered = String::from_utf8(signed)
            .expect("text")
            .replace(" aa 1 ", " bb 1 ");
        let err = verify_inrelease(&keyring, "http://m/InRelease", tampered.as_bytes())
            .expect_err("bad signature");
        assert!(
            err.to_string().contains("is not good by any key"),
            "{err:#}"
        );
    }

    /// A `.deb` made here (ar with a `data.tar.xz`) unpacks with its modes,
    /// symlinks and times; an entry with a `..` is refused.
    #[test]
    fn a_deb_unpacks_like_dpkg_deb() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut data = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, body: &[u8], link: &str| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h.set_size(body.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).expect("link");
            }
            data.append_data(&mut h, path, body).expect("append");
        };
        add("./usr/", tar::EntryType::Directory, 0o755, b"", "");
        add("./usr/sbin/", tar::EntryType::Directory, 0o755, b"", "");
        add(
            "./usr/sbin/zpool",
            tar::EntryType::Regular,
            0o755,
            b"elf",
            "",
        );
        add("./usr/sbin/suid", tar::EntryType::Regular, 0o4755, b"x", "");
        add("./sbin", tar::EntryType::Symlink, 0o777, b"", "usr/sbin");
        let data = data.into_inner().expect("tar");
        let make_deb = |deb: &Path, data: &[u8]| {
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
            xz.write_all(data).expect("xz");
            let xz = xz.finish().expect("xz");
            let mut ar = ar::Builder::new(std::fs::File::create(deb).expect("deb"));
            for (name, body) in [
                ("debian-binary", &b"2.0\n"[..]),
                ("control.tar.xz", &b""[..]),
                ("data.tar.xz", &xz[..]),
            ] {
                let h = ar::Header::new(name.as_bytes().to_vec(), body.len() as u64);
                ar.append(&h, body).expect("member");
            }
        };
        let deb = t.path().join("p.deb");
        make_deb(&deb, &data);
        let out = t.path().join("out");
        std::fs::create_dir(&out).expect("out");
        extract_deb(&deb, &out).expect("extracted");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(out.join("usr/sbin/zpool")).expect("zpool");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(meta.mtime(), 1_700_000_000);
        let suid = std::fs::metadata(out.join("usr/sbin/suid")).expect("suid");
        assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            std::fs::read_link(out.join("sbin")).expect("link"),
            Path::new("usr/sbin")
        );
        assert_eq!(
            std::fs::read(out.join("sbin/zpool")).expect("via link"),
            b"elf"
        );
        // A raw `..` name (tar::Builder's own checks would refuse to write it).
        let mut evil = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..11].copy_from_slice(b"../escape.x");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        evil.append(&h, &b"x"[..]).expect("raw entry");
        let evil_deb = t.path().join("evil.deb");
        make_deb(&evil_deb, &evil.into_inner().expect("tar"));
        let err = extract_deb(&evil_deb, &out).expect_err("outside its tree");
        assert!(format!("{err:#}").contains("outside its tree"), "{err:#}");
        assert!(!t.path().join("escape.x").exists());
        let not_deb = t.path().join("x.deb");
        std::fs::write(&not_deb, b"nope").expect("write");
        let err = extract_deb(&not_deb, &out).expect_err("not a deb");
        assert!(format!("{err:#}").contains("x.deb"), "{err:#}");
    }
}
