//! The build host's Nix: building the nodes' systems from a flake, and
//! listing closures with their registration.
//!
//! Commands as in Nix's manual: `nix build --json --no-link` (experimental
//! features `nix-command flakes`), `nix-store --query --requisites` and
//! `nix-store --dump-db` (the `--load-db` format: per path its name, NAR
//! hash, NAR size, deriver, number of references and the references).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;

/// The experimental features the flake commands need (Nix 2.8 and later).
const FEATURES: &str = "nix-command flakes";

/// A flake given in a profile as a flake reference: a path (`.`-, `/`- or
/// `~`-less words containing no `:`) is resolved against the profile's
/// directory; anything else (`github:…`, `git+https://…`) is passed on.
pub fn flake_ref(flake: &str, profile_dir: &Path) -> Result<String> {
    if flake.contains(':') {
        return Ok(flake.to_string());
    }
    let path = profile_dir.join(flake);
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot find the flake {}", path.display()))?;
    Ok(path.display().to_string())
}

/// The output paths of `attrs` of `flake` (`/nix/store/…`, in the order of
/// `attrs`), built with `nix build --json --no-link`. Nix 2.8 has no
/// `--print-out-paths`; its `--json` gives `[{"outputs":{"out":PATH}}]`.
pub fn build(flake: &str, attrs: &[String]) -> Result<Vec<String>> {
    let installables: Vec<String> = attrs.iter().map(|a| format!("{flake}#{a}")).collect();
    let out = cmd::run(
        Command::new("nix")
            .args(["--extra-experimental-features", FEATURES])
            .args(["build", "--no-link", "--json"])
            .args(&installables),
    )
    .with_context(|| {
        format!(
            "cannot build {} with Nix (package nix-bin)",
            installables.join(" ")
        )
    })?;
    out_paths(&out, attrs.len())
}

/// The `out` paths of `nix build --json` output, one per installable.
pub fn out_paths(json: &str, want: usize) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .context("cannot parse the output of `nix build --json`")?;
    let paths: Vec<String> = v
        .as_array()
        .context("`nix build --json` did not print a list")?
        .iter()
        .map(|b| {
            b["outputs"]["out"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("`nix build --json` gave no `out` output: {b}"))
        })
        .collect::<Result<_>>()?;
    if paths.len() != want {
        bail!(
            "`nix build --json` printed {} results for {want} installables",
            paths.len()
        );
    }
    Ok(paths)
}

fn nix_store(args: &[&str], what: &str) -> Result<String> {
    nix_store_with("nix-store", args, what)
}

/// [`nix_store`] with the program named (tests give one that is missing,
/// or one that fails). The error says which of the two happened: no Nix on
/// the build host, or a path this host's Nix does not know.
fn nix_store_with(program: &str, args: &[&str], what: &str) -> Result<String> {
    cmd::run(Command::new(program).args(args)).with_context(|| {
        if crate::tools::missing_packages(&[(program, "nix-bin")]).is_empty() {
            format!(
                "cannot list {what}: `{program}` refuses it; is it a store path that exists on \
                 this host (built here, e.g. `readlink -f result` after `nix build`)?"
            )
        } else {
            format!(
                "cannot list {what}: a Nix closure needs Nix on the build host (package nix-bin), \
                 or copy the closure as a directory and give `store = DIR`, `registration` and \
                 `[boot] toplevel` (docs/flake.md)"
            )
        }
    })
}

/// The closure of `tops` (`/nix/store/…` paths): the union of their
/// requisites, as sorted store path names (`HASH-NAME`).
pub fn closure(tops: &[String]) -> Result<Vec<String>> {
    let mut args = vec!["--query", "--requisites"];
    args.extend(tops.iter().map(String::as_str));
    let out = nix_store(&args, &format!("the closure of {}", tops.join(" ")))?;
    let mut paths: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("/nix/store/"))
        .map(str::to_string)
        .collect();
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// `nix-store --dump-db` of store path names: their registration (NAR
/// hash, size, deriver, references) as the build host's Nix has it.
pub fn registration(paths: &[String]) -> Result<String> {
    let full: Vec<String> = paths.iter().map(|p| format!("/nix/store/{p}")).collect();
    let mut args = vec!["--dump-db"];
    args.extend(full.iter().map(String::as_str));
    nix_store(&args, "the registration of the closure")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closure_without_nix_and_a_path_nix_refuses_are_told_apart() {
        let top = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-x";
        let closure_with = |program: &str| nix_store_with(program, &["-qR", top], top);
        let e = format!(
            "{:#}",
            closure_with("nodeflash-no-such-nix-store").expect_err("fails")
        );
        assert!(e.contains("needs Nix on the build host"), "{e}");
        assert!(e.contains("[boot] toplevel"), "{e}");
        // `false` is there and fails, as nix-store does on a path it does not know.
        let e = format!("{:#}", closure_with("false").expect_err("fails"));
        assert!(!e.contains("needs Nix"), "{e}");
        assert!(
            e.contains("`false` refuses it; is it a store path that exists on this host"),
            "{e}"
        );
    }

    #[test]
    fn out_paths_of_nix_build_json() {
        let json = r#"[{"drvPath":"/nix/store/a-x.drv","outputs":{"out":"/nix/store/b-x"}},
                       {"drvPath":"/nix/store/c-y.drv","outputs":{"out":"/nix/store/d-y"}}]"#;
        assert_eq!(
            out_paths(json, 2).expect("parses"),
            ["/nix/store/b-x", "/nix/store/d-y"]
        );
        assert!(out_paths(json, 3).is_err());
        assert!(out_paths(r#"[{"outputs":{}}]"#, 1).is_err());
    }

    #[test]
    fn flake_refs_and_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("flake")).expect("mkdir");
        assert_eq!(
            flake_ref("github:o/r", dir.path()).expect("ref"),
            "github:o/r"
        );
        let p = flake_ref("flake", dir.path()).expect("path");
        assert!(p.starts_with('/') && p.ends_with("/flake"), "{p}");
        assert!(flake_ref("missing", dir.path()).is_err());
    }
}
