//! The `nodeflash` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nodeflash_installer::profile::Profile;
use nodeflash_installer::units::mib;

use crate::build::{build, find_profile, provider, BuildOptions};
use crate::cache::Cache;
use crate::inputs::LockMode;
use crate::steps;

/// `Examples:` lines, then the exit status, for a command's `--help`.
macro_rules! examples {
    ($($line:literal),+ $(,)?) => {
        concat!(
            "Examples:\n",
            $("  ", $line, "\n",)+
            "\nExit status: 0 success, 1 error, 2 bad usage."
        )
    };
}

/// Build unattended installer images for homelab nodes.
#[derive(Debug, Parser)]
#[command(
    name = "nodeflash",
    version,
    after_help = concat!(
        "Output: step lines with their durations on stderr, results on stdout;\n",
        "-v also shows every command that is run, -q only errors.\n\n",
        examples!(
        "nodeflash profile check",
        "nodeflash profile show alrest",
        "nodeflash facts > node.json",
        "nodeflash plan --profile alrest --machine node.json",
        "nodeflash build --profile alrest --installer target/x86_64-unknown-linux-musl/release/nodeflash-installer",
        "cargo xtask build-iso --profile alrest   # compiles the installer, then runs the build",
    ))
)]
pub struct Cli {
    /// Show every command that is run.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Directory holding the profiles.
    #[arg(long, global = true, default_value = "profiles")]
    profiles_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the ISO of a profile: NAME.iso, NAME.iso.sha256 and NAME.json
    /// (the summary) in the output directory.
    #[command(after_help = examples!(
        "nodeflash build --profile alrest --installer target/x86_64-unknown-linux-musl/release/nodeflash-installer",
        "nodeflash build --profile ./lab.toml --installer INSTALLER --json > summary.json",
        "nodeflash build --profile alrest --installer INSTALLER --locked   # exactly the pinned packages",
        "cargo xtask build-iso --profile alrest   # the same, with the installer compiled first",
    ))]
    Build(BuildArgs),
    /// Inspect and validate profiles (the format is in docs/profile.md).
    #[command(after_help = examples!(
        "nodeflash profile check",
        "nodeflash profile show alrest",
        "nodeflash profile show ./lab.toml --json",
    ))]
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Show what the installer would do on a machine, from its facts (JSON as
    /// printed by `nodeflash facts`), without touching anything.
    #[command(after_help = examples!(
        "nodeflash facts > node.json   # on the machine, or the stick's `nodeflash-facts:` line",
        "nodeflash plan --profile alrest --machine node.json",
        "nodeflash plan --profile alrest --machine node.json --json",
    ))]
    Plan(PlanArgs),
    /// Write the NixOS module a flake imports, generated from the profile:
    /// file systems, ESP and swap, ZFS and systemd-boot, root's keys, and
    /// each node's host name and host ID (docs/flake.md).
    #[command(after_help = examples!(
        "nodeflash nixos-module --profile alrest > nodeflash.nix",
        "nodeflash nixos-module --profile alrest --out ../cluster/nodeflash.nix",
    ))]
    NixosModule(NixosModuleArgs),
    /// Print this machine's facts (disks, NICs, DMI) as JSON, always.
    #[command(after_help = concat!(
        "Run it as root: the DMI serial and product UUID are readable by root only\n",
        "(as a user they are null). Many consumer boards report the same placeholder\n",
        "serial on every unit (\"To Be Filled By O.E.M.\", \"Default string\"); for\n",
        "identical machines match on the NIC's `mac` or the disk's `disk-serial`.\n\n",
        examples!(
        "sudo nodeflash facts > node.json",
        "sudo nodeflash facts | jq '.dmi.product_serial'   # for a node's `match = { dmi-serial = … }`",
    )))]
    Facts(FactsArgs),
    /// Pack, extract and check store payloads (docs/payload.md).
    #[command(after_help = examples!(
        "nodeflash payload pack ./store store.nfp --registration ./registration",
        "nodeflash payload verify store.nfp",
    ))]
    Payload {
        #[command(subcommand)]
        command: PayloadCommand,
    },
    /// Bound the cache: evict the least recently used payloads, frames and
    /// images (docs/payload.md, "Cache bounds").
    #[command(after_help = examples!("nodeflash cache gc --max-size 5GiB"))]
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Write an ISO onto a USB stick and read it back; without DEVICE, list
    /// the disks it would accept and refuse.
    #[command(after_help = FLASH_HELP)]
    Flash(FlashArgs),
    /// Serve an image to nodes that boot from the network: proxy DHCP and
    /// iPXE by dnsmasq, the kernel, initramfs and store payload over HTTP.
    #[command(after_help = crate::serve::SERVE_HELP)]
    Serve(crate::serve::ServeArgs),
    /// Boot an ISO in QEMU with the serial console on this terminal: the
    /// stick installs a fresh NVMe disk, then the disk boots alone.
    #[command(after_help = crate::vm::RUN_VM_HELP)]
    RunVm(crate::vm::RunVmArgs),
    /// Pin the newest available build inputs in the lock the profile uses.
    ///
    /// The lock is `[inputs] lock`, default `inputs.lock` beside the
    /// profile. A build re-pins only what Debian no longer publishes; this
    /// moves every pin, the kernel included, to the newest version.
    #[command(after_help = examples!(
        "nodeflash update-inputs --profile alrest",
        "nodeflash update-inputs --profile ./lab.toml   # ./inputs.lock",
        "nodeflash update-inputs --check   # what a build would re-pin now; writes nothing",
        "cargo xtask update-inputs --profile alrest   # the same from the repository",
    ))]
    UpdateInputs(UpdateInputsArgs),
}

const FLASH_HELP: &str = "Examples:
  nodeflash flash                                   # list the disks, accepted and refused
  nodeflash flash target/nodeflash/alrest.iso       # the same, checking they can hold it
  nodeflash flash target/nodeflash/alrest.iso /dev/sdb
  nodeflash flash target/nodeflash/alrest.iso /dev/sdb --force /dev/sdb   # an internal or large disk
  nodeflash flash target/nodeflash/alrest.iso copy.img                    # a file works too

Accepted: a whole disk that is removable (sysfs removable=1) or on USB, at most
--max-size, not mounted, not swap, not held (LUKS, LVM, RAID), writable.
--force DEVICE (the same device again) overrides only \"not removable\" and
\"too large\". The written bytes are read back (O_DIRECT) and compared.

Exit status: 0 written and verified (or: at least one disk listed as accepted),
1 refused, failed or no acceptable disk, 2 bad usage.";

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Profile name (in the profiles directory) or path to a .toml file.
    #[arg(long)]
    profile: String,
    /// The installer binary that becomes /init.
    #[arg(long)]
    installer: PathBuf,
    /// Where the ISO, its .sha256 and the summary .json are written.
    #[arg(long, default_value = "target/nodeflash")]
    out_dir: PathBuf,
    /// Print the build summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Build exactly what the inputs lock pins: fail instead of
    /// re-pinning a package Debian no longer publishes, or creating a
    /// missing lock (cargo's `--locked`).
    #[arg(long)]
    locked: bool,
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// Profile name (in the profiles directory) or path to a .toml file.
    #[arg(long)]
    profile: String,
    /// Machine facts as JSON.
    #[arg(long)]
    machine: PathBuf,
    /// Print the node and the plan as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct NixosModuleArgs {
    /// Profile name (in the profiles directory) or path to a .toml file.
    #[arg(long)]
    profile: String,
    /// Write it here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct FactsArgs {
    /// Accepted for symmetry with the other commands: the output is JSON anyway.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct UpdateInputsArgs {
    /// Profile name (in the profiles directory) or path to a .toml file.
    #[arg(long, default_value = "alrest")]
    profile: String,
    /// Only check the lock against today's archive with fresh package
    /// lists, and print what a build would re-pin; change nothing.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, clap::Args)]
struct GcArgs {
    /// The bound (default: NODEFLASH_CACHE_MAX, else 20GiB).
    #[arg(long)]
    max_size: Option<nodeflash_installer::profile::Size>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// Profile name (in the profiles directory) or path to a .toml file.
    name: String,
    /// Print it as JSON instead of TOML.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Profile names (in the profiles directory) or paths to .toml files
    /// [default: every *.toml in the profiles directory].
    profiles: Vec<String>,
    /// Print one JSON object per profile (path, name, error) as a list.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct FlashArgs {
    /// The image, e.g. target/nodeflash/alrest.iso.
    iso: Option<PathBuf>,
    /// The stick: a whole disk such as /dev/sdb (or a regular file).
    device: Option<PathBuf>,
    /// Write to DEVICE although it is not removable or larger than
    /// --max-size: name the same device again.
    #[arg(long, value_name = "DEVICE")]
    force: Option<PathBuf>,
    /// Refuse disks larger than this.
    #[arg(long, default_value_t = nodeflash_installer::profile::Size(crate::flash::DEFAULT_MAX_SIZE))]
    max_size: nodeflash_installer::profile::Size,
    /// Print the listing or the result as JSON.
    #[arg(long)]
    json: bool,
    /// sysfs root (tests point this at a captured tree).
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs: PathBuf,
    /// procfs root (tests point this at captured files).
    #[arg(long, default_value = "/proc", hide = true)]
    proc: PathBuf,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Evict the least recently used payloads, frames, initramfs, EFI images
    /// and ISOs until they hold at most the bound; packages, extracted trees
    /// and compiled modules stay.
    #[command(after_help = examples!(
        "nodeflash cache gc   # down to NODEFLASH_CACHE_MAX, default 20GiB",
        "nodeflash cache gc --max-size 5GiB",
        "nodeflash cache gc --max-size 0   # drop every payload, frame and image",
    ))]
    Gc(GcArgs),
}

#[derive(Debug, Subcommand)]
enum PayloadCommand {
    /// Pack a store directory (its entries are store paths) into a payload.
    #[command(after_help = examples!(
        "nodeflash payload pack ./store store.nfp --registration ./registration",
        "nodeflash payload pack /tmp/store store.nfp --level 3 --json",
        "nodeflash payload pack ./store store.nfp --cache ~/.cache/nodeflash/frames",
    ))]
    Pack(crate::payload::PackArgs),
    /// Extract a payload into a new or empty directory, checking every file.
    #[command(after_help = examples!(
        "nodeflash payload unpack store.nfp ./unpacked",
        "nodeflash payload unpack store.nfp ./unpacked --jobs 2 --json",
    ))]
    Unpack(crate::payload::UnpackArgs),
    /// Check every frame and file of a payload; with DIR, check that the tree
    /// in DIR is exactly what the payload holds.
    #[command(after_help = examples!(
        "nodeflash payload verify store.nfp",
        "nodeflash payload verify store.nfp ./unpacked --json",
    ))]
    Verify(crate::payload::VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum ProfileCommand {
    /// Print the fully resolved profile (every default filled in).
    #[command(after_help = examples!(
        "nodeflash profile show alrest",
        "nodeflash profile show ./lab.toml --json",
    ))]
    Show(ShowArgs),
    /// Validate profiles: the ones named, or every one in the profiles
    /// directory.
    #[command(after_help = examples!(
        "nodeflash profile check",
        "nodeflash profile check alrest ./lab.toml",
        "nodeflash profile check --profiles-dir ~/lab/profiles --json",
    ))]
    Check(CheckArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    steps::configure(cli.quiet, cli.verbose);
    exit_code(run(cli))
}

/// Prints an error with its chain of causes; the exit code for a result.
pub fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What every command may read of the global options.
struct Globals {
    quiet: bool,
    profiles_dir: PathBuf,
}

/// Hands each command's arguments to its implementation.
fn run(cli: Cli) -> Result<()> {
    let g = Globals {
        quiet: cli.quiet,
        profiles_dir: cli.profiles_dir,
    };
    match cli.command {
        Command::Build(a) => build_command(a, &g),
        Command::Profile {
            command: ProfileCommand::Show(a),
        } => profile_show(a, &g),
        Command::Profile {
            command: ProfileCommand::Check(a),
        } => profile_check(a, &g),
        Command::Plan(a) => plan_command(a, &g),
        Command::NixosModule(a) => nixos_module(a, &g),
        Command::Facts(_) => {
            let facts = read_facts(std::path::Path::new("/sys"), std::path::Path::new("/dev"));
            println!("{}", serde_json::to_string_pretty(&facts)?);
            Ok(())
        }
        Command::Payload { command } => match command {
            PayloadCommand::Pack(a) => crate::payload::pack_command(a, g.quiet),
            PayloadCommand::Unpack(a) => crate::payload::unpack_command(a, g.quiet),
            PayloadCommand::Verify(a) => crate::payload::verify_command(a, g.quiet),
        },
        Command::Cache {
            command: CacheCommand::Gc(a),
        } => cache_gc(a, &g),
        Command::Flash(a) => flash_command(a),
        Command::Serve(a) => {
            let iso = match (&a.iso, &a.profile) {
                (Some(iso), _) => iso.clone(),
                (None, Some(p)) => PathBuf::from("target/nodeflash").join(format!("{p}.iso")),
                (None, None) => usage_error("serve needs --profile NAME or --iso PATH"),
            };
            crate::serve::run(&a, &iso)
        }
        Command::RunVm(a) => {
            if a.boot == crate::vm::Boots::Disk && a.disk.is_none() {
                usage_error("--boot disk needs --disk PATH (a disk installed by an earlier run)");
            }
            if !crate::vm::run_command(&a, &g.profiles_dir)? {
                // The verdict line said why; no second message.
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(1);
            }
            Ok(())
        }
        Command::UpdateInputs(a) => update_inputs(a, &g),
    }
}

/// `nodeflash build`.
fn build_command(a: BuildArgs, g: &Globals) -> Result<()> {
    let summary = build(&BuildOptions {
        profile: find_profile(&a.profile, &g.profiles_dir)?,
        installer: a.installer,
        out_dir: a.out_dir,
        cache: Cache::from_env()?,
        reuse_artifacts: true,
        lock_mode: if a.locked {
            LockMode::Locked
        } else {
            LockMode::Update
        },
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !g.quiet {
        print_summary(&summary);
    }
    Ok(())
}

/// `nodeflash profile show`.
fn profile_show(a: ShowArgs, g: &Globals) -> Result<()> {
    let p = Profile::load(&find_profile(&a.name, &g.profiles_dir)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", p.to_toml());
    }
    Ok(())
}

/// `nodeflash profile check`.
fn profile_check(a: CheckArgs, g: &Globals) -> Result<()> {
    if a.profiles.is_empty() {
        check_profiles(&g.profiles_dir, a.json)
    } else {
        let paths = a
            .profiles
            .iter()
            .map(|p| find_profile(p, &g.profiles_dir))
            .collect::<Result<Vec<_>>>()?;
        check_paths(&paths, a.json)
    }
}

/// `nodeflash plan`.
fn plan_command(a: PlanArgs, g: &Globals) -> Result<()> {
    let p = Profile::load(&find_profile(&a.profile, &g.profiles_dir)?)?;
    let machine = &a.machine;
    let text = std::fs::read_to_string(machine)
        .with_context(|| format!("cannot read machine facts {}", machine.display()))?;
    // `nodeflash facts` output, or the stick's console line as printed.
    let facts_json = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("nodeflash-facts: "))
        .unwrap_or(&text);
    let facts: nodeflash_installer::facts::Facts = serde_json::from_str(facts_json)
        .with_context(|| format!("invalid machine facts {}", machine.display()))?;
    let node = nodeflash_installer::nodes::identify(&p, &facts)?;
    let select = node.disk_select.as_ref().unwrap_or(&p.disk.select);
    let plan = nodeflash_installer::plan::plan_with(&p, select, &facts)?;
    let install = InstallPreview::of(&p, &node, &plan, &facts);
    if a.json {
        let out = serde_json::json!({ "node": node, "plan": plan, "install": install });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("node: {} ({})", node.hostname, node.reason);
        print!("{plan}");
        print!("{}", install.text());
    }
    Ok(())
}

/// `nodeflash nixos-module`.
fn nixos_module(a: NixosModuleArgs, g: &Globals) -> Result<()> {
    let path = find_profile(&a.profile, &g.profiles_dir)?;
    let p = Profile::load(&path)?;
    let source = path
        .file_name()
        .map_or_else(|| a.profile.clone(), |f| f.to_string_lossy().into_owned());
    let text = nodeflash_installer::nixos::flake_module(&p, &source);
    match a.out {
        Some(out) => {
            std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// `nodeflash cache gc`.
fn cache_gc(a: GcArgs, g: &Globals) -> Result<()> {
    let cache = Cache::from_env()?;
    let max = match a.max_size {
        Some(s) => s.0,
        None => Cache::max_bytes_from_env()?,
    };
    let stats = cache.gc(max, &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else if !g.quiet {
        println!(
            "{}: removed {} entries ({:.1} MiB), kept {} ({:.1} MiB) under {:.1} MiB",
            cache.root().display(),
            stats.removed,
            mib(stats.removed_bytes),
            stats.kept,
            mib(stats.kept_bytes),
            mib(max)
        );
    }
    Ok(())
}

/// `nodeflash flash`: `--force` must name the DEVICE again.
fn flash_command(a: FlashArgs) -> Result<()> {
    let forced = match (&a.force, &a.device) {
        (None, _) => false,
        (Some(f), Some(d)) if crate::flash::same_device(f, d) => true,
        (Some(f), d) => usage_error(&format!(
            "--force {} must name the DEVICE being written again{}",
            f.display(),
            d.as_ref()
                .map_or(String::new(), |d| format!(" ({})", d.display()))
        )),
    };
    crate::flash::command(&crate::flash::Options {
        iso: a.iso,
        device: a.device,
        forced,
        max_size: a.max_size.0,
        json: a.json,
        sysfs: a.sysfs,
        proc: a.proc,
    })
}

/// `nodeflash update-inputs`.
fn update_inputs(a: UpdateInputsArgs, g: &Globals) -> Result<()> {
    let path = find_profile(&a.profile, &g.profiles_dir)?;
    let p = Profile::load(&path)?;
    if a.check {
        check_inputs(&p, &path)
    } else {
        provider(&p, &path).update_lock(&Cache::from_env()?)?;
        Ok(())
    }
}

/// Checks a profile's lock against today's archive, as a new machine with an
/// empty cache sees it (package lists fetched into a temporary directory),
/// and prints what a build would re-pin, one line each, on stdout.
pub fn check_inputs(profile: &Profile, path: &std::path::Path) -> Result<()> {
    let tmp = tempfile::tempdir().context("cannot create a temporary cache")?;
    let changes = provider(profile, path).check(&Cache::at(tmp.path().to_path_buf())?)?;
    if changes.is_empty() {
        println!("every pin is published: a build with an empty cache fetches exactly them");
    }
    for c in &changes {
        println!("would re-pin {c}");
    }
    Ok(())
}

/// This machine's facts, with what is on each fixed disk when it can be
/// read (as root): the installer's own way of looking
/// (`nodeflash_installer::disk::look_at`). A disk that cannot be read keeps
/// `contents_read = false`, and a note on stderr says why.
fn read_facts(sys: &std::path::Path, dev: &std::path::Path) -> nodeflash_installer::facts::Facts {
    let mut facts = nodeflash_installer::facts::Facts::read(sys);
    let mut unread = Vec::new();
    for b in &mut facts.block_devices {
        if !b.hidden && b.size_bytes > 0 {
            if let Err(e) = nodeflash_installer::disk::look_at(sys, dev, b) {
                unread.push(format!("{}: {e:#}", b.name));
            }
        }
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { nix::libc::geteuid() } == 0;
    let as_user = if root {
        ""
    } else {
        " (run as root to read them)"
    };
    if !unread.is_empty() {
        steps::note(&format!(
            "not recorded what these disks hold{as_user}: {}",
            unread.join("; ")
        ));
    }
    if !root {
        steps::note("not root: the DMI serial and product UUID are readable by root only");
    }
    facts
}

/// What an install will do besides partitioning, for `nodeflash plan`:
/// the host ID, the pool and its datasets, who gets root SSH, the payload
/// and the boot. The plan's JSON carries it as `install`.
#[derive(Debug, serde::Serialize)]
struct InstallPreview {
    /// 8 hex digits, or why it is not known before the install.
    hostid: String,
    pool: String,
    /// The pool's partition, e.g. `/dev/nvme0n1p3`.
    device: String,
    /// `zpool create -o` options.
    pool_options: std::collections::BTreeMap<String, String>,
    /// Options of the pool's root dataset.
    root_options: std::collections::BTreeMap<String, String>,
    /// `(name, mountpoint)` of each dataset.
    datasets: Vec<(String, Option<String>)>,
    root_ssh: crate::build::RootSsh,
    payload: String,
    boot: crate::build::BootSummary,
}

impl InstallPreview {
    fn of(
        p: &Profile,
        node: &nodeflash_installer::nodes::Identity,
        plan: &nodeflash_installer::plan::Plan,
        facts: &nodeflash_installer::facts::Facts,
    ) -> Self {
        use nodeflash_installer::profile::HostId;
        let hostid = match node.hostid {
            HostId::Random => "random: chosen on the machine, printed on its console".into(),
            want => match nodeflash_installer::zfs::resolve_hostid(
                want,
                facts,
                plan.disk.serial.as_deref(),
            ) {
                // `resolve_hostid` takes the DMI product UUID first, which
                // facts captured without root lack.
                Ok(id) if want == HostId::Derive && facts.dmi.product_uuid.is_none() => format!(
                    "{id:08x}, derived from the disk serial: these facts have no DMI product \
                     UUID, which the stick uses instead when the machine has one \
                     (capture the facts as root)"
                ),
                Ok(id) => format!("{id:08x}"),
                Err(e) => format!("unknown: {e:#}"),
            },
        };
        let payload = &p.payload;
        let payload = if let Some(c) = &payload.closure {
            format!("the Nix closure of {c}")
        } else if let Some(d) = &payload.store {
            format!("the store directory {d}")
        } else if let Some(s) = &payload.synthetic {
            format!(
                "a synthetic store of {} files, {} (tests)",
                s.files, s.bytes
            )
        } else {
            "none (the profile has no [payload])".into()
        };
        // The kernel's partition names (`nvme0n1p3`, `sda3`), as one vdev
        // when the pool has several disks (`mirror A B`).
        let devices = plan.zfs_devices();
        let device = match (devices.len(), plan.vdev.keyword()) {
            (2.., Some(kind)) => format!("{kind} {}", devices.join(" ")),
            _ => devices.join(" "),
        };
        InstallPreview {
            hostid,
            device,
            pool: p.pool.name.to_string(),
            pool_options: p.pool.options.clone(),
            root_options: p.pool.root_options.clone(),
            datasets: p
                .pool
                .datasets
                .iter()
                .map(|d| {
                    (
                        d.name.get_ref().to_string(),
                        d.mountpoint.as_ref().map(|m| m.get_ref().to_string()),
                    )
                })
                .collect(),
            root_ssh: crate::build::RootSsh::of(&p.ssh, &node.keys),
            payload,
            boot: crate::build::BootSummary::of(p),
        }
    }

    /// The preview as `key: value` lines.
    fn text(&self) -> String {
        use std::fmt::Write;
        let opts = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut t = String::new();
        let _ = writeln!(t, "host id (networking.hostId): {}", self.hostid);
        let _ = writeln!(
            t,
            "pool: {} on {}, {}; root dataset {}",
            self.pool,
            self.device,
            opts(&self.pool_options),
            opts(&self.root_options)
        );
        let datasets: Vec<String> = self
            .datasets
            .iter()
            .map(|(n, m)| match m {
                Some(m) => format!("{}/{n} at {m}", self.pool),
                None => format!("{}/{n}", self.pool),
            })
            .collect();
        let _ = writeln!(t, "datasets: {}", datasets.join(", "));
        let r = &self.root_ssh;
        if r.is_nobody() {
            let _ = writeln!(
                t,
                "root SSH: nobody (no [ssh] github-users or keys): no one can log in over SSH"
            );
        }
        for url in &r.key_urls {
            let _ = writeln!(t, "root SSH: the keys {url} lists when the node installs");
        }
        for k in &r.keys {
            let _ = writeln!(t, "root SSH: {k}");
        }
        let _ = writeln!(t, "payload: {}", self.payload);
        let _ = writeln!(t, "boot: {}", self.boot.what);
        t
    }
}

/// Exits with status 2 and clap's usage message.
fn usage_error(msg: &str) -> ! {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, msg)
        .exit()
}

/// Prints the closing summary of a build on stdout.
pub fn print_summary(s: &crate::build::BuildSummary) {
    print!("{}", summary_text(s));
}

/// The closing summary of a build: the ISO, its size and sha256, the
/// payload, and the nodes with the host IDs to put into their NixOS
/// configurations (`networking.hostId`).
pub fn summary_text(s: &crate::build::BuildSummary) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "ISO:      {} ({:.1} MiB)",
        s.iso.display(),
        mib(s.iso_bytes)
    );
    let _ = writeln!(t, "sha256:   {}", s.iso_sha256);
    let _ = writeln!(
        t,
        "image:    {} (kernel {}, {} modules, initramfs {:.1} MiB)",
        &s.image_id[..s.image_id.len().min(12)],
        s.kernel_release,
        s.modules,
        mib(s.initrd_bytes)
    );
    let shown: Vec<String> = s
        .packages
        .iter()
        .filter(|p| {
            p.name.starts_with("linux-image-")
                || ["zfs-dkms", "systemd-boot-efi"].contains(&p.name.as_str())
        })
        .map(|p| p.to_string())
        .collect();
    if !shown.is_empty() {
        let _ = writeln!(
            t,
            "inputs:   {} (all {} packages in the .json)",
            shown.join(", "),
            s.packages.len()
        );
    }
    if s.firmware_files > 0 {
        let _ = writeln!(
            t,
            "firmware: {} files for the image's drivers, {:.1} MiB (in the initramfs above)",
            s.firmware_files,
            mib(s.firmware_bytes)
        );
    }
    match &s.payload {
        Some(p) => {
            let _ = writeln!(
                t,
                "payload:  {:.1} MiB packed from {} files, {:.1} MiB (manifest {})",
                mib(p.bytes),
                p.files,
                mib(p.store_bytes),
                &p.manifest_sha256[..p.manifest_sha256.len().min(12)]
            );
            let systems: Vec<_> = p.systems.values().chain(&p.default_system).collect();
            if let Some(largest) = systems.iter().map(|s| s.store_bytes).max() {
                let _ = writeln!(
                    t,
                    "systems:  {} from the flake in one payload: {:.2} MiB for {} node{}, \
                     {:.2} MiB for the largest one alone (uncompressed; the others add {:.1} KiB)",
                    systems.len(),
                    mib(p.store_bytes),
                    systems.len(),
                    if systems.len() == 1 { "" } else { "s" },
                    mib(largest),
                    p.store_bytes.saturating_sub(largest) as f64 / 1024.0
                );
            }
        }
        None => {
            let _ = writeln!(t, "payload:  none (the profile has no [payload])");
        }
    }
    let _ = writeln!(t, "boot:     {}", s.boot.what);
    let width = s
        .nodes
        .iter()
        .chain(&s.default_node)
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0);
    for (i, n) in s.nodes.iter().enumerate() {
        let _ = writeln!(
            t,
            "{}{:width$}  host ID {}{}",
            if i == 0 { "nodes:    " } else { "          " },
            n.name,
            n.hostid,
            if n.recognisable {
                ""
            } else {
                "  (no `match` rules: the stick cannot recognise it)"
            }
        );
    }
    match &s.default_node {
        Some(n) => {
            let _ = writeln!(
                t,
                "other:    {:width$}  host ID {}  (any machine that matches no node)",
                n.name, n.hostid
            );
        }
        None => {
            let _ = writeln!(t, "other:    refused (`[default-node] install = false`)");
        }
    }
    t.push_str(&root_ssh_text(s));
    for w in &s.warnings {
        let _ = writeln!(t, "warning:  {w}");
    }
    let _ = writeln!(
        t,
        "write it: nodeflash flash {}   (lists the sticks it accepts; add the device)",
        s.iso.display()
    );
    t
}

/// The `root SSH:` lines of the summary: who gets root's SSH access, the
/// nodes with the same access grouped.
fn root_ssh_text(s: &crate::build::BuildSummary) -> String {
    use std::fmt::Write;
    let all: Vec<_> = s.nodes.iter().chain(&s.default_node).collect();
    let mut groups: Vec<(Vec<&str>, &crate::build::RootSsh)> = Vec::new();
    for n in &all {
        match groups.iter_mut().find(|(_, r)| **r == n.root_ssh) {
            Some((names, _)) => names.push(&n.name),
            None => groups.push((vec![&n.name], &n.root_ssh)),
        }
    }
    let mut t = String::new();
    for (i, (names, r)) in groups.iter().enumerate() {
        let label = if groups.len() == 1 {
            "every node".to_string()
        } else {
            names.join(", ")
        };
        let head = if i == 0 { "root SSH: " } else { "          " };
        if r.is_nobody() {
            let _ = writeln!(t, "{head}{label}: nobody (no [ssh] github-users or keys)");
            continue;
        }
        let _ = writeln!(t, "{head}{label}:");
        for (user, url) in r.github_users.iter().zip(&r.key_urls) {
            let _ = writeln!(
                t,
                "            GitHub user {user}: the keys {url} lists when the node installs"
            );
        }
        for k in &r.keys {
            let _ = writeln!(t, "            {k}");
        }
    }
    t
}

/// Validates every `*.toml` in `dir`, reporting all errors; with `json`, as
/// a list of `{path, name, error}` on stdout.
pub fn check_profiles(dir: &std::path::Path, json: bool) -> Result<()> {
    if !dir.is_dir() {
        bail!("{}", crate::build::no_profiles_dir(dir));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list profiles in {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no profiles (*.toml) in {}", dir.display());
    }
    check_paths(&paths, json)
}

/// Validates the profiles at `paths`, reporting all errors; with `json`, as
/// a list of `{path, name, error}` on stdout.
pub fn check_paths(paths: &[PathBuf], json: bool) -> Result<()> {
    let mut failed = 0;
    let mut list = Vec::new();
    for p in paths {
        let (name, error) = match Profile::load(p) {
            Ok(profile) => (Some(profile.name.to_string()), None),
            Err(e) => {
                failed += 1;
                (None, Some(format!("{e:#}")))
            }
        };
        if json {
            list.push(serde_json::json!({ "path": p, "name": name, "error": error }));
        } else if let Some(e) = &error {
            println!("FAILED  {e}");
        } else {
            println!("ok      {} ({})", p.display(), name.unwrap_or_default());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    }
    if failed > 0 {
        bail!("{failed} of {} profiles are invalid", paths.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{node_warnings, BootSummary, BuildSummary, NodeSummary};
    use crate::inputs::PackageVersion;
    use nodeflash_installer::units::MIB;

    fn alrest_summary() -> BuildSummary {
        let profile = Profile::parse(
            include_str!("../../profiles/alrest.toml"),
            "profiles/alrest.toml",
        )
        .expect("alrest parses");
        let (nodes, default_node) = NodeSummary::of(&profile);
        let warnings = node_warnings(&nodes, default_node.as_ref());
        BuildSummary {
            boot: BootSummary::of(&profile),
            warnings,
            profile: "alrest".into(),
            iso: "target/nodeflash/alrest.iso".into(),
            iso_bytes: 75 * MIB + 524288,
            iso_sha256: "ab".repeat(32),
            image_id: "0123456789abcdef0123".into(),
            kernel_release: "6.1.0-40-amd64".into(),
            initrd_bytes: 30 * MIB,
            modules: 41,
            packages: [
                ("linux-image-6.1.0-40-amd64", "6.1.153-1"),
                ("linux-kbuild-6.1", "6.1.153-1"),
                ("zfs-dkms", "2.1.11-1+deb12u1"),
                ("systemd-boot-efi", "252.39-1~deb12u1"),
                ("libc6", "2.36-9+deb12u13"),
            ]
            .map(|(name, version)| PackageVersion {
                name: name.into(),
                version: version.into(),
            })
            .to_vec(),
            firmware_files: 12,
            firmware_bytes: 3 * MIB / 2,
            payload: None,
            nodes,
            default_node,
        }
    }

    #[test]
    fn summary_shows_the_iso_its_sha256_the_payload_boot_ssh_and_every_host_id() {
        let warn = "  (no `match` rules: the stick cannot recognise it)";
        let want = format!(
            "ISO:      target/nodeflash/alrest.iso (75.5 MiB)\n\
             sha256:   {sha}\n\
             image:    0123456789ab (kernel 6.1.0-40-amd64, 41 modules, initramfs 30.0 MiB)\n\
             inputs:   linux-image-6.1.0-40-amd64 6.1.153-1, zfs-dkms 2.1.11-1+deb12u1, \
             systemd-boot-efi 252.39-1~deb12u1 (all 5 packages in the .json)\n\
             firmware: 12 files for the image's drivers, 1.5 MiB (in the initramfs above)\n\
             payload:  none (the profile has no [payload])\n\
             boot:     nothing: the disk will not boot, because the profile has no [boot] \
             (no boot loader is written; see docs/flake.md)\n\
             nodes:    kos-mos  host ID 472479d4{warn}\n          \
                       logos    host ID aeace675{warn}\n          \
                       ontos    host ID 07602ecc{warn}\n          \
                       pneuma   host ID 34fbd94b{warn}\n\
             other:    install  host ID derive  (any machine that matches no node)\n\
             root SSH: every node: nobody (no [ssh] github-users or keys)\n\
             warning:  nobody gets root SSH on kos-mos, logos, ontos, pneuma, install: \
             no one can log in to them over SSH; set `[ssh] github-users = [\"YOUR-GITHUB-USER\"]` \
             or `keys = [\"ssh-ed25519 …\"]` in the profile\n\
             write it: nodeflash flash target/nodeflash/alrest.iso   (lists the sticks it accepts; add the device)\n",
            sha = "ab".repeat(32)
        );
        assert_eq!(summary_text(&alrest_summary()), want);
    }

    /// An inline key of a node.
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB/oDvZDOvsIcO07yOuLxZOeQQ78UJh0NTARK7EMiUtz me@laptop";

    #[test]
    fn summary_names_who_gets_root_ssh_per_node_with_fingerprints() {
        let text = include_str!("../../profiles/alrest.toml")
            .replace("github-users = []", "github-users = [\"alice\"]")
            .replace(
                "hostid = \"aeace675\"\n",
                &format!("hostid = \"aeace675\"\nkeys = [\"{KEY}\"]\n"),
            );
        let profile = Profile::parse(&text, "alrest.toml").expect("parses");
        let (nodes, default_node) = NodeSummary::of(&profile);
        assert!(node_warnings(&nodes, default_node.as_ref()).is_empty());
        let mut s = alrest_summary();
        s.nodes = nodes;
        s.default_node = default_node;
        s.warnings.clear();
        // `ssh-keygen -lf` of KEY.
        let fp = "SHA256:xWzAJybFebxdhfHdF12q1D4VL0DSM/kBS5LmZIRqXt4";
        let got = summary_text(&s);
        let want = format!(
            "root SSH: kos-mos, ontos, pneuma, install:\n\
             \x20           GitHub user alice: the keys https://github.com/alice.keys lists when the node installs\n\
             \x20         logos:\n\
             \x20           GitHub user alice: the keys https://github.com/alice.keys lists when the node installs\n\
             \x20           ssh-ed25519 {fp} me@laptop\n\
             write it:"
        );
        assert!(got.contains(&want), "{want}\nnot in\n{got}");
        assert!(!got.contains("warning:"), "{got}");
        // The JSON (and `<profile>.json`) says the same per node.
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["nodes"][1]["root_ssh"]["keys"][0]["fingerprint"], fp);
        assert_eq!(json["nodes"][0]["root_ssh"]["github_users"][0], "alice");
        assert_eq!(
            json["default_node"]["root_ssh"]["key_urls"][0],
            "https://github.com/alice.keys"
        );
        assert_eq!(json["boot"]["bootable"], false);
    }

    #[test]
    fn a_node_with_keys_of_its_own_is_not_warned_about() {
        let text = include_str!("../../profiles/alrest.toml").replace(
            "hostid = \"aeace675\"\n",
            &format!("hostid = \"aeace675\"\nkeys = [\"{KEY}\"]\n"),
        );
        let profile = Profile::parse(&text, "alrest.toml").expect("parses");
        let (nodes, default_node) = NodeSummary::of(&profile);
        let w = node_warnings(&nodes, default_node.as_ref());
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("nobody gets root SSH on kos-mos, ontos, pneuma, install:"),
            "{w:?}"
        );
    }

    #[test]
    fn what_people_type_is_accepted() {
        for args in [
            &["nodeflash", "facts", "--json"][..],
            &["nodeflash", "profile", "check", "alrest"],
            &["nodeflash", "profile", "check", "./a.toml", "b", "--json"],
        ] {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?} is refused: {e}");
            }
        }
    }

    #[test]
    fn boot_line_names_what_boots() {
        let qemu = Profile::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/qemu.toml"),
        )
        .expect("qemu profile");
        let b = BootSummary::of(&qemu);
        assert!(b.bootable);
        assert!(
            b.what
                .starts_with("systemd-boot, with nodeflash's check system"),
            "{b:?}"
        );
        let nixos = Profile::parse(
            &include_str!("../../profiles/alrest.toml").replace(
                "[finish]",
                "[payload]\nclosure = \"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-x\"\n\
                 [boot]\nsystem = \"nixos\"\n[finish]",
            ),
            "alrest.toml",
        )
        .expect("parses");
        let b = BootSummary::of(&nixos);
        assert!(b.bootable);
        assert!(
            b.what.starts_with("the NixOS system aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-x, whose own boot loader"),
            "{b:?}"
        );
        let flake = Profile::parse(
            &include_str!("../../profiles/alrest.toml").replace(
                "[finish]",
                "[payload]\nflake = \"../cluster\"\n[boot]\nsystem = \"nixos\"\n[finish]",
            ),
            "alrest.toml",
        )
        .expect("parses");
        let b = BootSummary::of(&flake);
        assert!(
            b.what
                .starts_with("each node's own NixOS system from the flake"),
            "{b:?}"
        );
    }

    #[test]
    fn summary_with_a_payload_recognised_nodes_and_no_default_node() {
        let mut s = alrest_summary();
        s.payload = Some(nodeflash_installer::image::PayloadInfo {
            path: "/nodeflash/store.nfp".into(),
            bytes: 300 * MIB,
            manifest_sha256: "cd".repeat(32),
            files: 40_000,
            store_bytes: 1024 * MIB,
            systems: Default::default(),
            default_system: None,
        });
        s.nodes.truncate(1);
        s.nodes[0].recognisable = true;
        s.default_node = None;
        let text = summary_text(&s);
        for want in [
            "payload:  300.0 MiB packed from 40000 files, 1024.0 MiB (manifest cdcdcdcdcdcd)\n",
            "nodes:    kos-mos  host ID 472479d4\n",
            "other:    refused (`[default-node] install = false`)\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
