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

/// Serves `response` to every connection until the client is done; returns
/// the body `Client::get` made of it, if any.
fn fetch(response: &[u8]) -> Option<String> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let mut client = Client::new(&[], true, UNIX_EPOCH).expect("client");
    client.policy = Policy {
        attempt_timeout: Duration::from_secs(2),
        max_attempts: 1,
        ..Policy::default()
    };
    let response = response.to_vec();
    listener.set_nonblocking(true).expect("nonblocking");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(&response);
            }
        })
    };
    let body = client
        .get(&format!("http://127.0.0.1:{port}/alice.keys"), &|_| {})
        .ok();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    body
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
