//! `cargo xtask fuzz`: the `cargo fuzz` targets in `fuzz/` (see
//! docs/fuzzing.md), run one after the other for a bounded time each, on one
//! core, with a summary of what each run did.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;

/// The targets of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["profile", "payload", "dhcp", "http"];

/// A unit that runs longer than this is reported as a hang.
const UNIT_TIMEOUT_SECS: u32 = 10;

/// What one run did, from libFuzzer's final statistics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub executions: Option<u64>,
    pub new_units: Option<u64>,
    pub peak_rss_mb: Option<u64>,
}

/// Reads `stat::NAME: VALUE` lines (`-print_final_stats=1`).
pub fn parse_stats(output: &str) -> Stats {
    let mut stats = Stats::default();
    for line in output.lines() {
        let Some((name, value)) = line
            .trim()
            .strip_prefix("stat::")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let value = value.trim().parse().ok();
        match name {
            "number_of_executed_units" => stats.executions = value,
            "new_units_added" => stats.new_units = value,
            "peak_rss_mb" => stats.peak_rss_mb = value,
            _ => {}
        }
    }
    stats
}

/// `cargo fuzz` and a nightly toolchain, or the exact commands that install them.
fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    if cmd::run(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_err() {
        missing.push("a nightly toolchain: rustup toolchain install nightly");
    }
    if cmd::run(Command::new("cargo-fuzz").arg("--version")).is_err() {
        missing.push("cargo-fuzz: cargo install cargo-fuzz");
    }
    if !missing.is_empty() {
        bail!(
            "fuzzing needs {}\n  install with:\n    {}",
            if missing.len() == 1 {
                "one more tool"
            } else {
                "two more tools"
            },
            missing.join("\n    ")
        );
    }
    Ok(())
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.filter(|e| e.is_ok()).count())
}

/// Runs `target` (or every target) for `seconds` each.
pub fn run(root: &Path, target: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "unknown fuzz target `{t}`: use one of {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    check_tools()?;
    let fuzz = root.join("fuzz");
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for t in targets {
        let corpus = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let seeds = fuzz.join("seeds").join(t);
        let mut c = Command::new("rustup");
        // One process on one core: no -jobs/-workers.
        c.args(["run", "nightly", "cargo", "fuzz", "run", t])
            .arg(format!("fuzz/corpus/{t}"))
            .arg(format!("fuzz/seeds/{t}"))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={UNIT_TIMEOUT_SECS}"))
            .arg("-print_final_stats=1")
            // The http target's client runs ureq's name lookups on threads it
            // does not join; LeakSanitizer counts their 32-byte thread-exit
            // registrations as leaks (glibc's __cxa_thread_atexit_impl).
            .args(if t == "http" {
                &["-detect_leaks=0"][..]
            } else {
                &[]
            })
            .current_dir(root)
            .stderr(Stdio::piped());
        // What `cargo run` set for xtask is not for this build: with it, the
        // fuzz crate's dependencies would be rebuilt after a run by hand.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if (name.starts_with("CARGO") && name != "CARGO_HOME")
                || name.starts_with("RUSTUP_TOOLCHAIN")
                || name == "RUSTC"
            {
                c.env_remove(name.as_ref());
            }
        }
        if !seeds.is_dir() {
            bail!("no seed corpus {}", seeds.display());
        }
        println!("fuzz {t} for {seconds}s: {c:?}");
        let started = Instant::now();
        let mut child = c.spawn().context("cannot run rustup")?;
        // libFuzzer reports on stderr: shown as it comes, its end kept.
        let mut tail: Vec<String> = Vec::new();
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line.context("cannot read the fuzzer's output")?;
                eprintln!("{line}");
                tail.push(line);
                if tail.len() > 400 {
                    tail.drain(..200);
                }
            }
        }
        let status = child.wait().context("cannot wait for cargo fuzz")?;
        let stats = parse_stats(&tail.join("\n"));
        let result = if status.success() {
            "no crash".to_string()
        } else {
            failed.push(t);
            format!("FAILED ({status}): see fuzz/artifacts/{t}/")
        };
        let num = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        summary.push(format!(
            "{t:<8} {:>5}s  {:>10} executions  {:>5} corpus files  {:>5} MB peak  {result}",
            started.elapsed().as_secs(),
            num(stats.executions),
            files_in(&corpus),
            num(stats.peak_rss_mb),
        ));
    }
    println!("\nfuzz summary:");
    for line in &summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!("fuzz targets found crashes: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        let out = "#1234\tDONE   cov: 1 ft: 2\nDone 1234 runs in 5 second(s)\n\
                   stat::number_of_executed_units: 1234\nstat::average_exec_per_sec:     246\n\
                   stat::new_units_added:          17\nstat::slowest_unit_time_sec:    0\n\
                   stat::peak_rss_mb:              40\n";
        assert_eq!(
            parse_stats(out),
            Stats {
                executions: Some(1234),
                new_units: Some(17),
                peak_rss_mb: Some(40),
            }
        );
        assert_eq!(parse_stats("crash\n"), Stats::default());
    }

    #[test]
    fn targets_match_the_fuzz_crate() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("fuzz/Cargo.toml");
        for t in TARGETS {
            assert!(
                text.contains(&format!("name = \"{t}\"")),
                "{t} is not a target of {}",
                manifest.display()
            );
            let seeds = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds")
                .join(t);
            assert!(files_in(&seeds) > 0, "no seeds in {}", seeds.display());
        }
        let bins = text.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has other targets");
    }
}
