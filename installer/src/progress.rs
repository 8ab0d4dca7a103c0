//! Progress of a long copy or step, one type for every one of them (the
//! builder's steps, `nodeflash flash`, the payload packer, the installer's
//! checks and copy). It knows a terminal from a log, as coreos-installer's
//! `ProgressReader` (src/download.rs) does: on a terminal an indicatif bar
//! (or spinner) that is cleared when it ends; on a log (a pipe, a file, the
//! installer's consoles) a plain line every few seconds, and only when the
//! caller gave one; nothing when quiet. The bar needs the feature
//! `terminal` (the builder's); without it a terminal is a log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where progress goes.
#[derive(Clone, Copy, Debug)]
pub enum Output {
    /// A terminal: a bar drawn on stderr.
    #[cfg(feature = "terminal")]
    Terminal,
    /// A log: the caller's plain lines, each printed by this function.
    Log(fn(&str)),
    /// Nothing (quiet, or a bar would break other output).
    Silent,
}

impl Output {
    /// stderr as it is: [`Output::Terminal`] when it is a terminal, else a
    /// log of plain lines on stderr; [`Output::Silent`] when `quiet`.
    pub fn stderr(quiet: bool) -> Self {
        #[cfg(feature = "terminal")]
        use std::io::IsTerminal;
        if quiet {
            return Output::Silent;
        }
        #[cfg(feature = "terminal")]
        if std::io::stderr().is_terminal() {
            return Output::Terminal;
        }
        Output::Log(eprint_line)
    }
}

fn eprint_line(line: &str) {
    eprintln!("{line}");
}

/// A terminal's bar.
#[cfg(feature = "terminal")]
pub type Bar = indicatif::ProgressBar;

/// Without the feature `terminal` there is never a bar.
#[cfg(not(feature = "terminal"))]
#[derive(Clone, Debug)]
pub enum Bar {}

#[cfg(not(feature = "terminal"))]
impl Bar {
    fn set_position(&self, _: u64) {
        match *self {}
    }
    fn finish_and_clear(&self) {
        match *self {}
    }
}

/// A plain progress line from the bytes done and the time since the start.
type LineFn<'a> = Box<dyn Fn(u64, Duration) -> String + Send + Sync + 'a>;

/// One long copy or step under way; the bar is cleared when it is
/// finished or dropped.
pub struct Progress<'a> {
    bar: Option<Bar>,
    log: Option<fn(&str)>,
    line: Option<LineFn<'a>>,
    interval: Duration,
    started: Instant,
    last_line: Instant,
}

/// What a terminal shows.
#[cfg_attr(not(feature = "terminal"), allow(dead_code))]
enum Style {
    /// Bytes done of a total (a byte-counting spinner when it is not known).
    Bytes(Option<u64>),
    /// A spinner with the elapsed time.
    Spinner,
}

impl<'a> Progress<'a> {
    /// A copy of `total` bytes (a spinner that counts bytes when the total
    /// is not known), named `what`.
    pub fn bytes(what: &str, total: Option<u64>, out: Output) -> Self {
        Self::start(out, what, Style::Bytes(total))
    }

    /// A step of unknown length named `what`: on a terminal a spinner with
    /// the elapsed time, ticking by itself.
    pub fn spinner(what: &str, out: Output) -> Self {
        Self::start(out, what, Style::Spinner)
    }

    fn start(out: Output, what: &str, style: Style) -> Self {
        #[cfg(not(feature = "terminal"))]
        let _ = (what, style);
        let now = Instant::now();
        let (bar, log) = match out {
            #[cfg(feature = "terminal")]
            Output::Terminal => (Some(terminal::bar(what, style)), None),
            Output::Log(f) => (None, Some(f)),
            Output::Silent => (None, None),
        };
        Self {
            bar,
            log,
            line: None,
            interval: Duration::from_secs(5),
            started: now,
            last_line: now,
        }
    }

    /// On a log, prints `line(done, elapsed)` at most once `every` period
    /// (the first one `every` after the start); without it a log shows nothing.
    pub fn lines(
        mut self,
        every: Duration,
        line: impl Fn(u64, Duration) -> String + Send + Sync + 'a,
    ) -> Self {
        self.interval = every;
        self.line = Some(Box::new(line));
        self
    }

    /// The terminal's bar, if there is one (to print notes above it).
    pub fn bar(&self) -> Option<&Bar> {
        self.bar.as_ref()
    }

    /// `done` bytes so far.
    pub fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if let (Some(log), Some(line)) = (self.log, &self.line) {
            if self.last_line.elapsed() >= self.interval {
                self.last_line = Instant::now();
                log(&line(done, self.started.elapsed()));
            }
        }
    }

    /// Runs `f` while a thread reads `done()` every 100 ms and shows it;
    /// returns what `f` returns.
    pub fn watch<T>(&mut self, done: impl Fn() -> u64 + Sync, f: impl FnOnce() -> T) -> T {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    self.set(done());
                }
            });
            let r = f();
            stop.store(true, Ordering::Relaxed);
            r
        })
    }

    /// Clears the bar; returns the time since the start.
    pub fn finish(mut self) -> Duration {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(feature = "terminal")]
mod terminal {
    use super::Style;
    use indicatif::{ProgressBar, ProgressStyle};
    use std::time::Duration;

    /// `{msg} [elapsed] bar done/total rate eta`.
    const BYTES_TEMPLATE: &str =
        "    {msg} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}";

    /// `{spinner} {msg} elapsed`.
    const SPINNER_TEMPLATE: &str = "    {spinner} {msg} {elapsed}";

    /// The bar of `style` named `what`.
    pub fn bar(what: &str, style: Style) -> ProgressBar {
        let bar = match style {
            Style::Bytes(Some(n)) => ProgressBar::new(n),
            Style::Bytes(None) | Style::Spinner => ProgressBar::new_spinner(),
        };
        match style {
            Style::Bytes(_) => bar.set_style(
                ProgressStyle::with_template(BYTES_TEMPLATE)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            Style::Spinner => {
                bar.set_style(
                    ProgressStyle::with_template(SPINNER_TEMPLATE)
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(200));
            }
        }
        bar.set_message(what.to_string());
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn keep(line: &str) {
        if let Ok(mut l) = LINES.lock() {
            l.push(line.to_string());
        }
    }

    #[test]
    fn a_log_gets_plain_lines_at_the_interval_only() {
        let mut p = Progress::bytes("copying", Some(100), Output::Log(keep))
            .lines(Duration::from_millis(50), |done, _| {
                format!("{done} of 100")
            });
        assert!(p.bar().is_none());
        p.set(10);
        std::thread::sleep(Duration::from_millis(60));
        p.set(20);
        p.set(30);
        let n = p.watch(
            || 40,
            || {
                std::thread::sleep(Duration::from_millis(400));
                7
            },
        );
        assert_eq!(n, 7);
        p.finish();
        let lines = LINES.lock().expect("lines").clone();
        assert_eq!(lines.first().map(String::as_str), Some("20 of 100"));
        assert!(!lines.iter().any(|l| l == "10 of 100" || l == "30 of 100"));
        assert!(lines.iter().any(|l| l == "40 of 100"), "{lines:?}");
    }

    #[test]
    fn silent_and_lineless_logs_show_nothing() {
        let mut p = Progress::spinner("step", Output::Silent);
        assert!(p.bar().is_none());
        p.set(1);
        let mut p = Progress::bytes("x", None, Output::Log(|_| panic!("printed")));
        p.set(1);
    }
}
