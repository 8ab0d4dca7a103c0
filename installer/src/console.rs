//! Everything the installer says goes to every active console (the screen a
//! person watches and the serial port the tests read) and into an in-memory
//! log that can be printed again or saved.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

struct State {
    outputs: Vec<File>,
    log: Vec<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    outputs: Vec::new(),
    log: Vec::new(),
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

/// Everything said so far.
pub fn log() -> Vec<String> {
    STATE.lock().map(|s| s.log.clone()).unwrap_or_default()
}

/// `say!` formats like `format!` and prints on every console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::say(&format!($($arg)*)) };
}
