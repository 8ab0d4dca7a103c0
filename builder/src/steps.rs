//! Step lines with durations on the build host (`==> Fetching inputs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;

static QUIET: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Quiet hides step lines; verbose also shows every command that is run.
pub fn configure(quiet: bool, verbose: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    VERBOSE.store(verbose, Ordering::Relaxed);
    if verbose {
        nodeflash_installer::cmd::set_logger(|line| eprintln!("    {line}"));
    }
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Prints a note under the current step.
pub fn note(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("    {msg}");
    }
}

/// Runs one named step and prints its duration.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let quiet = QUIET.load(Ordering::Relaxed);
    if !quiet {
        eprintln!("==> {name}");
    }
    let t = Instant::now();
    let r = f();
    if !quiet && r.is_ok() {
        eprintln!("    {name}: done in {:.1}s", t.elapsed().as_secs_f64());
    }
    r
}
