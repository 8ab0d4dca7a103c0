//! HTTPS GET of small bodies: rustls (ring) with Mozilla's roots plus the
//! profile's CA certificates, a minimal HTTP/1.1 client, timeouts, and
//! retries with exponential backoff inside a total time bound.
//!
//! Errors say which stage failed in plain words (DNS lookup, connection, TLS,
//! HTTP status), name the URL and count the attempts.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// Timeouts and retries of one fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// One attempt: DNS, connect, TLS, request and response.
    pub attempt_timeout: Duration,
    /// All attempts and the waits between them.
    pub total: Duration,
    /// The wait after the first failure; it doubles after each one…
    pub first_wait: Duration,
    /// …up to this.
    pub max_wait: Duration,
    /// At most this many attempts; by default no limit, so that `total`
    /// (the profile's `fetch-timeout-secs`) is the one bound.
    pub max_attempts: u32,
    /// Larger responses are refused.
    pub max_body: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(15),
            total: Duration::from_secs(120),
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(16),
            max_attempts: u32::MAX,
            max_body: 1 << 20,
        }
    }
}

/// How long to wait after `failed` attempts (1 after the first failure)
/// when `elapsed` has passed since the first one began; `None` means give
/// up: no attempts left, or the wait would end past the total bound.
pub fn retry_wait(p: &Policy, failed: u32, elapsed: Duration) -> Option<Duration> {
    if failed == 0 || failed >= p.max_attempts {
        return None;
    }
    let factor = 2u32.saturating_pow(failed - 1);
    let wait = p.first_wait.saturating_mul(factor).min(p.max_wait);
    (elapsed.saturating_add(wait) < p.total).then_some(wait)
}

/// [`retry_wait`], or the wait the server asked for (`Retry-After`), at
/// least the backoff's; `None` when either ends past the total bound.
pub fn wait_before_retry(
    p: &Policy,
    failed: u32,
    elapsed: Duration,
    asked: Option<Duration>,
) -> Option<Duration> {
    let wait = retry_wait(p, failed, elapsed)?;
    let wait = asked.map_or(wait, |a| a.max(wait));
    (elapsed.saturating_add(wait) < p.total).then_some(wait)
}

/// Whether a non-2xx, non-redirect response is worth another attempt, and
/// how long the server asks to wait (`Retry-After` in seconds, RFC 9110
/// §10.2.3; an HTTP date is not read). Retried: 429, 5xx, and GitHub's
/// rate limit, which answers 403 with `x-ratelimit-remaining: 0` (GitHub's
/// REST API docs, "Rate limits"). Other statuses are final.
fn classify(resp: &Response) -> Failure {
    let mut message = format!("HTTP status {} {}", resp.status, resp.reason)
        .trim_end()
        .to_string();
    let rate_limited =
        resp.status == 403 && resp.header("x-ratelimit-remaining").map(str::trim) == Some("0");
    if rate_limited {
        message.push_str(" (rate limited: x-ratelimit-remaining is 0)");
    }
    let after = resp
        .header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if let Some(a) = after {
        message.push_str(&format!(" (Retry-After {} s)", a.as_secs()));
    }
    Failure {
        message,
        retry: resp.status == 429 || resp.status >= 500 || rate_limited,
        after,
    }
}

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("only https:// and http:// URLs are supported".into());
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = path.split('#').next().unwrap_or_default();
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        if authority.contains('@') {
            return Err("user names or passwords in the URL are not supported".into());
        }
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or("unclosed `[` in the host")?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("no valid host name".into());
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("bad port `{p}`"))?,
            None if https => 443,
            None => 80,
        };
        Ok(Url {
            https,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// The `Host:` header value.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.https { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves a `Location` header against this URL.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        if location.starts_with("https://") || location.starts_with("http://") {
            Url::parse(location)
        } else if location.starts_with('/') && !location.starts_with("//") {
            Ok(Url {
                path: location.to_string(),
                ..self.clone()
            })
        } else {
            Err(format!("unsupported redirect location `{location}`"))
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole HTTP/1.x response (read until the server closed the
/// connection): status line, headers, and a body by `Content-Length`,
/// chunked, or up to the end.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response ended inside its headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response headers are not text")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (n, v) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    resp.body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        if rest.len() < len {
            return Err(format!(
                "the response was cut short ({} of {len} bytes)",
                rest.len()
            ));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(resp)
}

/// Decodes a chunked body; it must end with the zero-size chunk.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let nl = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("the chunked response was cut short")?;
        let size_line = std::str::from_utf8(&data[..nl]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        data = &data[nl + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data
            .get(..size)
            .ok_or("the chunked response was cut short")?;
        body.extend_from_slice(chunk);
        data = data
            .get(size + 2..)
            .ok_or("the chunked response was cut short")?;
    }
}

/// `YYYY-MM-DD HH:MM UTC` (before 1970: `before 1970`).
pub fn utc(t: SystemTime) -> String {
    let Ok(d) = t.duration_since(UNIX_EPOCH) else {
        return "before 1970".into();
    };
    let secs = d.as_secs();
    let days = (secs / 86400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let hm = secs % 86400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        hm / 3600,
        hm % 3600 / 60
    )
}

/// When the clock is before `not_before` (the image's build time), the
/// sentence that says so.
pub fn clock_note(now: SystemTime, not_before: SystemTime) -> Option<String> {
    (now < not_before).then(|| {
        format!(
            "the system clock says {}, before this image was built ({}): certificates look \
             not yet valid; set the clock in the firmware setup",
            utc(now),
            utc(not_before)
        )
    })
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    message: String,
    retry: bool,
    /// The wait the server asked for before another attempt.
    after: Option<Duration>,
}

impl Failure {
    fn retry(message: String) -> Self {
        Self {
            message,
            retry: true,
            after: None,
        }
    }
    fn stop(message: String) -> Self {
        Self {
            message,
            retry: false,
            after: None,
        }
    }
}

/// Plain words for a connection error.
fn io_words(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".into(),
        io::ErrorKind::HostUnreachable => "no route to host".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        io::ErrorKind::ConnectionReset => "connection reset by the server".into(),
        io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
        _ => e.to_string(),
    }
}

/// Plain words for a TLS error.
fn tls_words(e: &rustls::Error) -> String {
    let words = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "certificate not trusted: its CA is unknown (add it to `ca-certificates`)"
            }
            CertificateError::BadSignature => {
                "certificate not trusted: it is not signed by the trusted CA of its issuer's name"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not valid yet"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "certificate not valid for this host name"
            }
            _ => "certificate refused",
        },
        _ => "handshake failed",
    };
    format!("{words} ({e})")
}

/// An HTTPS (or, when allowed, HTTP) client for small bodies.
#[derive(Debug, Clone)]
pub struct Client {
    tls: Arc<ClientConfig>,
    pub policy: Policy,
    pub allow_http: bool,
    /// The image's build time: a clock before it explains TLS errors.
    pub not_before: SystemTime,
}

impl Client {
    /// Trusts Mozilla's roots and the PEM certificates in `extra_ca_pem`.
    pub fn new(extra_ca_pem: &[Vec<u8>], allow_http: bool, not_before: SystemTime) -> Result<Self> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for (i, pem) in extra_ca_pem.iter().enumerate() {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("CA certificate file {}: bad PEM", i + 1))?;
            if certs.is_empty() {
                bail!("CA certificate file {}: no certificate in it", i + 1);
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("CA certificate file {}: bad certificate", i + 1))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            policy: Policy::default(),
            allow_http,
            not_before,
        })
    }

    /// GETs `url` and returns its body as text, retrying as the policy says.
    /// `log` gets one line per failed attempt.
    pub fn get(&self, url: &str, log: &dyn Fn(&str)) -> Result<String> {
        let parsed = Url::parse(url).map_err(|e| anyhow::anyhow!("bad URL {url}: {e}"))?;
        if !parsed.https && !self.allow_http {
            bail!("refusing plain http for {url}: use https, or set `allow-http = true`");
        }
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = self.policy.total.saturating_sub(started.elapsed());
            let deadline = Instant::now() + self.policy.attempt_timeout.min(left);
            let failure = match self.attempt(&parsed, deadline) {
                Ok(body) => {
                    return String::from_utf8(body)
                        .map_err(|_| anyhow::anyhow!("{url}: the response is not text"));
                }
                Err(f) => f,
            };
            let s = if attempts == 1 { "" } else { "s" };
            let wait = if failure.retry {
                wait_before_retry(&self.policy, attempts, started.elapsed(), failure.after)
            } else {
                None
            };
            match wait {
                Some(wait) => {
                    log(&format!(
                        "GET {url}: {} (attempt {attempts}); retrying in {:.0?}",
                        failure.message, wait
                    ));
                    std::thread::sleep(wait);
                }
                None => bail!(
                    "cannot fetch {url}: {} (after {attempts} attempt{s})",
                    failure.message
                ),
            }
        }
    }

    /// One attempt, following up to 5 redirects, until `deadline`.
    fn attempt(&self, url: &Url, deadline: Instant) -> Result<Vec<u8>, Failure> {
        let mut url = url.clone();
        for _ in 0..=5 {
            let resp = self.exchange(&url, deadline)?;
            match resp.status {
                200..=299 => return Ok(resp.body),
                301 | 302 | 303 | 307 | 308 => {
                    let location = resp.header("location").unwrap_or_default();
                    let next = url.join(location).map_err(|e| {
                        Failure::stop(format!("HTTP status {} with {e}", resp.status))
                    })?;
                    if !next.https && !self.allow_http {
                        return Err(Failure::stop(format!(
                            "redirected to plain http ({location}), which is refused"
                        )));
                    }
                    url = next;
                }
                _ => return Err(classify(&resp)),
            }
        }
        Err(Failure::stop("too many redirects".into()))
    }

    /// DNS, connect, TLS, one request and its whole response.
    fn exchange(&self, url: &Url, deadline: Instant) -> Result<Response, Failure> {
        let left = |stage: &str| {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(Failure::retry(format!("{stage}: timed out")))
            } else {
                Ok(d)
            }
        };
        let host = &url.host;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, url.port)],
            Err(_) => (host.as_str(), url.port)
                .to_socket_addrs()
                .map_err(|e| Failure::retry(format!("DNS lookup of {host} failed: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(Failure::retry(format!(
                "DNS lookup of {host} failed: no address"
            )));
        }
        let mut sock = None;
        let mut last = String::new();
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, left("connection")?) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = format!("connection to {addr} failed: {}", io_words(&e)),
            }
        }
        let mut sock = sock.ok_or_else(|| Failure::retry(last))?;
        // A second handle to set the timeouts while the stream is borrowed.
        let ctl = sock
            .try_clone()
            .map_err(|e| Failure::retry(format!("connection: {e}")))?;
        let timeouts = |stage: &str| -> Result<(), Failure> {
            let d = left(stage)?;
            ctl.set_read_timeout(Some(d))
                .and_then(|()| ctl.set_write_timeout(Some(d)))
                .map_err(|e| Failure::retry(format!("{stage}: {e}")))
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nodeflash\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            url.path,
            url.host_header()
        );
        let mut raw = Vec::new();
        if url.https {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| Failure::stop(format!("`{host}` is not a valid TLS server name")))?;
            let conn = rustls::ClientConnection::new(self.tls.clone(), name)
                .map_err(|e| Failure::stop(format!("TLS setup failed: {e}")))?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            while tls.conn.is_handshaking() {
                timeouts("TLS handshake")?;
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    return Err(self.tls_failure(host, &e));
                }
            }
            timeouts("sending the request")?;
            tls.write_all(request.as_bytes())
                .and_then(|()| tls.flush())
                .map_err(|e| {
                    Failure::retry(format!("sending the request failed: {}", io_words(&e)))
                })?;
            self.read_all(&mut tls, &mut raw, &|| timeouts("reading the response"))?;
        } else {
            timeouts("sending the request")?;
            sock.write_all(request.as_bytes()).map_err(|e| {
                Failure::retry(format!("sending the request failed: {}", io_words(&e)))
            })?;
            self.read_all(&mut sock, &mut raw, &|| timeouts("reading the response"))?;
        }
        parse_response(&raw).map_err(|e| Failure::retry(format!("bad HTTP response: {e}")))
    }

    /// Reads until the server closes, at most `max_body` bytes (plus headers).
    fn read_all(
        &self,
        r: &mut impl Read,
        raw: &mut Vec<u8>,
        set_timeouts: &dyn Fn() -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let mut buf = [0u8; 8192];
        loop {
            set_timeouts()?;
            match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // No close_notify: the length checks in parse_response catch a cut.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Failure::retry(format!(
                        "reading the response failed: {}",
                        io_words(&e)
                    )))
                }
            }
            if raw.len() > self.policy.max_body + 16384 {
                return Err(Failure::stop(format!(
                    "the response is larger than {} bytes",
                    self.policy.max_body
                )));
            }
        }
    }

    /// A handshake error: a TLS error (not retried) or an I/O error.
    fn tls_failure(&self, host: &str, e: &io::Error) -> Failure {
        let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        match tls {
            Some(t) => {
                let mut message = format!("TLS with {host} failed: {}", tls_words(t));
                if let Some(note) = clock_note(SystemTime::now(), self.not_before) {
                    message.push_str("; ");
                    message.push_str(&note);
                }
                Failure::stop(message)
            }
            None => Failure::retry(format!("TLS handshake with {host} failed: {}", io_words(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::keys::{parse_keys, tests::ED25519};
    use crate::net::test_server::{KeyServer, Validity};
    use std::cell::RefCell;
    use std::net::TcpListener;

    /// Short waits, three attempts.
    fn quick() -> Policy {
        Policy {
            attempt_timeout: Duration::from_secs(20),
            total: Duration::from_secs(120),
            first_wait: Duration::from_millis(10),
            max_wait: Duration::from_millis(40),
            max_attempts: 3,
            max_body: 1 << 16,
        }
    }

    fn client(server: &KeyServer) -> Client {
        let mut c = Client::new(&[server.ca_pem().into_bytes()], false, UNIX_EPOCH)
            .expect("client with the test CA");
        c.policy = quick();
        c
    }

    /// `get`, with the log lines it printed.
    fn get(c: &Client, url: &str) -> (Result<String>, Vec<String>) {
        let lines = RefCell::new(Vec::new());
        let r = c.get(url, &|l: &str| lines.borrow_mut().push(l.to_string()));
        (r, lines.into_inner())
    }

    fn err_of(r: Result<String>) -> String {
        format!("{:#}", r.expect_err("the fetch should fail"))
    }

    #[test]
    fn retry_schedule_doubles_up_to_the_cap_within_the_bounds() {
        let p = Policy {
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(4),
            total: Duration::from_secs(30),
            max_attempts: 6,
            ..Policy::default()
        };
        let waits: Vec<Option<Duration>> =
            (1..=6).map(|n| retry_wait(&p, n, Duration::ZERO)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            waits,
            [
                Some(s(1)),
                Some(s(2)),
                Some(s(4)),
                Some(s(4)),
                Some(s(4)),
                None
            ]
        );
        assert_eq!(retry_wait(&p, 0, Duration::ZERO), None);
        // A wait that would end at or past the total bound is not taken.
        assert_eq!(retry_wait(&p, 3, s(25)), Some(s(4)));
        assert_eq!(retry_wait(&p, 3, s(26)), None);
        // Huge attempt counts saturate instead of overflowing.
        let many = Policy {
            max_attempts: u32::MAX,
            total: Duration::MAX,
            ..p
        };
        assert_eq!(retry_wait(&many, 200, Duration::ZERO), Some(s(4)));
    }

    #[test]
    fn the_default_policy_retries_until_the_total_time_is_spent() {
        // Attempts that fail at once (a refused connection): the last one
        // must start late in the 120 s budget, not after 8 attempts at 63 s.
        let p = Policy::default();
        let mut elapsed = Duration::ZERO;
        let mut attempts = 1;
        while let Some(wait) = retry_wait(&p, attempts, elapsed) {
            elapsed += wait;
            attempts += 1;
        }
        assert_eq!((attempts, elapsed), (11, Duration::from_secs(111)));
        // With a profile's own budget, the same.
        let p = Policy {
            total: Duration::from_secs(300),
            ..Policy::default()
        };
        let mut elapsed = Duration::ZERO;
        let mut attempts = 1;
        while let Some(wait) = retry_wait(&p, attempts, elapsed) {
            elapsed += wait;
            attempts += 1;
        }
        assert!(elapsed > Duration::from_secs(280), "{elapsed:?}");
    }

    #[test]
    fn urls() {
        let u = Url::parse("https://github.com/alice.keys").expect("valid");
        assert_eq!(
            u,
            Url {
                https: true,
                host: "github.com".into(),
                port: 443,
                path: "/alice.keys".into()
            }
        );
        assert_eq!(u.host_header(), "github.com");
        let u = Url::parse("http://10.0.2.2:8080?u=a#frag").expect("valid");
        assert_eq!((u.https, u.port, u.path.as_str()), (false, 8080, "/?u=a"));
        assert_eq!(u.host_header(), "10.0.2.2:8080");
        let u = Url::parse("https://[fd00::1]:8443/k").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 8443));
        assert_eq!(u.host_header(), "[fd00::1]:8443");
        assert_eq!(
            u.join("/other").expect("path").path,
            "/other",
            "an absolute path keeps the host"
        );
        assert!(u.join("relative").is_err());
        for bad in [
            "ftp://x/",
            "github.com/a",
            "https://",
            "https://u:p@h/",
            "https://h:99999/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").expect("valid");
        assert_eq!(
            (r.status, r.reason.as_str(), r.body.as_slice()),
            (200, "OK", &b"abc"[..])
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("valid");
        assert_eq!(r.body, b"abcde");
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").expect("valid");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        for (raw, want) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"[..],
                "cut short",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                "cut short",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-", "inside its headers"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1 response"),
            (b"HTTP/1.1 abc\r\n\r\n", "bad status line"),
        ] {
            let e = parse_response(raw).expect_err("bad response");
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn dates_and_the_clock_note() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(utc(at(0)), "1970-01-01 00:00 UTC");
        assert_eq!(utc(at(951_782_400)), "2000-02-29 00:00 UTC");
        assert_eq!(utc(at(1_700_000_000)), "2023-11-14 22:13 UTC");
        assert_eq!(utc(at(4_102_444_799)), "2099-12-31 23:59 UTC");
        assert_eq!(clock_note(at(2000), at(1000)), None);
        let note = clock_note(at(951_782_400), at(1_700_000_000)).expect("clock behind");
        assert!(
            note.contains(
                "2000-02-29 00:00 UTC, before this image was built (2023-11-14 22:13 UTC)"
            ),
            "{note}"
        );
    }

    #[test]
    fn fetches_keys_over_https() {
        let body = format!("{ED25519}\n");
        let s = KeyServer::start(&[("/alice.keys", &[(200, body.as_str())])]).expect("server");
        let url = s.url("/alice.keys");
        let (r, log) = get(&client(&s), &url);
        let text = r.expect("fetched");
        assert_eq!(parse_keys(&text, &url).expect("valid keys").len(), 1);
        assert!(log.is_empty(), "{log:?}");
        assert_eq!(s.requests(), ["/alice.keys"]);
        // By name too: the certificate is valid for localhost.
        let by_name = format!("https://localhost:{}/alice.keys", s.port());
        assert_eq!(get(&client(&s), &by_name).0.expect("fetched"), text);
    }

    #[test]
    fn rate_limits_are_retried_and_retry_after_is_honoured_within_the_bound() {
        let resp = |status: u16, headers: &[(&str, &str)]| Response {
            status,
            reason: "R".into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        };
        // GitHub's rate limit: 403 with nothing left, retried.
        let f = classify(&resp(403, &[("X-RateLimit-Remaining", "0")]));
        assert!(f.retry, "{f:?}");
        assert!(f.message.contains("rate limited"), "{f:?}");
        // A plain 403 is final, as is 404.
        assert!(!classify(&resp(403, &[("x-ratelimit-remaining", "59")])).retry);
        assert!(!classify(&resp(404, &[])).retry);
        // Retry-After on 429 and 503.
        for status in [429, 503] {
            let f = classify(&resp(status, &[("Retry-After", "7")]));
            assert!(f.retry);
            assert_eq!(f.after, Some(Duration::from_secs(7)));
        }
        let s = Duration::from_secs;
        let p = Policy {
            total: s(30),
            ..Policy::default()
        };
        // The server's wait when longer than the backoff, the backoff when not.
        assert_eq!(wait_before_retry(&p, 1, s(0), Some(s(7))), Some(s(7)));
        assert_eq!(wait_before_retry(&p, 4, s(0), Some(s(2))), Some(s(8)));
        // Never past the total bound.
        assert_eq!(wait_before_retry(&p, 1, s(20), Some(s(10))), None);
        assert_eq!(wait_before_retry(&p, 1, s(0), Some(s(3600))), None);
    }

    #[test]
    fn a_spent_rate_limit_is_waited_out() {
        let body = format!("{ED25519}\n");
        let s = KeyServer::start(&[("/k", &[(403, ""), (429, ""), (200, body.as_str())])])
            .expect("server");
        let (r, log) = get(&client(&s), &s.url("/k"));
        assert_eq!(r.expect("fetched"), body);
        assert!(
            log[0].contains(
                "HTTP status 403 Forbidden (rate limited: x-ratelimit-remaining is 0) (attempt 1)"
            ),
            "{log:?}"
        );
        assert!(log[1].contains("(Retry-After 1 s) (attempt 2)"), "{log:?}");
    }

    #[test]
    fn server_errors_are_retried_until_success() {
        let body = format!("{ED25519}\n");
        let s = KeyServer::start(&[("/k", &[(500, ""), (429, ""), (200, body.as_str())])])
            .expect("server");
        let (r, log) = get(&client(&s), &s.url("/k"));
        assert_eq!(r.expect("fetched on the third attempt"), body);
        assert_eq!(s.requests().len(), 3);
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(
            log[0].contains("HTTP status 500 Internal Server Error (attempt 1)"),
            "{log:?}"
        );
    }

    #[test]
    fn persistent_server_errors_give_up_after_the_attempts() {
        let s = KeyServer::start(&[("/k", &[(503, "")])]).expect("server");
        let url = s.url("/k");
        let msg = err_of(get(&client(&s), &url).0);
        assert!(
            msg.contains(&format!(
                "cannot fetch {url}: HTTP status 503 Service Unavailable (after 3 attempts)"
            )),
            "{msg}"
        );
        assert_eq!(s.requests().len(), 3);
    }

    #[test]
    fn other_client_errors_are_not_retried() {
        let s = KeyServer::start(&[]).expect("server");
        let msg = err_of(get(&client(&s), &s.url("/nobody.keys")).0);
        assert!(
            msg.contains("HTTP status 404 Not Found (after 1 attempt)"),
            "{msg}"
        );
        assert_eq!(s.requests(), ["/nobody.keys"]);
    }

    #[test]
    fn a_server_that_is_down_is_a_connection_error() {
        let s = KeyServer::start(&[]).expect("server");
        let c = client(&s);
        let url = s.url("/k");
        let port = s.port();
        drop(s);
        let msg = err_of(get(&c, &url).0);
        assert!(
            msg.contains(&format!(
                "connection to 127.0.0.1:{port} failed: connection refused (after 3 attempts)"
            )),
            "{msg}"
        );
    }

    #[test]
    fn an_html_page_is_not_keys() {
        let page = "<!DOCTYPE html><html><body>Sign in</body></html>";
        let s = KeyServer::start(&[("/k", &[(200, page)])]).expect("server");
        let url = s.url("/k");
        let text = get(&client(&s), &url).0.expect("fetched");
        let msg = format!("{:#}", parse_keys(&text, &url).expect_err("html"));
        assert!(msg.contains("got an HTML page"), "{msg}");
    }

    #[test]
    fn plain_http_only_when_allowed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let url = format!("http://127.0.0.1:{port}/k");
        let mut c = Client::new(&[], false, UNIX_EPOCH).expect("client");
        c.policy = quick();
        let msg = err_of(get(&c, &url).0);
        assert!(msg.contains("refusing plain http"), "{msg}");
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).expect("read");
                assert!(n > 0, "request cut short");
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nkeys!\n")
                .expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        c.allow_http = true;
        assert_eq!(get(&c, &url).0.expect("allowed"), "keys!\n");
        let head = server.join().expect("server thread");
        assert!(head.starts_with("GET /k HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{head}"
        );
    }

    #[test]
    fn an_unknown_ca_is_a_tls_error_and_not_retried() {
        let s = KeyServer::start(&[("/k", &[(200, "x")])]).expect("server");
        let mut c = Client::new(&[], false, UNIX_EPOCH).expect("client without the test CA");
        c.policy = quick();
        let msg = err_of(get(&c, &s.url("/k")).0);
        assert!(
            msg.contains("TLS with 127.0.0.1 failed: certificate not trusted"),
            "{msg}"
        );
        assert!(msg.contains("(after 1 attempt)"), "{msg}");
        assert!(!msg.contains("system clock"), "{msg}");
        assert!(s.requests().is_empty());
    }

    #[test]
    fn a_clock_before_the_build_is_named_in_tls_errors() {
        let s = KeyServer::start_with(&[("/k", &[(200, "x")])], Validity::Future).expect("server");
        let mut c = client(&s);
        let msg = err_of(get(&c, &s.url("/k")).0);
        assert!(msg.contains("certificate not valid yet"), "{msg}");
        assert!(!msg.contains("system clock"), "{msg}");
        // As if the image were built in 2200 and the clock were behind it.
        c.not_before = UNIX_EPOCH + Duration::from_secs(7_258_118_400);
        let msg = err_of(get(&c, &s.url("/k")).0);
        assert!(msg.contains("the system clock says"), "{msg}");
        assert!(
            msg.contains("before this image was built (2200-01-01 00:00 UTC)"),
            "{msg}"
        );
    }

    #[test]
    fn bad_extra_ca_is_refused() {
        let e = Client::new(&[b"not a pem".to_vec()], false, UNIX_EPOCH).expect_err("no cert");
        assert!(format!("{e:#}").contains("CA certificate file 1"), "{e:#}");
    }

    #[test]
    fn a_dns_failure_is_named() {
        let mut c = Client::new(&[], false, UNIX_EPOCH).expect("client");
        c.policy = Policy {
            max_attempts: 1,
            ..quick()
        };
        let msg = err_of(get(&c, "https://nodeflash-no-such-host.invalid/k").0);
        assert!(
            msg.contains("DNS lookup of nodeflash-no-such-host.invalid failed"),
            "{msg}"
        );
    }
}
