//! A fake Hugging Face hub for end-to-end tests:
//! `fake-hub [--bytes-per-sec N] <repo>:<path>=<local file> ...`
//! hosts each local file (LFS style when over 1 MB or ending in .gguf,
//! .safetensors or .parquet), prints `http://127.0.0.1:<port>` on stdout,
//! and serves until killed.

use dramatis_testkit::{FakeHub, Faults, Hosted};

fn main() {
    let mut args = std::env::args().skip(1);
    let hub = FakeHub::start();
    let mut faults = Faults::default();
    while let Some(a) = args.next() {
        if a == "--bytes-per-sec" {
            faults.bytes_per_sec = args.next().and_then(|n| n.parse().ok());
            continue;
        }
        let (remote, local) = a.split_once('=').expect("<repo>:<path>=<local file>");
        let (repo, path) = remote.split_once(':').expect("<repo>:<path>");
        let bytes = std::fs::read(local).unwrap_or_else(|e| panic!("{local}: {e}"));
        let lfs = bytes.len() > 1_000_000
            || [".gguf", ".safetensors", ".parquet"]
                .iter()
                .any(|x| path.ends_with(x));
        hub.host(
            repo,
            path,
            if lfs {
                Hosted::lfs(bytes)
            } else {
                Hosted::small(bytes)
            },
        );
    }
    hub.set_faults(faults);
    println!("{}", hub.endpoint());
    loop {
        std::thread::park();
    }
}
