//! The URLs nodeflash fetches from (the profile's `key-url`, the payload's
//! `nodeflash.payload=`), checked the same way at build time and on the node.

use ureq::http::Uri;

/// Checks that `url` is an `http://` or `https://` URL with a host and
/// without a user name or password, as the key fetch takes it (the profile's
/// `key-url` is checked with this at build time). The error says what is
/// wrong.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("not an http:// or https:// URL".into());
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        return Err("a user name or password in the URL is not supported".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("no valid host name".into());
    }
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    if port.is_some_and(|p| !p.contains(']') && p.parse::<u16>().is_err()) {
        return Err("not a valid URL (the port is not a number from 0 to 65535)".into());
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for good in [
            "https://github.com/alice.keys",
            "http://10.0.2.2:8080?u=a#frag",
            "https://[fd00::1]:8443/k",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for (bad, want) in [
            ("ftp://x/", "not an http"),
            ("github.com/a", "not a valid URL"),
            ("https://", "not a valid URL"),
            ("https://u:p@h/", "user name or password"),
            ("https://h:99999/", "not a valid URL"),
        ] {
            let e = check_url(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
