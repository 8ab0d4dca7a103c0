//! What the key fetch does with what a server sends: ureq's HTTP/1 client
//! (status line, headers, `Content-Length`, chunked or to-the-end bodies,
//! redirects) driven through `Client::get` against a local plain-http server
//! that answers every request with the input, then the `authorized_keys`
//! parser on the body.
//!
//! The first byte chooses the entry point: even, the rest is a whole
//! response served to the client; odd, the rest is a body given straight to
//! the key parser (so the key lines are reached without the HTTP envelope).
//! Properties besides "no panic": a body is never longer than what the
//! server sent, and every accepted key prints as an `authorized_keys` line
//! that parses back to the same key.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use nodeflash_installer::net::fetch::{Client, Policy};
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
    assert_eq!(again, set.keys, "authorized_keys does not read back\n{text}");
}

/// The response the server sends to every request of the current input.
static RESPONSE: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// A plain-http server on a local port (started once) that answers every
/// request with [`RESPONSE`], and a client for it.
fn server() -> &'static (Client, String) {
    static SERVER: OnceLock<(Client, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { continue };
                let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = RESPONSE.lock().map(|r| r.clone()).unwrap_or_default();
                let _ = sock.write_all(&response);
            }
        });
        let mut client = Client::new(&[], true, UNIX_EPOCH).expect("client");
        client.policy = Policy {
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 1,
            ..Policy::default()
        };
        (client, format!("http://127.0.0.1:{port}/alice.keys"))
    })
}

/// The body `Client::get` makes of `response`, if any.
fn fetch(response: &[u8]) -> Option<String> {
    let (client, url) = server();
    *RESPONSE.lock().expect("response lock") = response.to_vec();
    client.get(url, &|_| {}).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        keys(rest);
        return;
    }
    if let Some(body) = fetch(rest) {
        assert!(body.len() <= rest.len(), "a body longer than the response");
        keys(body.as_bytes());
    }
});
