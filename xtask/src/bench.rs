//! `cargo xtask gen-store` and `cargo xtask bench store`: how nodeflash's
//! payload compares with squashfs and plain copies on a synthetic store.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nodeflash_builder::synthetic::{self, remove_tree, Spec, Stats};
use nodeflash_builder::{steps, tools};
use nodeflash_installer::cmd;
use nodeflash_installer::profile::Size;

use crate::{cargo, ensure_packages, is_root, run_visible, target_dir};

pub fn gen_store(spec: &Spec, out: &Path) -> Result<()> {
    let stats = steps::step(&format!("Generating {}", out.display()), || {
        synthetic::generate(out, spec)
    })?;
    println!("{}", describe(&stats));
    Ok(())
}

fn describe(s: &Stats) -> String {
    format!(
        "{} files ({}), {} directories, {} symlinks, {} store paths",
        s.files,
        mib(s.bytes),
        s.dirs,
        s.symlinks,
        s.store_paths
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Runs one timed command: logs its argv, fails with its stderr.
fn timed(c: &mut Command) -> Result<Duration> {
    let argv: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(|c: char| c.is_whitespace() || "|$\"".contains(c)) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect();
    steps::note(&format!("$ {}", argv.join(" ")));
    let t = Instant::now();
    cmd::run(c)?;
    Ok(t.elapsed())
}

/// Syncs and drops the page cache; false when it could not be dropped.
fn drop_caches() -> Result<bool> {
    cmd::run(&mut Command::new("sync"))?;
    Ok(is_root() && fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok())
}

/// Generates the store in `dir/store`, or reuses it when its stamp matches the spec.
fn prepare_store(dir: &Path, spec: &Spec) -> Result<(PathBuf, String)> {
    let store = dir.join("store");
    let stamp_path = dir.join("store.spec");
    let stamp = format!(
        "files={} bytes={} seed={} generator={}\n",
        spec.files,
        spec.bytes,
        spec.seed,
        synthetic::VERSION
    );
    let old = fs::read_to_string(&stamp_path).unwrap_or_default();
    if old.lines().next() == stamp.lines().next() && store.is_dir() {
        steps::note(&format!("reusing {}", store.display()));
        let generated = old.lines().nth(1).unwrap_or("").to_string();
        return Ok((store, format!("{generated} (reused)")));
    }
    remove_tree(&store)?;
    let _ = fs::remove_file(&stamp_path);
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let t = Instant::now();
    let stats = steps::step(
        &format!("Generating the synthetic store in {}", store.display()),
        || synthetic::generate(&store, spec),
    )?;
    let generated = format!("{}, generated in {}", describe(&stats), secs(t.elapsed()));
    fs::write(&stamp_path, format!("{stamp}{generated}\n"))
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    Ok((store, generated))
}

/// Makes `v2`: a copy of `v1` (hard links) where a few store paths, spread
/// over the store, get a new name (a new hash, as Nix gives a rebuilt path)
/// and one changed file. Returns how many.
fn make_v2(v1: &Path, v2: &Path) -> Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    remove_tree(v2)?;
    cmd::run(Command::new("cp").arg("-al").arg(v1).arg(v2))?;
    let mut names: Vec<String> = fs::read_dir(v2)
        .with_context(|| format!("cannot read {}", v2.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read {}", v2.display()))?;
    names.sort();
    let dirs: Vec<&String> = names.iter().filter(|n| v2.join(n).is_dir()).collect();
    const CHANGED: usize = 6;
    let picked: Vec<&String> = (0..CHANGED)
        .filter_map(|i| dirs.get(dirs.len() * (2 * i + 1) / (2 * CHANGED)).copied())
        .collect();
    let writable = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", p.display()))
    };
    writable(v2, 0o755)?;
    for old in &picked {
        let hash = &old.as_bytes()[..32.min(old.len())];
        // Another hash of the same form: each character moved along Nix's alphabet.
        const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let new_hash: String = hash
            .iter()
            .map(|c| {
                let i = ALPHABET.iter().position(|a| a == c).unwrap_or(0);
                char::from(ALPHABET[(i + 7) % ALPHABET.len()])
            })
            .collect();
        let new = format!("{new_hash}{}", &old[hash.len()..]);
        cmd::run(
            Command::new("cp")
                .arg("-a")
                .arg(v2.join(old))
                .arg(v2.join(&new)),
        )?;
        remove_tree(&v2.join(old))?;
        // One file changes: the first regular file, depth first.
        let mut stack = vec![v2.join(&new)];
        'walk: while let Some(d) = stack.pop() {
            let mut list: Vec<PathBuf> = fs::read_dir(&d)
                .with_context(|| format!("cannot read {}", d.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot read {}", d.display()))?;
            list.sort();
            for p in list {
                let meta = fs::symlink_metadata(&p)
                    .with_context(|| format!("cannot stat {}", p.display()))?;
                if meta.is_file() {
                    let mode = meta.permissions().mode() & 0o777;
                    writable(&p, 0o644)?;
                    let mut f = fs::OpenOptions::new()
                        .append(true)
                        .open(&p)
                        .with_context(|| format!("cannot open {}", p.display()))?;
                    std::io::Write::write_all(&mut f, b"\n# changed by the rebuild\n")
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    drop(f);
                    writable(&p, mode)?;
                    break 'walk;
                } else if meta.is_dir() {
                    stack.push(p);
                }
            }
        }
    }
    writable(v2, 0o755)?;
    Ok(picked.len())
}

/// Wall time, the output's size for packs, and the host's 1-minute load
/// average before and after (the bench shares its cores with others).
struct Measure {
    time: Duration,
    size: Option<u64>,
    load: Option<(f64, f64)>,
}

/// The 1-minute load average (`/proc/loadavg`'s first field), if readable.
fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Row {
    step: &'static str,
    tool: String,
    nodeflash: bool,
    result: Result<Measure>,
}

type Key = fn(&Measure) -> Option<f64>;

fn size_of(m: &Measure) -> Option<f64> {
    m.size.map(|s| s as f64)
}

fn time_of(m: &Measure) -> Option<f64> {
    Some(m.time.as_secs_f64())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn store(spec: &Spec, jobs: Option<usize>) -> Result<()> {
    ensure_packages(tools::BENCH_TOOLS)?;
    let jobs = jobs.unwrap_or_else(cores);
    let dir = target_dir().join("bench");
    let (store, generated) = prepare_store(&dir, spec)?;
    steps::step("Compiling nodeflash (release)", || {
        run_visible(cargo().args(["build", "--quiet", "--release", "-p", "nodeflash-builder"]))
    })?;
    let nodeflash = target_dir().join("release/nodeflash");
    let nfp = dir.join("store.nfp");
    let sqfs = dir.join("store.sqfs");
    let frames = dir.join("frames");
    remove_tree(&frames)?;
    let dest = dir.join("unpacked");
    let mut cache_dropped = true;
    let mut rows = Vec::new();

    let mut pack = |step: &'static str,
                    tool: String,
                    nodeflash: bool,
                    out: &Path,
                    c: &mut Command|
     -> Result<()> {
        let _ = fs::remove_file(out);
        cache_dropped &= drop_caches()?;
        let before = load_average();
        let result = timed(c).and_then(|t| {
            let size = fs::metadata(out)
                .with_context(|| format!("cannot stat {}", out.display()))?
                .len();
            Ok(Measure {
                time: t,
                size: Some(size),
                load: before.zip(load_average()),
            })
        });
        rows.push(Row {
            step,
            tool,
            nodeflash,
            result,
        });
        Ok(())
    };
    let squashfs = |src: &Path, out: &Path| {
        let mut c = Command::new("mksquashfs");
        c.arg(src)
            .arg(out)
            .args(["-comp", "zstd", "-Xcompression-level", "19", "-b", "1M"])
            .args(["-noappend", "-no-progress", "-processors"])
            .arg(jobs.to_string());
        c
    };
    let squashfs_tool = format!("mksquashfs (zstd -19, 1 MiB blocks, {jobs} processors)");
    steps::step("Packing", || {
        pack(
            "pack",
            "nodeflash payload pack (empty frame cache)".into(),
            true,
            &nfp,
            Command::new(&nodeflash)
                .args(["payload", "pack", "--names-are-content", "--cache"])
                .arg(&frames)
                .arg(&store)
                .arg(&nfp),
        )?;
        pack(
            "pack",
            squashfs_tool.clone(),
            false,
            &sqfs,
            &mut squashfs(&store, &sqfs),
        )
    })?;

    // The rebuild: v2 changes a few store paths of v1, as a NixOS rebuild
    // after one option changes `etc`, the toplevel, the activation script
    // and a few units.
    let v2 = dir.join("store-v2");
    let changed = steps::step("Making v2 of the store", || make_v2(&store, &v2))?;
    let nfp2 = dir.join("store-v2.nfp");
    let nfp2_full = dir.join("store-v2-full.nfp");
    let sqfs2 = dir.join("store-v2.sqfs");
    steps::step("Packing v2", || {
        pack(
            "rebuild",
            "nodeflash payload pack v2, frame cache of v1".into(),
            true,
            &nfp2,
            Command::new(&nodeflash)
                .args(["payload", "pack", "--names-are-content", "--cache"])
                .arg(&frames)
                .arg(&v2)
                .arg(&nfp2),
        )?;
        pack(
            "rebuild",
            "nodeflash payload pack v2, full repack".into(),
            true,
            &nfp2_full,
            Command::new(&nodeflash)
                .args(["payload", "pack"])
                .arg(&v2)
                .arg(&nfp2_full),
        )?;
        pack(
            "rebuild",
            format!("{squashfs_tool} of v2"),
            false,
            &sqfs2,
            &mut squashfs(&v2, &sqfs2),
        )
    })?;
    let identical = fs::read(&nfp2)
        .ok()
        .is_some_and(|a| fs::read(&nfp2_full).is_ok_and(|b| a == b));
    for p in [&nfp2, &nfp2_full, &sqfs2] {
        let _ = fs::remove_file(p);
    }
    remove_tree(&v2)?;
    let rebuild = format!(
        "v2 changes {changed} store paths of v1; its payload from the frame cache is {} the full repack's, byte for byte",
        if identical { "identical to" } else { "NOT identical to" }
    );

    // The destination exists beforehand only where the command needs it.
    let mut unpack = |tool: &str, nodeflash: bool, create: bool, c: &mut Command| -> Result<()> {
        remove_tree(&dest)?;
        if create {
            fs::create_dir(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        }
        cache_dropped &= drop_caches()?;
        let before = load_average();
        let result = timed(c).map(|time| Measure {
            time,
            size: None,
            load: before.zip(load_average()),
        });
        rows.push(Row {
            step: "unpack",
            tool: tool.into(),
            nodeflash,
            result,
        });
        Ok(())
    };
    steps::step("Unpacking", || {
        unpack(
            "nodeflash payload unpack",
            true,
            false,
            Command::new(&nodeflash)
                .args(["payload", "unpack"])
                .arg(&nfp)
                .arg(&dest),
        )?;
        unpack(
            "unsquashfs",
            false,
            false,
            Command::new("unsquashfs").arg("-d").arg(&dest).arg(&sqfs),
        )?;
        unpack(
            "cp -a",
            false,
            false,
            Command::new("cp").arg("-a").arg(&store).arg(&dest),
        )?;
        unpack(
            "tar | tar",
            false,
            true,
            Command::new("bash")
                .args([
                    "-o",
                    "pipefail",
                    "-c",
                    r#"tar -C "$1" -cf - . | tar -C "$2" -xf -"#,
                ])
                .arg("bash")
                .arg(&store)
                .arg(&dest),
        )?;
        // What a per-store-path parallel copy does (disko-install itself
        // copies with nixos-install, i.e. Nix, which this host lacks).
        unpack(
            "ls | xargs -P8 cp -r",
            false,
            true,
            Command::new("bash")
                .args([
                    "-o",
                    "pipefail",
                    "-c",
                    r#"ls "$1" | xargs -P8 -I{} cp -r "$1"/{} "$2"/"#,
                ])
                .arg("bash")
                .arg(&store)
                .arg(&dest),
        )?;
        remove_tree(&dest)
    })?;

    let report = report(spec, &generated, jobs, cache_dropped, &rebuild, &rows)?;
    let path = dir.join("store.md");
    fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{report}");
    steps::note(&format!("written to {}", path.display()));
    Ok(())
}

fn best_peer(rows: &[Row], step: &str, key: Key) -> Option<f64> {
    rows.iter()
        .filter(|r| r.step == step && !r.nodeflash)
        .filter_map(|r| r.result.as_ref().ok().and_then(key))
        .min_by(f64::total_cmp)
}

fn report(
    spec: &Spec,
    generated: &str,
    jobs: usize,
    cache_dropped: bool,
    rebuild: &str,
    rows: &[Row],
) -> Result<String> {
    let kernel = cmd::run(Command::new("uname").arg("-r"))?;
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mut md = String::new();
    let _ = writeln!(md, "# Store payload benchmark\n");
    let _ = writeln!(
        md,
        "- machine: {} cores ({cpu}), Linux {}",
        cores(),
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "- spec: {} files, {}, seed {}: {generated}",
        spec.files,
        Size(spec.bytes),
        spec.seed
    );
    let _ = writeln!(md, "- mksquashfs processors: {jobs}");
    let _ = writeln!(md, "- rebuild: {rebuild}");
    let _ = writeln!(
        md,
        "- page cache: {}\n",
        if cache_dropped {
            "synced and dropped before every run"
        } else {
            "synced but NOT dropped before each run (needs root): timings are not comparable"
        }
    );
    let _ = writeln!(
        md,
        "| step | command | size | time | size vs squashfs | time vs best peer | load (1 min) |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|");
    let mut errors = Vec::new();
    let mut met = Vec::new();
    for r in rows {
        let (size_cell, time_cell, size_ratio, time_ratio, load) = match &r.result {
            Err(e) => {
                let msg = format!("{e:#}").replace('\n', "\n  ");
                errors.push(format!("- {} {}: {msg}", r.step, r.tool));
                (
                    "failed".into(),
                    "failed".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                )
            }
            Ok(m) => {
                let ratio = |own: Option<f64>, peer: Option<f64>| match (own, peer) {
                    (Some(a), Some(b)) if r.nodeflash && b > 0.0 => format!("{:.2}x", a / b),
                    _ => String::new(),
                };
                let sr = ratio(size_of(m), best_peer(rows, r.step, size_of));
                let tr = ratio(time_of(m), best_peer(rows, r.step, time_of));
                let load = m
                    .load
                    .map(|(a, b)| format!("{a:.1} → {b:.1}"))
                    .unwrap_or_default();
                (
                    m.size.map(mib).unwrap_or_default(),
                    secs(m.time),
                    sr,
                    tr,
                    load,
                )
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {size_cell} | {time_cell} | {size_ratio} | {time_ratio} | {load} |",
            r.step,
            r.tool.replace('|', "\\|")
        );
    }
    let nodeflash = |step: &str| rows.iter().find(|r| r.step == step && r.nodeflash);
    let verdict = |own: Option<f64>, peer: Option<f64>, ok: fn(f64, f64) -> bool| match (own, peer)
    {
        (Some(a), Some(b)) => {
            if ok(a, b) {
                "met"
            } else {
                "NOT met"
            }
        }
        _ => "not measured",
    };
    let own = |step: &str, key: Key| {
        nodeflash(step)
            .and_then(|r| r.result.as_ref().ok())
            .and_then(key)
    };
    met.push(format!(
        "payload ≤ squashfs size: {}",
        verdict(
            own("pack", size_of),
            best_peer(rows, "pack", size_of),
            |a, b| a <= b
        )
    ));
    met.push(format!(
        "unpack faster than every peer: {}",
        verdict(
            own("unpack", time_of),
            best_peer(rows, "unpack", time_of),
            |a, b| a < b
        )
    ));
    let rebuild_time = |tool: &str| {
        rows.iter()
            .find(|r| r.step == "rebuild" && r.tool.contains(tool))
            .and_then(|r| r.result.as_ref().ok())
            .map(|m| m.time.as_secs_f64())
    };
    let cached = rebuild_time("frame cache");
    let full = rebuild_time("full repack");
    met.push(format!(
        "rebuild ≤ 5 % of a full repack: {}{}",
        verdict(cached, full, |a, b| a <= 0.05 * b),
        match (cached, full) {
            (Some(a), Some(b)) if b > 0.0 => format!(" ({:.1} %)", 100.0 * a / b),
            _ => String::new(),
        }
    ));
    let rebuild_size = rows
        .iter()
        .find(|r| r.step == "rebuild" && r.tool.contains("frame cache"))
        .and_then(|r| r.result.as_ref().ok())
        .and_then(size_of);
    met.push(format!(
        "rebuilt payload ≤ squashfs of v2: {}",
        verdict(rebuild_size, best_peer(rows, "rebuild", size_of), |a, b| a
            <= b)
    ));
    met.push(format!(
        "full pack time ≤ mksquashfs: {}",
        verdict(
            own("pack", time_of),
            best_peer(rows, "pack", time_of),
            |a, b| a <= b
        )
    ));
    let _ = writeln!(md, "\nTargets: {}.", met.join("; "));
    if !errors.is_empty() {
        let _ = writeln!(md, "\nFailed:\n\n{}", errors.join("\n"));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: &'static str, tool: &str, nodeflash: bool, secs: u64, size: Option<u64>) -> Row {
        Row {
            step,
            tool: tool.into(),
            nodeflash,
            result: Ok(Measure {
                time: Duration::from_secs(secs),
                size,
                load: (secs == 4).then_some((6.0, 7.5)),
            }),
        }
    }

    #[test]
    fn report_states_ratios_and_targets() {
        let spec = Spec {
            files: 10,
            bytes: 1000,
            seed: 1,
        };
        let rows = vec![
            row("pack", "nodeflash", true, 4, Some(90)),
            row("pack", "mksquashfs", false, 8, Some(100)),
            row("unpack", "nodeflash", true, 3, None),
            row("unpack", "unsquashfs", false, 2, None),
            row("unpack", "tar | tar", false, 6, None),
            Row {
                result: Err(anyhow::anyhow!("boom")),
                ..row("unpack", "cp -a", false, 0, None)
            },
            row("rebuild", "v2, frame cache of v1", true, 1, Some(95)),
            row("rebuild", "v2, full repack", true, 40, Some(95)),
            row("rebuild", "mksquashfs of v2", false, 30, Some(100)),
        ];
        let md = report(&spec, "generated", 2, true, "v2", &rows).expect("report");
        assert!(
            md.contains("| pack | nodeflash | 0.0 MiB | 4.00 s | 0.90x | 0.50x | 6.0 → 7.5 |"),
            "{md}"
        );
        assert!(
            md.contains("| unpack | nodeflash |  | 3.00 s |  | 1.50x |  |"),
            "{md}"
        );
        assert!(md.contains("| unpack | tar \\| tar |"), "{md}");
        assert!(
            md.contains("payload ≤ squashfs size: met; unpack faster than every peer: NOT met"),
            "{md}"
        );
        assert!(md.contains("- unpack cp -a: boom"), "{md}");
        assert!(
            md.contains(
                "rebuild ≤ 5 % of a full repack: met (2.5 %); \
                 rebuilt payload ≤ squashfs of v2: met; full pack time ≤ mksquashfs: met"
            ),
            "{md}"
        );
        assert!(md.contains("- rebuild: v2\n"), "{md}");
    }
}
