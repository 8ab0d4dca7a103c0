//! The profile parser and its cross-key validation on arbitrary text.
//!
//! Besides "no panic", two properties: an error points inside the text
//! (line and column of a character that exists, or 1:1), and a profile that
//! parses prints (`nodeflash profile show`) as TOML that parses again to the
//! same printed profile.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeflash_installer::profile::Profile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Profile::parse(text, "fuzz.toml") {
        Ok(profile) => {
            let shown = profile.to_toml();
            let again = Profile::parse(&shown, "shown.toml")
                .unwrap_or_else(|e| panic!("the printed profile does not parse: {e}\n{shown}"));
            assert_eq!(again.to_toml(), shown, "printing is not stable");
        }
        Err(e) => {
            let lines = text.split('\n').count().max(1);
            assert!(
                (1..=lines).contains(&e.line) && e.column >= 1,
                "error position {}:{} is outside the text ({lines} lines): {e}",
                e.line,
                e.column
            );
            let line = text.split('\n').nth(e.line - 1).unwrap_or_default();
            assert!(
                e.column <= line.len() + 1,
                "error column {} is past the end of line {} ({} bytes): {e}",
                e.column,
                e.line,
                line.len()
            );
            let _ = e.to_string();
        }
    }
});
