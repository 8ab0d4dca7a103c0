//! Step lines with durations on the build host (`==> Fetching inputs`),
//! and a spinner with the elapsed time under the long ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use nodeflash_installer::progress::{Output, Progress};

static QUIET: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);
/// The spinner of the long step under way, which notes print above.
static SPINNER: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

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
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    line(&format!("    {msg}"));
}

/// One line on stderr, above the spinner of a long step when one runs (a
/// step of another thread may print while it does).
fn line(msg: &str) {
    match SPINNER.lock().ok().as_deref().and_then(Option::as_ref) {
        Some(bar) => bar.suspend(|| eprintln!("{msg}")),
        None => eprintln!("{msg}"),
    }
}

/// Runs one named step and prints its duration.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let quiet = QUIET.load(Ordering::Relaxed);
    if !quiet {
        line(&format!("==> {name}"));
    }
    let t = Instant::now();
    let r = f();
    if !quiet && r.is_ok() {
        line(&format!(
            "    {name}: done in {:.1}s",
            t.elapsed().as_secs_f64()
        ));
    }
    r
}

/// A step that can take minutes: as [`step`], with a spinner and the
/// elapsed time while it runs when stderr is a terminal (not with `-v`,
/// whose command lines would break it, nor `-q`).
pub fn long_step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    step(name, || {
        let out = match verbose() {
            true => Output::Silent,
            false => Output::stderr(quiet()),
        };
        let spinner = Progress::spinner(name, out);
        if let (Some(bar), Ok(mut s)) = (spinner.bar(), SPINNER.lock()) {
            *s = Some(bar.clone());
        }
        let r = f();
        if let Ok(mut s) = SPINNER.lock() {
            *s = None;
        }
        spinner.finish();
        r
    })
}
