//! The one helper that runs external commands.
//!
//! Every command's argv is logged (to the console in the installer, to stderr
//! with `-v` on the build host), its stdout is returned, and a failure carries
//! the command line, the exit status and the captured stderr.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

static LOGGER: OnceLock<fn(&str)> = OnceLock::new();

/// Sets where command lines are logged (once; later calls are ignored).
pub fn set_logger(log: fn(&str)) {
    let _ = LOGGER.set(log);
}

fn argv(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes `cmd` run with `root` as its root directory (`chroot(2)` and
/// `chdir("/")` in the child, so no `chroot` program is needed); its
/// program is then a path inside `root`.
pub fn in_root<'a>(cmd: &'a mut Command, root: &Path) -> &'a mut Command {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    // Allocated before the fork: the child may only make system calls.
    let root = std::ffi::CString::new(root.as_os_str().as_bytes())
        .unwrap_or_else(|_| c"/nonexistent".to_owned());
    // SAFETY: between fork and exec only async-signal-safe system calls
    // (chroot, chdir) run, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::chroot(root.as_ptr()) != 0 || nix::libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `cmd` to completion and returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    run_with_input(cmd, &[])
}

/// Runs `cmd` with `input` on its stdin and returns its stdout.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<String> {
    use std::io::Write;
    let line = argv(cmd);
    if let Some(log) = LOGGER.get() {
        log(&format!("$ {line}"));
    }
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdin(if input.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let stdin = child.stdin.take();
    let out = std::thread::scope(|s| {
        if let Some(mut stdin) = stdin {
            // Written beside the reads of stdout and stderr, so neither side
            // blocks; a command that exits without reading it fails below.
            s.spawn(move || {
                let _ = stdin.write_all(input);
            });
        }
        child.wait_with_output()
    })
    .with_context(|| format!("cannot run `{line}`"))?;
    let took = started.elapsed();
    if took.as_secs() >= 1 {
        if let Some(log) = LOGGER.get() {
            log(&format!("  ({:.1}s)", took.as_secs_f64()));
        }
    }
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        // Keep the end of long error output: that is where the cause is.
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`{line}` failed ({}){}{}",
            out.status,
            if tail.is_empty() { "" } else { ":\n" },
            tail.join("\n")
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{line}` printed output that is not UTF-8"))
}

/// Runs `cmd` attached to this process's stdin, stdout and stderr (an
/// interactive program such as QEMU with its console on the terminal);
/// fails when it exits unsuccessfully. Its output is not captured: it has
/// already been shown.
pub fn run_attached(cmd: &mut Command) -> Result<()> {
    let line = argv(cmd);
    if let Some(log) = LOGGER.get() {
        log(&format!("$ {line}"));
    }
    let status = cmd
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status}); its messages are above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_argv_status_and_stderr() {
        let err =
            run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c 'echo boom >&2; exit 3'"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn input_reaches_stdin() {
        let out = run_with_input(&mut Command::new("cat"), b"registration\n").expect("cat runs");
        assert_eq!(out, "registration\n");
    }

    #[test]
    fn success_returns_stdout() {
        assert_eq!(
            run(Command::new("echo").arg("hi")).expect("echo runs"),
            "hi\n"
        );
    }

    #[test]
    fn attached_failure_carries_argv_and_status() {
        run_attached(Command::new("true").arg("ok")).expect("true runs");
        let err = run_attached(Command::new("sh").args(["-c", "exit 4"])).expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("sh -c 'exit 4'") && msg.contains("exit status: 4"),
            "{msg}"
        );
    }

    #[test]
    fn missing_program_is_named() {
        let err = run(&mut Command::new("nodeflash-no-such-program")).expect_err("must fail");
        assert!(format!("{err:#}").contains("nodeflash-no-such-program"));
    }
}
