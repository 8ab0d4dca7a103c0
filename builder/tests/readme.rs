//! README's `nodeflash` commands, as written: every `nodeflash …` line of
//! its `sh` code blocks must be valid for the command line (optional parts
//! written `[…]` are left out), and the ones that only read (`--help`,
//! `profile …`) are run from the repository's root and must succeed.
//! README's two `cargo xtask` commands are checked and run by xtask (see
//! `xtask/src/readme.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use nodeflash_builder::cli::Cli;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the builder is in the workspace")
        .to_path_buf()
}

/// The `nodeflash` command lines of the `sh` code blocks of a Markdown
/// text, without comments, split into words.
fn nodeflash_lines(markdown: &str) -> Vec<Vec<String>> {
    let mut in_sh = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        let t = line.trim();
        if let Some(info) = t.strip_prefix("```") {
            in_sh = !in_sh && info == "sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let command = t.split_once(" #").map_or(t, |(c, _)| c).trim();
        if command.starts_with("nodeflash ") || command == "nodeflash" {
            out.push(without_optional(command));
        }
    }
    out
}

/// The words of a command line without its `[…]` parts.
fn without_optional(command: &str) -> Vec<String> {
    let mut depth = 0usize;
    let mut kept = String::new();
    for c in command.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => kept.push(c),
            _ => {}
        }
    }
    kept.split_whitespace().map(str::to_string).collect()
}

/// Whether a command only reads and is quick: run as written.
fn cheap(words: &[String]) -> bool {
    let has = |w: &str| words.iter().any(|x| x == w);
    let shell = words
        .iter()
        .any(|w| w.contains(['|', '>', '<', '&', ';', '$']));
    !shell && (has("--help") || words.get(1).is_some_and(|w| w == "profile"))
}

#[test]
fn the_extraction_reads_sh_blocks_only() {
    let md =
        "```sh\nnodeflash profile check   # all\nnodeflash payload verify x.nfp [DIR] [--jobs N]\n\
              cargo xtask test\n```\n\n```toml\nnodeflash = 1\n```\nnodeflash facts\n";
    assert_eq!(
        nodeflash_lines(md),
        [
            vec!["nodeflash", "profile", "check"],
            vec!["nodeflash", "payload", "verify", "x.nfp"],
        ]
    );
    assert!(cheap(&without_optional("nodeflash profile show alrest")));
    assert!(!cheap(&without_optional("nodeflash facts > node.json")));
    assert!(!cheap(&without_optional("nodeflash flash x.iso /dev/sdX")));
}

#[test]
fn readme_nodeflash_commands_work_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let lines = nodeflash_lines(&readme);
    assert!(lines.len() >= 8, "README's nodeflash commands: {lines:?}");
    let mut ran = 0;
    for words in &lines {
        let line = words.join(" ");
        // Up to a redirection or pipe.
        let args = words
            .iter()
            .take_while(|w| !["|", ">", ">>", "<", "&&", ";"].contains(&w.as_str()));
        let parsed = Cli::try_parse_from(args);
        if let Err(e) = parsed {
            // `--help` stops parsing with this "error".
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp,
                "README's `{line}` is not valid: {e}"
            );
        }
        if cheap(words) {
            let out = Command::new(env!("CARGO_BIN_EXE_nodeflash"))
                .args(&words[1..])
                .current_dir(repo())
                .output()
                .expect("nodeflash runs");
            assert!(
                out.status.success(),
                "README's `{line}` failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 4, "only {ran} of README's commands were run");
}
