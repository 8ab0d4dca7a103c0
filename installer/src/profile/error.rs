//! Profile errors: the public [`ProfileError`] (file, line, column, key,
//! message), the [`Problem`] a validation rule returns, and how a problem's
//! key is found in the source when serde recorded no span for it.

use std::fmt;
use std::ops::Range;

use super::Profile;

/// A profile error with its place in the file.
#[derive(Debug)]
pub struct ProfileError {
    /// The file name as given to [`Profile::parse`].
    pub file: String,
    /// 1-based line of the value or key at fault (1 when unknown).
    pub line: usize,
    /// 1-based column, in bytes, on that line (1 when unknown).
    pub column: usize,
    /// The dotted key at fault (`pool.datasets[0].name`); empty for the
    /// file as a whole (a TOML syntax error).
    pub key: String,
    /// What is wrong (and, for a missing key, what to write).
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProfileError {}

impl ProfileError {
    /// An error at `span` of `src` (1:1 without a span).
    fn new(
        src: &str,
        file: &str,
        span: Option<Range<usize>>,
        key: String,
        message: String,
    ) -> Self {
        let (line, column) = span.map_or((1, 1), |s| line_col(src, s.start));
        ProfileError {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    }

    /// A TOML syntax or serde error (unknown key, bad value, missing key):
    /// its path as the dotted key, its span as the place, and for a missing
    /// key what to write instead ([`explain_missing`]).
    pub(super) fn from_toml(
        src: &str,
        file: &str,
        e: serde_path_to_error::Error<toml::de::Error>,
    ) -> Self {
        let key = e.path().to_string();
        let inner = e.into_inner();
        // `Spanned` values add a private path component.
        let key = key.replace(".$__serde_spanned_private_value", "");
        let key = if key == "." { String::new() } else { key };
        let raw = inner.message().trim();
        let message = explain_missing(&key, raw);
        // A missing key is named like any other: `disk`, `disk.select`.
        let key = match raw
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            Some(field) if key.is_empty() => field.to_string(),
            Some(field) => format!("{key}.{field}"),
            None => key,
        };
        Self::new(src, file, inner.span(), key, message)
    }

    /// A validation problem of `profile`, parsed from `src`, placed in the
    /// source: at its span; else where its key is written ([`find_key`]),
    /// looked for from its `[[pools]]` table, or its `[[pools.datasets]]` /
    /// `[[pool.datasets]]` table, on; else at that table (a key left out, a
    /// default); else at 1:1.
    pub(super) fn from_problem(src: &str, file: &str, profile: &Profile, p: Problem) -> Self {
        let Problem { span, key, message } = p;
        // A key of `[[pools]]` N is looked for from that table on, one
        // of its `datasets` N from that one on.
        let index = |k: &str, prefix: &str| -> Option<(usize, String)> {
            let rest = k.strip_prefix(prefix)?;
            let (n, rest) = rest.split_once(']')?;
            Some((n.parse().ok()?, rest.trim_start_matches('.').to_string()))
        };
        let (pool, rest, table_from) = match index(&key, "pools[") {
            Some((n, rest)) => (
                profile.pools.get(n),
                rest,
                src.match_indices("[[pools]]")
                    .nth(n)
                    .map_or(0, |(at, _)| at),
            ),
            None => (
                Some(&profile.pool),
                key.strip_prefix("pool.").unwrap_or_default().to_string(),
                0,
            ),
        };
        let from = index(&rest, "datasets[")
            .and_then(|(i, _)| pool?.datasets.get(i))
            .map_or(table_from, |d| {
                let at = d.name.span().start;
                src[..at].rfind("[[").unwrap_or(at)
            });
        // A key left out (a default) is shown at its table.
        let span = span
            .or_else(|| find_key(&src[from..], &key).map(|r| r.start + from..r.end + from))
            .or((from > 0).then_some(from..from));
        Self::new(src, file, span, key, message)
    }
}

/// A problem one validation rule found: the dotted key at fault (`pool.vdev`,
/// `nodes[0].disk.max-size`), the message, and the span of the value in the
/// source when the rule knows it (a `Spanned` field). Without a span the key
/// is looked for in the source ([`ProfileError::from_problem`]).
#[derive(Debug)]
pub(super) struct Problem {
    pub(super) span: Option<Range<usize>>,
    pub(super) key: String,
    pub(super) message: String,
}

impl Problem {
    /// A problem at `key`, with no span yet.
    pub(super) fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            span: None,
            key: key.into(),
            message: message.into(),
        }
    }

    /// The same problem at this place in the source (a `Range` or an
    /// `Option` of one).
    pub(super) fn spanned(self, span: impl Into<Option<Range<usize>>>) -> Self {
        Self {
            span: span.into(),
            ..self
        }
    }

    /// The same problem with its key below `prefix`: a rule of a part
    /// (`DiskSelect`, `Ssh`) gives `.device`, its caller `disk.select`.
    pub(super) fn under(self, prefix: &str) -> Self {
        Self {
            key: format!("{prefix}{}", self.key),
            ..self
        }
    }
}

/// Where a key without a recorded span is written: the first line that
/// assigns its last component (`compresion = …` or `compresion=` in a table).
fn find_key(src: &str, key: &str) -> Option<Range<usize>> {
    let last = key.rsplit('.').next()?.split('[').next()?;
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let code = line.split('#').next().unwrap_or("");
        for (i, _) in code.match_indices(last) {
            let before = code[..i].chars().next_back();
            let after = code[i + last.len()..].trim_start();
            let starts =
                before.is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '\t' || c == '"');
            // A quoted key (`"feature@x" = …`) ends with its quote and `=`;
            // a quoted value that happens to be the key's name does not.
            let quoted = after
                .strip_prefix('"')
                .is_some_and(|a| a.trim_start().starts_with('='));
            if starts && (after.starts_with('=') || quoted) {
                return Some(offset + i..offset + i + last.len());
            }
        }
        offset += line.len();
    }
    None
}

/// serde's "missing field `x`" with what to write instead, for the
/// sections and keys that have no default.
fn explain_missing(key: &str, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'))
    else {
        return message.to_string();
    };
    match (key, field) {
        ("", "disk") => "the profile has no [disk] section: add one with `select = { … }`, the \
                         rules that choose the disk to install on (it has no default, because \
                         that disk is wiped; see docs/profile.md)"
            .into(),
        ("disk", "select") => {
            "[disk] has no `select`: give the rules that choose the disk to \
                               install on, e.g. `select = { serial = \"…\" }` (see docs/profile.md)"
                .into()
        }
        ("", "name") => "the profile has no `name` (lowercase letters, digits, `-`)".into(),
        _ => format!("`{field}` is required here"),
    }
}

/// The 1-based line and column (in bytes) of `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::super::tests::err;
    use super::super::*;
    use super::*;

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let e =
            err("name = \"t\"\n[disk]\nselect = { serial = \"S1\" }\nwipes = \"always\"\n[pool]\n");
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("unknown field `wipes`"), "{e}");
        assert!(e.to_string().starts_with("t.toml:4:1: "), "{e}");
    }

    #[test]
    fn sections_with_defaults_may_be_left_out_and_disk_is_named() {
        // docs/profile.md gives a default for every [pool] key.
        let p = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"S1\" }\n",
            "t.toml",
        )
        .expect("no [pool]");
        assert_eq!(p.pool.name.0, "rpool");
        assert!(p.pool.datasets.is_empty());
        let e = err("name = \"t\"\n[pool]\n");
        assert!(e.to_string().starts_with("t.toml:1:1: `disk`: "), "{e}");
        assert!(e.message.contains("no [disk] section"), "{e}");
        let e = err("name = \"t\"\n[disk]\nwipe = \"always\"\n");
        assert!(e.message.contains("[disk] has no `select`"), "{e}");
        assert_eq!(e.key, "disk.select", "{e}");
    }

    #[test]
    fn toml_syntax_error_has_position() {
        let e = err("name = \"t\"\n[disk\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn a_key_without_a_span_is_found_where_it_is_assigned() {
        let at = |src: &str, key: &str| find_key(src, key).map(|r| line_col(src, r.start));
        let src = "[pool]\n# compresion = \"x\"\nname = \"compresion\"\nroot-options = { atime = \"on\", compresion = \"lz4\" }\n";
        // Not in the comment, not the value that happens to be the key's name.
        assert_eq!(at(src, "pool.root-options.compresion"), Some((4, 32)));
        // A quoted key, and an index dropped from the last component.
        let src = "[pool]\noptions = { \"feature@x\" = \"enabled\" }\n";
        assert_eq!(at(src, "pool.options.feature@x"), Some((2, 14)));
        let src = "[disk]\nselect = { serial = \"A\" }\nmembers = [ { } ]\n";
        assert_eq!(at(src, "disk.members[0]"), Some((3, 1)));
        assert_eq!(at(src, "disk.wipe"), None);
        // Columns count from 1; an offset past the end is the end.
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\ncd", 99), (2, 3));
    }
}
