//! How many threads the engine runs on the CPU.
//!
//! One per physical core this process may use: matrix products saturate a
//! core's vector units, so a second hyper-thread on the same core only adds
//! contention; and never more than the CPUs the process is allowed (its
//! affinity mask and cgroup quota, which `available_parallelism` reads — a
//! container on a 96-core host limited to 16 CPUs must not start 96
//! spinning threads). The pool's idle threads sleep: a chat app is idle
//! most of the time.

use std::collections::HashSet;

/// Physical cores among the CPUs this process may run on, at most the CPUs
/// it is allowed; 1 when nothing can be read.
pub fn default_threads() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(allowed, |p| p.min(allowed)).max(1)
}

/// Sets the engine's thread count (`None`: [`default_threads`]) for the
/// rest of the process and returns the count in use. The first call wins;
/// call it before the first model runs. The binaries also give candle the
/// same count (`CANDLE_NUM_THREADS`) for the operations it runs itself.
pub fn configure(threads: Option<usize>) -> usize {
    let n = threads.filter(|&n| n > 0).unwrap_or_else(default_threads);
    // For what still runs on rayon (candle's own operations, which the
    // training passes use); an error means a pool exists already (an
    // earlier call).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("rayon-{i}"))
        .build_global();
    super::pool::start(n)
}

/// Sets up the process's engine threads: [`configure`], and candle's own
/// pool of CPU threads (for the operations it still runs) to the same count,
/// parking as soon as it is idle — left spinning, its threads took the cores
/// from the engine's products (16 cores: decode 6.5 → 9.3 tok/s). Returns the
/// count in use.
///
/// # Safety
/// Sets environment variables: call it first thing in `main`, before any
/// other thread exists.
#[allow(unsafe_code)]
pub unsafe fn init_process(threads: Option<usize>) -> usize {
    let n = threads.filter(|&n| n > 0).unwrap_or_else(default_threads);
    // SAFETY: the caller guarantees no other thread runs yet.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
        }
    }
    tune_allocator();
    configure(Some(n))
}

/// glibc's allocator, for a prompt's products: each allocates outputs of
/// tens of megabytes (512 tokens × 10,240 for fc1: 21 MB). Above the mmap
/// threshold (128 KB, raised only by what has been freed) each is a fresh
/// mapping whose pages the kernel zeroes on first touch — 5% of a prefill:
/// serve up to 32 MB from the heap and keep up to 128 MB of freed memory for
/// the next layer (Q4_K_M pp512 on 2 threads +8–10%). And one arena: the
/// pass runs on a pool thread, whose own arena kept what earlier layers
/// freed apart from the main heap (peak RSS after a 2,044-token chat 1.15×
/// of weights + KV with an arena per thread, 1.02× with one; prefill within
/// noise).
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // once, before the engine's threads start (see `init_process`).
    unsafe {
        // 32 MB is the most glibc documents; where one refuses it, the trim
        // threshold is left alone too (setting it would freeze the mmap
        // threshold at its 128 KB start).
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The engine's thread count now.
pub fn current() -> usize {
    super::pool::threads()
}

#[cfg(target_os = "linux")]
fn physical_cores() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut cores = HashSet::new();
    for cpu in parse_cpu_list(list)? {
        let topo = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| std::fs::read_to_string(format!("{topo}/{f}")).ok();
        let (package, core) = (read("physical_package_id")?, read("core_id")?);
        cores.insert((package.trim().to_string(), core.trim().to_string()));
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(not(target_os = "linux"))]
fn physical_cores() -> Option<usize> {
    None
}

/// `0-3,8,10-11` → the CPU numbers.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_default_is_within_what_the_process_may_use() {
        let n = default_threads();
        let allowed = std::thread::available_parallelism().unwrap().get();
        assert!(n >= 1 && n <= allowed, "{n} threads of {allowed} allowed");
    }
}
