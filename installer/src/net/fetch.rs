//! HTTPS GET of small bodies with [`ureq`] (rustls with ring, Mozilla's
//! roots plus the profile's CA certificates): timeouts, and retries with
//! exponential backoff inside a total time bound.
//!
//! What is ours on top of the library: errors that say which stage failed in
//! plain words (DNS lookup, connection, TLS with the clock note, HTTP
//! status), name the URL and count the attempts; and the retry policy.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::CertificateError;
use ureq::config::Config;
use ureq::http::{HeaderMap, StatusCode, Uri};

use super::url::check_url;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

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

/// Whether a non-2xx response (redirects are followed by ureq) is worth
/// another attempt, and how long the server asks to wait (`Retry-After` in
/// seconds, RFC 9110 §10.2.3; an HTTP date is not read). Retried: 429, 5xx,
/// and GitHub's rate limit, which answers 403 with `x-ratelimit-remaining: 0`
/// (GitHub's REST API docs, "Rate limits"). Other statuses are final.
fn classify(status: StatusCode, headers: &HeaderMap) -> Failure {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut message = format!(
        "HTTP status {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
    .trim_end()
    .to_string();
    let rate_limited =
        status.as_u16() == 403 && header("x-ratelimit-remaining").map(str::trim) == Some("0");
    if rate_limited {
        message.push_str(" (rate limited: x-ratelimit-remaining is 0)");
    }
    let after = header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if let Some(a) = after {
        message.push_str(&format!(" (Retry-After {} s)", a.as_secs()));
    }
    Failure {
        message,
        retry: status.as_u16() == 429 || status.is_server_error() || rate_limited,
        after,
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
pub(super) struct Failure {
    pub(super) message: String,
    pub(super) retry: bool,
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

/// A name lookup error, kept apart from the connection's I/O errors so that
/// the message names the stage.
#[derive(Debug)]
struct LookupError(io::Error);

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for LookupError {}

/// ureq's resolver, with its I/O errors marked as [`LookupError`]s.
#[derive(Debug, Default)]
struct Lookup(DefaultResolver);

impl Resolver for Lookup {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        self.0.resolve(uri, config, timeout).map_err(|e| match e {
            ureq::Error::Io(e) => ureq::Error::Io(io::Error::new(e.kind(), LookupError(e))),
            e => e,
        })
    }
}

/// An HTTPS (or, when allowed, HTTP) client for small bodies.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub policy: Policy,
    pub allow_http: bool,
    /// The image's build time: a clock before it explains TLS errors.
    pub not_before: SystemTime,
}

impl Client {
    /// Trusts Mozilla's roots and the PEM certificates in `extra_ca_pem`;
    /// fails naming the file (by its position, from 1) that holds no
    /// certificate or a bad one.
    pub fn new(extra_ca_pem: &[Vec<u8>], allow_http: bool, not_before: SystemTime) -> Result<Self> {
        let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()))
            .collect();
        for (i, pem) in extra_ca_pem.iter().enumerate() {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("CA certificate file {}: bad PEM", i + 1))?;
            if certs.is_empty() {
                bail!("CA certificate file {}: no certificate in it", i + 1);
            }
            for cert in certs {
                // Parsed now, so that a bad one is named here and not at
                // the first fetch.
                rustls::RootCertStore::empty()
                    .add(cert.clone())
                    .with_context(|| format!("CA certificate file {}: bad certificate", i + 1))?;
                roots.push(Certificate::from_der(cert.as_ref()).to_owned());
            }
        }
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(5)
            .user_agent("nodeflash")
            .accept("text/plain")
            .build();
        Ok(Self {
            agent: ureq::Agent::with_parts(config, DefaultConnector::default(), Lookup::default()),
            policy: Policy::default(),
            allow_http,
            not_before,
        })
    }

    /// GETs `url` and returns its body as text, retrying as the policy says.
    /// `log` gets one line per failed attempt. Fails with the last attempt's
    /// stage and words, the URL and the number of attempts.
    pub fn get(&self, url: &str, log: &dyn Fn(&str)) -> Result<String> {
        let uri = check_url(url).map_err(|e| anyhow::anyhow!("bad URL {url}: {e}"))?;
        if uri.scheme_str() == Some("http") && !self.allow_http {
            bail!("refusing plain http for {url}: use https, or set `allow-http = true`");
        }
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = self.policy.total.saturating_sub(started.elapsed());
            let failure = match self.attempt(&uri, host, self.policy.attempt_timeout.min(left)) {
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

    /// One ranged GET of bytes `from..to` (end exclusive) of the file at
    /// `uri`, which must be `total` bytes long: the response must be
    /// `206 Partial Content` with exactly that `Content-Range` (RFC 9110
    /// §14.4), or a `200` with the whole file when the whole file was
    /// asked for. Connecting and the response head are bounded by the
    /// policy's attempt timeout, and each read of the body by `per_read`
    /// (a server that stops sending is an error, not a hang). Returns the
    /// body as a reader (no size limit: the caller reads `to - from` bytes).
    pub(super) fn open_range(
        &self,
        uri: &Uri,
        (from, to, total): (u64, u64, u64),
        per_read: Duration,
    ) -> Result<Box<dyn io::Read + Send>, Failure> {
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let whole = from == 0 && to == total;
        let resp = self
            .agent
            .get(uri)
            .header("Range", format!("bytes={from}-{}", to.saturating_sub(1)))
            .header("Accept", "application/octet-stream")
            .config()
            .timeout_connect(Some(self.policy.attempt_timeout))
            .timeout_recv_response(Some(self.policy.attempt_timeout))
            .timeout_per_read(Some(per_read))
            .https_only(!self.allow_http)
            .build()
            .call()
            .map_err(|e| self.failure(uri, host, e))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        match status {
            206 => {
                let want = format!("bytes {from}-{}/{total}", to.saturating_sub(1));
                let got = header("content-range");
                if got != want {
                    return Err(Failure::stop(format!(
                        "the server answered Content-Range {got:?} instead of {want:?} \
                         (is it serving another file of another length?)"
                    )));
                }
            }
            200 if whole => {
                let len = header("content-length");
                if len != total.to_string() {
                    return Err(Failure::stop(format!(
                        "the server sends {len:?} bytes instead of {total}"
                    )));
                }
            }
            200 => {
                return Err(Failure::stop(
                    "the server ignores range requests (it answered 200, not 206)".into(),
                ))
            }
            _ => return Err(classify(resp.status(), resp.headers())),
        }
        Ok(Box::new(resp.into_body().into_reader()))
    }

    /// One attempt (redirects followed by ureq), within `timeout`.
    fn attempt(&self, uri: &Uri, host: &str, timeout: Duration) -> Result<Vec<u8>, Failure> {
        let mut resp = self
            .agent
            .get(uri)
            .config()
            .timeout_global(Some(timeout))
            .https_only(!self.allow_http)
            .build()
            .call()
            .map_err(|e| self.failure(uri, host, e))?;
        if !resp.status().is_success() {
            return Err(classify(resp.status(), resp.headers()));
        }
        resp.body_mut()
            .with_config()
            .limit(self.policy.max_body as u64)
            .read_to_vec()
            .map_err(|e| self.failure(uri, host, e))
    }

    /// What ureq's error `e` means, in the stage's words; TLS errors and
    /// refusals are final, the rest is retried.
    fn failure(&self, uri: &Uri, host: &str, e: ureq::Error) -> Failure {
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        let at = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        match e {
            ureq::Error::HostNotFound => {
                Failure::retry(format!("DNS lookup of {host} failed: no address"))
            }
            ureq::Error::Io(e) if e.get_ref().is_some_and(|i| i.is::<LookupError>()) => {
                Failure::retry(format!("DNS lookup of {host} failed: {e}"))
            }
            // rustls reports through the stream's I/O errors.
            ureq::Error::Io(e) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
                let tls = e
                    .into_inner()
                    .and_then(|i| i.downcast::<rustls::Error>().ok());
                match tls {
                    Some(t) => self.failure(uri, host, ureq::Error::Rustls(*t)),
                    None => Failure::retry("TLS failed".into()),
                }
            }
            ureq::Error::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => {
                    Failure::retry(format!("connection to {at} failed: {}", io_words(&e)))
                }
                _ => Failure::retry(format!("exchange with {at} failed: {}", io_words(&e))),
            },
            // ureq names the stage whose timeout ran out first; the attempt's
            // own bound is its "global" one.
            ureq::Error::Timeout(stage) => {
                Failure::retry(format!("{at}: timed out ({stage} timeout)"))
            }
            ureq::Error::Rustls(t) => {
                let mut message = format!("TLS with {host} failed: {}", tls_words(&t));
                if let Some(note) = clock_note(SystemTime::now(), self.not_before) {
                    message.push_str("; ");
                    message.push_str(&note);
                }
                Failure::stop(message)
            }
            ureq::Error::RequireHttpsOnly(to) => {
                Failure::stop(format!("redirected to plain http ({to}), which is refused"))
            }
            ureq::Error::TooManyRedirects => Failure::stop("too many redirects".into()),
            ureq::Error::BodyExceedsLimit(_) => Failure::stop(format!(
                "the response is larger than {} bytes",
                self.policy.max_body
            )),
            ureq::Error::Protocol(e) => Failure::retry(format!("bad HTTP response: {e}")),
            e => Failure::retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::keys::{parse_keys, tests::ED25519};
    use crate::net::test_server::{KeyServer, Validity};
    use std::cell::RefCell;
    use std::io::{Read, Write};
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

    /// Serves `response` once on a plain-http port; returns the URL and the
    /// thread that yields the request's head.
    fn serve_once(response: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).expect("read");
                assert!(n > 0, "request cut short");
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(response).expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        (format!("http://127.0.0.1:{port}/k"), server)
    }

    #[test]
    fn responses() {
        let mut c = Client::new(&[], true, UNIX_EPOCH).expect("client");
        c.policy = Policy {
            max_attempts: 1,
            ..quick()
        };
        let (url, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(get(&c, &url).0.expect("chunked"), "abcde");
        server.join().expect("server");
        let (url, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc");
        let msg = err_of(get(&c, &url).0);
        server.join().expect("server");
        assert!(msg.contains(&format!("cannot fetch {url}")), "{msg}");
        let (url, server) = serve_once(b"SSH-2.0-OpenSSH\r\n\r\n");
        let msg = err_of(get(&c, &url).0);
        server.join().expect("server");
        assert!(msg.contains("bad HTTP response"), "{msg}");
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
        let resp = |status: u16, headers: &[(&'static str, &'static str)]| {
            let status = StatusCode::from_u16(status).expect("status");
            let mut map = HeaderMap::new();
            for (n, v) in headers {
                map.insert(*n, ureq::http::HeaderValue::from_static(v));
            }
            classify(status, &map)
        };
        // GitHub's rate limit: 403 with nothing left, retried.
        let f = resp(403, &[("x-ratelimit-remaining", "0")]);
        assert!(f.retry, "{f:?}");
        assert!(f.message.contains("rate limited"), "{f:?}");
        // A plain 403 is final, as is 404.
        assert!(!resp(403, &[("x-ratelimit-remaining", "59")]).retry);
        assert!(!resp(404, &[]).retry);
        // Retry-After on 429 and 503.
        for status in [429, 503] {
            let f = resp(status, &[("retry-after", "7")]);
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
        let (url, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nkeys!\n");
        let mut c = Client::new(&[], false, UNIX_EPOCH).expect("client");
        c.policy = quick();
        let msg = err_of(get(&c, &url).0);
        assert!(msg.contains("refusing plain http"), "{msg}");
        c.allow_http = true;
        assert_eq!(get(&c, &url).0.expect("allowed"), "keys!\n");
        let head = server.join().expect("server thread");
        assert!(head.starts_with("GET /k HTTP/1.1\r\n"), "{head}");
        // Header names are case-insensitive (RFC 9110 §5.1).
        let host = url.trim_start_matches("http://").trim_end_matches("/k");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("\r\nhost: {host}\r\n")),
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
