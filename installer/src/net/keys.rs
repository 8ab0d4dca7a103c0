//! SSH public keys: checking `authorized_keys` lines (inline in the profile
//! or fetched), their fingerprints, and writing root's `authorized_keys` in
//! the target.

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use ssh_encoding::Decode as _;
use ssh_key::authorized_keys::Entry;
use ssh_key::PublicKey;
use std::str::FromStr as _;

/// Key types accepted in `authorized_keys`.
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One public key and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The key type, e.g. `ssh-ed25519`.
    pub kind: String,
    /// The decoded key blob (what the fingerprint is computed over).
    pub blob: Vec<u8>,
    pub comment: Option<String>,
    /// Where the key came from, e.g. `github user alice (https://…)`.
    pub source: String,
}

impl Key {
    /// `SHA256:…` as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    /// The key as one `authorized_keys` line (without a newline).
    pub fn line(&self) -> String {
        let mut line = format!("{} {}", self.kind, STANDARD.encode(&self.blob));
        if let Some(c) = &self.comment {
            line.push(' ');
            line.push_str(c);
        }
        line
    }
}

/// `SHA256:` and the unpadded base64 of the blob's sha256, as `ssh-keygen -l`
/// prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

/// At most `n` characters of a line, for error messages.
fn excerpt(line: &str, n: usize) -> String {
    let mut s: String = line.chars().take(n).collect();
    if line.chars().count() > n {
        s.push('…');
    }
    format!("{s:?}")
}

/// Checks one `authorized_keys` line with the `ssh-key` crate (the
/// `authorized_keys` format of sshd(8), AUTHORIZED_KEYS FILE FORMAT), then
/// nodeflash's rules on top: a type in [`KEY_TYPES`] (DSA refused), no
/// options before the type (`from=…`, `command=…`), an optional comment. The
/// error says what is wrong, without the source (see [`parse_keys`]).
pub fn parse_line(line: &str, source: &str) -> Result<Key, String> {
    let line = line.trim();
    let (kind, rest) = match line.split_once(char::is_whitespace) {
        Some((kind, rest)) => (kind, rest.trim()),
        None => (line, ""),
    };
    if kind == "ssh-dss" {
        return Err("ssh-dss (DSA) keys are refused: OpenSSH no longer accepts them".into());
    }
    if !KEY_TYPES.contains(&kind) {
        return match Entry::from_str(line) {
            Ok(e) if !e.config_opts().is_empty() => Err(format!(
                "options before the key type are not accepted: {}",
                excerpt(line, 40)
            )),
            _ => Err(format!("not an SSH public key: {}", excerpt(line, 40))),
        };
    }
    if rest.is_empty() {
        return Err(format!("{kind} key without its base64 data"));
    }
    let public = PublicKey::from_openssh(line).map_err(|e| describe(kind, rest, &e))?;
    let blob = public
        .to_bytes()
        .map_err(|e| format!("{kind} key cannot be encoded again ({e})"))?;
    let comment = Some(public.comment()).filter(|c| !c.is_empty());
    Ok(Key {
        kind: kind.to_string(),
        blob,
        comment: comment.map(str::to_string),
        source: source.to_string(),
    })
}

/// What the `ssh-key` crate's error `e` means for a line of type `kind` whose
/// key data (base64) starts `data`.
fn describe(kind: &str, data: &str, e: &ssh_key::Error) -> String {
    use ssh_encoding::{base64, Error as Encoding};
    match e {
        ssh_key::Error::AlgorithmUnknown => {
            // The blob names another type than the line: say which.
            let b64 = data.split_whitespace().next().unwrap_or_default();
            let embedded = STANDARD
                .decode(b64)
                .ok()
                .and_then(|blob| String::decode(&mut blob.as_slice()).ok());
            match embedded {
                Some(t) if t != kind => format!("key data is of type {t:?}, not {kind}"),
                _ => format!("{kind} key data is not a {kind} key"),
            }
        }
        ssh_key::Error::Encoding(
            Encoding::Length | Encoding::Base64(base64::Error::InvalidLength),
        ) => format!("{kind} key data is truncated"),
        ssh_key::Error::Encoding(
            Encoding::CharacterEncoding | Encoding::Base64(base64::Error::InvalidEncoding),
        ) => format!("{kind} key data is not valid base64 ({e})"),
        ssh_key::Error::Encoding(Encoding::TrailingData { remaining }) => {
            format!("{kind} key data has {remaining} bytes after the key")
        }
        _ => format!("{kind} key data is not a valid {kind} key ({e})"),
    }
}

/// Parses a whole `authorized_keys` text (a fetched body): empty lines and
/// `#` comments are skipped; an HTML page or any bad line is an error that
/// names `source` and the line number.
pub fn parse_keys(text: &str, source: &str) -> Result<Vec<Key>> {
    let start = text.trim_start().to_ascii_lowercase();
    if start.starts_with('<') || start.contains("<html") {
        bail!(
            "{source}: got an HTML page, not SSH keys (line 1: {})",
            excerpt(text.trim_start().lines().next().unwrap_or_default(), 40)
        );
    }
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let key = parse_line(trimmed, source)
            .map_err(|e| anyhow::anyhow!("{source}: line {}: {e}", i + 1))?;
        keys.push(key);
    }
    Ok(keys)
}

/// Keys without duplicates (by key blob), in the order first seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Adds a key unless the same key blob is already there; true if added.
    pub fn add(&mut self, key: Key) -> bool {
        if self.keys.iter().any(|k| k.blob == key.blob) {
            return false;
        }
        self.keys.push(key);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The `authorized_keys` text: each key under a comment naming its source.
    pub fn authorized_keys(&self) -> String {
        let mut out = String::from("# written by nodeflash\n");
        let mut last_source = None;
        for k in &self.keys {
            if last_source != Some(&k.source) {
                let _ = writeln!(out, "# {}", k.source);
                last_source = Some(&k.source);
            }
            let _ = writeln!(out, "{}", k.line());
        }
        out
    }
}

/// Writes `<root>/root/.ssh/authorized_keys` (mode 0600) in `<root>/root/.ssh`
/// (mode 0700), both owned by root.
pub fn write_authorized_keys(root: &Path, keys: &KeySet) -> Result<()> {
    let home = root.join("root");
    let dir = home.join(".ssh");
    let file = dir.join("authorized_keys");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    std::os::unix::fs::chown(&dir, Some(0), Some(0))
        .with_context(|| format!("cannot give {} to root", dir.display()))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", file.display()))?;
    std::os::unix::fs::fchown(&f, Some(0), Some(0))
        .with_context(|| format!("cannot give {} to root", file.display()))?;
    f.write_all(keys.authorized_keys().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// Made with `ssh-keygen -t ed25519 -C alice@example`; `ssh-keygen -lf`
    /// printed the fingerprint.
    pub(crate) const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINhLmJw4pYEgXDVADIJc9tycFkdazOtZ5yoJuq6lQDRv alice@example";
    const ED25519_FP: &str = "SHA256:Z9aIAepEYbmA2GcAXwSFgyFtWBsMpOqTUTAHKvwh6O4";
    /// `ssh-keygen -t ecdsa -b 256 -C ''`.
    pub(crate) const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBKAPiBvog88AtRIjiwMBLTly3/kOwviPlxRNlfhhkcPgLDLUoASH2lhmHTfWGTMaRMzXLFYCkxmZeKPI9zDX3e0=";
    const ECDSA_FP: &str = "SHA256:loyNhTIuNyXZBB116+CcX8YsKgZLu7vcTTh3j6OveaQ";

    /// A well-formed blob of type `kind` (RFC 4253 6.6, RFC 5656 3.1 and
    /// OpenSSH's PROTOCOL.u2f: the fields of each type, with made-up key
    /// bytes), base64-encoded.
    fn blob_b64(kind: &str) -> String {
        fn string(b: &mut Vec<u8>, s: &[u8]) {
            b.extend_from_slice(&(s.len() as u32).to_be_bytes());
            b.extend_from_slice(s);
        }
        let point = |n: usize| [vec![4], vec![7; 2 * n]].concat();
        let mut b = Vec::new();
        string(&mut b, kind.as_bytes());
        match kind {
            "ssh-ed25519" => string(&mut b, &[7; 32]),
            "sk-ssh-ed25519@openssh.com" => {
                string(&mut b, &[7; 32]);
                string(&mut b, b"ssh:");
            }
            // e, then n with a leading zero byte (a positive mpint).
            "ssh-rsa" | "ssh-dss" => {
                string(&mut b, &[1, 0, 1]);
                string(&mut b, &[[0].as_slice(), &[0xc5; 256]].concat());
            }
            "sk-ecdsa-sha2-nistp256@openssh.com" => {
                string(&mut b, b"nistp256");
                string(&mut b, &point(32));
                string(&mut b, b"ssh:");
            }
            _ => {
                let (curve, n) = match kind {
                    "ecdsa-sha2-nistp384" => ("nistp384", 48),
                    "ecdsa-sha2-nistp521" => ("nistp521", 66),
                    _ => ("nistp256", 32),
                };
                string(&mut b, curve.as_bytes());
                string(&mut b, &point(n));
            }
        }
        STANDARD.encode(b)
    }

    #[test]
    fn known_vectors() {
        let k = parse_line(ED25519, "t").expect("valid key");
        assert_eq!(k.kind, "ssh-ed25519");
        assert_eq!(k.comment.as_deref(), Some("alice@example"));
        assert_eq!(k.fingerprint(), ED25519_FP);
        assert_eq!(k.line(), ED25519);
        let k = parse_line(ECDSA, "t").expect("valid key");
        assert_eq!(k.comment, None);
        assert_eq!(k.fingerprint(), ECDSA_FP);
        assert_eq!(k.line(), ECDSA);
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        if Command::new("ssh-keygen").arg("-?").output().is_err() {
            crate::testing::require_or_skip("ssh-keygen is not installed (package openssh-client)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (kind, bits) in [("ed25519", "256"), ("ecdsa", "384"), ("rsa", "2048")] {
            let path = dir.path().join(kind);
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-b", bits, "-N", "", "-C", "t@h", "-f"])
                .arg(&path)
                .output()
                .expect("ssh-keygen runs");
            assert!(out.status.success(), "{out:?}");
            let public = fs::read_to_string(path.with_extension("pub")).expect("public key");
            let listed = Command::new("ssh-keygen")
                .arg("-lf")
                .arg(path.with_extension("pub"))
                .output()
                .expect("ssh-keygen -l runs");
            let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
            let want = listed.split_whitespace().nth(1).expect("fingerprint field");
            let key = parse_line(&public, "t").expect("ssh-keygen's key parses");
            assert_eq!(key.fingerprint(), want, "{kind}: {listed}");
        }
    }

    #[test]
    fn every_known_type_parses_and_dss_does_not() {
        for kind in KEY_TYPES {
            let line = format!("{kind} {}", blob_b64(kind));
            let k = parse_line(&line, "t").unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(k.kind, *kind);
        }
        let e = parse_line(&format!("ssh-dss {}", blob_b64("ssh-dss")), "t").expect_err("dss");
        assert!(e.contains("DSA"), "{e}");
    }

    #[test]
    fn bad_lines_say_why() {
        let mismatched = format!("ssh-rsa {}", blob_b64("ssh-ed25519"));
        let cases = [
            ("ssh-ed25519", "without its base64"),
            ("ssh-ed25519 !!!notbase64", "not valid base64"),
            ("ssh-ed25519 AAAA", "truncated"),
            ("ssh-ed25519   \t  AAAA  c", "truncated"),
            (mismatched.as_str(), "of type \"ssh-ed25519\", not ssh-rsa"),
            ("hello world", "not an SSH public key"),
            (
                &format!("from=\"10.0.0.0/8\" {ED25519}"),
                "options before the key type",
            ),
            (&format!("no-pty {ED25519}"), "options before the key type"),
        ];
        for (line, want) in cases {
            let e = parse_line(line, "t").expect_err(line);
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn parse_keys_names_source_and_line() {
        let text = format!("# a comment\n\n{ED25519}\n\t{ECDSA}  \n");
        let keys = parse_keys(&text, "github user alice").expect("valid");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].source, "github user alice");
        let e = parse_keys(&format!("{ED25519}\ngarbage here\n"), "github user bob")
            .expect_err("garbage");
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("github user bob: line 2: not an SSH public key"),
            "{msg}"
        );
        let html = "\n<!DOCTYPE html>\n<html><body>Not Found</body></html>\n";
        let msg = format!(
            "{:#}",
            parse_keys(html, "https://x/y.keys").expect_err("html")
        );
        assert!(msg.contains("https://x/y.keys: got an HTML page"), "{msg}");
        assert!(parse_keys("", "t").expect("empty is valid").is_empty());
    }

    #[test]
    fn keyset_dedups_by_blob_and_renders() {
        let mut set = KeySet::default();
        assert!(set.add(parse_line(ED25519, "inline").expect("valid")));
        // The same key with another comment is the same key.
        let again = ED25519.replace("alice@example", "other");
        assert!(!set.add(parse_line(&again, "github user alice").expect("valid")));
        assert!(set.add(parse_line(ECDSA, "github user alice").expect("valid")));
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.authorized_keys(),
            format!("# written by nodeflash\n# inline\n{ED25519}\n# github user alice\n{ECDSA}\n")
        );
    }

    /// Whether the tests run as root (the owner of this process's /proc entry).
    pub(crate) fn is_root() -> bool {
        fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    #[test]
    fn writes_authorized_keys_with_modes() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut set = KeySet::default();
        set.add(parse_line(ED25519, "inline").expect("valid"));
        match write_authorized_keys(root.path(), &set) {
            Ok(()) => {}
            Err(e) if !is_root() => {
                crate::testing::require_or_skip(&format!("not root, cannot chown ({e:#})"));
                return;
            }
            Err(e) => panic!("{e:#}"),
        }
        let dir = root.path().join("root/.ssh");
        let file = dir.join("authorized_keys");
        let dm = fs::metadata(&dir).expect("dir");
        let fm = fs::metadata(&file).expect("file");
        assert_eq!(dm.mode() & 0o7777, 0o700);
        assert_eq!(fm.mode() & 0o7777, 0o600);
        assert_eq!((dm.uid(), dm.gid(), fm.uid(), fm.gid()), (0, 0, 0, 0));
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            set.authorized_keys()
        );
        // Writing again replaces the file.
        write_authorized_keys(root.path(), &KeySet::default()).expect("rewrite");
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            "# written by nodeflash\n"
        );
    }
}
