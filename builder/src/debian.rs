//! The Debian provider: bookworm packages fetched with apt (a sources file of
//! its own with `contrib`, never the host's `/etc/apt` changed), checked
//! against the sha256 pinned in the lock, extracted without installing, and
//! OpenZFS compiled from `zfs-dkms` against the matching kernel headers.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;
use serde::{Deserialize, Serialize};

use crate::cache::{key_of, sha256_file, Cache};
use crate::inputs::{BuildInputs, Lock, Provider};
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

/// Every package an image needs for a kernel release.
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
    ];
    names.extend(USERSPACE.iter().map(|s| s.to_string()));
    Ok(names)
}

/// apt with a private sources file and state under the cache.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(cache: &Cache) -> Result<Self> {
        let sources = sources_file(SUITE)?;
        let dir = cache
            .root()
            .join("apt")
            .join(&key_of([sources.as_bytes()])[..16]);
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        std::fs::write(dir.join("nodeflash.sources"), sources)
            .with_context(|| format!("cannot write {}", dir.join("nodeflash.sources").display()))?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = self.dir.display();
        for opt in [
            format!("Dir::Etc::SourceList={d}/nodeflash.sources"),
            "Dir::Etc::SourceParts=/nonexistent".to_string(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::status=/dev/null".to_string(),
            "APT::Sandbox::User=root".to_string(),
            "Acquire::Retries=3".to_string(),
        ] {
            c.arg("-o").arg(opt);
        }
        c
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            })
            .unwrap_or(false)
    }

    fn update(&self) -> Result<()> {
        cmd::run(self.command("apt-get").args(["-q", "update"]))
            .context("cannot read the Debian package lists")?;
        Ok(())
    }

    /// The candidate (newest) version record of a package.
    fn show(&self, name: &str) -> Result<(String, String, String)> {
        let out = cmd::run(
            self.command("apt-cache")
                .args(["show", "--no-all-versions", name]),
        )
        .with_context(|| {
            format!("package {name} is not in the Debian archive ({SUITE}, main and contrib)")
        })?;
        let field = |f: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                .map(str::to_string)
                .with_context(|| format!("apt-cache gives no {f} for {name}"))
        };
        Ok((
            field("Version")?,
            field("SHA256")?,
            field("Depends").unwrap_or_default(),
        ))
    }

    fn download(&self, pkg: &Package, into: &Path) -> Result<PathBuf> {
        cmd::run(
            self.command("apt-get")
                .args(["-q", "download", &format!("{}={}", pkg.name, pkg.version)])
                .current_dir(into),
        )?;
        let deb = std::fs::read_dir(into)
            .with_context(|| format!("cannot list {}", into.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| {
                format!(
                    "apt-get download left no .deb for {} in {}",
                    pkg.name,
                    into.display()
                )
            })?;
        Ok(deb)
    }
}

/// Our sources file: the host's Debian mirrors for `suite`, `-updates` and
/// `-security`, with `main contrib`. `NODEFLASH_DEBIAN_MIRROR` and
/// `NODEFLASH_DEBIAN_SECURITY_MIRROR` override the host's.
fn sources_file(suite: &str) -> Result<String> {
    let host = host_sources();
    let pick = |env: &str, want_security: bool| -> Option<(String, Option<String>)> {
        if let Ok(uri) = std::env::var(env) {
            return Some((uri, None));
        }
        host.iter()
            .find(|s| {
                s.suites
                    .iter()
                    .any(|x| x.starts_with(suite) && x.ends_with("-security") == want_security)
            })
            .map(|s| (s.uri.clone(), s.signed_by.clone()))
    };
    let main = pick("NODEFLASH_DEBIAN_MIRROR", false);
    let security = pick("NODEFLASH_DEBIAN_SECURITY_MIRROR", true);
    let Some((main_uri, main_key)) = main else {
        bail!(
            "no Debian {suite} mirror found in /etc/apt/sources.list{{,.d}}: set NODEFLASH_DEBIAN_MIRROR \
             (and NODEFLASH_DEBIAN_SECURITY_MIRROR) to the archive's URIs"
        );
    };
    let key = |k: Option<String>| {
        k.unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".to_string())
    };
    let mut out = format!(
        "Types: deb\nURIs: {main_uri}\nSuites: {suite} {suite}-updates\nComponents: main contrib\nSigned-By: {}\n",
        key(main_key)
    );
    match security {
        Some((uri, k)) => out.push_str(&format!(
            "\nTypes: deb\nURIs: {uri}\nSuites: {suite}-security\nComponents: main contrib\nSigned-By: {}\n",
            key(k)
        )),
        None => steps::note(&format!(
            "warning: no {suite}-security source on this host: kernel security updates will not be pinned"
        )),
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
struct HostSource {
    uri: String,
    suites: Vec<String>,
    signed_by: Option<String>,
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
                signed_by: field("Signed-By").filter(|s| s.starts_with('/')),
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
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, tail)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = tail.trim();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(HostSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
                signed_by,
            });
        }
    }
    out
}

/// The Debian provider for one lock file.
#[derive(Debug)]
pub struct Debian {
    pub lock_path: PathBuf,
}

impl Debian {
    fn lock(&self) -> Result<DebianLock> {
        Lock::load(&self.lock_path)?.debian.with_context(|| {
            format!(
                "{} pins no Debian packages; run `cargo xtask update-inputs`",
                self.lock_path.display()
            )
        })
    }

    /// The verified `.deb` of a pinned package, downloaded if not cached.
    fn fetch(&self, cache: &Cache, apt: &mut Option<Apt>, pkg: &Package) -> Result<PathBuf> {
        let name = format!("{}.deb", pkg.sha256);
        cache.file("debs", &name, |dest| {
            let apt = match apt {
                Some(a) => a,
                None => {
                    let a = Apt::new(cache)?;
                    if !a.has_lists() {
                        a.update()?;
                    }
                    apt.insert(a)
                }
            };
            steps::note(&format!("downloading {} {}", pkg.name, pkg.version));
            let tmp = tempfile::tempdir_in(cache.root()).context("cannot create a download directory")?;
            let deb = apt.download(pkg, tmp.path()).or_else(|_| {
                // The lists may be older than the lock: refresh once and retry.
                apt.update()?;
                apt.download(pkg, tmp.path())
            });
            let deb = deb.with_context(|| {
                format!(
                    "cannot download {} {} pinned in {}: Debian may have dropped that version \
                     (security updates replace old ones); run `cargo xtask update-inputs` to pin the current versions",
                    pkg.name,
                    pkg.version,
                    self.lock_path.display()
                )
            })?;
            let got = sha256_file(&deb)?;
            if got != pkg.sha256 {
                bail!(
                    "{} {} has sha256 {got}, but {} pins {}: refusing it",
                    pkg.name,
                    pkg.version,
                    self.lock_path.display(),
                    pkg.sha256
                );
            }
            std::fs::copy(&deb, dest).with_context(|| format!("cannot copy {} to {}", deb.display(), dest.display()))?;
            Ok(())
        })
    }
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
        .with_context(|| format!("cannot extract {}", deb.display()))?;
    Ok(())
}

impl Provider for Debian {
    fn update_lock(&self, cache: &Cache) -> Result<()> {
        let apt = Apt::new(cache)?;
        apt.update()?;
        let (_, _, depends) = apt.show("linux-image-amd64")?;
        let release = depends
            .split(',')
            .find_map(|d| d.trim().strip_prefix("linux-image-"))
            .and_then(|d| d.split_whitespace().next())
            .with_context(|| {
                format!("cannot find the kernel release in linux-image-amd64's Depends: {depends}")
            })?
            .to_string();
        let mut packages = Vec::new();
        for name in package_names(&release)? {
            let (version, sha256, _) = apt.show(&name)?;
            packages.push(Package {
                name,
                version,
                sha256,
            });
        }
        let mut lock = Lock::load(&self.lock_path).unwrap_or_default();
        let new = DebianLock {
            suite: SUITE.to_string(),
            kernel_release: release,
            packages,
        };
        if lock.debian.as_ref() == Some(&new) {
            steps::note(&format!(
                "{} is up to date (kernel {})",
                self.lock_path.display(),
                new.kernel_release
            ));
        } else {
            steps::note(&format!(
                "pinned kernel {} in {}",
                new.kernel_release,
                self.lock_path.display()
            ));
            lock.debian = Some(new);
            lock.save(&self.lock_path)?;
        }
        Ok(())
    }

    fn provide(&self, cache: &Cache) -> Result<BuildInputs> {
        let lock = self.lock()?;
        let release = lock.kernel_release.clone();
        let expected = package_names(&release)?;
        let pinned: Vec<&str> = lock.packages.iter().map(|p| p.name.as_str()).collect();
        for name in &expected {
            if !pinned.contains(&name.as_str()) {
                bail!(
                    "{} does not pin {name}; run `cargo xtask update-inputs`",
                    self.lock_path.display()
                );
            }
        }
        let pkg = |name: &str| {
            lock.packages
                .iter()
                .find(|p| p.name == name)
                .context("pinned package")
        };
        let mut apt = None;
        let debs = steps::long_step("Fetching inputs", || {
            lock.packages
                .iter()
                .map(|p| Ok((p.name.clone(), self.fetch(cache, &mut apt, p)?)))
                .collect::<Result<Vec<_>>>()
        })?;
        let deb = |name: &str| {
            debs.iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| d.clone())
                .context("fetched package")
        };
        let unpacked = |name: &str| -> Result<PathBuf> {
            let p = pkg(name)?;
            let d = deb(name)?;
            cache.dir("unpacked", &p.sha256, |dir| extract(&d, dir))
        };
        let image_pkg = format!("linux-image-{release}");
        let kernel_tree = steps::step("Unpacking inputs", || unpacked(&image_pkg))?;
        let boot_tree = unpacked("systemd-boot-efi")?;

        let userspace: Vec<&Package> = USERSPACE.iter().map(|n| pkg(n)).collect::<Result<_>>()?;
        let sysroot_key = key_of(userspace.iter().map(|p| p.sha256.as_str()));
        let sysroot = cache.dir("sysroot", &sysroot_key, |dir| {
            for p in &userspace {
                extract(&deb(&p.name)?, dir)?;
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
                .chain([compiler.lines().next().unwrap_or(""), "zfs-modules-v2"]),
        );
        let zfs_modules = cache.dir("zfs-modules", &zfs_key, |out| {
            steps::long_step("Compiling ZFS modules", || {
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
            kernel_release: release,
            id,
        })
    }
}

/// Compiles the OpenZFS kernel modules from `zfs-dkms` against the headers,
/// and puts the stripped `.ko` files into `out`.
fn build_zfs(cache: &Cache, release: &str, debs: &[PathBuf], out: &Path) -> Result<()> {
    let work = tempfile::tempdir_in(cache.root()).context("cannot create a ZFS build directory")?;
    let root = work.path();
    for deb in debs {
        extract(deb, root)?;
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
    cmd::run(
        Command::new("./configure")
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
    cmd::run(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .env("KCFLAGS", format!("-ffile-prefix-map={}=", root.display()))
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
            &names[..6],
            [
                "linux-image-6.1.0-56-amd64",
                "linux-headers-6.1.0-56-amd64",
                "linux-headers-6.1.0-56-common",
                "linux-kbuild-6.1",
                "zfs-dkms",
                "systemd-boot-efi"
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
                signed_by: Some("/usr/share/keyrings/k.gpg".into()),
            }]
        );
        let one = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security bookworm-security main\ndeb-src http://x bookworm main\n";
        assert_eq!(
            parse_one_line(one),
            vec![HostSource {
                uri: "http://sec.example/debian-security".into(),
                suites: vec!["bookworm-security".into()],
                signed_by: Some("/k.gpg".into()),
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
}
