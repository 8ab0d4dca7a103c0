//! `nodeflash serve`: one built image, served to nodes that boot from the
//! network. The chain is the usual one (docs/netboot.md): the firmware's PXE
//! asks DHCP; dnsmasq in proxy-DHCP mode (beside the LAN's own DHCP server)
//! names iPXE (Debian's `ipxe` package) over TFTP; iPXE asks again, and gets
//! the URL of this server's iPXE script; the script loads the image's own
//! kernel and initramfs over HTTP with the image's kernel command line plus
//! `nodeflash.payload=URL`; the installer then reads the store payload from
//! here with range requests.
//!
//! Everything served comes out of the ISO itself (the same bytes as on a
//! stick): the payload is served straight from its extent in the ISO, the
//! kernel and initramfs are read from the ISO's EFI partition.
//!
//! HTTP is `tiny_http`: synchronous, small, no async runtime, and it leaves
//! the responses to us, so that each request is one worker thread and the
//! number of workers is the concurrency bound. Range requests (RFC 9110
//! §14) are ours: one `bytes=A-B`, `bytes=A-` or `bytes=-N` range.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nodeflash_installer::image::ImageInfo;
use nodeflash_installer::profile::Profile;

/// iPXE for UEFI that drives the NIC through the firmware's own network
/// driver (SNP), so it works on any NIC the firmware can PXE boot from.
pub const IPXE_EFI: &str = "/usr/lib/ipxe/snponly.efi";

/// `nodeflash serve`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Profile name: serves target/nodeflash/PROFILE.iso.
    #[arg(long)]
    pub profile: Option<String>,
    /// The image to serve [default: target/nodeflash/PROFILE.iso].
    #[arg(long)]
    pub iso: Option<PathBuf>,
    /// This server's IPv4 address on the nodes' LAN: HTTP listens there and
    /// the iPXE script and proxy DHCP point to it.
    #[arg(long)]
    pub address: Ipv4Addr,
    /// HTTP port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// At most this many responses are sent at once (one worker thread
    /// each); further requests wait their turn.
    #[arg(long, default_value_t = 32)]
    pub max_connections: usize,
    /// At most this many MB/s (10^6 bytes) per response, to leave room on
    /// a LAN that others use [default: no limit].
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Seconds without a byte of the payload before a node gives up its
    /// install [default: the installer's, 120].
    #[arg(long, value_name = "SECONDS")]
    pub payload_stall: Option<u64>,
    /// Only HTTP: no proxy DHCP and TFTP (the LAN's DHCP server then points
    /// PXE clients to iPXE and iPXE to http://ADDRESS:PORT/boot.ipxe).
    #[arg(long)]
    pub no_dhcp: bool,
    /// Where dnsmasq's configuration, TFTP root and log go
    /// [default: a temporary directory].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

pub const SERVE_HELP: &str = concat!(
    "Serves: /boot.ipxe (the iPXE script), /vmlinuz and /initrd (the image's kernel and\n",
    "initramfs), /payload (the store payload, with range requests); with proxy DHCP\n",
    "(the default), dnsmasq answers PXE clients beside the LAN's DHCP server and\n",
    "serves iPXE over TFTP. One log line per node and file: MAC, node, bytes, done or\n",
    "failed. Stops on Ctrl-C or SIGTERM (dnsmasq with it). See docs/netboot.md.\n\n",
    "Examples:\n",
    "  nodeflash serve --profile alrest --address 192.168.1.10\n",
    "  nodeflash serve --iso alrest.iso --address 192.168.1.10 --no-dhcp --max-connections 8\n",
    "\nExit status: 0 success, 1 error, 2 bad usage."
);

/// A byte range of the ISO file: where a file of the ISO9660 tree lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Where `path` lies in `iso`, from xorriso's `-find … -exec report_lba`
/// (xorriso(1), "report_lba"): one line per extent, `File data lba: XT ,
/// START , BLOCKS , FILESIZE , 'PATH'` in 2048-byte blocks. A file in several
/// extents (over 4 GiB) must have them one after the other.
pub fn iso_extent(iso: &Path, path: &str) -> Result<Extent> {
    let out = Command::new("xorriso")
        .args(["-indev"])
        .arg(iso)
        .args(["-find", path, "-exec", "report_lba"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run xorriso (Debian package xorriso)")?;
    if !out.status.success() {
        bail!(
            "xorriso cannot read {}: {}",
            iso.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_report_lba(&String::from_utf8_lossy(&out.stdout), path)
        .with_context(|| format!("{} in {}", path, iso.display()))
}

/// The parser of [`iso_extent`].
pub fn parse_report_lba(text: &str, path: &str) -> Result<Extent> {
    let quoted = format!("'{path}'");
    let mut found: Option<Extent> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("File data lba:") else {
            continue;
        };
        let fields: Vec<&str> = rest.split(',').map(str::trim).collect();
        if fields.len() != 5 || fields[4] != quoted {
            continue;
        }
        let num = |i: usize| -> Result<u64> {
            fields[i]
                .parse()
                .with_context(|| format!("bad number {:?} in xorriso's report", fields[i]))
        };
        let (start, size) = (num(1)? * 2048, num(3)?);
        found = Some(match found {
            None => Extent {
                offset: start,
                len: size,
            },
            Some(e) if e.offset + e.len == start => Extent {
                offset: e.offset,
                len: e.len + size,
            },
            Some(_) => bail!("the file's extents are not contiguous"),
        });
    }
    found.context("not found")
}

/// Reads `len` bytes at `offset` of `file`.
fn read_at(file: &Path, e: Extent) -> Result<Vec<u8>> {
    let mut f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    f.seek(SeekFrom::Start(e.offset))
        .with_context(|| format!("cannot read {}", file.display()))?;
    let mut v = vec![0u8; e.len as usize];
    f.read_exact(&mut v)
        .with_context(|| format!("cannot read {}", file.display()))?;
    Ok(v)
}

/// The image's files as served.
pub struct Image {
    pub iso: PathBuf,
    pub info: ImageInfo,
    pub profile: Profile,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    /// The store payload's extent in the ISO.
    pub payload: Option<Extent>,
    /// `--payload-stall`: seconds without a byte of the payload before a
    /// node gives up, passed on the kernel command line.
    pub payload_stall: Option<u64>,
}

impl Image {
    /// Reads what the ISO holds: `image.json`, `profile.toml` and the
    /// payload's extent from its ISO9660 tree, the kernel and initramfs
    /// from its EFI partition (GPT type C12A7328-…, 512-byte sectors).
    pub fn load(iso: &Path) -> Result<Self> {
        let json = read_at(iso, iso_extent(iso, "/nodeflash/image.json")?)?;
        let info: ImageInfo = serde_json::from_slice(&json)
            .with_context(|| format!("{}: bad /nodeflash/image.json", iso.display()))?;
        let toml = read_at(iso, iso_extent(iso, "/nodeflash/profile.toml")?)?;
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let profile_path = dir.path().join(format!("{}.toml", info.profile));
        std::fs::write(&profile_path, toml).context("cannot write the profile")?;
        let profile = Profile::load(&profile_path)
            .with_context(|| format!("{}: bad /nodeflash/profile.toml", iso.display()))?;
        let payload = match &info.payload {
            Some(p) => {
                let e = iso_extent(iso, &format!("/{}", p.path.trim_start_matches('/')))?;
                if e.len != p.bytes {
                    bail!(
                        "{}: the payload is {} bytes instead of the {} its image.json says",
                        iso.display(),
                        e.len,
                        p.bytes
                    );
                }
                Some(e)
            }
            None => None,
        };
        let esp = esp_extent(iso)?;
        let esp_path = dir.path().join("esp.img");
        std::fs::write(&esp_path, read_at(iso, esp)?).context("cannot write the ESP copy")?;
        let kernel = crate::efi::read_fat_file(&esp_path, "nodeflash/vmlinuz")?;
        let initrd = crate::efi::read_fat_file(&esp_path, "nodeflash/initrd.zst")?;
        Ok(Self {
            iso: iso.to_path_buf(),
            info,
            profile,
            kernel,
            initrd,
            payload,
            payload_stall: None,
        })
    }

    /// The node a MAC address is given to by the profile (`match = { mac }`),
    /// if any.
    pub fn node_of_mac(&self, mac: &str) -> Option<String> {
        self.profile
            .nodes
            .iter()
            .find(|n| {
                n.matches
                    .mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            })
            .map(|n| n.name.get_ref().to_string())
    }

    /// The iPXE script: the image's kernel and initramfs with the image's
    /// command line and the payload's URL (`${net0/mac}` is filled in by
    /// iPXE, so the server can name the node in its log). On UEFI, iPXE
    /// hands the initramfs to the kernel's EFI stub by its name
    /// (`initrd=initrd`).
    pub fn ipxe_script(&self, base: &str) -> String {
        let mut args = format!("initrd=initrd {}", self.profile.image.cmdline);
        if self.payload.is_some() {
            args.push_str(&format!(
                " {}{base}/payload?mac=${{net0/mac}}",
                nodeflash_installer::image::PAYLOAD_URL_WORD
            ));
            if let Some(s) = self.payload_stall {
                args.push_str(&format!(
                    " {}{s}",
                    nodeflash_installer::image::PAYLOAD_STALL_WORD
                ));
            }
        }
        format!(
            "#!ipxe\necho nodeflash {} ({}) from {base}\nkernel {base}/vmlinuz?mac=${{net0/mac}} {args}\ninitrd --name initrd {base}/initrd?mac=${{net0/mac}}\nboot\n",
            self.info.profile,
            self.info.short_id()
        )
    }
}

/// The ESP appended to the ISO, from its GPT (512-byte sectors).
fn esp_extent(iso: &Path) -> Result<Extent> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(iso)
        .with_context(|| format!("cannot read the GPT of {}", iso.display()))?;
    let esp = disk
        .partitions()
        .values()
        .find(|p| p.part_type_guid == gpt::partition_types::EFI)
        .with_context(|| format!("{} has no EFI system partition", iso.display()))?;
    Ok(Extent {
        offset: esp.first_lba * 512,
        len: (esp.last_lba + 1 - esp.first_lba) * 512,
    })
}

/// One `Range` header against a file of `total` bytes: the bytes
/// `start..end` asked for, `None` for the whole file (no header), or an
/// error for a range that cannot be served (416). One range only;
/// `bytes=A-B`, `bytes=A-` and `bytes=-N` (RFC 9110 §14.1.2).
pub fn parse_range(header: Option<&str>, total: u64) -> Result<Option<(u64, u64)>, String> {
    let Some(h) = header else { return Ok(None) };
    let spec = h
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("not a byte range: {h:?}"))?;
    if spec.contains(',') {
        return Err("several ranges are not served".into());
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("bad range {h:?}"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("bad range {h:?}"))
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (false, true) => (num(a)?, total),
        (false, false) => (num(a)?, num(b)?.saturating_add(1).min(total)),
        (true, false) => (total.saturating_sub(num(b)?), total),
        (true, true) => return Err(format!("bad range {h:?}")),
    };
    if start >= end || start >= total {
        return Err(format!("range {h:?} is outside the {total} bytes"));
    }
    Ok(Some((start, end)))
}

/// A reader that counts what was read through it.
struct Counted<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf)?;
        self.n.fetch_add(r as u64, Ordering::Relaxed);
        Ok(r)
    }
}

/// Responses under way: (log line's start, bytes sent, bytes to send), so
/// that a stop logs each as failed.
type Active = std::sync::Mutex<std::collections::BTreeMap<u64, (String, Arc<AtomicU64>, u64)>>;
static ACTIVE: Active = std::sync::Mutex::new(std::collections::BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Logs every response still under way as failed (the server stops).
fn log_unfinished(log: fn(&str)) {
    if let Ok(active) = ACTIVE.lock() {
        for (start, sent, total) in active.values() {
            log(&format!(
                "{start}: failed after {} of {total} bytes: the server stopped",
                sent.load(Ordering::Relaxed)
            ));
        }
    }
}

/// A reader that keeps to `rate` bytes per second on average.
struct Throttled<R> {
    inner: R,
    rate: f64,
    started: Instant,
    n: u64,
}

impl<R: Read> Read for Throttled<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf)?;
        self.n += r as u64;
        let due = std::time::Duration::from_secs_f64(self.n as f64 / self.rate);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
        Ok(r)
    }
}

/// The `mac=` of a request's query, lower case, if it looks like a MAC.
fn mac_of(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let mac = query.split('&').find_map(|kv| kv.strip_prefix("mac="))?;
    let mac = mac
        .replace("%3A", ":")
        .replace("%3a", ":")
        .to_ascii_lowercase();
    let ok = mac.len() == 17
        && mac
            .split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(mac)
}

/// Serves `image` over HTTP on `addr:port` with `workers` threads until
/// `stop` says so. Each request is logged with `log`.
pub fn http(
    image: Arc<Image>,
    listen: (Ipv4Addr, u16),
    (workers, rate_limit): (usize, Option<f64>),
    log: fn(&str),
) -> Result<Arc<tiny_http::Server>> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", listen.0, listen.1))?;
    let server = Arc::new(server);
    let base = format!("http://{}:{}", listen.0, listen.1);
    for _ in 0..workers.max(1) {
        let (server, image, base) = (server.clone(), image.clone(), base.clone());
        std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                respond(&image, &base, req, rate_limit, log);
            }
        });
    }
    Ok(server)
}

/// One request: the script, the kernel, the initramfs or (a range of) the
/// payload, and its log line.
fn respond(
    image: &Image,
    base: &str,
    req: tiny_http::Request,
    rate_limit: Option<f64>,
    log: fn(&str),
) {
    use tiny_http::{Header, Response, StatusCode};
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or_default().to_string();
    let peer = req
        .remote_addr()
        .map_or_else(|| "?".to_string(), |a| a.ip().to_string());
    let mac = mac_of(&url);
    let who = match &mac {
        Some(m) => match image.node_of_mac(m) {
            Some(n) => format!("{m} (node {n})"),
            None => format!("{m} (no [[nodes]] entry has this MAC)"),
        },
        None => "unknown MAC".to_string(),
    };
    let header =
        |name: &str, value: &str| Header::from_bytes(name.as_bytes(), value.as_bytes()).ok();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let (what, total, result) = match path.as_str() {
        "/boot.ipxe" => {
            let script = image.ipxe_script(base);
            let len = script.len() as u64;
            let mut r = Response::from_string(script);
            if let Some(h) = header("Content-Type", "text/plain") {
                r.add_header(h);
            }
            sent.store(len, Ordering::Relaxed);
            ("boot.ipxe".to_string(), len, req.respond(r))
        }
        "/vmlinuz" | "/initrd" | "/payload" => {
            let (bytes, extent): (Option<&[u8]>, Option<Extent>) = match path.as_str() {
                "/vmlinuz" => (Some(&image.kernel), None),
                "/initrd" => (Some(&image.initrd), None),
                _ => (None, image.payload),
            };
            let total = bytes.map_or_else(|| extent.map_or(0, |e| e.len), |b| b.len() as u64);
            if bytes.is_none() && extent.is_none() {
                let r = req.respond(Response::empty(StatusCode(404)));
                log(&format!(
                    "serve: {peer} {who}: {path}: 404 (the image has no payload)"
                ));
                let _ = r;
                return;
            }
            let (start, end, status) = match parse_range(range.as_deref(), total) {
                Ok(None) => (0, total, 200),
                Ok(Some((a, b))) => (a, b, 206),
                Err(e) => {
                    let mut r = Response::empty(StatusCode(416));
                    if let Some(h) = header("Content-Range", &format!("bytes */{total}")) {
                        r.add_header(h);
                    }
                    let _ = req.respond(r);
                    log(&format!("serve: {peer} {who}: {path}: 416 ({e})"));
                    return;
                }
            };
            let len = end - start;
            let reader: Box<dyn Read + Send> = match (bytes, extent) {
                (Some(b), _) => Box::new(std::io::Cursor::new(
                    b[start as usize..end as usize].to_vec(),
                )),
                (None, Some(e)) => match File::open(&image.iso).and_then(|mut f| {
                    f.seek(SeekFrom::Start(e.offset + start))?;
                    Ok(f)
                }) {
                    Ok(f) => Box::new(f.take(len)),
                    Err(err) => {
                        let _ = req.respond(Response::empty(StatusCode(500)));
                        log(&format!(
                            "serve: {peer} {who}: {path}: failed: cannot read {}: {err}",
                            image.iso.display()
                        ));
                        return;
                    }
                },
                (None, None) => return,
            };
            let mut headers = vec![];
            headers.extend(header("Accept-Ranges", "bytes"));
            headers.extend(header("Content-Type", "application/octet-stream"));
            if status == 206 {
                headers.extend(header(
                    "Content-Range",
                    &format!("bytes {start}-{}/{total}", end - 1),
                ));
            }
            let reader: Box<dyn Read + Send> = match rate_limit {
                Some(mb_s) => Box::new(Throttled {
                    inner: reader,
                    rate: mb_s * 1e6,
                    started: Instant::now(),
                    n: 0,
                }),
                None => reader,
            };
            let body = Counted {
                inner: reader,
                n: sent.clone(),
            };
            let r = Response::new(StatusCode(status), headers, body, Some(len as usize), None);
            let what = if status == 206 {
                format!("{} bytes {start}-{} of {total}", &path[1..], end - 1)
            } else {
                format!("{} ({total} bytes)", &path[1..])
            };
            let id = NEXT.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut a) = ACTIVE.lock() {
                a.insert(
                    id,
                    (format!("serve: {peer} {who}: {what}"), sent.clone(), len),
                );
            }
            let result = req.respond(r);
            if let Ok(mut a) = ACTIVE.lock() {
                a.remove(&id);
            }
            (what, len, result)
        }
        _ => {
            let r = req.respond(Response::empty(StatusCode(404)));
            log(&format!("serve: {peer} {who}: {path}: 404"));
            let _ = r;
            return;
        }
    };
    let n = sent.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let verdict = match result {
        Ok(()) if n >= total => "done".to_string(),
        Ok(()) => format!("failed after {n} of {total} bytes"),
        Err(e) => format!("failed after {n} of {total} bytes: {e}"),
    };
    log(&format!(
        "serve: {peer} {who}: {what}: {verdict}, {n} bytes in {secs:.1}s ({:.1} MB/s)",
        nodeflash_installer::units::mb_per_s(n, secs)
    ));
}

/// dnsmasq's configuration: no DNS (`port=0`); proxy DHCP on the subnet of
/// `address` (`dhcp-range=ADDRESS,proxy`: the LAN's DHCP server keeps
/// giving the addresses); PXE clients that are not iPXE get iPXE over TFTP
/// from `tftp_root`; iPXE (user class `iPXE`, RFC 3004 option 77, as iPXE
/// sends it) gets the script's URL. From dnsmasq(8): `--dhcp-range` with
/// `proxy`, `--pxe-service`, `--dhcp-userclass`, `--enable-tftp`.
pub fn dnsmasq_conf(address: Ipv4Addr, port: u16, tftp_root: &Path, log: &Path) -> String {
    format!(
        "# written by nodeflash serve\n\
         port=0\n\
         log-dhcp\n\
         log-facility={log}\n\
         dhcp-range={address},proxy\n\
         dhcp-userclass=set:ipxe,iPXE\n\
         pxe-prompt=\"nodeflash\",0\n\
         pxe-service=tag:!ipxe,x86-64_EFI,\"nodeflash: iPXE\",ipxe.efi\n\
         pxe-service=tag:ipxe,x86-64_EFI,\"nodeflash: install\",http://{address}:{port}/boot.ipxe\n\
         dhcp-boot=tag:ipxe,http://{address}:{port}/boot.ipxe\n\
         enable-tftp\n\
         tftp-root={root}\n",
        log = log.display(),
        root = tftp_root.display()
    )
}

/// dnsmasq, stopped (SIGTERM, then waited for) when dropped.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}

/// `nodeflash serve`: loads the image, starts HTTP and (unless `no_dhcp`)
/// dnsmasq, and runs until SIGINT or SIGTERM.
pub fn run(a: &ServeArgs, iso: &Path) -> Result<()> {
    // The image first, so that its xorriso runs can still be interrupted;
    // then the signals blocked before any thread starts, so that every
    // thread has them blocked and the signal reaches `signals.wait()` (and
    // dnsmasq is stopped).
    let mut image = Image::load(iso)?;
    let signals = stop_signals();
    signals
        .thread_block()
        .context("cannot block SIGINT and SIGTERM")?;
    image.payload_stall = a.payload_stall;
    let image = Arc::new(image);
    let state = match &a.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::tempdir().context("cannot create a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let (dir, _keep) = state;
    let log: fn(&str) = |l| eprintln!("{l}");
    if a.rate_limit.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate-limit must be more than 0 MB/s");
    }
    let server = http(
        image.clone(),
        (a.address, a.port),
        (a.max_connections, a.rate_limit),
        log,
    )?;
    eprintln!(
        "serve: {} ({}) on http://{}:{}/ (payload {}), at most {} responses at once",
        image.info.profile,
        image.info.short_id(),
        a.address,
        a.port,
        image
            .payload
            .map_or("none".to_string(), |e| format!("{} bytes", e.len)),
        a.max_connections
    );
    let _dnsmasq = if a.no_dhcp {
        eprintln!("serve: no proxy DHCP (--no-dhcp): point PXE to iPXE and iPXE to http://{}:{}/boot.ipxe", a.address, a.port);
        None
    } else {
        crate::tools::require(crate::tools::SERVE_TOOLS)?;
        let tftp = dir.join("tftp");
        std::fs::create_dir_all(&tftp)
            .with_context(|| format!("cannot create {}", tftp.display()))?;
        std::fs::copy(IPXE_EFI, tftp.join("ipxe.efi"))
            .with_context(|| format!("cannot copy {IPXE_EFI} (Debian package ipxe)"))?;
        let conf = dir.join("dnsmasq.conf");
        let dlog = dir.join("dnsmasq.log");
        std::fs::write(&conf, dnsmasq_conf(a.address, a.port, &tftp, &dlog))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut command = Command::new("dnsmasq");
        // SAFETY: between fork and exec only pthread_sigmask runs, which is
        // async-signal-safe; dnsmasq must not inherit the blocked SIGTERM.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                stop_signals()
                    .thread_unblock()
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq (Debian package dnsmasq-base)")?;
        let mut d = Dnsmasq(child);
        std::thread::sleep(std::time::Duration::from_millis(300));
        // A port already taken (67, 4011, 69) or a bad configuration ends
        // dnsmasq at once: say so rather than serve nodes that never boot.
        if let Some(status) = d.0.try_wait().context("cannot ask dnsmasq's state")? {
            bail!(
                "dnsmasq exited at once ({status}); its log {} says why (is another DHCP \
                 proxy or TFTP server running on this host?)",
                dlog.display()
            );
        }
        eprintln!(
            "serve: proxy DHCP and TFTP (iPXE) by dnsmasq on {}'s subnet; its config {} and log {}",
            a.address,
            conf.display(),
            dlog.display()
        );
        Some(d)
    };
    signals.wait().context("cannot wait for a signal")?;
    eprintln!("serve: stopping");
    server.unblock();
    log_unfinished(log);
    Ok(())
}

/// SIGINT and SIGTERM: what stops `serve`.
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-9"), 10), Ok(Some((0, 10))));
        assert_eq!(parse_range(Some("bytes=3-"), 10), Ok(Some((3, 10))));
        assert_eq!(parse_range(Some("bytes=3-100"), 10), Ok(Some((3, 10))));
        assert_eq!(parse_range(Some("bytes=-4"), 10), Ok(Some((6, 10))));
        assert!(parse_range(Some("bytes=10-"), 10).is_err());
        assert!(parse_range(Some("bytes=0-1,3-4"), 10).is_err());
        assert!(parse_range(Some("items=0-1"), 10).is_err());
        assert!(parse_range(Some("bytes=5-2"), 10).is_err());
    }

    #[test]
    fn report_lba() {
        let text = "Report layout: xt , Startlba ,   Blocks , Filesize , ISO image path\n\
            File data lba:  0 ,       69 ,        4 ,     6739 , '/nodeflash/image.json'\n\
            File data lba:  0 ,       74 ,    12876 , 26368174 , '/nodeflash/store.nfp'\n";
        assert_eq!(
            parse_report_lba(text, "/nodeflash/store.nfp").expect("found"),
            Extent {
                offset: 74 * 2048,
                len: 26368174
            }
        );
        let two = "File data lba:  0 ,  10 ,  2 ,  4096 , '/a'\nFile data lba:  1 ,  12 ,  1 ,  5 , '/a'\n";
        assert_eq!(
            parse_report_lba(two, "/a").expect("found"),
            Extent {
                offset: 10 * 2048,
                len: 4101
            }
        );
        let apart = "File data lba:  0 ,  10 ,  2 ,  4096 , '/a'\nFile data lba:  1 ,  20 ,  1 ,  5 , '/a'\n";
        assert!(parse_report_lba(apart, "/a").is_err());
        assert!(parse_report_lba(text, "/nope").is_err());
    }

    #[test]
    fn macs_of_queries() {
        assert_eq!(
            mac_of("/payload?mac=52:54:00:AA:bb:01").as_deref(),
            Some("52:54:00:aa:bb:01")
        );
        assert_eq!(
            mac_of("/payload?x=1&mac=52%3A54%3A00%3Aaa%3Abb%3A01").as_deref(),
            Some("52:54:00:aa:bb:01")
        );
        assert_eq!(mac_of("/payload?mac=${net0/mac}"), None);
        assert_eq!(mac_of("/payload"), None);
    }
}
