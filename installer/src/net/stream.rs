//! A large file read over HTTP as one sequential stream ([`RangeReader`]):
//! the source of a netbooted node's store payload. A connection that drops
//! or stalls is opened again with a range request from the first byte not
//! yet read, after a backoff, until no byte has come for a bounded time.
//! Integrity is not this module's business: the payload reader checks every
//! frame's sha256 against the manifest, whose sha256 the image holds.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use ureq::http::Uri;

use super::fetch::Client;
use super::url::check_url;

/// How a [`RangeReader`] waits and when it gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPolicy {
    /// One read from the connection: longer without a byte and the
    /// connection counts as dropped (ureq's per-read timeout).
    pub per_read: Duration,
    /// The wait after the first failure in a row; it doubles after each…
    pub first_wait: Duration,
    /// …up to this.
    pub max_wait: Duration,
    /// The bound: no byte for this long (the attempts and waits since the
    /// last byte that arrived) and the read fails.
    pub stall: Duration,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        Self {
            per_read: Duration::from_secs(20),
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(8),
            stall: Duration::from_secs(120),
        }
    }
}

/// Bytes `start..end` of the `total`-byte file at a URL, as a [`Read`]. The
/// first request is sent at the first read (so that a reader made early
/// holds no connection). Every request asks for the rest of the range
/// (`Range: bytes=POS-END`) and the answer must say it is that part of a
/// file of `total` bytes ([`Client::open_range`]). Errors (as `io::Error`)
/// name the URL, the byte where reading stopped, the last failure and the
/// attempts; a refusal (404, a file of another length, no range support) is
/// final at once.
pub struct RangeReader {
    client: Client,
    uri: Uri,
    url: String,
    pos: u64,
    end: u64,
    total: u64,
    policy: StreamPolicy,
    body: Option<Box<dyn Read + Send>>,
    log: fn(&str),
    /// How many times the stream was opened again after a failure.
    pub resumed: u32,
}

impl std::fmt::Debug for RangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReader")
            .field("url", &self.url)
            .field("pos", &self.pos)
            .field("end", &self.end)
            .field("total", &self.total)
            .finish()
    }
}

impl RangeReader {
    /// A reader of bytes `start..end` of `url` (`http://` or `https://`),
    /// a file of `total` bytes; `log` gets one line per failed attempt and
    /// one per resumption. Errors: a bad URL, or a range outside the file.
    pub fn new(
        client: Client,
        url: &str,
        (start, end, total): (u64, u64, u64),
        policy: StreamPolicy,
        log: fn(&str),
    ) -> anyhow::Result<Self> {
        let uri = check_url(url).map_err(|e| anyhow::anyhow!("bad payload URL {url}: {e}"))?;
        if start > end || end > total {
            anyhow::bail!("bytes {start}..{end} are not in a file of {total} bytes ({url})");
        }
        Ok(Self {
            client,
            uri,
            url: url.to_string(),
            pos: start,
            end,
            total,
            policy,
            body: None,
            log,
            resumed: 0,
        })
    }

    /// The next byte to read.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        let since = Instant::now();
        let mut failed = 0u32;
        loop {
            let message = match &mut self.body {
                None => match self.client.open_range(
                    &self.uri,
                    (self.pos, self.end, self.total),
                    self.policy.per_read,
                ) {
                    Ok(body) => {
                        if failed > 0 {
                            (self.log)(&format!(
                                "payload: resumed {} at byte {} of {} (range request)",
                                self.url, self.pos, self.total
                            ));
                        }
                        self.body = Some(body);
                        continue;
                    }
                    Err(f) if !f.retry => {
                        return Err(io::Error::other(format!(
                            "cannot read {} at byte {} of {}: {}",
                            self.url, self.pos, self.total, f.message
                        )));
                    }
                    Err(f) => f.message,
                },
                Some(body) => {
                    let want = buf.len().min((self.end - self.pos) as usize);
                    match body.read(&mut buf[..want]) {
                        Ok(0) => "the server closed the connection early".to_string(),
                        Ok(n) => {
                            self.pos += n as u64;
                            return Ok(n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => format!("the connection failed: {e}"),
                    }
                }
            };
            self.body = None;
            failed += 1;
            let wait = self
                .policy
                .first_wait
                .saturating_mul(2u32.saturating_pow(failed - 1))
                .min(self.policy.max_wait);
            if since.elapsed() + wait >= self.policy.stall {
                return Err(io::Error::other(format!(
                    "cannot read {} at byte {} of {}: {message} (no data for {:.0}s, {failed} attempts)",
                    self.url,
                    self.pos,
                    self.total,
                    since.elapsed().as_secs_f64()
                )));
            }
            if failed == 1 {
                self.resumed += 1;
            }
            (self.log)(&format!(
                "payload: {message} at byte {} of {}; retrying in {:.0?}",
                self.pos, self.total, wait
            ));
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A server of `data` that honours `Range: bytes=A-B` and, for the
    /// first `cut` requests, sends only `chunk` bytes of the body before
    /// closing; records each request's range.
    fn server(data: Vec<u8>, cut: usize, chunk: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/payload", l.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (n, s) in l.incoming().enumerate() {
                let Ok(mut s) = s else { return };
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        break;
                    }
                    req.push(b[0]);
                }
                let req = String::from_utf8_lossy(&req).to_string();
                let range = req
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                seen2.lock().expect("lock").push(range.clone());
                let (a, b) = range.split_once('-').expect("a range");
                let (a, b): (usize, usize) = (a.parse().expect("a"), b.parse().expect("b"));
                let body = &data[a..=b];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                    body.len(),
                    data.len()
                );
                let _ = s.write_all(head.as_bytes());
                let send = if n < cut {
                    &body[..chunk.min(body.len())]
                } else {
                    body
                };
                let _ = s.write_all(send);
            }
        });
        (url, seen)
    }

    fn client() -> Client {
        Client::new(&[], true, std::time::UNIX_EPOCH).expect("client")
    }

    fn quick() -> StreamPolicy {
        StreamPolicy {
            per_read: Duration::from_secs(5),
            first_wait: Duration::from_millis(10),
            max_wait: Duration::from_millis(50),
            stall: Duration::from_secs(5),
        }
    }

    #[test]
    fn resumes_with_range_requests_after_dropped_connections() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (url, seen) = server(data.clone(), 3, 10_000);
        let total = data.len() as u64;
        let mut r = RangeReader::new(client(), &url, (1000, total, total), quick(), |_| {})
            .expect("reader");
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read");
        assert_eq!(got, data[1000..]);
        assert_eq!(r.resumed, 3);
        assert_eq!(
            *seen.lock().expect("lock"),
            ["1000-99999", "11000-99999", "21000-99999", "31000-99999"]
        );
    }

    #[test]
    fn a_file_of_another_length_is_refused_at_once() {
        let (url, _) = server(vec![1u8; 500], 0, 0);
        let mut r =
            RangeReader::new(client(), &url, (0, 100, 1000), quick(), |_| {}).expect("reader");
        let e = r.read(&mut [0u8; 10]).expect_err("refused").to_string();
        assert!(e.contains("instead of \"bytes 0-99/1000\""), "{e}");
    }

    #[test]
    fn a_server_that_stays_down_fails_within_the_bound() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/payload", l.local_addr().expect("addr"));
        drop(l);
        let mut p = quick();
        p.stall = Duration::from_millis(300);
        let t = Instant::now();
        let mut r = RangeReader::new(client(), &url, (0, 10, 10), p, |_| {}).expect("reader");
        let e = r.read(&mut [0u8; 10]).expect_err("fails").to_string();
        assert!(e.contains("at byte 0 of 10"), "{e}");
        assert!(e.contains("connection refused"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
