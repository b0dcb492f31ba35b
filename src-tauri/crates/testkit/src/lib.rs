//! Test support: a fake Hugging Face hub that answers the endpoints hf-hub
//! and Dramatis use, on 127.0.0.1, with knobs for the failures downloads must
//! survive (a dropped connection, a stall, an error status, a wrong hash,
//! a slow line). It is real HTTP over a real socket; only the hub is fake.
//!
//! LFS files answer `resolve` with a 302 to a "CDN" on `localhost` (another
//! host name, as the real CDN is), carrying `X-Linked-Etag` (sha256),
//! `X-Linked-Size` and `X-Repo-Commit`; small files answer directly with a
//! git-sha1 `ETag`. Both honour `Range`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Digest as _;

/// The commit every hosted file belongs to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A file the fake hub serves.
#[derive(Debug, Clone)]
pub struct Hosted {
    /// Contents.
    pub bytes: Arc<Vec<u8>>,
    /// Served through the LFS redirect (sha256 ETag) or directly (git sha1).
    pub lfs: bool,
    /// The hash announced; defaults to the real one. Set it to lie.
    pub etag: String,
}

impl Hosted {
    /// An LFS file (weights, parquet).
    pub fn lfs(bytes: Vec<u8>) -> Self {
        let etag = sha256_hex(&bytes);
        Self {
            bytes: Arc::new(bytes),
            lfs: true,
            etag,
        }
    }
    /// A small git file (config, tokenizer).
    pub fn small(bytes: Vec<u8>) -> Self {
        let etag = git_sha1_hex(&bytes);
        Self {
            bytes: Arc::new(bytes),
            lfs: false,
            etag,
        }
    }
}

/// One request the hub saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `GET`, `HEAD`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The `Range` start and inclusive end, if any.
    pub range: Option<(u64, Option<u64>)>,
    /// The `Authorization` header.
    pub auth: Option<String>,
}

/// Failure knobs; each one-shot knob fires once and clears itself.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer every request with this status.
    pub status: Option<u16>,
    /// Close the connection once this many body bytes were sent in total.
    pub drop_after: Option<u64>,
    /// Stop sending (keep the socket open) once this many body bytes were sent.
    pub stall_after: Option<u64>,
    /// Limit the body rate to this many bytes per second.
    pub bytes_per_sec: Option<u64>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Hosted>,
    seen: Vec<Seen>,
    faults: Faults,
    body_sent: u64,
}

/// A running fake hub. It stops when the process ends.
#[derive(Clone)]
pub struct FakeHub {
    port: u16,
    state: Arc<Mutex<State>>,
}

/// sha256 as lowercase hex.
pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

/// git's blob id: sha1 of `blob <len>\0` and the bytes.
pub fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic bytes that do not compress: a test payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

impl FakeHub {
    /// Starts a hub on an ephemeral port of 127.0.0.1 (or `port`).
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let hub = Self {
            port: listener.local_addr()?.port(),
            state: Arc::default(),
        };
        let h = hub.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let h = h.clone();
                std::thread::spawn(move || {
                    let _ = h.serve(conn);
                });
            }
        });
        Ok(hub)
    }

    /// Starts a hub on an ephemeral port.
    pub fn start() -> Self {
        Self::start_on(0).expect("bind 127.0.0.1")
    }

    /// `http://127.0.0.1:<port>`, for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Hosts a file of a model repository (`owner/name`), or of a dataset
    /// repository when `repo` starts with `datasets/`.
    pub fn host(&self, repo: &str, path: &str, file: Hosted) {
        let mut s = self.state.lock().unwrap();
        for rev in ["main", COMMIT] {
            s.files
                .insert(format!("/{repo}/resolve/{rev}/{path}"), file.clone());
        }
    }

    /// Replaces the failure knobs.
    pub fn set_faults(&self, f: Faults) {
        let mut s = self.state.lock().unwrap();
        s.faults = f;
        s.body_sent = 0;
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    fn serve(&self, conn: TcpStream) -> std::io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let range = headers.get("range").and_then(|r| {
            let r = r.strip_prefix("bytes=")?;
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()))
        });
        let (file, faults) = {
            let mut s = self.state.lock().unwrap();
            s.seen.push(Seen {
                method: method.clone(),
                path: path.clone(),
                range,
                auth: headers.get("authorization").cloned(),
            });
            let file = if let Some(etag) = path.strip_prefix("/cdn/") {
                s.files.values().find(|f| f.lfs && f.etag == etag).cloned()
            } else {
                s.files.get(&path).cloned()
            };
            (file, s.faults.clone())
        };
        let mut out = conn;
        if let Some(status) = faults.status {
            return write!(
                out,
                "HTTP/1.1 {status} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        let Some(file) = file else {
            return write!(
                out,
                "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        };
        if file.lfs && !path.starts_with("/cdn/") {
            return write!(
                out,
                "HTTP/1.1 302 Found\r\nLocation: http://localhost:{}/cdn/{}\r\nX-Linked-Etag: \"{}\"\r\nX-Linked-Size: {}\r\nX-Repo-Commit: {COMMIT}\r\nETag: \"{}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.port,
                file.etag,
                file.etag,
                file.bytes.len(),
                git_sha1_hex(&file.bytes),
            );
        }
        let len = file.bytes.len() as u64;
        let (start, end) = match range {
            Some((a, b)) => (a.min(len), b.map_or(len, |b| (b + 1).min(len))),
            None => (0, len),
        };
        let status = if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nAccept-Ranges: bytes\r\nETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
            end - start,
            end.saturating_sub(1),
            file.etag,
        )?;
        if method == "HEAD" {
            return Ok(());
        }
        let mut pos = start;
        while pos < end {
            let piece = (end - pos).min(16 << 10);
            let (cut, stall) = {
                let mut s = self.state.lock().unwrap();
                let sent = s.body_sent;
                let mut cut = None;
                let mut stall = false;
                if let Some(d) = s.faults.drop_after.filter(|&d| sent + piece > d) {
                    cut = Some(d.saturating_sub(sent));
                    s.faults.drop_after = None;
                } else if let Some(d) = s.faults.stall_after.filter(|&d| sent + piece > d) {
                    cut = Some(d.saturating_sub(sent));
                    stall = true;
                    s.faults.stall_after = None;
                }
                s.body_sent += cut.unwrap_or(piece);
                (cut, stall)
            };
            let n = cut.unwrap_or(piece);
            out.write_all(&file.bytes[pos as usize..(pos + n) as usize])?;
            out.flush()?;
            pos += n;
            if cut.is_some() {
                if stall {
                    std::thread::sleep(Duration::from_secs(120));
                }
                return out.shutdown(std::net::Shutdown::Both);
            }
            if let Some(bps) = faults.bytes_per_sec {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / bps as f64));
            }
        }
        Ok(())
    }
}
