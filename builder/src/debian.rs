//! The Debian provider: bookworm packages read from the archive directly
//! (signed indices, see [`crate::archive`]; no `apt` or `dpkg` on the host),
//! checked
//! against the sha256 pinned in the lock, extracted without installing, and
//! OpenZFS compiled from `zfs-dkms` against the matching kernel headers.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::{self, Http};
use crate::cache::{key_of, Cache};
use crate::inputs::{BuildInputs, Lock, LockMode, PackageVersion, Provider, Repin};
use crate::steps;

pub const SUITE: &str = "bookworm";

/// The ZFS userspace and the packages of every library it links.
const USERSPACE: &[&str] = &[
    "zfsutils-linux",
    "libzfs4linux",
    "libnvpair3linux",
    "libuutil3linux",
    "libzpool5linux",
    "libtirpc3",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libkrb5support0",
    "libcom-err2",
    "libkeyutils1",
    "libssl3",
    "zlib1g",
    "libblkid1",
    "libuuid1",
    "libudev1",
    "libc6",
    "libgcc-s1",
];

/// Firmware that the image's network drivers load (`r8169`, `r8152`:
/// `rtl_nic/…`; `tg3`: `tigon/…`), from Debian's `non-free-firmware`.
/// Only the files the image's modules name (`firmware=`) are copied.
const FIRMWARE: &[&str] = &["firmware-realtek", "firmware-misc-nonfree"];

/// The stick's first stage under UEFI: shim signed by Microsoft's UEFI CA
/// (what firmware with Secure Boot on trusts out of the box). It starts
/// `grubx64.efi` from its own directory (shim's `DEFAULT_LOADER`).
const SHIM: &str = "shim-signed";
/// Where [`SHIM`] has its binary.
const SHIM_EFI: &str = "usr/lib/shim/shimx64.efi.signed";
/// The stick's second stage: GRUB signed by Debian's key, which shim
/// trusts; it checks the kernel's signature through shim when Secure Boot
/// is on. Bookworm signs no systemd-boot.
const GRUB: &str = "grub-efi-amd64-signed";
/// Where [`GRUB`] has its monolithic image (modules built in; prefix
/// `/EFI/debian` embedded, see `build::write_efi`).
const GRUB_EFI: &str = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";

/// Programs of the ZFS userspace the image carries.
const PROGRAMS: &[&str] = &["/sbin/zpool", "/sbin/zfs", "/sbin/zdb"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DebianLock {
    pub suite: String,
    pub kernel_release: String,
    #[serde(rename = "package")]
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Package {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// How many of [`package_names`]' first names belong to the kernel: its
/// image, headers, common headers (these three carry the ABI in their
/// names) and kbuild.
const KERNEL_PACKAGES: usize = 4;

/// Every package an image needs for a kernel release, the kernel's
/// [`KERNEL_PACKAGES`] first.
fn package_names(release: &str) -> Result<Vec<String>> {
    let base = release.strip_suffix("-amd64").with_context(|| {
        format!("unexpected kernel release `{release}`: expected an -amd64 flavour")
    })?;
    let major_minor: Vec<&str> = base.split('.').take(2).collect();
    let kbuild = format!("linux-kbuild-{}", major_minor.join("."));
    let mut names = vec![
        format!("linux-image-{release}"),
        format!("linux-headers-{release}"),
        format!("linux-headers-{base}-common"),
        kbuild,
        "zfs-dkms".to_string(),
        "systemd-boot-efi".to_string(),
        SHIM.to_string(),
        GRUB.to_string(),
    ];
    names.extend(USERSPACE.iter().map(|s| s.to_string()));
    names.extend(FIRMWARE.iter().map(|s| s.to_string()));
    Ok(names)
}

/// The archive's package lists, read once per build from the signed
/// indices of every configured suite (see [`crate::archive`]).
struct Indices {
    /// Every record of every suite, by package name.
    records: HashMap<String, Vec<Record>>,
}

/// The components read: the ZFS packages are in `contrib`, the firmware in
/// `non-free-firmware`.
const COMPONENTS: &[&str] = &["main", "contrib", "non-free-firmware"];

impl Indices {
    /// Fetches and checks `InRelease` of each suite of [`sources`], then
    /// each component's `Packages` (from the cache when its sha256 is
    /// there already).
    fn open(cache: &Cache) -> Result<Self> {
        let dists = sources(SUITE)?;
        let keyring = archive::keyring(cache)?;
        let http = Http::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut records: HashMap<String, Vec<Record>> = HashMap::new();
        for dist in &dists {
            let base = format!("{}/dists/{}", dist.uri.trim_end_matches('/'), dist.suite);
            let url = format!("{base}/InRelease");
            steps::note(&format!("reading {url}"));
            let signed = http.get_vec(&url)?;
            let text = archive::verify_inrelease(&keyring, &url, &signed)?;
            let release = archive::parse_release(&text)
                .with_context(|| format!("cannot read the signed text of {url}"))?;
            if release.codename != dist.suite && release.suite != dist.suite {
                bail!(
                    "{url} is signed for {} ({}), not for {}: refusing it",
                    release.codename,
                    release.suite,
                    dist.suite
                );
            }
            if let Some(until) = release.valid_until.filter(|u| *u < now) {
                bail!(
                    "{url} expired {} s ago (Valid-Until): the mirror serves stale package \
                     lists; use another mirror",
                    now - until
                );
            }
            for component in COMPONENTS {
                let plain = format!("{component}/binary-{}/Packages", archive::ARCH);
                let xz = format!("{plain}.xz");
                let find = |path: &str| release.sha256.iter().find(|i| i.path == path);
                let (Some(plain_entry), Some(xz_entry)) = (find(&plain), find(&xz)) else {
                    continue;
                };
                let index_url = if release.by_hash {
                    format!(
                        "{base}/{component}/binary-{}/by-hash/SHA256/{}",
                        archive::ARCH,
                        xz_entry.sha256
                    )
                } else {
                    format!("{base}/{xz}")
                };
                let path = cache.file("debian-index", &plain_entry.sha256, |dest| {
                    let compressed = http.get_vec(&index_url)?;
                    let got = hex::encode(Sha256::digest(&compressed));
                    if got != xz_entry.sha256 {
                        bail!(
                            "{index_url} has sha256 {got}, but the signed {url} lists {}: refusing it",
                            xz_entry.sha256
                        );
                    }
                    let mut text = Vec::new();
                    liblzma::read::XzDecoder::new(&compressed[..])
                        .read_to_end(&mut text)
                        .with_context(|| format!("cannot decompress {index_url}"))?;
                    let got = hex::encode(Sha256::digest(&text));
                    if got != plain_entry.sha256 {
                        bail!(
                            "{index_url} unpacks to sha256 {got}, but the signed {url} lists {}: refusing it",
                            plain_entry.sha256
                        );
                    }
                    std::fs::write(dest, &text)
                        .with_context(|| format!("cannot write {}", dest.display()))
                })?;
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                // A cached index is checked again: the cache is keyed by
                // the sha256 the signed list gives, not trusted for it.
                let got = hex::encode(Sha256::digest(text.as_bytes()));
                if got != plain_entry.sha256 {
                    bail!(
                        "{} has sha256 {got}, not {} as its name says: remove it",
                        path.display(),
                        plain_entry.sha256
                    );
                }
                for mut r in parse_records(&text) {
                    r.filename = format!("{}/{}", dist.uri.trim_end_matches('/'), r.filename);
                    records.entry(r.package.clone()).or_default().push(r);
                }
            }
        }
        Ok(Self { records })
    }

    /// Downloads `pkg` into `dest`, checked against the lock's sha256.
    fn download(&self, pkg: &Package, dest: &Path, lock_path: &Path) -> Result<()> {
        let r = self
            .records
            .get(&pkg.name)
            .and_then(|rs| rs.iter().find(|r| r.version == pkg.version))
            .with_context(|| {
                format!(
                    "the Debian archive ({SUITE}) does not list {} {}",
                    pkg.name, pkg.version
                )
            })?;
        let mut file = std::fs::File::create(dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        let got = Http::new().get(&r.filename, &mut file)?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", dest.display()))?;
        if got != pkg.sha256 {
            bail!(
                "{} {} from {} has sha256 {got}, but {} pins {}: refusing it",
                pkg.name,
                pkg.version,
                r.filename,
                lock_path.display(),
                pkg.sha256
            );
        }
        Ok(())
    }
}

/// One suite of a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dist {
    uri: String,
    suite: String,
}

/// The suites read: `suite` and `suite-updates` from the main mirror,
/// `suite-security` from the security mirror. The mirrors are
/// `NODEFLASH_DEBIAN_MIRROR` and `NODEFLASH_DEBIAN_SECURITY_MIRROR`, else
/// the host's apt sources (`/etc/apt/sources.list{,.d}`) when it has them.
/// Errors when neither names a main mirror.
fn sources(suite: &str) -> Result<Vec<Dist>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    pick_sources(
        suite,
        env("NODEFLASH_DEBIAN_MIRROR"),
        env("NODEFLASH_DEBIAN_SECURITY_MIRROR"),
        &host_sources(),
    )
}

/// The mirrors a build reads, as (environment variable, URI): what
/// `NODEFLASH_DEBIAN_MIRROR` and `NODEFLASH_DEBIAN_SECURITY_MIRROR` say, else
/// the host's apt sources. Errors as [`sources`] does.
pub fn configured_mirrors() -> Result<Vec<(&'static str, String)>> {
    Ok(sources(SUITE)?
        .into_iter()
        .filter(|d| !d.suite.ends_with("-updates"))
        .map(|d| {
            let var = if d.suite.ends_with("-security") {
                "NODEFLASH_DEBIAN_SECURITY_MIRROR"
            } else {
                "NODEFLASH_DEBIAN_MIRROR"
            };
            (var, d.uri)
        })
        .collect())
}

/// [`sources`] from the environment's values and the host's sources.
fn pick_sources(
    suite: &str,
    main_env: Option<String>,
    security_env: Option<String>,
    host: &[HostSource],
) -> Result<Vec<Dist>> {
    let from_host = |want_security: bool| {
        host.iter()
            .find(|s| {
                s.suites
                    .iter()
                    .any(|x| x.starts_with(suite) && x.ends_with("-security") == want_security)
            })
            .map(|s| s.uri.clone())
    };
    let Some(main) = main_env.or_else(|| from_host(false)) else {
        bail!(
            "no Debian mirror configured: set NODEFLASH_DEBIAN_MIRROR (for example \
             NODEFLASH_DEBIAN_MIRROR=http://deb.debian.org/debian and \
             NODEFLASH_DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security); \
             on a Debian host a {suite} source in /etc/apt/sources.list{{,.d}} is used instead"
        );
    };
    let mut out = vec![
        Dist {
            uri: main.clone(),
            suite: suite.to_string(),
        },
        Dist {
            uri: main,
            suite: format!("{suite}-updates"),
        },
    ];
    match security_env.or_else(|| from_host(true)) {
        Some(uri) => out.push(Dist {
            uri,
            suite: format!("{suite}-security"),
        }),
        None => steps::note(&format!(
            "warning: no {suite}-security mirror (NODEFLASH_DEBIAN_SECURITY_MIRROR): \
             kernel security updates will not be pinned"
        )),
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
struct HostSource {
    uri: String,
    suites: Vec<String>,
}

fn host_sources() -> Vec<HostSource> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "sources" || ext == "list" {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    texts.push((ext == "sources", t));
                }
            }
        }
    }
    texts
        .iter()
        .flat_map(|(deb822, t)| {
            if *deb822 {
                parse_deb822(t)
            } else {
                parse_one_line(t)
            }
        })
        .collect()
}

fn parse_deb822(text: &str) -> Vec<HostSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let types = field("Types").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb")
            || field("Enabled").as_deref() == Some("no")
        {
            continue;
        }
        let suites: Vec<String> = field("Suites")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for uri in field("URIs").unwrap_or_default().split_whitespace() {
            out.push(HostSource {
                uri: uri.to_string(),
                suites: suites.clone(),
            });
        }
    }
    out
}

fn parse_one_line(text: &str) -> Vec<HostSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((_, tail)) = opts.split_once(']') else {
                continue;
            };
            rest = tail.trim();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(HostSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// One version of a package as the archive's signed indices list it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    package: String,
    version: String,
    sha256: String,
    depends: String,
    /// `Filename` (below the mirror's URI), then the whole URL.
    filename: String,
}

/// The records of a `Packages` index (deb822 paragraphs); a paragraph
/// without `Package`, `Version`, `SHA256` or `Filename` is skipped.
fn parse_records(text: &str) -> Vec<Record> {
    text.split("\n\n")
        .filter_map(|para| {
            let field = |f: &str| {
                para.lines()
                    .find_map(|l| l.strip_prefix(f)?.strip_prefix(": "))
                    .map(str::to_string)
            };
            Some(Record {
                package: field("Package")?,
                version: field("Version")?,
                sha256: field("SHA256")?,
                depends: field("Depends").unwrap_or_default(),
                filename: field("Filename")?,
            })
        })
        .collect()
}

/// What resolving pins needs of the archive. [`Indices`] answers from the
/// live archive's signed indices; the re-pinning rules below are written against this
/// trait so they can be unit-tested.
trait Archive {
    /// Every published version of each of `names` (one query for all); a
    /// name the archive does not have is absent or empty.
    fn published(&self, names: &[&str]) -> Result<Vec<Record>>;
    /// The version `apt-get install` would take of each of `names`
    /// (highest priority, then newest); a name the archive lacks is absent.
    fn candidates(&self, names: &[&str]) -> Result<Vec<Record>>;

    /// The candidate of `name`, or an error naming it.
    fn candidate(&self, name: &str) -> Result<Record> {
        self.candidates(&[name])?
            .into_iter()
            .find(|r| r.package == name)
            .with_context(|| {
                format!("package {name} is not in the Debian archive ({SUITE}, main and contrib)")
            })
    }
}

impl Archive for Indices {
    fn published(&self, names: &[&str]) -> Result<Vec<Record>> {
        Ok(names
            .iter()
            .flat_map(|n| self.records.get(*n).cloned().unwrap_or_default())
            .collect())
    }

    /// The newest version of each name across the suites: every suite has
    /// apt's default priority (500), so apt takes the highest version.
    fn candidates(&self, names: &[&str]) -> Result<Vec<Record>> {
        Ok(names
            .iter()
            .filter_map(|n| {
                self.records
                    .get(*n)?
                    .iter()
                    .max_by(|a, b| archive::compare_versions(&a.version, &b.version))
                    .cloned()
            })
            .collect())
    }
}

/// The kernel release the archive's `linux-image-amd64` points at now.
fn current_kernel_release(archive: &dyn Archive) -> Result<String> {
    let depends = archive.candidate("linux-image-amd64")?.depends;
    depends
        .split(',')
        .find_map(|d| d.trim().strip_prefix("linux-image-"))
        .and_then(|d| d.split_whitespace().next())
        .map(str::to_string)
        .with_context(|| {
            format!("cannot find the kernel release in linux-image-amd64's Depends: {depends}")
        })
}

/// A lock pinning the archive's current versions of everything an image
/// needs, for the kernel `linux-image-amd64` points at.
fn newest(archive: &dyn Archive) -> Result<DebianLock> {
    let release = current_kernel_release(archive)?;
    let names = package_names(&release)?;
    let found = archive.candidates(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let packages = names
        .into_iter()
        .map(|name| {
            let r = found.iter().find(|r| r.package == name).with_context(|| {
                format!("package {name} is not in the Debian archive ({SUITE}, main and contrib)")
            })?;
            Ok(Package {
                name,
                version: r.version.clone(),
                sha256: r.sha256.clone(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(DebianLock {
        suite: SUITE.to_string(),
        kernel_release: release,
        packages,
    })
}

/// The pins among `pins` whose version the archive no longer publishes.
///
/// Errors when the archive publishes a pinned version with another sha256
/// than the lock's: that is never re-pinned (the lock or the archive has
/// been tampered with, or the mirror is broken).
fn unpublished(archive: &dyn Archive, pins: &[&Package], lock_path: &Path) -> Result<Vec<Package>> {
    let names: Vec<&str> = pins.iter().map(|p| p.name.as_str()).collect();
    let records = archive.published(&names)?;
    let mut gone = Vec::new();
    for pkg in pins {
        let same = |r: &&Record| r.package == pkg.name && r.version == pkg.version;
        match records.iter().find(same) {
            Some(r) if r.sha256 != pkg.sha256 => bail!(
                "the Debian archive lists {} {} with sha256 {}, but {} pins {}: refusing it",
                pkg.name,
                pkg.version,
                r.sha256,
                lock_path.display(),
                pkg.sha256
            ),
            Some(_) => {}
            None => gone.push((*pkg).clone()),
        }
    }
    Ok(gone)
}

/// `lock` with every package of `gone` pinned again, and one [`Repin`] per
/// change. Packages the lock's kernel needs but does not pin are pinned too.
///
/// Rules: the kernel ABI (`kernel-release`) is kept while the archive still
/// publishes its image, headers and common headers, since modules built for
/// one ABI load into every upload of it (Debian's kernel ABI policy); a
/// package is then pinned to the archive's candidate of the same name. When
/// the ABI itself is gone, the kernel follows `linux-image-amd64` and its
/// four packages are pinned together. Other pins are kept.
fn repin(
    lock: &DebianLock,
    gone: &[Package],
    archive: &dyn Archive,
) -> Result<(DebianLock, Vec<Repin>)> {
    let old_names = package_names(&lock.kernel_release)?;
    let abi_names = &old_names[..KERNEL_PACKAGES - 1];
    let abi_published =
        archive.published(&abi_names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let abi_gone = abi_names.iter().any(|name| {
        gone.iter().any(|p| &p.name == name) && !abi_published.iter().any(|r| &r.package == name)
    });
    let release = if abi_gone {
        current_kernel_release(archive)?
    } else {
        lock.kernel_release.clone()
    };
    let names = package_names(&release)?;
    let mut packages = Vec::new();
    let mut changes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        // The package this one replaces: same name, or same kernel role.
        let old = lock.packages.iter().find(|p| &p.name == name).or_else(|| {
            (i < KERNEL_PACKAGES)
                .then(|| lock.packages.iter().find(|p| p.name == old_names[i]))
                .flatten()
        });
        let reason = match old {
            Some(_) if abi_gone && i < KERNEL_PACKAGES => format!(
                "kernel ABI {} is no longer published; the kernel follows linux-image-amd64",
                lock.kernel_release
            ),
            Some(o) if gone.iter().any(|g| g.name == o.name) => {
                "the pinned version is no longer published".to_string()
            }
            Some(o) => {
                packages.push(o.clone());
                continue;
            }
            None => "not pinned before".to_string(),
        };
        let r = archive.candidate(name).with_context(|| {
            format!("cannot pin {name} again: the archive has no version of it")
        })?;
        let to = Package {
            name: name.clone(),
            version: r.version,
            sha256: r.sha256,
        };
        changes.push(Repin {
            from: old.map(|o| PackageVersion {
                name: o.name.clone(),
                version: o.version.clone(),
            }),
            to: PackageVersion {
                name: to.name.clone(),
                version: to.version.clone(),
            },
            reason,
        });
        packages.push(to);
    }
    Ok((
        DebianLock {
            suite: lock.suite.clone(),
            kernel_release: release,
            packages,
        },
        changes,
    ))
}

/// The changes from `old` to `new`, for `update-inputs`.
fn differences(old: Option<&DebianLock>, new: &DebianLock, reason: &str) -> Vec<Repin> {
    new.packages
        .iter()
        .filter_map(|p| {
            let before = old.and_then(|o| o.packages.iter().find(|q| q.name == p.name));
            if before.is_some_and(|b| b == p) {
                return None;
            }
            Some(Repin {
                from: before.map(|b| PackageVersion {
                    name: b.name.clone(),
                    version: b.version.clone(),
                }),
                to: PackageVersion {
                    name: p.name.clone(),
                    version: p.version.clone(),
                },
                reason: reason.to_string(),
            })
        })
        .collect()
}

/// The Debian provider for one lock file.
#[derive(Debug)]
pub struct Debian {
    pub lock_path: PathBuf,
    /// How the user names the profile, for the `update-inputs` command in
    /// messages (`--profile` takes the same).
    pub profile_arg: String,
}

impl Debian {
    /// The command that re-pins this lock.
    fn update_command(&self) -> String {
        format!("cargo xtask update-inputs --profile {}", self.profile_arg)
    }

    /// The lock, complete and with every pin obtainable: from the file,
    /// created when missing, and re-pinned where the archive has dropped a
    /// version (unless `mode` is [`LockMode::Locked`]). Opens the archive
    /// (refreshing its lists once) only when a pin is not in the cache.
    fn settle(
        &self,
        cache: &Cache,
        mode: LockMode,
        indices: &mut Option<Indices>,
    ) -> Result<(DebianLock, Vec<Repin>)> {
        let locked = mode == LockMode::Locked;
        let lock = Lock::load_if_present(&self.lock_path)?.and_then(|l| l.debian);
        let lock = match lock {
            Some(l) => l,
            None if locked => bail!(
                "{} pins no Debian packages, and --locked forbids creating them: run `{}`",
                self.lock_path.display(),
                self.update_command()
            ),
            None => {
                let new = newest(open(cache, indices)?)?;
                self.save(&new)?;
                steps::note(&format!(
                    "inputs: created {} (kernel {}, {} packages)",
                    self.lock_path.display(),
                    new.kernel_release,
                    new.packages.len()
                ));
                return Ok((new, Vec::new()));
            }
        };
        let needed = package_names(&lock.kernel_release)?;
        let unpinned: Vec<&String> = needed
            .iter()
            .filter(|n| !lock.packages.iter().any(|p| &&p.name == n))
            .collect();
        let absent: Vec<&Package> = lock
            .packages
            .iter()
            .filter(|p| !cache.has("debs", &deb_key(p)))
            .collect();
        if absent.is_empty() && unpinned.is_empty() {
            return Ok((lock, Vec::new()));
        }
        let archive = open(cache, indices)?;
        let gone = unpublished(archive, &absent, &self.lock_path)?;
        if gone.is_empty() && unpinned.is_empty() {
            return Ok((lock, Vec::new()));
        }
        if locked && !gone.is_empty() {
            let what: Vec<String> = gone
                .iter()
                .map(|p| format!("{} {}", p.name, p.version))
                .collect();
            bail!(
                "cannot download {} pinned in {}: Debian no longer publishes that version \
                 (security updates replace old ones), and --locked forbids re-pinning; \
                 run `{}` to pin the current versions, or build without --locked",
                what.join(", "),
                self.lock_path.display(),
                self.update_command()
            );
        }
        if locked {
            let what: Vec<&str> = unpinned.iter().map(|n| n.as_str()).collect();
            bail!(
                "{} does not pin {}, which this build needs, and --locked forbids pinning it; \
                 run `{}`, or build without --locked",
                self.lock_path.display(),
                what.join(", "),
                self.update_command()
            );
        }
        let (new, changes) = repin(&lock, &gone, archive)?;
        for c in &changes {
            steps::note(&format!("inputs: {c}"));
        }
        self.save(&new)?;
        steps::note(&format!("inputs: updated {}", self.lock_path.display()));
        Ok((new, changes))
    }

    fn save(&self, debian: &DebianLock) -> Result<()> {
        let mut lock = Lock::load_if_present(&self.lock_path)?.unwrap_or_default();
        lock.debian = Some(debian.clone());
        lock.save(&self.lock_path)
    }

    /// The verified `.deb` of a pinned package, downloaded if not cached.
    fn fetch(
        &self,
        cache: &Cache,
        indices: &mut Option<Indices>,
        pkg: &Package,
    ) -> Result<PathBuf> {
        let deb = cache.file("debs", &deb_key(pkg), |dest| {
            let indices = open(cache, indices)?;
            steps::note(&format!("downloading {} {}", pkg.name, pkg.version));
            indices
                .download(pkg, dest, &self.lock_path)
                .with_context(|| {
                    format!(
                        "cannot download {} {} pinned in {}",
                        pkg.name,
                        pkg.version,
                        self.lock_path.display(),
                    )
                })
        })?;
        // A cached .deb is checked again on every use, as the indices are.
        if crate::cache::sha256_file(&deb)? != pkg.sha256 {
            bail!(
                "the cached {} is not {} {} as {} pins it: remove it",
                deb.display(),
                pkg.name,
                pkg.version,
                self.lock_path.display()
            );
        }
        Ok(deb)
    }
}

/// The cache key of a package's `.deb`: its sha256, so a package once
/// fetched is never fetched again, even after the archive drops it.
fn deb_key(pkg: &Package) -> String {
    format!("{}.deb", pkg.sha256)
}

/// The archive with lists refreshed once per build, opened on first use.
fn open<'a>(cache: &Cache, indices: &'a mut Option<Indices>) -> Result<&'a Indices> {
    if indices.is_none() {
        *indices =
            Some(Indices::open(cache).context("cannot read the Debian archive's package lists")?);
    }
    indices.as_ref().context("the archive is open")
}

impl Provider for Debian {
    fn update_lock(&self, cache: &Cache) -> Result<Vec<Repin>> {
        let mut indices = None;
        let new = newest(open(cache, &mut indices)?)?;
        let old = Lock::load_if_present(&self.lock_path)?.and_then(|l| l.debian);
        let changes = differences(old.as_ref(), &new, "the newest published version");
        if old.as_ref() == Some(&new) {
            steps::note(&format!(
                "{} is up to date (kernel {})",
                self.lock_path.display(),
                new.kernel_release
            ));
        } else {
            for c in &changes {
                steps::note(&format!("inputs: {c}"));
            }
            self.save(&new)?;
            steps::note(&format!(
                "pinned kernel {} in {}",
                new.kernel_release,
                self.lock_path.display()
            ));
        }
        Ok(changes)
    }

    fn check(&self, cache: &Cache) -> Result<Vec<Repin>> {
        let lock = Lock::load(&self.lock_path)?
            .debian
            .with_context(|| format!("{} pins no Debian packages", self.lock_path.display()))?;
        let mut indices = None;
        let archive = open(cache, &mut indices)?;
        let pins: Vec<&Package> = lock.packages.iter().collect();
        let gone = unpublished(archive, &pins, &self.lock_path)?;
        Ok(repin(&lock, &gone, archive)?.1)
    }

    fn provide(&self, cache: &Cache, mode: LockMode) -> Result<BuildInputs> {
        let mut indices = None;
        let (lock, changes, debs) = steps::long_step("Fetching inputs", || {
            let (lock, changes) = self.settle(cache, mode, &mut indices)?;
            let debs = lock
                .packages
                .iter()
                .map(|p| Ok((p.name.clone(), self.fetch(cache, &mut indices, p)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok((lock, changes, debs))
        })?;
        let release = lock.kernel_release.clone();
        let expected = package_names(&release)?;
        let pkg = |name: &str| {
            lock.packages
                .iter()
                .find(|p| p.name == name)
                .with_context(|| format!("{} does not pin {name}", self.lock_path.display()))
        };
        let deb = |name: &str| {
            debs.iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| d.clone())
                .context("fetched package")
        };
        let unpacked = |name: &str| -> Result<PathBuf> {
            let p = pkg(name)?;
            let d = deb(name)?;
            cache.dir("unpacked", &p.sha256, |dir| archive::extract_deb(&d, dir))
        };
        let image_pkg = format!("linux-image-{release}");
        let kernel_tree = steps::step("Unpacking inputs", || unpacked(&image_pkg))?;
        let boot_tree = unpacked("systemd-boot-efi")?;
        let shim_tree = unpacked(SHIM)?;
        let grub_tree = unpacked(GRUB)?;
        let firmware = FIRMWARE
            .iter()
            .map(|n| {
                let tree = unpacked(n)?;
                // bookworm installs into /lib/firmware; later releases /usr/lib.
                Ok(["lib/firmware", "usr/lib/firmware"]
                    .iter()
                    .map(|d| tree.join(d))
                    .find(|d| d.is_dir())
                    .unwrap_or_else(|| tree.join("lib/firmware")))
            })
            .collect::<Result<Vec<_>>>()?;

        let userspace: Vec<&Package> = USERSPACE.iter().map(|n| pkg(n)).collect::<Result<_>>()?;
        let sysroot_key = key_of(userspace.iter().map(|p| p.sha256.as_str()));
        let sysroot = cache.dir("sysroot", &sysroot_key, |dir| {
            for p in &userspace {
                archive::extract_deb(&deb(&p.name)?, dir)?;
            }
            Ok(())
        })?;

        let header_pkgs: Vec<&Package> = expected[1..5]
            .iter()
            .map(|n| pkg(n))
            .collect::<Result<_>>()?;
        let zfs_src = pkg("zfs-dkms")?;
        let compiler = cmd::run(Command::new("gcc-12").arg("--version"))?;
        let zfs_key = key_of(
            header_pkgs
                .iter()
                .chain([&zfs_src])
                .map(|p| p.sha256.as_str())
                .chain([compiler.lines().next().unwrap_or(""), "zfs-modules-v3"]),
        );
        // Say why the modules are compiled again when a re-pin caused it.
        let why: Vec<String> = changes
            .iter()
            .filter(|c| header_pkgs.iter().any(|p| p.name == c.to.name))
            .map(|c| c.to.to_string())
            .collect();
        let title = if why.is_empty() {
            format!("Compiling ZFS modules for {release}")
        } else {
            format!(
                "Compiling ZFS modules for {release} (re-pinned {})",
                why.join(", ")
            )
        };
        let zfs_modules = cache.dir("zfs-modules", &zfs_key, |out| {
            steps::long_step(&title, || {
                steps::note("once per kernel: about 4 to 6 minutes on 2 cores");
                let debs: Vec<PathBuf> = header_pkgs
                    .iter()
                    .chain([&zfs_src])
                    .map(|p| deb(&p.name))
                    .collect::<Result<_>>()?;
                build_zfs(cache, &release, &debs, out)
            })
        })?;

        let id = key_of(
            lock.packages
                .iter()
                .map(|p| p.sha256.as_str())
                .chain([zfs_key.as_str()]),
        );
        Ok(BuildInputs {
            kernel: kernel_tree.join(format!("boot/vmlinuz-{release}")),
            modules_root: kernel_tree.join(format!("lib/modules/{release}")),
            extra_modules: vec![(zfs_modules, PathBuf::from("extra/zfs"))],
            programs: PROGRAMS.iter().map(PathBuf::from).collect(),
            sysroot,
            systemd_boot: boot_tree.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            shim: shim_tree.join(SHIM_EFI),
            grub: grub_tree.join(GRUB_EFI),
            firmware,
            kernel_release: release,
            id,
            packages: lock
                .packages
                .iter()
                .map(|p| PackageVersion {
                    name: p.name.clone(),
                    version: p.version.clone(),
                })
                .collect(),
        })
    }
}

/// Compiles the OpenZFS kernel modules from `zfs-dkms` against the headers,
/// and puts the stripped `.ko` files into `out`.
fn build_zfs(cache: &Cache, release: &str, debs: &[PathBuf], out: &Path) -> Result<()> {
    let work = tempfile::tempdir_in(cache.root()).context("cannot create a ZFS build directory")?;
    let root = work.path();
    for deb in debs {
        archive::extract_deb(deb, root)?;
    }
    let base = release.trim_end_matches("-amd64");
    let common = root.join(format!("usr/src/linux-headers-{base}-common"));
    let arch = root.join(format!("usr/src/linux-headers-{release}"));
    // The arch headers include the common ones by an absolute /usr/src path.
    let makefile = arch.join("Makefile");
    std::fs::write(
        &makefile,
        format!("include {}/Makefile\n", common.display()),
    )
    .with_context(|| format!("cannot write {}", makefile.display()))?;
    let src = std::fs::read_dir(root.join("usr/src"))
        .context("cannot list the unpacked sources")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("zfs-"))
        })
        .context("zfs-dkms holds no usr/src/zfs-* source")?;
    // configure's own checks compile with `CC`, the modules with the
    // headers' `gcc-12` (`.kernelvariables`): the same compiler for both,
    // and no `gcc` or `cc` needed on the host besides it.
    cmd::run(
        Command::new("./configure")
            .env("CC", "gcc-12")
            .arg("--with-config=kernel")
            .arg(format!("--with-linux={}", common.display()))
            .arg(format!("--with-linux-obj={}", arch.display()))
            .current_dir(&src),
    )
    .context("cannot configure OpenZFS for the kernel headers")?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Assertion messages carry `__FILE__`: the sources' path below the
    // temporary directory becomes `/usr/src/zfs-…`, as in a DKMS build, so
    // the modules hold no path of the build host and do not depend on it.
    // No debug information (`-g0` after the kernel's `-g`): it is stripped
    // from the modules anyway, and writing it costs compile time.
    cmd::run(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .env(
                "KCFLAGS",
                format!("-ffile-prefix-map={}= -g0", root.display()),
            )
            .current_dir(&src),
    )
    .context("cannot compile OpenZFS")?;
    let mut found = 0;
    for entry in walk(&src.join("module"))? {
        if entry.extension().is_some_and(|e| e == "ko") {
            let name = entry.file_name().context("module file name")?;
            let dest = out.join(name);
            std::fs::copy(&entry, &dest)
                .with_context(|| format!("cannot copy {}", entry.display()))?;
            cmd::run(Command::new("strip").arg("--strip-debug").arg(&dest))?;
            found += 1;
        }
    }
    if found == 0 {
        bail!(
            "the OpenZFS build produced no modules in {}",
            src.join("module").display()
        );
    }
    Ok(())
}

/// Every file below `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e.with_context(|| format!("cannot list {}", d.display()))?;
            let ty = e
                .file_type()
                .with_context(|| format!("cannot stat {}", e.path().display()))?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_set_follows_the_kernel_release() {
        let names = package_names("6.1.0-56-amd64").expect("names");
        assert_eq!(
            &names[..8],
            [
                "linux-image-6.1.0-56-amd64",
                "linux-headers-6.1.0-56-amd64",
                "linux-headers-6.1.0-56-common",
                "linux-kbuild-6.1",
                "zfs-dkms",
                "systemd-boot-efi",
                "shim-signed",
                "grub-efi-amd64-signed",
            ]
        );
        assert!(names.contains(&"libc6".to_string()));
        assert!(package_names("6.1.0-56-arm64").is_err());
    }

    #[test]
    fn host_sources_in_both_formats() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\nTypes: deb-src\nURIs: http://src.example\nSuites: bookworm\n";
        assert_eq!(
            parse_deb822(deb822),
            vec![HostSource {
                uri: "http://mirror.example/debian".into(),
                suites: vec!["bookworm".into(), "bookworm-updates".into()],
            }]
        );
        let one = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security bookworm-security main\ndeb-src http://x bookworm main\n";
        assert_eq!(
            parse_one_line(one),
            vec![HostSource {
                uri: "http://sec.example/debian-security".into(),
                suites: vec!["bookworm-security".into()],
            }]
        );
    }

    #[test]
    fn lock_round_trip() {
        let lock = Lock {
            debian: Some(DebianLock {
                suite: "bookworm".into(),
                kernel_release: "6.1.0-56-amd64".into(),
                packages: vec![Package {
                    name: "zfs-dkms".into(),
                    version: "2.1.11-1+deb12u1".into(),
                    sha256: "00".repeat(32),
                }],
            }),
        };
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("inputs.lock");
        lock.save(&p).expect("save");
        assert_eq!(Lock::load(&p).expect("load"), lock);
        let err = Lock::load(&t.path().join("missing.lock")).expect_err("missing");
        assert!(format!("{err:#}").contains("cargo xtask update-inputs"));
    }
    /// A mirror that serves other bytes than the lock pins: the download is
    /// refused with both sha256 and nothing enters the cache. The mirror is
    /// a one-request HTTP server on the loopback.
    #[test]
    fn a_download_with_another_sha256_is_refused_and_not_cached() {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = b"not the pinned package";
            let mut conn = conn;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .expect("head");
            conn.write_all(body).expect("body");
        });
        let pinned = hex::encode(Sha256::digest(b"the pinned package"));
        let served = hex::encode(Sha256::digest(b"not the pinned package"));
        let pkg = Package {
            name: "libkeyutils1".into(),
            version: "1.6.3-2".into(),
            sha256: pinned.clone(),
        };
        let mut records = HashMap::new();
        records.insert(
            pkg.name.clone(),
            vec![Record {
                package: pkg.name.clone(),
                version: pkg.version.clone(),
                sha256: pinned.clone(),
                depends: String::new(),
                filename: format!("http://127.0.0.1:{port}/pool/main/k/keyutils/k.deb"),
            }],
        );
        let t = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(t.path().join("cache")).expect("cache");
        let debian = Debian {
            lock_path: PathBuf::from("profiles/inputs.lock"),
            profile_arg: "qemu".into(),
        };
        let err = debian
            .fetch(&cache, &mut Some(Indices { records }), &pkg)
            .expect_err("refused");
        server.join().expect("server");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!(
                "libkeyutils1 1.6.3-2 from http://127.0.0.1:{port}/pool/main/k/keyutils/k.deb \
                 has sha256 {served}, but profiles/inputs.lock pins {pinned}: refusing it"
            )),
            "{msg}"
        );
        assert!(!cache.has("debs", &deb_key(&pkg)));
    }

    #[test]
    fn a_missing_mirror_says_how_to_set_it() {
        let err = pick_sources("bookworm", None, None, &[]).expect_err("no mirror");
        assert_eq!(
            err.to_string(),
            "no Debian mirror configured: set NODEFLASH_DEBIAN_MIRROR (for example \
             NODEFLASH_DEBIAN_MIRROR=http://deb.debian.org/debian and \
             NODEFLASH_DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security); \
             on a Debian host a bookworm source in /etc/apt/sources.list{,.d} is used instead"
        );
        let host = parse_deb822(
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\n\n\
             Types: deb\nURIs: http://s.example/debian-security\nSuites: bookworm-security\n",
        );
        let got = pick_sources(
            "bookworm",
            Some("http://env.example/debian".into()),
            None,
            &host,
        )
        .expect("sources");
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|d| (d.uri.as_str(), d.suite.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("http://env.example/debian", "bookworm"),
                ("http://env.example/debian", "bookworm-updates"),
                ("http://s.example/debian-security", "bookworm-security"),
            ]
        );
    }
}

#[cfg(test)]
mod repin_tests {
    use std::collections::BTreeMap;

    use super::*;

    /// An archive as a table: name → published (version, sha256), the
    /// candidate being the last one listed.
    struct Table(BTreeMap<String, Vec<Record>>);

    impl Table {
        fn new(rows: &[(&str, &str, &str)]) -> Self {
            let mut t: BTreeMap<String, Vec<Record>> = BTreeMap::new();
            for (name, version, sha) in rows {
                let depends = match name.strip_prefix("linux-image-amd64") {
                    Some("") => format!("linux-image-{sha} (= {version})"),
                    _ => String::new(),
                };
                t.entry(name.to_string()).or_default().push(Record {
                    package: name.to_string(),
                    version: version.to_string(),
                    sha256: sha.to_string(),
                    depends,
                    filename: String::new(),
                });
            }
            Self(t)
        }
    }

    impl Archive for Table {
        fn published(&self, names: &[&str]) -> Result<Vec<Record>> {
            Ok(names
                .iter()
                .flat_map(|n| self.0.get(*n).cloned().unwrap_or_default())
                .collect())
        }
        fn candidates(&self, names: &[&str]) -> Result<Vec<Record>> {
            Ok(names
                .iter()
                .filter_map(|n| self.0.get(*n)?.last().cloned())
                .collect())
        }
    }

    /// The lock as landed before Debian replaced linux-kbuild-6.1
    /// 6.1.192-2 (issue 15), reduced to what the rules look at.
    fn landed() -> DebianLock {
        let mut packages: Vec<Package> = package_names("6.1.0-56-amd64")
            .expect("names")
            .into_iter()
            .map(|name| Package {
                sha256: format!("{name}-old"),
                version: "1".into(),
                name,
            })
            .collect();
        for p in &mut packages[..KERNEL_PACKAGES] {
            p.version = "6.1.192-2".into();
        }
        DebianLock {
            suite: SUITE.into(),
            kernel_release: "6.1.0-56-amd64".into(),
            packages,
        }
    }

    /// The archive: everything of `lock` still published but `except`,
    /// plus `more`.
    fn archive(lock: &DebianLock, except: &[&str], more: &[(&str, &str, &str)]) -> Table {
        let mut rows: Vec<(&str, &str, &str)> = lock
            .packages
            .iter()
            .filter(|p| !except.contains(&p.name.as_str()))
            .map(|p| (p.name.as_str(), p.version.as_str(), p.sha256.as_str()))
            .collect();
        rows.extend_from_slice(more);
        Table::new(&rows)
    }

    #[test]
    fn a_dropped_package_is_repinned_in_the_same_abi() {
        let lock = landed();
        let table = archive(
            &lock,
            &["linux-kbuild-6.1"],
            &[
                ("linux-kbuild-6.1", "6.1.176-1", "kb-176"),
                ("linux-kbuild-6.1", "6.1.192-3", "kb-new"),
                // A newer ABI exists, but the pinned one is still published.
                ("linux-image-amd64", "6.1.192-3", "6.1.0-57-amd64"),
            ],
        );
        let pins: Vec<&Package> = lock.packages.iter().collect();
        let gone = unpublished(&table, &pins, Path::new("inputs.lock")).expect("checked");
        assert_eq!(
            gone.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["linux-kbuild-6.1"]
        );
        let (new, changes) = repin(&lock, &gone, &table).expect("re-pinned");
        assert_eq!(
            changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["linux-kbuild-6.1 6.1.192-2 → 6.1.192-3 (the pinned version is no longer published)"]
        );
        assert_eq!(new.kernel_release, "6.1.0-56-amd64");
        for (old, new) in lock.packages.iter().zip(&new.packages) {
            if old.name == "linux-kbuild-6.1" {
                assert_eq!(
                    (new.version.as_str(), new.sha256.as_str()),
                    ("6.1.192-3", "kb-new")
                );
            } else {
                assert_eq!(old, new);
            }
        }
    }

    #[test]
    fn a_dropped_abi_moves_the_kernel_to_linux_image_amd64s() {
        let lock = landed();
        let abi = [
            "linux-image-6.1.0-56-amd64",
            "linux-headers-6.1.0-56-amd64",
            "linux-headers-6.1.0-56-common",
            "linux-kbuild-6.1",
        ];
        let table = archive(
            &lock,
            &abi,
            &[
                ("linux-image-amd64", "6.1.200-1", "6.1.0-60-amd64"),
                ("linux-image-6.1.0-60-amd64", "6.1.200-1", "img"),
                ("linux-headers-6.1.0-60-amd64", "6.1.200-1", "hdr"),
                ("linux-headers-6.1.0-60-common", "6.1.200-1", "common"),
                ("linux-kbuild-6.1", "6.1.200-1", "kb"),
            ],
        );
        let pins: Vec<&Package> = lock.packages.iter().collect();
        let gone = unpublished(&table, &pins, Path::new("inputs.lock")).expect("checked");
        let (new, changes) = repin(&lock, &gone, &table).expect("re-pinned");
        assert_eq!(new.kernel_release, "6.1.0-60-amd64");
        assert_eq!(changes.len(), KERNEL_PACKAGES);
        assert_eq!(
            changes[0].to_string(),
            "linux-image-6.1.0-56-amd64 6.1.192-2 → linux-image-6.1.0-60-amd64 6.1.200-1 \
             (kernel ABI 6.1.0-56-amd64 is no longer published; the kernel follows linux-image-amd64)"
        );
        assert_eq!(
            new.packages
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>(),
            package_names("6.1.0-60-amd64").expect("names")
        );
        assert_eq!(
            new.packages[KERNEL_PACKAGES..],
            lock.packages[KERNEL_PACKAGES..]
        );
    }

    #[test]
    fn a_pinned_version_with_another_sha256_is_refused_not_repinned() {
        let lock = landed();
        let table = archive(&lock, &["zfs-dkms"], &[("zfs-dkms", "1", "tampered")]);
        let pins: Vec<&Package> = lock.packages.iter().collect();
        let err = unpublished(&table, &pins, Path::new("inputs.lock")).expect_err("refused");
        assert!(
            format!("{err:#}").contains("lists zfs-dkms 1 with sha256 tampered, but inputs.lock pins zfs-dkms-old: refusing it"),
            "{err:#}"
        );
    }

    #[test]
    fn a_package_the_lock_lacks_is_pinned_and_one_not_published_at_all_is_an_error() {
        let mut lock = landed();
        lock.packages.retain(|p| p.name != "libssl3");
        let table = archive(&lock, &[], &[("libssl3", "3.0.22", "ssl")]);
        let (new, changes) = repin(&lock, &[], &table).expect("pinned");
        assert_eq!(
            changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["libssl3 3.0.22 (not pinned before)"]
        );
        assert!(new.packages.iter().any(|p| p.name == "libssl3"));
        let table = archive(&lock, &[], &[]);
        let err = repin(&lock, &[], &table).expect_err("nothing to pin");
        assert!(
            format!("{err:#}").contains("cannot pin libssl3 again"),
            "{err:#}"
        );
    }

    #[test]
    fn index_records_are_parsed_per_paragraph() {
        let text = "Package: linux-kbuild-6.1\nVersion: 6.1.192-3\nDepends: libc6 (>= 2.34)\nFilename: pool/main/l/linux/k_6.1.192-3_amd64.deb\nSHA256: aa\n\nPackage: linux-kbuild-6.1\nVersion: 6.1.176-1\nFilename: pool/main/l/linux/k_6.1.176-1_amd64.deb\nSHA256: bb\nDescription-md5: x\n\nPackage: broken\n";
        assert_eq!(
            parse_records(text),
            vec![
                Record {
                    package: "linux-kbuild-6.1".into(),
                    version: "6.1.192-3".into(),
                    sha256: "aa".into(),
                    depends: "libc6 (>= 2.34)".into(),
                    filename: "pool/main/l/linux/k_6.1.192-3_amd64.deb".into(),
                },
                Record {
                    package: "linux-kbuild-6.1".into(),
                    version: "6.1.176-1".into(),
                    sha256: "bb".into(),
                    depends: String::new(),
                    filename: "pool/main/l/linux/k_6.1.176-1_amd64.deb".into(),
                },
            ]
        );
    }
}
