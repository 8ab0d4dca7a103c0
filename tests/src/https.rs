//! A small HTTPS server for key fetches: a fresh test CA, a server
//! certificate for `localhost`, 127.0.0.1 and 10.0.2.2 (the host as QEMU's
//! user network shows it to the guest), and scripted responses per path.
//!
//! The installer's unit tests compile this same file (`#[path]`), so it uses
//! only std, anyhow, rcgen and rustls.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// One scripted response: status code and body.
pub type Response = (u16, String);

/// What the server was asked and what it still has to answer.
#[derive(Default)]
struct State {
    /// Per path, the responses not given yet; the last one repeats.
    script: HashMap<String, Vec<Response>>,
    requests: Vec<String>,
}

/// A running HTTPS server on 127.0.0.1; stops when dropped.
pub struct KeyServer {
    port: u16,
    ca_pem: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Certificate validity of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid from a day ago.
    Now,
    /// Valid only from 2100 on (a client whose clock is behind sees this).
    Future,
}

impl KeyServer {
    /// Starts a server answering `script`: for each path, its responses in
    /// order, the last one repeated. Other paths get 404.
    pub fn start(script: &[(&str, &[(u16, &str)])]) -> Result<Self> {
        Self::start_with(script, Validity::Now)
    }

    pub fn start_with(script: &[(&str, &[(u16, &str)])], validity: Validity) -> Result<Self> {
        let ca_key = KeyPair::generate().context("cannot generate the test CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "nodeflash test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).context("cannot sign the test CA")?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().context("cannot generate the server key")?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "10.0.2.2".to_string(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "nodeflash test server");
        if validity == Validity::Future {
            params.not_before = rcgen::date_time_ymd(2100, 1, 1);
            params.not_after = rcgen::date_time_ymd(2101, 1, 1);
        }
        let cert = params
            .signed_by(&key, &issuer)
            .context("cannot sign the server certificate")?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .context("cannot set up the server's TLS")?;
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State {
            script: script
                .iter()
                .map(|(path, rs)| {
                    let rs: Vec<Response> = rs.iter().map(|(s, b)| (*s, b.to_string())).collect();
                    (path.to_string(), rs)
                })
                .collect(),
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(sock) = conn {
                        // A failed handshake (an untrusted client) only ends that connection.
                        let _ = serve(sock, &config, &state);
                    }
                }
            })
        };
        Ok(Self {
            port,
            ca_pem: ca_cert.pem(),
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test CA's certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The paths requested so far, in order (only requests that got past TLS).
    pub fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request on one connection.
fn serve(sock: TcpStream, config: &Arc<rustls::ServerConfig>, state: &Mutex<State>) -> Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(config.clone())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!("connection closed before the request was complete");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (status, body): Response = {
        let mut s = state
            .lock()
            .map_err(|_| anyhow::anyhow!("server state poisoned"))?;
        s.requests.push(path.clone());
        match s.script.get_mut(&path) {
            Some(rs) if rs.len() > 1 => rs.remove(0),
            Some(rs) if rs.len() == 1 => rs[0].clone(),
            _ => (404, "not found\n".to_string()),
        }
    };
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    // As GitHub answers when its rate limit is spent: 403 with nothing
    // left; and a 429 that asks for a wait of 1 s.
    let extra = match status {
        403 => "X-RateLimit-Remaining: 0\r\n",
        429 => "Retry-After: 1\r\n",
        _ => "",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    tls.flush()?;
    let _ = tls.sock.shutdown(Shutdown::Write);
    Ok(())
}
