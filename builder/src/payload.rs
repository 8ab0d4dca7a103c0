//! The profile's store, packed into a payload once and cached by content:
//! a Nix closure (by its store paths, which Nix already names by content), a
//! store directory (by the hash of every file), or a synthetic store (by its
//! generator's spec).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use nodeflash_installer::image::NodeSystem;
use nodeflash_installer::payload::{
    self, Counters, FrameCache, PackOptions, Payload, FORMAT_VERSION,
};
use nodeflash_installer::profile::{default_system_attr, Profile};
use nodeflash_installer::progress::{Output, Progress};
use nodeflash_installer::units::{mb_per_s, mib};

use crate::build::CheckSystem;
use crate::cache::{key_of, Cache};
use crate::{steps, synthetic};

/// A packed payload in the cache.
#[derive(Debug, Clone)]
pub struct Packed {
    pub path: PathBuf,
    pub bytes: u64,
    pub manifest_sha256: String,
    pub files: usize,
    pub store_bytes: u64,
    pub store_paths: usize,
    /// With a flake: each node's system (by node name).
    pub systems: BTreeMap<String, NodeSystem>,
    /// With a flake: the generic node's system, if the profile names one.
    pub default_system: Option<NodeSystem>,
}

/// Where the store comes from.
enum Source {
    Closure {
        paths: Vec<String>,
        registration: String,
    },
    Store {
        dir: PathBuf,
        registration: Option<String>,
    },
    /// A synthetic store, or an empty one (the check system only).
    Synthetic(Option<synthetic::Spec>),
}

/// The packed payload of the profile, if it has a store.
/// With `system`, the check system is one more store path of the payload.
pub fn prepare(
    profile: &Profile,
    profile_path: &Path,
    cache: &Cache,
    system: Option<&CheckSystem>,
) -> Result<Option<Packed>> {
    let p = &profile.payload;
    let dir = profile_path.parent().unwrap_or(Path::new("."));
    let mut systems = BTreeMap::new();
    let mut default_system = None;
    let source = if let Some(flake) = &p.flake {
        let (s, d, source) = flake_systems(profile, flake, dir)?;
        (systems, default_system) = (s, d);
        source
    } else if let Some(top) = &p.closure {
        closure(top)?
    } else if let Some(store) = &p.store {
        let registration =
            match &p.registration {
                Some(r) => {
                    let path = dir.join(r);
                    Some(std::fs::read_to_string(&path).with_context(|| {
                        format!("cannot read the registration {}", path.display())
                    })?)
                }
                None => None,
            };
        Source::Store {
            dir: dir.join(store),
            registration,
        }
    } else if let Some(s) = &p.synthetic {
        Source::Synthetic(Some(synthetic::Spec {
            files: s.files,
            bytes: s.bytes.0,
            seed: s.seed,
        }))
    } else if system.is_some() {
        Source::Synthetic(None)
    } else {
        return Ok(None);
    };
    let settings = [
        FORMAT_VERSION.to_string(),
        payload::LAYOUT_VERSION.to_string(),
        p.level.to_string(),
        payload::DEFAULT_FRAME_SIZE.to_string(),
    ];
    let key = match &source {
        Source::Closure {
            paths,
            registration,
        } => key_of(
            ["closure", registration.as_str()]
                .into_iter()
                .chain(paths.iter().map(String::as_str))
                .chain(settings.iter().map(String::as_str)),
        ),
        Source::Store { dir, registration } => {
            let tree = steps::step(&format!("Hashing the store {}", dir.display()), || {
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let entries = payload::scan(dir, threads)?;
                Ok(payload::digest(entries.iter().map(|e| &e.0)))
            })?;
            key_of(
                [
                    "store",
                    tree.as_str(),
                    registration.as_deref().unwrap_or(""),
                ]
                .into_iter()
                .chain(settings.iter().map(String::as_str)),
            )
        }
        Source::Synthetic(spec) => key_of(
            [
                "synthetic".to_string(),
                synthetic::VERSION.to_string(),
                format!("{:?}", spec.as_ref().map(|s| (s.files, s.bytes, s.seed))),
                system.map(|s| s.name.clone()).unwrap_or_default(),
            ]
            .iter()
            .chain(settings.iter()),
        ),
    };
    let path = steps::step("Packing store", || {
        cache.file("payload", &format!("{key}.nfp"), |out| {
            pack_source(&source, system, out, p.level, cache)
        })
    })?;
    let opened = Payload::open(
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
    )
    .with_context(|| format!("cached payload {} is unreadable", path.display()))?;
    let m = &opened.manifest;
    for system in systems.values_mut().chain(default_system.as_mut()) {
        let keep: std::collections::BTreeSet<&str> =
            system.closure.iter().map(String::as_str).collect();
        system.store_bytes = m
            .entries
            .iter()
            .filter(|e| keep.contains(e.store_path()))
            .map(|e| match e {
                payload::Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum();
    }
    Ok(Some(Packed {
        bytes: opened.header.total_len(),
        manifest_sha256: opened.manifest_sha256(),
        files: m.files(),
        store_bytes: m.bytes(),
        store_paths: m.store_paths().len(),
        path,
        systems,
        default_system,
    }))
}

/// The closure of a store path, from the build host's Nix.
fn closure(top: &str) -> Result<Source> {
    let paths = crate::nix::closure(&[top.to_string()])?;
    let registration = crate::nix::registration(&paths)?;
    Ok(Source::Closure {
        paths,
        registration,
    })
}

/// Every node's system built from the flake (and the generic node's, when
/// the profile names one), and the union of their closures with its
/// registration: a store path the nodes share is packed once.
type Systems = (BTreeMap<String, NodeSystem>, Option<NodeSystem>, Source);

fn flake_systems(profile: &Profile, flake: &str, dir: &Path) -> Result<Systems> {
    let flake = crate::nix::flake_ref(flake, dir)?;
    let mut attrs: Vec<String> = profile
        .nodes
        .iter()
        .map(|n| {
            n.system
                .clone()
                .unwrap_or_else(|| default_system_attr(&n.name.get_ref().0))
        })
        .collect();
    attrs.extend(profile.default_node.system.clone());
    let tops = steps::step(
        &format!("Building {} systems with Nix from {flake}", attrs.len()),
        || crate::nix::build(&flake, &attrs),
    )?;
    let mut systems = BTreeMap::new();
    let mut default_system = None;
    for (i, top) in tops.iter().enumerate() {
        let system = NodeSystem {
            toplevel: top.trim_start_matches("/nix/store/").to_string(),
            closure: crate::nix::closure(std::slice::from_ref(top))?,
            store_bytes: 0,
        };
        match profile.nodes.get(i) {
            Some(n) => {
                systems.insert(n.name.get_ref().0.clone(), system);
            }
            None => default_system = Some(system),
        }
    }
    let paths = crate::nix::closure(&tops)?;
    let registration = crate::nix::registration(&paths)?;
    Ok((
        systems,
        default_system,
        Source::Closure {
            paths,
            registration,
        },
    ))
}

fn pack_source(
    source: &Source,
    system: Option<&CheckSystem>,
    out: &Path,
    level: i32,
    cache: &Cache,
) -> Result<()> {
    let mut opts = PackOptions {
        level,
        cache: Some(FrameCache {
            dir: cache.root().join("frames"),
            // Only a Nix store's names stand for their content; a store
            // directory or a synthetic store is hashed file by file.
            names_are_content: matches!(source, Source::Closure { .. }),
        }),
        ..PackOptions::default()
    };
    let generated;
    let src: &Path = match source {
        Source::Closure {
            paths,
            registration,
        } => {
            opts.only = Some(paths.clone());
            opts.registration = Some(registration.clone());
            Path::new("/nix/store")
        }
        Source::Store { dir, registration } => {
            opts.registration.clone_from(registration);
            dir
        }
        Source::Synthetic(spec) => {
            generated = tempfile::tempdir().context("cannot create a temporary directory")?;
            let dir = generated.path().join("store");
            match spec {
                Some(spec) => drop(synthetic::generate(&dir, spec)?),
                None => std::fs::create_dir(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?,
            }
            if let Some(system) = system {
                add_check_system(&dir, system)?;
            }
            let packed = pack_dir(&dir, out, &opts);
            // Its directories are read-only, as in a store.
            synthetic::remove_tree(&dir)?;
            return packed;
        }
    };
    pack_dir(src, out, &opts)
}

/// Adds the check system's store path (kernel and initrd, read-only as in a
/// store) to a generated store.
fn add_check_system(store: &Path, system: &CheckSystem) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = store.join(&system.name);
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, src) in [("kernel", &system.kernel), ("initrd", &system.initrd)] {
        let dest = dir.join(name);
        std::fs::copy(src, &dest)
            .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444))
            .with_context(|| format!("cannot set the mode of {}", dest.display()))?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))
}

fn pack_dir(src: &Path, out: &Path, opts: &PackOptions) -> Result<()> {
    let counters = Counters::default();
    let stats = with_progress("packing", None, &counters, || {
        payload::pack(src, out, opts, &counters)
    })?;
    steps::note(&format!(
        "{} files, {:.1} MiB → {:.1} MiB in {} frames (zstd {}); {}",
        stats.files,
        mib(stats.bytes),
        mib(stats.payload_bytes),
        stats.frames,
        opts.level,
        reuse_note(&stats)
    ));
    Ok(())
}

/// How much of a pack came from the frame cache, in words.
pub fn reuse_note(stats: &payload::PackStats) -> String {
    let mut s = format!(
        "{} of {} units from the frame cache, {:.1} MiB compressed",
        stats.units_reused,
        stats.units,
        mib(stats.bytes_compressed)
    );
    if stats.cache_damaged > 0 {
        s.push_str(&format!(
            "; {} damaged cache entries compressed again",
            stats.cache_damaged
        ));
    }
    s
}

/// Runs `f` with a progress bar fed from `counters` when stderr is a terminal.
pub fn with_progress<T>(
    what: &str,
    total_bytes: Option<u64>,
    counters: &Counters,
    f: impl FnOnce() -> T,
) -> T {
    let out = match Output::stderr(steps::quiet()) {
        Output::Log(_) => Output::Silent,
        out => out,
    };
    Progress::bytes(what, total_bytes, out).watch(|| counters.bytes.load(Ordering::Relaxed), f)
}

// `nodeflash payload pack | unpack | verify`: their arguments and implementations.

#[derive(Debug, clap::Args)]
pub struct PackArgs {
    pub src: PathBuf,
    pub out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = nodeflash_installer::payload::DEFAULT_LEVEL)]
    pub level: i32,
    /// Nix registration (closure-info format) to carry for `nix-store --load-db`.
    #[arg(long)]
    pub registration: Option<PathBuf>,
    /// Compression threads (default: one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Keep each unit's compressed frames in DIR and reuse them in later
    /// packs (the payload is the same bytes either way).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// With --cache: the store paths' names stand for their content (a
    /// Nix store), so files are not hashed to find cached units.
    #[arg(long, requires = "cache")]
    pub names_are_content: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct UnpackArgs {
    pub payload: PathBuf,
    pub dir: PathBuf,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    pub payload: PathBuf,
    pub dir: Option<PathBuf>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Compression or worker threads: `jobs`, else one per CPU.
fn threads(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Opens the payload file at `path`, its header and manifest checked.
fn open_payload(path: &Path) -> Result<Payload<std::io::BufReader<std::fs::File>>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open payload {}", path.display()))?;
    Payload::open(std::io::BufReader::with_capacity(1 << 20, f))
        .with_context(|| format!("cannot read payload {}", path.display()))
}

/// Prints a command's result: `value` as JSON, else `text` unless quiet.
fn report(json: bool, quiet: bool, value: serde_json::Value, text: String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if !quiet {
        println!("{text}");
    }
    Ok(())
}

/// `nodeflash payload pack`: packs the store directory `a.src` into `a.out`
/// and prints what it holds (docs/payload.md).
pub fn pack_command(a: PackArgs, quiet: bool) -> Result<()> {
    let counters = Counters::default();
    let started = std::time::Instant::now();
    let registration = a
        .registration
        .map(|r| {
            std::fs::read_to_string(&r)
                .with_context(|| format!("cannot read registration {}", r.display()))
        })
        .transpose()?;
    let opts = PackOptions {
        level: a.level,
        threads: threads(a.jobs),
        registration,
        cache: a.cache.map(|dir| payload::FrameCache {
            dir,
            names_are_content: a.names_are_content,
        }),
        ..PackOptions::default()
    };
    let stats = with_progress("packing", None, &counters, || {
        payload::pack(&a.src, &a.out, &opts, &counters)
    })?;
    let mut text = format!(
        "{}: {} files, {:.1} MiB → {:.1} MiB ({} frames) in {:.1}s",
        a.out.display(),
        stats.files,
        mib(stats.bytes),
        mib(stats.payload_bytes),
        stats.frames,
        started.elapsed().as_secs_f64()
    );
    if opts.cache.is_some() {
        text.push_str(&format!("; {}", reuse_note(&stats)));
    }
    report(a.json, quiet, serde_json::to_value(&stats)?, text)
}

/// `nodeflash payload unpack`: extracts `a.payload` into the new or empty
/// directory `a.dir`, every file checked.
pub fn unpack_command(a: UnpackArgs, quiet: bool) -> Result<()> {
    let counters = Counters::default();
    let started = std::time::Instant::now();
    let p = open_payload(&a.payload)?;
    let total = p.manifest.bytes();
    let stats = with_progress("unpacking", Some(total), &counters, || {
        p.extract(Some(&a.dir), threads(a.jobs), &counters)
    })
    .with_context(|| format!("cannot unpack {}", a.payload.display()))?;
    let text = format!(
        "{}: {} files, {:.1} MiB in {:.1}s",
        a.dir.display(),
        stats.files,
        mib(stats.bytes),
        started.elapsed().as_secs_f64()
    );
    report(a.json, quiet, serde_json::to_value(&stats)?, text)
}

/// `nodeflash payload verify`: checks every frame and file of `a.payload`
/// and, with `a.dir`, that the tree there is exactly what it holds.
pub fn verify_command(a: VerifyArgs, quiet: bool) -> Result<()> {
    let counters = Counters::default();
    let payload = &a.payload;
    let p = open_payload(payload)?;
    let manifest = p.manifest.clone();
    let sha = p.manifest_sha256();
    let total = manifest.bytes();
    // As the installer does: every frame's sha256 in one read (the
    // check before the disk is touched), then every file.
    let frames = {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(payload)
            .with_context(|| format!("cannot open payload {}", payload.display()))?;
        f.seek(SeekFrom::Start(p.frames_offset()))
            .with_context(|| format!("cannot read payload {}", payload.display()))?;
        p.check_frames(
            std::io::BufReader::with_capacity(1 << 20, f),
            threads(a.jobs),
            &Counters::default(),
        )
        .with_context(|| format!("payload {} is damaged", payload.display()))?
    };
    let started = std::time::Instant::now();
    with_progress("verifying", Some(total), &counters, || {
        p.extract(None, threads(a.jobs), &counters)
    })
    .with_context(|| format!("payload {} is damaged", payload.display()))?;
    let files_secs = started.elapsed().as_secs_f64();
    let mut value = serde_json::json!({
        "payload": payload, "manifest_sha256": sha, "files": manifest.files(),
        "bytes": total, "store_paths": manifest.store_paths().len(),
        "tree_digest": payload::digest(&manifest.entries),
        "frames": frames.frames, "frames_check_secs": frames.secs,
        "files_check_secs": files_secs,
    });
    let mut text = format!(
        "{}: ok, {} files, {:.1} MiB, {} store paths\n\
         frames: {} checked by sha256 in {:.2}s ({:.1} MB/s of payload); files: decompressed and checked in {:.2}s",
        payload.display(),
        manifest.files(),
        mib(total),
        manifest.store_paths().len(),
        frames.frames,
        frames.secs,
        mb_per_s(frames.bytes, frames.secs),
        files_secs
    );
    if let Some(dir) = &a.dir {
        let scanned = payload::scan(dir, threads(a.jobs))?;
        payload::compare(&manifest.entries, &scanned, true)
            .with_context(|| format!("{} does not match {}", dir.display(), payload.display()))?;
        value["dir"] = serde_json::json!(dir);
        text.push_str(&format!("\n{}: matches the payload", dir.display()));
    }
    report(a.json, quiet, value, text)
}
