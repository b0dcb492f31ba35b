//! Downloads from a Hugging Face hub into the shared cache, on hf-hub's
//! tokio API (chunked, resumable through its `.sync.part` files), with what a
//! desktop app adds around it: a free-space check, bounded retries, stall
//! detection, pause and cancel, progress with rate and ETA, and a hash check
//! of every file against the ETag the hub reported (sha256 for LFS files,
//! git's blob sha1 for small ones).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hf_hub::api::tokio::{ApiBuilder, ApiError};
use serde::Serialize;
use sha1::Digest as _;

use crate::cache::remove_if_exists;
use crate::{Error, HubCache, RemoteFile, Result};

/// Room left free on the disk beyond the download itself.
const DISK_MARGIN: u64 = 64 << 20;

/// How to reach the hub and how patient to be.
#[derive(Clone)]
pub struct HubOptions {
    /// `https://huggingface.co`, or `HF_ENDPOINT`.
    pub endpoint: String,
    /// A Hugging Face token for gated or private repositories.
    pub token: Option<String>,
    /// Where files land.
    pub cache: HubCache,
    /// Bytes per ranged request: also how much a resume may repeat.
    pub chunk_bytes: usize,
    /// Extra attempts after a transient failure.
    pub retries: u32,
    /// Wait before the first retry (doubles each time).
    pub retry_delay: Duration,
    /// A download that receives nothing for this long is restarted.
    pub stall_timeout: Duration,
    /// How free space is measured (replaceable in tests).
    pub free_space: fn(&Path) -> std::io::Result<u64>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache", &self.cache)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("retries", &self.retries)
            .field("stall_timeout", &self.stall_timeout)
            .finish()
    }
}

fn available_space(p: &Path) -> std::io::Result<u64> {
    // The cache folder may not exist yet: measure its nearest ancestor.
    let mut p = p;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    fs4::available_space(p)
}

impl HubOptions {
    /// The hub and cache the environment names: `HF_ENDPOINT`, `HF_TOKEN`
    /// (else the token file huggingface-cli writes), `HF_HUB_CACHE` / `HF_HOME`.
    pub fn from_env() -> Self {
        let cache = HubCache::from_env();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| cache.hf().token());
        Self {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_owned(),
            token,
            cache,
            chunk_bytes: 8 << 20,
            retries: 3,
            retry_delay: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(30),
            free_space: available_space,
        }
    }
}

/// Stops a download from another thread: pause keeps what was downloaded
/// for a later resume, cancel removes it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicU8>);

const RUNNING: u8 = 0;
const PAUSE: u8 = 1;
const DISCARD: u8 = 2;

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Stop, keeping the partial download.
    pub fn pause(&self) {
        let _ = self
            .0
            .compare_exchange(RUNNING, PAUSE, Ordering::SeqCst, Ordering::SeqCst);
    }
    /// Stop and remove the partial download.
    pub fn cancel(&self) {
        self.0.store(DISCARD, Ordering::SeqCst);
    }
    /// Whether either was asked.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst) != RUNNING
    }
    fn discards(&self) -> bool {
        self.0.load(Ordering::SeqCst) == DISCARD
    }
}

/// What a download is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asking the hub for sizes and hashes.
    Checking,
    /// Receiving bytes.
    Downloading,
    /// Hashing what arrived.
    Verifying,
}

/// A progress report, sent about ten times a second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownloadProgress {
    /// What is happening.
    pub phase: Phase,
    /// `repo/path` of the current file.
    pub file: String,
    /// Bytes done over all files (downloaded, or hashed while verifying).
    pub done_bytes: u64,
    /// Bytes over all files.
    pub total_bytes: u64,
    /// Recent rate.
    pub bytes_per_sec: f64,
    /// Seconds left at that rate.
    pub eta_secs: Option<f64>,
}

/// A file present and verified in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fetched {
    /// What was asked for.
    pub file: RemoteFile,
    /// Its snapshot path in the cache.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The sha256 of its contents (for LFS files: the hub's ETag).
    pub sha256: String,
    /// False when it was already in the cache.
    pub downloaded: bool,
}

/// What the hub says about a file before it is downloaded.
#[derive(Debug, Clone)]
struct Remote {
    size: u64,
    etag: String,
}

/// The downloader.
#[derive(Debug, Clone)]
pub struct Hub {
    opts: HubOptions,
}

/// A rate over the last few seconds.
struct RateMeter {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateMeter {
    fn new() -> Self {
        Self {
            samples: Default::default(),
        }
    }
    fn rate(&mut self, bytes: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.2 {
            0.0
        } else {
            bytes.saturating_sub(b0) as f64 / dt
        }
    }
}

/// Progress bookkeeping over several files.
struct Reporter<'a> {
    on_progress: &'a mut (dyn FnMut(&DownloadProgress) + Send),
    meter: RateMeter,
    base: u64,
    total: u64,
}

impl Reporter<'_> {
    fn report(&mut self, phase: Phase, file: &RemoteFile, done_in_file: u64) {
        let done = self.base + done_in_file;
        let rate = self.meter.rate(done);
        let left = self.total.saturating_sub(done) as f64;
        (self.on_progress)(&DownloadProgress {
            phase,
            file: file.display(),
            done_bytes: done,
            total_bytes: self.total,
            bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| left / rate),
        });
    }
}

/// hf-hub's progress hook: a shared byte counter.
#[derive(Clone)]
struct Counter(Arc<AtomicU64>);

impl hf_hub::api::tokio::Progress for Counter {
    async fn init(&mut self, _size: usize, _filename: &str) {
        self.0.store(0, Ordering::SeqCst);
    }
    async fn update(&mut self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::SeqCst);
    }
    async fn finish(&mut self) {}
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))
}

impl Hub {
    /// A downloader with these options.
    pub fn new(opts: HubOptions) -> Self {
        Self { opts }
    }

    /// A downloader configured from the environment.
    pub fn from_env() -> Self {
        Self::new(HubOptions::from_env())
    }

    /// The options in use.
    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    /// The cache downloads land in.
    pub fn cache(&self) -> &HubCache {
        &self.opts.cache
    }

    /// Replaces the token in a message (errors from libraries may echo requests).
    fn redact(&self, s: String) -> String {
        match &self.opts.token {
            Some(t) if !t.is_empty() => s.replace(t.as_str(), "<token>"),
            _ => s,
        }
    }

    /// The URL hf-hub downloads `f` from.
    pub fn url(&self, f: &RemoteFile) -> String {
        let prefix = match f.repo_type {
            crate::RepoType::Model => "",
            crate::RepoType::Dataset => "datasets/",
        };
        format!(
            "{}/{prefix}{}/resolve/{}/{}",
            self.opts.endpoint,
            f.repo,
            f.revision.replace('/', "%2F"),
            f.path
        )
    }

    /// Makes sure every file is in the cache and verified, downloading the
    /// missing ones. Files already present are found without any request.
    /// Blocks; call it off the UI thread. `cancel` stops it between chunks.
    pub fn fetch(
        &self,
        files: &[RemoteFile],
        on_progress: &mut (dyn FnMut(&DownloadProgress) + Send),
        cancel: &CancelToken,
    ) -> Result<Vec<Fetched>> {
        let present: Vec<Option<PathBuf>> = files.iter().map(|f| self.cache().find(f)).collect();
        let mut remotes: Vec<Option<Remote>> = vec![None; files.len()];
        for (i, f) in files.iter().enumerate() {
            if present[i].is_none() {
                if cancel.is_stopped() {
                    return Err(Error::Cancelled);
                }
                (on_progress)(&DownloadProgress {
                    phase: Phase::Checking,
                    file: f.display(),
                    done_bytes: 0,
                    total_bytes: 0,
                    bytes_per_sec: 0.0,
                    eta_secs: None,
                });
                remotes[i] = Some(self.with_retries(f, cancel, || self.probe(f))?);
            }
        }
        let sizes: Vec<u64> = files
            .iter()
            .zip(&present)
            .zip(&remotes)
            .map(|((_, p), r)| match (p, r) {
                (Some(p), _) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                (None, Some(r)) => r.size,
                (None, None) => 0,
            })
            .collect();
        let to_download: u64 = files
            .iter()
            .zip(&remotes)
            .filter_map(|(f, r)| {
                r.as_ref()
                    .map(|r| r.size.saturating_sub(self.part_bytes(f, &r.etag)))
            })
            .sum();
        if to_download > 0 {
            let root = self.cache().root();
            let free = (self.opts.free_space)(root).map_err(|e| Error::io(root, e))?;
            if free < to_download + DISK_MARGIN {
                return Err(Error::DiskFull {
                    dir: root.to_owned(),
                    needed: to_download + DISK_MARGIN,
                    free,
                });
            }
        }

        let mut reporter = Reporter {
            on_progress,
            meter: RateMeter::new(),
            base: 0,
            total: sizes.iter().sum(),
        };
        let mut out = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let (path, downloaded) = match (&present[i], &remotes[i]) {
                (Some(p), _) => (p.clone(), false),
                (None, Some(r)) => {
                    let p = self
                        .with_retries(f, cancel, || self.attempt(f, r, &mut reporter, cancel))
                        .inspect_err(|e| {
                            if matches!(e, Error::Cancelled) && cancel.discards() {
                                let _ = self.remove_part(f, &r.etag);
                            }
                        })?;
                    (p, true)
                }
                (None, None) => unreachable!("probed above"),
            };
            let sha256 = self.verify(f, &path, &mut reporter, cancel)?;
            reporter.base += sizes[i];
            out.push(Fetched {
                file: f.clone(),
                bytes: sizes[i],
                path,
                sha256,
                downloaded,
            });
        }
        Ok(out)
    }

    fn with_retries<T>(
        &self,
        f: &RemoteFile,
        cancel: &CancelToken,
        mut op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut delay = self.opts.retry_delay;
        for attempt in 0.. {
            match op() {
                Err(e) if e.is_transient() && attempt < self.opts.retries => {
                    tracing::warn!(file = %f.display(), attempt, error = %e, "retrying");
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if cancel.is_stopped() {
                            return Err(Error::Cancelled);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    delay *= 2;
                }
                r => return r,
            }
        }
        unreachable!()
    }

    fn client(&self) -> Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &self.opts.token {
            let mut v =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    Error::Protocol {
                        file: "token".into(),
                        message: "the Hugging Face token has characters a header cannot carry"
                            .into(),
                    }
                })?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(self.opts.stall_timeout)
            .user_agent(concat!("dramatis/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Protocol {
                file: "client".into(),
                message: e.to_string(),
            })
    }

    fn status_error(&self, f: &RemoteFile, status: u16) -> Error {
        match status {
            404 => Error::NotFound {
                file: f.display(),
                endpoint: self.opts.endpoint.clone(),
            },
            401 | 403 => Error::Unauthorized {
                file: f.display(),
                status,
            },
            _ => Error::Http {
                file: f.display(),
                status,
            },
        }
    }

    fn network_error(&self, f: &RemoteFile, e: &reqwest::Error) -> Error {
        if let Some(s) = e.status() {
            return self.status_error(f, s.as_u16());
        }
        let mut message = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Error::Network {
            file: f.display(),
            message: self.redact(message),
        }
    }

    /// Asks the hub for a file's size and ETag: the resolve URL answers
    /// (or redirects, for LFS files) with `X-Linked-Size` / `X-Linked-Etag`,
    /// else `Content-Range` / `ETag`.
    fn probe(&self, f: &RemoteFile) -> Result<Remote> {
        let client = self.client()?;
        let url = self.url(f);
        runtime()?.block_on(async {
            let send = |u: String| {
                client
                    .get(u)
                    .header(reqwest::header::RANGE, "bytes=0-0")
                    .send()
            };
            let r = send(url.clone())
                .await
                .map_err(|e| self.network_error(f, &e))?;
            let status = r.status();
            if !(status.is_success() || status.is_redirection()) {
                return Err(self.status_error(f, status.as_u16()));
            }
            let h = r.headers();
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let etag = get("x-linked-etag")
                .or_else(|| get("etag"))
                .map(|e| e.trim_start_matches("W/").replace('"', ""))
                .ok_or_else(|| Error::Protocol {
                    file: f.display(),
                    message: "no ETag".into(),
                })?;
            if get("x-repo-commit").is_none() {
                return Err(Error::Protocol {
                    file: f.display(),
                    message: "no X-Repo-Commit".into(),
                });
            }
            let size_of = |range: Option<String>| {
                range.and_then(|r| r.rsplit('/').next().and_then(|n| n.parse::<u64>().ok()))
            };
            let size = match get("x-linked-size").and_then(|s| s.parse().ok()) {
                Some(s) => s,
                None if status.is_redirection() => {
                    let loc = get("location").ok_or_else(|| Error::Protocol {
                        file: f.display(),
                        message: "a redirect without Location".into(),
                    })?;
                    let target = reqwest::Url::parse(&url)
                        .and_then(|u| u.join(&loc))
                        .map_err(|e| Error::Protocol {
                            file: f.display(),
                            message: format!("bad redirect: {e}"),
                        })?;
                    let r2 = send(target.to_string())
                        .await
                        .map_err(|e| self.network_error(f, &e))?;
                    if !r2.status().is_success() {
                        return Err(self.status_error(f, r2.status().as_u16()));
                    }
                    size_of(
                        r2.headers()
                            .get("content-range")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                    )
                    .ok_or_else(|| Error::Protocol {
                        file: f.display(),
                        message: "no Content-Range".into(),
                    })?
                }
                None => size_of(get("content-range")).ok_or_else(|| Error::Protocol {
                    file: f.display(),
                    message: "no size (X-Linked-Size or Content-Range)".into(),
                })?,
            };
            Ok(Remote { size, etag })
        })
    }

    fn part_path(&self, f: &RemoteFile, etag: &str) -> PathBuf {
        self.cache()
            .repo_dir(f)
            .join("blobs")
            .join(format!("{etag}.sync.part"))
    }

    /// Bytes a resumable part file already holds.
    fn part_bytes(&self, f: &RemoteFile, etag: &str) -> u64 {
        let p = self.part_path(f, etag);
        let Ok(mut file) = std::fs::File::open(&p) else {
            return 0;
        };
        use std::io::{Seek, SeekFrom};
        let mut buf = [0u8; 8];
        if file.seek(SeekFrom::End(-8)).is_err() || file.read_exact(&mut buf).is_err() {
            return 0;
        }
        u64::from_le_bytes(buf)
    }

    fn remove_part(&self, f: &RemoteFile, etag: &str) -> std::io::Result<()> {
        remove_if_exists(&self.part_path(f, etag))
    }

    fn map_api_error(&self, f: &RemoteFile, e: ApiError) -> Error {
        match e {
            ApiError::RequestError(e) => self.network_error(f, &e),
            ApiError::TooManyRetries(inner) => self.map_api_error(f, *inner),
            ApiError::IoError(io) => Error::io(self.cache().repo_dir(f), io),
            ApiError::LockAcquisition(_) => Error::Busy(f.display()),
            other => Error::Protocol {
                file: f.display(),
                message: self.redact(other.to_string()),
            },
        }
    }

    /// One try at downloading a file, resuming a part file if there is one.
    /// Its own runtime: dropping it stops hf-hub's chunk tasks too.
    fn attempt(
        &self,
        f: &RemoteFile,
        remote: &Remote,
        reporter: &mut Reporter<'_>,
        cancel: &CancelToken,
    ) -> Result<PathBuf> {
        let api = ApiBuilder::from_cache(self.cache().hf())
            .with_endpoint(self.opts.endpoint.clone())
            .with_token(self.opts.token.clone())
            .with_progress(false)
            .with_chunk_size(Some(self.opts.chunk_bytes))
            .with_user_agent("dramatis", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| self.map_api_error(f, e))?;
        let repo = api.repo(f.hf_repo());
        let counter = Arc::new(AtomicU64::new(0));
        let rt = runtime()?;
        let stall = self.opts.stall_timeout;
        let result = rt.block_on(async {
            let download = repo.download_with_progress(&f.path, Counter(counter.clone()));
            tokio::pin!(download);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let (mut last, mut last_change) = (u64::MAX, Instant::now());
            loop {
                tokio::select! {
                    r = &mut download => break r.map_err(|e| self.map_api_error(f, e)),
                    _ = tick.tick() => {
                        let now = counter.load(Ordering::SeqCst).min(remote.size);
                        if now != last {
                            last = now;
                            last_change = Instant::now();
                            reporter.report(Phase::Downloading, f, now);
                        }
                        if cancel.is_stopped() {
                            break Err(Error::Cancelled);
                        }
                        if last_change.elapsed() > stall {
                            break Err(Error::Stalled { file: f.display(), secs: stall.as_secs() });
                        }
                    }
                }
            }
        });
        // Dropping the runtime drops the chunk tasks still in flight.
        rt.shutdown_timeout(Duration::from_secs(2));
        let path = result?;
        reporter.report(Phase::Downloading, f, remote.size);
        Ok(path)
    }

    /// Hashes a cached file and compares it with its blob's name (the ETag
    /// the hub reported). A mismatch removes the file.
    fn verify(
        &self,
        f: &RemoteFile,
        path: &Path,
        reporter: &mut Reporter<'_>,
        cancel: &CancelToken,
    ) -> Result<String> {
        let blob = HubCache::blob_of(path).map_err(|e| Error::io(path, e))?;
        let etag = blob
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mut file = std::fs::File::open(&blob).map_err(|e| Error::io(&blob, e))?;
        let len = file.metadata().map_err(|e| Error::io(&blob, e))?.len();
        let mut sha256 = sha2::Sha256::new();
        let mut git = sha1::Sha1::new();
        git.update(format!("blob {len}\0").as_bytes());
        let mut buf = vec![0u8; 1 << 20];
        let (mut done, mut last_report) = (0u64, Instant::now());
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&blob, e))?;
            if n == 0 {
                break;
            }
            sha256.update(&buf[..n]);
            git.update(&buf[..n]);
            done += n as u64;
            if last_report.elapsed() > Duration::from_millis(100) {
                last_report = Instant::now();
                reporter.report(Phase::Verifying, f, done);
                if cancel.is_stopped() {
                    return Err(Error::Cancelled);
                }
            }
        }
        reporter.report(Phase::Verifying, f, done);
        let sha256 = hex(&sha256.finalize());
        let (algorithm, actual) = match etag.len() {
            64 => ("sha256", sha256.clone()),
            40 => ("git-sha1", hex(&git.finalize())),
            _ => {
                return Err(Error::Protocol {
                    file: f.display(),
                    message: format!("cannot verify: the cached blob is named `{etag}`"),
                });
            }
        };
        if !actual.eq_ignore_ascii_case(&etag) {
            remove_if_exists(&blob).map_err(|e| Error::io(&blob, e))?;
            remove_if_exists(path).map_err(|e| Error::io(path, e))?;
            return Err(Error::Checksum {
                file: f.display(),
                algorithm,
                expected: etag,
                actual,
            });
        }
        Ok(sha256)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `1.8 GB`-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
