//! README's two commands. `cargo xtask test` runs README's build command as
//! it is written, so a README edit that breaks the command breaks CI.

use anyhow::{bail, Result};

/// The heading of the block that holds the two commands.
pub const HEADING: &str = "## The two commands";

/// The commands of the first fenced block under [`HEADING`], split into
/// words, without their comments: exactly two, the build and the test
/// command. They run without a shell, so shell syntax is refused.
pub fn two_commands(readme: &str) -> Result<[Vec<String>; 2]> {
    let Some(start) = readme.lines().position(|l| l.trim_end() == HEADING) else {
        bail!("README.md has no `{HEADING}` heading");
    };
    let mut lines = readme.lines().skip(start + 1);
    if !lines
        .by_ref()
        .take_while(|l| !l.starts_with("## "))
        .any(|l| l.starts_with("```"))
    {
        bail!("README.md has no fenced code block under `{HEADING}`");
    }
    let mut commands = Vec::new();
    let mut closed = false;
    for line in lines {
        if line.starts_with("```") {
            closed = true;
            break;
        }
        let command = line.split_once('#').map_or(line, |(c, _)| c).trim();
        if command.is_empty() {
            continue;
        }
        if let Some(c) = command.chars().find(|c| "|&;<>()$`\\\"'*?~".contains(*c)) {
            bail!("README.md's `{command}` has shell syntax ({c:?}); `cargo xtask test` runs it without a shell");
        }
        commands.push(command.split_whitespace().map(str::to_string).collect());
    }
    if !closed {
        bail!("README.md's code block under `{HEADING}` is not closed");
    }
    match <[Vec<String>; 2]>::try_from(commands) {
        Ok(two) => Ok(two),
        Err(c) => bail!(
            "README.md has {} commands under `{HEADING}`, not two (build, test)",
            c.len()
        ),
    }
}

/// The arguments after `cargo xtask` of a command, if it is one.
pub fn xtask_args(command: &[String]) -> Option<&[String]> {
    match command {
        [cargo, xtask, rest @ ..] if cargo == "cargo" && xtask == "xtask" => Some(rest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn reads_the_block_under_the_heading() {
        let md = "# x\n\n## The two commands\n\nOn Debian:\n\n```sh\n\
                  cargo xtask build-iso --profile alrest   # → the ISO\n\
                  \n# a comment line\ncargo xtask test\n```\n\n## Next\n```sh\nrm -rf /\n```\n";
        let [build, test] = two_commands(md).expect("two commands");
        assert_eq!(build, words("cargo xtask build-iso --profile alrest"));
        assert_eq!(test, words("cargo xtask test"));
        assert_eq!(
            xtask_args(&build),
            Some(&words("build-iso --profile alrest")[..])
        );
        assert_eq!(xtask_args(&words("make test")), None);
    }

    #[test]
    fn refuses_what_it_cannot_run_as_written() {
        let block = |body: &str| format!("## The two commands\n\n```sh\n{body}```\n");
        for (md, want) in [
            ("no heading".to_string(), "no `## The two commands` heading"),
            (
                "## The two commands\n\ntext\n## Other\n```sh\ncargo xtask test\n```\n".into(),
                "no fenced code block",
            ),
            (block("cargo xtask test\n"), "1 commands"),
            (
                block("cargo xtask build-iso\ncargo xtask test\nmake\n"),
                "3 commands",
            ),
            (
                block("cargo xtask build-iso > log\ncargo xtask test\n"),
                "shell syntax ('>')",
            ),
            (
                "## The two commands\n```sh\ncargo xtask test\n".into(),
                "not closed",
            ),
        ] {
            let err = two_commands(&md).expect_err(want).to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
