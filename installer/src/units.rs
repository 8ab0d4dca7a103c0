//! Byte units, in one place: sizes are printed in binary units (MiB,
//! 2^20 bytes; [`human_bytes`] picks B to TiB), throughputs of the install
//! and the payload in MB/s (10^6 bytes a second, as `dd` and the install
//! report print them; the tests read those figures) and the flash's in
//! binary units a second ([`human_rate`]). Each label is computed by the
//! function named after it, so a figure and its unit cannot drift apart.

use std::time::Duration;

/// One mebibyte, 2^20 bytes.
pub const MIB: u64 = 1 << 20;

/// One megabyte, 10^6 bytes (the unit of MB and MB/s).
pub const MB: u64 = 1_000_000;

/// `bytes` in MiB (2^20), for `{:.1} MiB`.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// `bytes` in MB (10^6), for `{:.1} MB`.
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB as f64
}

/// Throughput in MB/s (10^6 bytes a second) of `bytes` moved in `secs`
/// seconds; a zero duration counts as a microsecond.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-6) / MB as f64
}

/// `1.0 TiB`, `512.0 MiB`, `12 B`: a size for people, in binary units.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `35.2 MiB/s`: `bytes` moved in `took`, in [`human_bytes`]'s units a
/// second; a zero duration counts as a microsecond.
pub fn human_rate(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(1e-6);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_what_they_say() {
        assert_eq!(mib(3 * MIB / 2), 1.5);
        assert_eq!(mb(2_500_000), 2.5);
        assert_eq!(mb_per_s(10_000_000, 2.0), 5.0);
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(512 * MIB), "512.0 MiB");
        assert_eq!(human_bytes(1 << 40), "1.0 TiB");
        assert_eq!(human_rate(70 * MIB, Duration::from_secs(2)), "35.0 MiB/s");
    }
}
