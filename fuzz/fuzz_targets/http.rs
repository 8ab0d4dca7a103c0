//! What the key fetch does with what a server sends: the HTTP/1 response
//! parser (status line, headers, `Content-Length`, chunked or to-the-end
//! bodies), the redirect `Location` resolution, and the `authorized_keys`
//! parser on the body.
//!
//! The first byte chooses the entry point: even, a whole response; odd, the
//! rest is a body given straight to the key parser (so the key lines are
//! reached without the HTTP envelope). Properties besides "no panic": a body
//! is never longer than what followed the headers, and every accepted key
//! prints as an `authorized_keys` line that parses back to the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeflash_installer::net::fetch::{parse_response, Url};
use nodeflash_installer::net::keys::{parse_keys, parse_line, KeySet};

const SOURCE: &str = "https://keys.example/alice.keys";

fn keys(body: &[u8]) {
    // `Client::get` refuses a body that is not UTF-8.
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let Ok(keys) = parse_keys(text, SOURCE) else {
        return;
    };
    let mut set = KeySet::default();
    for key in keys {
        let line = key.line();
        let back = parse_line(&line, SOURCE)
            .unwrap_or_else(|e| panic!("the key's own line {line:?} does not parse: {e}"));
        assert_eq!(back, key, "{line:?} does not parse back to the same key");
        let _ = key.fingerprint();
        set.add(key);
    }
    let text = set.authorized_keys();
    let again = parse_keys(&text, SOURCE)
        .unwrap_or_else(|e| panic!("the written authorized_keys does not parse: {e:#}\n{text}"));
    assert_eq!(
        again, set.keys,
        "authorized_keys does not read back\n{text}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        keys(rest);
        return;
    }
    let Ok(resp) = parse_response(rest) else {
        return;
    };
    assert!(resp.body.len() <= rest.len());
    if let Some(location) = resp.header("location") {
        if let Ok(base) = Url::parse(SOURCE) {
            if let Ok(next) = base.join(location) {
                assert!(next.path.starts_with('/'), "{next:?}");
            }
        }
        if let Ok(url) = Url::parse(location) {
            assert!(url.path.starts_with('/') && !url.host.is_empty(), "{url:?}");
        }
    }
    if (200..300).contains(&resp.status) {
        keys(&resp.body);
    }
});
