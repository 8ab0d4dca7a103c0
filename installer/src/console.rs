//! Everything the installer says goes to every active console (the screen a
//! person watches and the serial port the tests read) and into an in-memory
//! log that can be printed again or saved.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct State {
    outputs: Vec<File>,
    log: Vec<String>,
    /// When the last line was said.
    last: Option<Instant>,
}

static STATE: Mutex<State> = Mutex::new(State {
    outputs: Vec::new(),
    log: Vec::new(),
    last: None,
});

/// Opens every console the kernel lists as active (`console=` on the command
/// line), falling back to `/dev/console`. Without any (on a build host), lines
/// go to stderr.
pub fn open() {
    let mut outputs = Vec::new();
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    for name in active.split_whitespace() {
        let path = format!("/dev/{name}");
        if let Ok(f) = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(&path)
        {
            outputs.push(f);
        }
    }
    if outputs.is_empty() {
        if let Ok(f) = OpenOptions::new().write(true).open("/dev/console") {
            outputs.push(f);
        }
    }
    if let Ok(mut s) = STATE.lock() {
        s.outputs = outputs;
    }
}

/// Prints one or more lines on every console.
pub fn say(text: &str) {
    let Ok(mut s) = STATE.lock() else { return };
    s.last = Some(Instant::now());
    for line in text.lines() {
        s.log.push(line.to_string());
    }
    let mut bytes = text.as_bytes().to_vec();
    if !text.ends_with('\n') {
        bytes.push(b'\n');
    }
    if s.outputs.is_empty() {
        let _ = std::io::stderr().write_all(&bytes);
    }
    for out in &mut s.outputs {
        let _ = out.write_all(&bytes);
    }
}

/// Watches for a stall: when nothing has been said for `after`, asks the
/// kernel for the stacks of every blocked (D state) task (SysRq `w`, written
/// to `/proc/sysrq-trigger`, which works whatever `kernel.sysrq` allows;
/// see the kernel's admin-guide/sysrq.rst) and prints them on every console
/// as `kernel: …` lines, taken from `/dev/kmsg`. The kernel's own console
/// output is not used: with `quiet` it hides the stacks, and its lines
/// would cut into ours. At most `reports` times per boot.
pub fn watch_for_stalls(after: Duration, reports: usize) {
    WATCHING.store(true, Ordering::Relaxed);
    std::thread::spawn(move || {
        let mut left = reports;
        while left > 0 && WATCHING.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(5));
            let silent = WATCHING.load(Ordering::Relaxed)
                && STATE
                    .lock()
                    .ok()
                    .and_then(|s| s.last)
                    .is_some_and(|l| l.elapsed() >= after);
            if silent {
                left -= 1;
                report_stall(after);
            }
        }
    });
}

/// Ends [`watch_for_stalls`]: the silence that follows is on purpose (a
/// halt after the outcome was printed).
pub fn stop_watching() {
    WATCHING.store(false, Ordering::Relaxed);
}

static WATCHING: AtomicBool = AtomicBool::new(false);

fn report_stall(after: Duration) {
    use std::io::Read;
    say(&format!(
        "stall: nothing happened for {} s; the kernel's blocked tasks follow",
        after.as_secs()
    ));
    let kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg");
    let mut kmsg = match kmsg {
        Ok(k) => k,
        Err(e) => return say(&format!("stall: cannot open /dev/kmsg: {e}")),
    };
    // One record per read: "PRIORITY,SEQ,USEC,FLAGS;TEXT", then
    // " KEY=VALUE" lines (Documentation/ABI/testing/dev-kmsg).
    let mut buf = vec![0u8; 8192];
    let mut next = |kmsg: &mut File| -> Option<(u8, String)> {
        let n = kmsg.read(&mut buf).ok()?;
        let record = String::from_utf8_lossy(&buf[..n]);
        let (head, text) = record.lines().next()?.split_once(';')?;
        let level = head.split(',').next()?.parse::<u32>().ok()? & 7;
        Some((level as u8, text.to_string()))
    };
    // What the kernel warned about before (hidden by `quiet`), e.g. an
    // NVMe command timing out: the last 40 warnings or worse.
    let mut earlier = std::collections::VecDeque::new();
    while let Some((level, text)) = next(&mut kmsg) {
        if level <= 4 {
            earlier.push_back(text);
            if earlier.len() > 40 {
                earlier.pop_front();
            }
        }
    }
    for text in earlier {
        say(&format!("kernel (earlier): {text}"));
    }
    if let Err(e) = std::fs::write("/proc/sysrq-trigger", "w") {
        return say(&format!("stall: cannot write /proc/sysrq-trigger: {e}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..2000 {
        let Some((_, text)) = next(&mut kmsg) else {
            break;
        };
        say(&format!("kernel: {text}"));
    }
    say("stall: end of the kernel's report");
}

/// Everything said so far.
pub fn log() -> Vec<String> {
    STATE.lock().map(|s| s.log.clone()).unwrap_or_default()
}

/// `say!` formats like `format!` and prints on every console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::say(&format!($($arg)*)) };
}
