//! `cargo xtask`: the project's own commands (see `cargo xtask --help`).
//!
//! They set up what they need on a Debian 12 host themselves: Debian
//! packages (when run as root), the musl target, then call the builder.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nodeflash_builder::build::{build, profile_path, provider, BuildOptions};
use nodeflash_builder::cache::Cache;
use nodeflash_builder::{cli, steps, synthetic, tools};
use nodeflash_installer::cmd;
use nodeflash_installer::profile::{Profile, Size};

mod bench;
mod fuzz;

const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Args {
    /// Show every command that is run.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build `target/nodeflash/<profile>.iso` (installs missing host packages when root).
    BuildIso {
        #[arg(long, default_value = "alrest")]
        profile: String,
    },
    /// Pin the newest Debian packages in profiles/inputs.lock.
    UpdateInputs,
    /// The whole test suite: format, lints, unit tests, and the QEMU tests on the built `qemu` image.
    Test,
    /// Write a deterministic synthetic Nix store: exactly FILES regular files
    /// of BYTES bytes in total, plus directories and symlinks.
    GenStore {
        #[arg(long)]
        files: u64,
        /// Total size of the regular files, e.g. 1GiB.
        #[arg(long)]
        bytes: Size,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (must not exist or be empty).
        out: PathBuf,
    },
    /// Fuzz the parsers with `cargo fuzz` (nightly), SECONDS per target; not
    /// part of `test`. Crashes are left in fuzz/artifacts/TARGET/.
    Fuzz {
        /// One of profile, payload, dhcp, http (default: all, one after the other).
        target: Option<String>,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Benchmarks; results go to target/bench/.
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Pack and unpack a synthetic store with nodeflash and its peers
    /// (squashfs, cp, tar, parallel cp); prints target/bench/store.md.
    Store {
        #[arg(long, default_value_t = 40_000)]
        files: u64,
        #[arg(long, default_value = "1GiB")]
        bytes: Size,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Processors given to mksquashfs (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    steps::configure(false, args.verbose);
    let result = match args.command {
        Cmd::BuildIso { profile } => build_iso(&profile).map(|s| cli::print_summary(&s)),
        Cmd::UpdateInputs => update_inputs(),
        Cmd::Test => test(),
        Cmd::Fuzz { target, seconds } => fuzz::run(&root(), target.as_deref(), seconds),
        Cmd::GenStore {
            files,
            bytes,
            seed,
            out,
        } => bench::gen_store(
            &synthetic::Spec {
                files,
                bytes: bytes.0,
                seed,
            },
            &out,
        ),
        Cmd::Bench {
            command:
                BenchCmd::Store {
                    files,
                    bytes,
                    seed,
                    jobs,
                },
        } => bench::store(
            &synthetic::Spec {
                files,
                bytes: bytes.0,
                seed,
            },
            jobs,
        ),
    };
    cli::exit_code(result)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command with its output on the terminal.
fn run_visible(c: &mut Command) -> Result<()> {
    let line = format!("{c:?}");
    let status = c.status().with_context(|| format!("cannot run {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    cmd::run(Command::new("id").arg("-u")).is_ok_and(|out| out.trim() == "0")
}

/// Installs the Debian packages of missing tools when root, else says how.
fn ensure_packages(tools_needed: &[(&str, &str)]) -> Result<()> {
    let missing = tools::missing_packages(tools_needed);
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || tools::require(&[("apt-get", "apt")]).is_err() {
        return tools::require(tools_needed);
    }
    steps::step(
        &format!("Installing Debian packages: {}", missing.join(" ")),
        || {
            cmd::run(Command::new("apt-get").args(["-q", "update"]))?;
            cmd::run(
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["-q", "-y", "install", "--no-install-recommends"])
                    .args(&missing),
            )?;
            Ok(())
        },
    )?;
    tools::require(tools_needed)
}

/// The target the installer is built for: static musl when the toolchain
/// has it or can fetch it, else glibc (its libraries then go into the image).
fn installer_target() -> &'static str {
    let installed = cmd::run(Command::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == MUSL) {
        return MUSL;
    }
    let added = steps::step(&format!("Adding the Rust target {MUSL}"), || {
        cmd::run(Command::new("rustup").args(["target", "add", MUSL])).map(drop)
    });
    match added {
        Ok(()) => MUSL,
        Err(e) => {
            steps::note(&format!(
                "warning: cannot add {MUSL} ({e:#}); building the installer for {GNU} with its libraries in the image"
            ));
            GNU
        }
    }
}

/// The user's rustflags, and build-host paths rewritten to fixed ones: the
/// installer's panic messages name the sources of its dependencies (under
/// the cargo home) and generated code (under the target directory), and the
/// image must carry no path of the build host (tests/tests/secrets.rs), nor
/// depend on where the repository or the cargo home are.
fn installer_rustflags() -> String {
    let mut flags: Vec<String> = match std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        Ok(f) if !f.is_empty() => f.split('\x1f').map(String::from).collect(),
        _ => std::env::var("RUSTFLAGS")
            .map(|f| f.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let dir = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    // When several prefixes match, rustc applies the last one given: the
    // deeper directories come after the repository.
    let remaps = [
        (Some(root()), "/nodeflash"),
        (Some(target_dir()), "/nodeflash/target"),
        (dir("CARGO_HOME", ".cargo"), "/cargo"),
        (dir("RUSTUP_HOME", ".rustup"), "/rustup"),
    ];
    for (from, to) in remaps {
        if let Some(from) = from {
            flags.push(format!("--remap-path-prefix={}={to}", from.display()));
        }
    }
    flags.join("\x1f")
}

fn build_installer() -> Result<PathBuf> {
    let target = installer_target();
    steps::step(&format!("Compiling the installer ({target})"), || {
        run_visible(
            cargo()
                .args([
                    "build",
                    "--quiet",
                    "--release",
                    "-p",
                    "nodeflash-installer",
                    "--target",
                    target,
                ])
                .env("CARGO_ENCODED_RUSTFLAGS", installer_rustflags()),
        )
    })?;
    Ok(target_dir()
        .join(target)
        .join("release/nodeflash-installer"))
}

fn build_iso(profile: &str) -> Result<nodeflash_builder::build::BuildSummary> {
    ensure_packages(tools::BUILD_TOOLS)?;
    let installer = build_installer()?;
    build(&BuildOptions {
        profile: profile_path(profile, &root().join("profiles")),
        installer,
        out_dir: target_dir().join("nodeflash"),
        cache: Cache::from_env()?,
        reuse_artifacts: true,
    })
}

fn update_inputs() -> Result<()> {
    ensure_packages(&[("apt-get", "apt")])?;
    let path = root().join("profiles/alrest.toml");
    let profile = Profile::load(&path)?;
    steps::step("Updating profiles/inputs.lock", || {
        provider(&profile, &path).update_lock(&Cache::from_env()?)
    })
}

fn test() -> Result<()> {
    let all: Vec<(&str, &str)> = tools::BUILD_TOOLS
        .iter()
        .chain(tools::TEST_TOOLS)
        .copied()
        .collect();
    ensure_packages(&all)?;
    steps::step("Checking formatting", || {
        run_visible(cargo().args(["fmt", "--all", "--check"]))
    })?;
    steps::step("Linting", || {
        run_visible(cargo().args([
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // README's image too: its QEMU test installs it on a 1 TB disk.
    for profile in ["qemu", "qemu-bus", "alrest"] {
        cli::print_summary(&build_iso(profile)?);
    }
    let installer = build_installer()?;
    steps::step("Running the tests (unit and QEMU)", || {
        run_visible(
            cargo()
                .args(["test", "--workspace"])
                .env("NODEFLASH_TEST_IMAGES", target_dir().join("nodeflash"))
                .env("NODEFLASH_TEST_INSTALLER", &installer)
                .env("NODEFLASH_PROFILES", root().join("profiles")),
        )
    })
}
