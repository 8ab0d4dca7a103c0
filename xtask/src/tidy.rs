//! Checks on the tree itself, as rust-analyzer's `xtask/src/tidy.rs` does.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask sits in the workspace")
            .to_path_buf()
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            if path.is_dir() {
                if name != "target" && name != "fixtures" && name != "snapshots" {
                    rust_files(&path, out);
                }
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }

    /// Every source file, by its file name, a path ending in it, or its module
    /// name in backticks (`dhcp.rs`, `src/scan.rs`, `e2e`), is named in ARCHITECTURE.md's code map; `lib.rs`,
    /// `main.rs` and `mod.rs` by their directory (`flash/`, or the crate's).
    #[test]
    fn every_source_file_is_in_the_code_map() {
        let root = root();
        let text = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md is readable");
        let map = text
            .split_once("## Code map")
            .and_then(|(_, rest)| rest.split("\n## ").next())
            .expect("ARCHITECTURE.md has a code map");
        let mut files = Vec::new();
        for dir in ["installer", "builder", "xtask", "tests", "fuzz"] {
            rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 50, "the walk found the sources");
        let mut missing = Vec::new();
        for f in &files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let named = match name {
                "lib.rs" | "main.rs" | "mod.rs" => {
                    // Named by its directory: `flash/` for flash/mod.rs, the
                    // crate (`builder/`) for src/lib.rs and src/main.rs.
                    let parent = f.parent().unwrap_or(&root);
                    let dir = if parent.file_name().is_some_and(|n| n == "src") {
                        parent.parent().unwrap_or(&root)
                    } else {
                        parent
                    };
                    let dir = dir.file_name().unwrap_or_default().to_string_lossy();
                    map.contains(&format!("`{dir}/"))
                }
                _ => {
                    let stem = name.trim_end_matches(".rs");
                    [
                        format!("`{name}`"),
                        format!("/{name}`"),
                        format!("`{stem}`"),
                    ]
                    .iter()
                    .any(|n| map.contains(n.as_str()))
                }
            };
            if !named {
                missing.push(f.strip_prefix(&root).unwrap_or(f).display().to_string());
            }
        }
        assert!(
            missing.is_empty(),
            "not named in ARCHITECTURE.md's code map: {missing:?}"
        );
    }
}
