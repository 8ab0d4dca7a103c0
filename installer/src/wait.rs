//! The one polling loop: devices, links and pools appear in their own time,
//! and there is no udev to tell.

use std::time::{Duration, Instant};

/// Calls `poll` at once, then every `every` until it returns `Some` or
/// `timeout` has passed since the call; returns that value, or `None` at the
/// deadline (after one last poll). `poll` errors are the caller's to carry in
/// its `T` (for example `Option<Result<…>>` or a value that says what is
/// still missing).
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut poll: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = poll() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_ready_or_the_deadline() {
        let mut n = 0;
        let got = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, Some(3));
        let started = Instant::now();
        let mut polls = 0;
        let none: Option<()> =
            wait_until(Duration::from_millis(50), Duration::from_millis(10), || {
                polls += 1;
                None
            });
        assert!(none.is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!((3..=7).contains(&polls), "{polls} polls");
        // A zero timeout still polls once.
        assert_eq!(
            wait_until(Duration::ZERO, Duration::ZERO, || Some(1)),
            Some(1)
        );
    }
}
