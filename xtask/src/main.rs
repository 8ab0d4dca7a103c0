//! `cargo xtask`: the project's own commands (see `cargo xtask --help`).
//!
//! They set up what they need on a Debian 12 host themselves: Debian
//! packages (when run as root), the musl target, then call the builder.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nodeflash_builder::build::{build, find_profile, provider, BuildOptions};
use nodeflash_builder::cache::Cache;
use nodeflash_builder::inputs::LockMode;
use nodeflash_builder::{cli, steps, synthetic, tools};
use nodeflash_installer::cmd;
use nodeflash_installer::profile::{Profile, Size};

mod bench;
mod fuzz;
mod noapt;
mod readme;
mod tidy;

/// Nix settings for the tests' builds (see `test`).
const TEST_NIX_CONFIG: &str = "build-users-group =\nsubstituters =\n";

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
        /// Build exactly what the inputs lock pins: fail instead of
        /// re-pinning a package Debian no longer publishes (cargo's meaning).
        #[arg(long)]
        locked: bool,
    },
    /// Build `target/nodeflash/<profile>.iso`, then boot it in QEMU with the
    /// console on this terminal (`nodeflash run-vm`; Ctrl-A X quits).
    #[command(after_help = nodeflash_builder::vm::RUN_VM_HELP)]
    RunVm {
        #[command(flatten)]
        vm: nodeflash_builder::vm::RunVmArgs,
    },
    /// Pin the newest Debian packages in the lock the profile uses
    /// (`profiles/inputs.lock` for the profiles here).
    UpdateInputs {
        /// Profile name (in profiles/) or path to a .toml file.
        #[arg(long, default_value = "alrest")]
        profile: String,
        /// Only print what a build would re-pin today; change nothing.
        #[arg(long)]
        check: bool,
    },
    /// The whole test suite: format, lints, unit tests, and the QEMU tests on the built `qemu` image.
    Test,
    /// Build profile `qemu`, then again with the host's apt and dpkg hidden
    /// in an empty cache, and compare the ISOs byte for byte; then check the
    /// errors of a missing mirror and of a wrong sha256 (part of `test`).
    NoApt,
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
        Cmd::BuildIso { profile, locked } => {
            build_iso(&profile, lock_mode(locked)).map(|s| cli::print_summary(&s))
        }
        Cmd::RunVm { vm } => run_vm(vm),
        Cmd::UpdateInputs { profile, check } => update_inputs(&profile, check),
        Cmd::Test => test(),
        Cmd::NoApt => no_apt(),
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

/// Builds the `nodeflash` command (debug) and returns its path.
fn build_nodeflash() -> Result<PathBuf> {
    run_visible(cargo().args([
        "build",
        "--quiet",
        "-p",
        "nodeflash-builder",
        "--bin",
        "nodeflash",
    ]))?;
    Ok(target_dir().join("debug/nodeflash"))
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

fn build_iso(profile: &str, lock_mode: LockMode) -> Result<nodeflash_builder::build::BuildSummary> {
    let path = find_profile(profile, &root().join("profiles"))?;
    // Nix too when the profile builds its systems from a flake.
    let loaded = Profile::load(&path)?;
    let mut needed = tools::for_profile(&loaded);
    needed.extend_from_slice(tools::INSTALLER_TOOLS);
    ensure_packages(&needed)?;
    let cache = Cache::from_env()?;
    // The build inputs (downloads, the OpenZFS compile) while the installer
    // compiles: on a fresh machine each takes minutes, neither needs the
    // other, and each leaves a core idle part of the time (configure's
    // checks run one at a time, the installer's last crates too; 12 s
    // saved in a cold run). The build then finds the inputs in the cache.
    let installer = std::thread::scope(|s| {
        let inputs = s.spawn(|| {
            provider(&loaded, &path)
                .provide(&cache, lock_mode)
                .map(drop)
        });
        let installer = build_installer();
        let inputs = inputs
            .join()
            .map_err(|_| anyhow::anyhow!("the build inputs' thread panicked"))?;
        inputs.and(installer)
    })?;
    build(&BuildOptions {
        profile: path,
        installer,
        out_dir: target_dir().join("nodeflash"),
        cache,
        reuse_artifacts: true,
        lock_mode,
    })
}

/// Builds the profile's ISO, then boots it as `nodeflash run-vm` does.
fn run_vm(mut vm: nodeflash_builder::vm::RunVmArgs) -> Result<()> {
    let Some(profile) = vm.profile.clone() else {
        bail!("give the profile to build and boot: --profile NAME");
    };
    if vm.boot != nodeflash_builder::vm::Boots::Disk {
        let all: Vec<(&str, &str)> = tools::BUILD_TOOLS
            .iter()
            .chain(tools::INSTALLER_TOOLS)
            .chain(tools::VM_TOOLS)
            .copied()
            .collect();
        ensure_packages(&all)?;
        let summary = build_iso(&profile, LockMode::Update)?;
        cli::print_summary(&summary);
        vm.iso = Some(summary.iso);
    }
    if !nodeflash_builder::vm::run_command(&vm, &root().join("profiles"))? {
        // The verdict line said why; no second message.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

fn lock_mode(locked: bool) -> LockMode {
    if locked {
        LockMode::Locked
    } else {
        LockMode::Update
    }
}

fn update_inputs(profile: &str, check: bool) -> Result<()> {
    ensure_packages(&[("gpgv", "gpgv")])?;
    let path = find_profile(profile, &root().join("profiles"))?;
    let profile = Profile::load(&path)?;
    if check {
        return steps::step("Checking the inputs lock against the archive", || {
            cli::check_inputs(&profile, &path)
        });
    }
    steps::step("Updating the inputs lock", || {
        provider(&profile, &path)
            .update_lock(&Cache::from_env()?)
            .map(drop)
    })
}

fn test() -> Result<()> {
    // The tests build stand-in systems with real Nix (tests/fixtures/flake).
    let all: Vec<(&str, &str)> = tools::BUILD_TOOLS
        .iter()
        .chain(tools::INSTALLER_TOOLS)
        .chain(tools::TEST_TOOLS)
        .chain(tools::NIX_TOOLS)
        .copied()
        .collect();
    ensure_packages(&all)?;
    steps::step("Checking formatting", || {
        run_visible(cargo().args(["fmt", "--all", "--check"]))
    })?;
    steps::step("Linting", || {
        let lint = ["--all-targets", "--", "-D", "warnings"];
        run_visible(
            cargo()
                .args(["clippy", "--quiet", "--workspace"])
                .args(lint),
        )?;
        // The shared layer alone, as the builder links it (no `pid1`).
        run_visible(
            cargo()
                .args([
                    "clippy",
                    "--quiet",
                    "-p",
                    "nodeflash-installer",
                    "--no-default-features",
                ])
                .args(lint),
        )
    })?;
    let [readme_build, readme_test] = readme_commands()?;
    if readme_test != ["cargo", "xtask", "test"] {
        bail!(
            "README.md's test command is `{}`, not this one (`cargo xtask test`)",
            readme_test.join(" ")
        );
    }
    // What a new machine meets: every pin resolved against today's archive
    // with empty package lists and cache; prints what a build would re-pin,
    // and fails when something can no longer be had at all.
    update_inputs("alrest", true)?;
    for profile in ["qemu", "qemu-bus"] {
        cli::print_summary(&build_iso(profile, LockMode::Update)?);
    }
    // The same `qemu` image again with the host's apt and dpkg hidden, in
    // an empty cache: byte-identical, or the test fails (issue 21).
    noapt::check(&noapt::ordinary_iso(), &build_installer()?)?;
    // README's image, built by README's command as written: its QEMU test
    // installs it on a 1 TB disk.
    let profile = readme_build_profile(&readme_build)?;
    let summary = target_dir().join(format!("nodeflash/{profile}.json"));
    let started = std::time::SystemTime::now();
    steps::step(
        &format!("Running README's build command: {}", readme_build.join(" ")),
        || {
            run_visible(
                Command::new(&readme_build[0])
                    .args(&readme_build[1..])
                    .current_dir(root()),
            )
        },
    )?;
    let written = std::fs::metadata(&summary)
        .and_then(|m| m.modified())
        .with_context(|| format!("README's build command wrote no {}", summary.display()))?;
    if written < started {
        bail!(
            "README's build command did not write {}: it is older than the command",
            summary.display()
        );
    }
    let installer = build_installer()?;
    // `nodeflash serve` for the network boot test (tests/tests/netboot.rs).
    let nodeflash = steps::step("Compiling nodeflash", build_nodeflash)?;
    // cargo-nextest (.config/nextest.toml: one QEMU test per core, each
    // retried once, see issue 19); plain `cargo test` where it is missing.
    let nextest = cmd::run(cargo().args(["nextest", "--version"])).is_ok();
    if !nextest {
        steps::note(
            "cargo-nextest is not installed (`cargo install cargo-nextest --locked`): \
             running `cargo test`, without the one retry of a hung QEMU boot",
        );
    }
    // One KVM probe for the whole run, not one per test process.
    let accel = if nodeflash_builder::vm::kvm_works() {
        "kvm"
    } else {
        "tcg"
    };
    let args: &[&str] = if nextest {
        &["nextest", "run", "--workspace"]
    } else {
        &["test", "--workspace"]
    };
    steps::step("Running the tests (unit and QEMU)", || {
        run_visible(
            cargo()
                .args(args)
                .env("NODEFLASH_ACCEL", accel)
                .env("NODEFLASH_TEST_IMAGES", target_dir().join("nodeflash"))
                .env("NODEFLASH_TEST_INSTALLER", &installer)
                .env("NODEFLASH_TEST_NODEFLASH", &nodeflash)
                .env("NODEFLASH_PROFILES", root().join("profiles"))
                // The stand-in flake builds with Debian's nix-bin as root:
                // no `nixbld` build users (that group comes with the
                // daemon's package) and no binary cache to ask.
                .env("NIX_CONFIG", TEST_NIX_CONFIG),
        )
    })
}

/// `cargo xtask no-apt`: the ordinary `qemu` build, then [`noapt::check`].
fn no_apt() -> Result<()> {
    ensure_packages(&[tools::BUILD_TOOLS, tools::INSTALLER_TOOLS].concat())?;
    cli::print_summary(&build_iso("qemu", LockMode::Locked)?);
    noapt::check(&noapt::ordinary_iso(), &build_installer()?)
}

/// README's two commands (see `readme.rs`).
fn readme_commands() -> Result<[Vec<String>; 2]> {
    let path = root().join("README.md");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    readme::two_commands(&text)
}

/// The profile README's build command builds, checked to be `cargo xtask
/// build-iso` with arguments this xtask accepts.
fn readme_build_profile(command: &[String]) -> Result<String> {
    let args = readme::xtask_args(command).with_context(|| {
        format!(
            "README.md's build command `{}` is not `cargo xtask …`",
            command.join(" ")
        )
    })?;
    let parsed =
        Args::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().map(String::as_str)))
            .with_context(|| {
                format!(
                    "README.md's build command `{}` is not valid",
                    command.join(" ")
                )
            })?;
    match parsed.command {
        Cmd::BuildIso { profile, .. } => Ok(profile),
        _ => bail!(
            "README.md's build command `{}` is not `cargo xtask build-iso`",
            command.join(" ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README's two commands are the ones this xtask runs: the build command
    /// is a valid `build-iso` of the seed's cluster, which `cargo xtask test`
    /// runs as written, and the test command is `cargo xtask test`, which is
    /// what CI (`.ci/run`) runs.
    #[test]
    fn readme_commands_are_what_ci_runs() {
        let [build, test] = readme_commands().expect("README's two commands");
        assert_eq!(
            readme_build_profile(&build).expect("a build-iso command"),
            "alrest"
        );
        assert_eq!(build.join(" "), "cargo xtask build-iso --profile alrest");
        assert_eq!(test, ["cargo", "xtask", "test"]);
        let args = readme::xtask_args(&test).expect("cargo xtask");
        let parsed = Args::try_parse_from(
            std::iter::once("cargo xtask").chain(args.iter().map(String::as_str)),
        )
        .expect("valid xtask arguments");
        assert!(matches!(parsed.command, Cmd::Test));
        let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
        assert!(
            ci.lines().any(|l| l.trim() == test.join(" ")),
            ".ci/run does not run README's `{}`:\n{ci}",
            test.join(" ")
        );
    }

    #[test]
    fn a_build_command_that_is_not_build_iso_is_refused() {
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        for (cmd, want) in [
            ("cargo build --release", "is not `cargo xtask …`"),
            ("cargo xtask build-iso --profil alrest", "is not valid"),
            (
                "cargo xtask update-inputs",
                "is not `cargo xtask build-iso`",
            ),
        ] {
            let err = readme_build_profile(&words(cmd)).expect_err(cmd);
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        assert_eq!(
            readme_build_profile(&words("cargo xtask build-iso")).expect("default"),
            "alrest"
        );
    }
}
