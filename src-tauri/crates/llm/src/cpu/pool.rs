//! The engine's threads: one region of parallel work at a time, handed to
//! workers that poll briefly between regions (spinning, then yielding the
//! core) and sleep after.
//!
//! A decode step is about 160 short regions (five products and the
//! attention in each of 32 layers), each tens of microseconds per thread,
//! with a few microseconds of one-thread work between them. A work-stealing
//! pool pays for splitting, stealing and waking on every one (the profile
//! showed the hand-offs); here a region is one atomic word that the caller
//! publishes and every thread claims task indices from, and workers that
//! saw the last region end less than [`SPIN`] ago are still polling it.
//! After that they sleep on a condition variable, so an idle app costs no
//! CPU.
//!
//! Invariants: a region's closure is only read by a thread that claimed one
//! of its tasks; the caller returns only when every task is claimed and no
//! worker is inside the region (`active` is zero), so the closure outlives
//! every use. Regions started from inside a region (or from a second thread
//! while one runs) do not nest: the first runs inline, the second waits.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next region before it
/// sleeps: longer than the gaps inside and between decode steps, short
/// enough that an idle app is idle.
const SPIN: Duration = Duration::from_millis(2);

/// Polls of the state word (a few microseconds of pure spinning) before
/// an idle worker starts yielding its core between polls.
const POLLS_BEFORE_YIELDING: u32 = 1 << 11;

/// The state word: epoch (24 bits) | task count (20) | next task (20).
const FIELD: u32 = 20;
const MASK: u64 = (1 << FIELD) - 1;
/// The most tasks one region publishes; [`run`] splits larger counts.
const MAX_TASKS: usize = (1 << FIELD) - 1;
/// Epochs wrap at 24 bits.
const EPOCHS: u64 = (1 << 24) - 1;

/// What each participating thread runs: claims and runs tasks until none
/// are left.
type Job<'a> = dyn Fn(&Claims<'_>) + Sync + 'a;

struct Shared {
    state: AtomicU64,
    /// The current region's job, valid while one of its tasks is claimed
    /// and unfinished (see the module's invariants).
    job: std::cell::UnsafeCell<Option<(&'static Job<'static>, usize)>>,
    /// Workers between noticing a region and leaving it.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    /// A task on a worker panicked; the region's caller panics in turn.
    panicked: std::sync::atomic::AtomicBool,
    wake: Mutex<()>,
    woken: Condvar,
    /// One region at a time.
    region: Mutex<()>,
}

// SAFETY: `job` is written only by the region's caller while no task of
// the previous region is claimed or running, and read only after a
// successful claim (ordered by `state`'s acquire/release).
unsafe impl Sync for Shared {}

/// The task indices a thread claims in the current region.
pub(crate) struct Claims<'a> {
    /// The published region's state and epoch; `None` where the calling
    /// thread runs every task itself.
    region: Option<(&'a AtomicU64, u64)>,
    /// Added to each index (a region covers `base..base + tasks`).
    base: usize,
    /// Claimed and not yet run: `start..end`.
    held: Cell<(usize, usize)>,
    /// Threads that may take part (sizes the claims).
    threads: usize,
}

impl Claims<'_> {
    /// The next task this thread runs, or `None` when all are taken.
    pub(crate) fn next(&self) -> Option<usize> {
        let (mut start, mut end) = self.held.get();
        if start == end {
            let (state, epoch) = self.region?;
            (start, end) = claim(state, epoch, self.threads)?;
        }
        self.held.set((start + 1, end));
        Some(self.base + start)
    }
}

/// Claims the next run of tasks of region `epoch`, if that region is
/// current and has tasks left: a share of what is left that shrinks as
/// it runs out (half of an even split among `threads`), so a thread reads
/// long runs of neighbouring rows and touches the shared word a few times
/// per region, while the last tasks still spread over every thread.
fn claim(state: &AtomicU64, epoch: u64, threads: usize) -> Option<(usize, usize)> {
    let mut s = state.load(Ordering::Acquire);
    loop {
        let (e, tasks, next) = unpack(s);
        if e != epoch || next >= tasks {
            return None;
        }
        let take = ((tasks - next) / (2 * threads as u64)).max(1);
        // Sequentially consistent, like the worker's `active` count before it
        // and the caller's closing store and `active` load after: a claim
        // that succeeds is then seen as an active worker by a caller that
        // closes the region early (a panicking task), not only by one whose
        // last claim failed after it.
        match state.compare_exchange_weak(s, s + take, Ordering::SeqCst, Ordering::Acquire) {
            Ok(_) => return Some((next as usize, (next + take) as usize)),
            Err(now) => s = now,
        }
    }
}

/// (epoch, tasks, next task) of a state word.
fn unpack(s: u64) -> (u64, u64, u64) {
    (s >> (2 * FIELD), (s >> FIELD) & MASK, s & MASK)
}

fn pack(epoch: u64, tasks: u64, next: u64) -> u64 {
    (epoch << (2 * FIELD)) | (tasks << FIELD) | next
}

struct Pool {
    shared: &'static Shared,
    threads: usize,
}

thread_local! {
    /// Set on workers, and on a caller while its region runs: a region
    /// started there runs inline.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Starts the engine's threads (`threads` in all, the caller of a region
/// counting as one). The first call wins; later ones return its count.
pub(crate) fn start(threads: usize) -> usize {
    POOL.get_or_init(|| Pool::new(threads.max(1))).threads
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(super::threads::default_threads()))
}

/// The engine's thread count.
pub(crate) fn threads() -> usize {
    pool().threads
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            job: std::cell::UnsafeCell::new(None),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: std::sync::atomic::AtomicBool::new(false),
            wake: Mutex::new(()),
            woken: Condvar::new(),
            region: Mutex::new(()),
        }));
        for i in 1..threads {
            // A worker that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name(format!("engine-{i}"))
                .spawn(move || work(shared, threads));
        }
        Self { shared, threads }
    }
}

/// A worker: waits for a region, claims its tasks, and again.
fn work(shared: &'static Shared, threads: usize) {
    INSIDE.with(|c| c.set(true));
    let mut seen = unpack(shared.state.load(Ordering::Acquire)).0;
    loop {
        let epoch = wait_for_region(shared, seen);
        seen = epoch;
        // Counted before claiming: a caller that finds every task claimed,
        // or closes the region early, then sees this worker (see `claim`).
        shared.active.fetch_add(1, Ordering::SeqCst);
        if let Some(first) = claim(&shared.state, epoch, threads) {
            // SAFETY: a task of this region is claimed and unfinished, so
            // its caller is still waiting and `job` is this region's.
            let (job, base) = unsafe { *shared.job.get() }.expect("a published region has a job");
            let claims = Claims {
                region: Some((&shared.state, epoch)),
                base,
                held: Cell::new(first),
                threads,
            };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&claims))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.active.fetch_sub(1, Ordering::Release);
    }
}

/// Polls for an epoch other than `seen`, then sleeps until one comes.
fn wait_for_region(shared: &Shared, seen: u64) -> u64 {
    let epoch = || unpack(shared.state.load(Ordering::Acquire)).0;
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let e = epoch();
        if e != seen {
            return e;
        }
        polls = polls.wrapping_add(1);
        if polls < POLLS_BEFORE_YIELDING {
            std::hint::spin_loop();
        } else {
            // The core is given to any other thread that wants it (another
            // program, or an engine thread holding claimed tasks when the
            // cores are shared) while this one still answers within a
            // scheduler slice.
            std::thread::yield_now();
            if start.elapsed() > SPIN {
                break;
            }
        }
    }
    let mut guard = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
    // Announce the sleep before the last look: a caller publishing after
    // that look sees the sleeper and wakes it (both sides sequentially
    // consistent), and its notify waits for this thread to be waiting.
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut e = unpack(shared.state.load(Ordering::SeqCst)).0;
    while e == seen {
        guard = shared.woken.wait(guard).unwrap_or_else(|e| e.into_inner());
        e = unpack(shared.state.load(Ordering::SeqCst)).0;
    }
    shared.sleepers.fetch_sub(1, Ordering::SeqCst);
    e
}

/// Runs `f(i)` for every `i` in `0..tasks` on the engine's threads (the
/// calling one included), each exactly once, and returns when all are done.
pub(crate) fn run(tasks: usize, f: impl Fn(usize) + Sync) {
    participate(tasks, &|c: &Claims<'_>| {
        while let Some(i) = c.next() {
            f(i);
        }
    });
}

/// [`run`], with a value each participating thread makes once per region
/// (scratch space) and passes to its tasks.
pub(crate) fn run_with<S>(
    tasks: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) + Sync,
) {
    participate(tasks, &|c: &Claims<'_>| {
        let Some(first) = c.next() else { return };
        let mut s = init();
        f(&mut s, first);
        while let Some(i) = c.next() {
            f(&mut s, i);
        }
    });
}

/// `f(c, chunk)` for each `chunk`-long piece of `data` (the last may be
/// shorter), `c` counting from 0, on the engine's threads.
pub(crate) fn chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let parts = Parts::new(data, chunk);
    run(parts.count(), |c| {
        // SAFETY: task `c` runs once, and alone takes piece `c`.
        f(c, unsafe { parts.get(c) })
    });
}

/// [`chunks`] over three slices cut into as many pieces: `f(c, a, b, d)`
/// with piece `c` of each.
pub(crate) fn chunks3<A: Send, B: Send, D: Send>(
    (a, b, d): (&mut [A], &mut [B], &mut [D]),
    (ca, cb, cd): (usize, usize, usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [D]) + Sync,
) {
    let (pa, pb, pd) = (Parts::new(a, ca), Parts::new(b, cb), Parts::new(d, cd));
    assert!(
        pa.count() == pb.count() && pb.count() == pd.count(),
        "the slices are cut into different numbers of pieces"
    );
    run(pa.count(), |c| {
        // SAFETY: task `c` runs once, and alone takes piece `c` of each.
        let (a, b, d) = unsafe { (pa.get(c), pb.get(c), pd.get(c)) };
        f(c, a, b, d)
    });
}

/// `f(i)` for `i` in `0..tasks` on the engine's threads, in order.
pub(crate) fn map<R: Send>(tasks: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..tasks).map(|_| None).collect();
    chunks(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter()
        .map(|r| r.expect("every task ran"))
        .collect()
}

/// A slice cut into `chunk`-long pieces that tasks take by index; each
/// piece must be taken by one task only.
pub(crate) struct Parts<'a, T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
    _data: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the pieces are disjoint (see `get`), so sharing `Parts` among
// threads is sharing `&mut` access to disjoint parts of a `Send` slice.
unsafe impl<T: Send> Sync for Parts<'_, T> {}

impl<'a, T> Parts<'a, T> {
    /// `data` in pieces of `chunk` (at least 1).
    pub(crate) fn new(data: &'a mut [T], chunk: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            chunk: chunk.max(1),
            _data: std::marker::PhantomData,
        }
    }

    /// How many pieces there are.
    pub(crate) fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Piece `c`.
    ///
    /// # Safety
    /// No other reference to piece `c` may be live: each piece is taken
    /// once, by one task.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self, c: usize) -> &'a mut [T] {
        let start = c * self.chunk;
        assert!(
            start < self.len || (start == 0 && self.len == 0),
            "piece {c} of {}",
            self.count()
        );
        let end = (start + self.chunk).min(self.len);
        // SAFETY: in bounds (checked above), and piece `c` is not
        // referenced elsewhere (the caller's guarantee).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

/// Runs `job` on the caller and every worker that comes, for `tasks` tasks
/// (in regions of at most [`MAX_TASKS`]).
fn participate(tasks: usize, job: &Job<'_>) {
    let pool = pool();
    for base in (0..tasks).step_by(MAX_TASKS) {
        let n = (tasks - base).min(MAX_TASKS);
        if n == 1 || pool.threads == 1 || INSIDE.with(Cell::get) {
            job(&Claims {
                region: None,
                base,
                held: Cell::new((0, n)),
                threads: 1,
            });
        } else {
            region(pool, n, base, job);
        }
    }
}

/// Publishes a region of `tasks` tasks (`base..base + tasks` to `job`),
/// takes part, and returns when no thread is inside it.
fn region(pool: &Pool, tasks: usize, base: usize, job: &Job<'_>) {
    let shared = pool.shared;
    let _one = shared.region.lock().unwrap_or_else(|e| e.into_inner());
    // A region whose caller's own task panicked unwound before reading the
    // flag; it is no news for this one.
    shared.panicked.store(false, Ordering::Relaxed);
    // SAFETY: no task of the previous region is claimed or running (its
    // caller returned only then, and this thread holds `region`), so no
    // worker reads `job` until it claims a task of the region published
    // below. The lifetime is erased for the span of this call, which
    // returns (or unwinds, see `Close`) only once no worker is inside.
    unsafe {
        *shared.job.get() = Some((
            std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job),
            base,
        ));
    }
    let epoch = (unpack(shared.state.load(Ordering::Relaxed)).0 + 1) & EPOCHS;
    shared
        .state
        .store(pack(epoch, tasks as u64, 0), Ordering::SeqCst);
    if shared.sleepers.load(Ordering::SeqCst) > 0 {
        let _g = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
        shared.woken.notify_all();
    }
    let close = Close {
        shared,
        epoch,
        tasks,
    };
    INSIDE.with(|c| c.set(true));
    job(&Claims {
        region: Some((&shared.state, epoch)),
        base,
        held: Cell::new((0, 0)),
        threads: pool.threads,
    });
    drop(close);
    if shared.panicked.swap(false, Ordering::Acquire) {
        panic!("a task on one of the engine's threads panicked");
    }
}

/// Ends a region, also when the caller's part unwinds: no task is claimed
/// after it, and it waits for the workers still inside.
struct Close<'a> {
    shared: &'a Shared,
    epoch: u64,
    tasks: usize,
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        let t = self.tasks as u64;
        self.shared
            .state
            .store(pack(self.epoch, t, t), Ordering::SeqCst);
        let mut polls = 0u32;
        while self.shared.active.load(Ordering::SeqCst) != 0 {
            polls = polls.saturating_add(1);
            if polls < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        INSIDE.with(|c| c.set(false));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// Every task of every region runs exactly once, for counts around the
    /// claim sizes' edges, with regions started from several threads at once.
    #[test]
    fn every_task_runs_once() {
        start(4);
        let callers: Vec<_> = (0..3)
            .map(|k| {
                std::thread::spawn(move || {
                    for tasks in (0..70).chain([255, 256, 257, 1000 + k]) {
                        let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                        run(tasks, |i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        for (i, h) in hits.iter().enumerate() {
                            assert_eq!(h.load(Ordering::Relaxed), 1, "task {i} of {tasks}");
                        }
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    #[test]
    fn regions_past_the_most_one_publishes_are_split() {
        let tasks = MAX_TASKS * 2 + 5;
        let sum = AtomicU64::new(0);
        let count = AtomicU64::new(0);
        run(tasks, |i| {
            sum.fetch_add(i as u64, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
        });
        let n = tasks as u64;
        assert_eq!(count.load(Ordering::Relaxed), n);
        assert_eq!(sum.load(Ordering::Relaxed), n * (n - 1) / 2);
    }

    #[test]
    fn chunks_map_and_nesting() {
        let mut v: Vec<usize> = vec![0; 1003];
        chunks(&mut v, 10, |c, piece| {
            assert!(piece.len() == 10 || (c == 100 && piece.len() == 3));
            // A region inside a task runs inline on that thread.
            let inner = map(piece.len(), |j| c * 10 + j);
            piece.copy_from_slice(&inner);
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
        let (mut a, mut b, mut d) = (vec![0u8; 9], vec![0u16; 6], vec![0u32; 3]);
        chunks3((&mut a, &mut b, &mut d), (3, 2, 1), |c, a, b, d| {
            a.fill(c as u8);
            b.fill(c as u16);
            d.fill(c as u32);
        });
        assert_eq!(a, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(b, [0, 0, 1, 1, 2, 2]);
        assert_eq!(d, [0, 1, 2]);
    }

    /// Scratch is made at most once per thread and region, and only by a
    /// thread that runs a task.
    #[test]
    fn scratch_is_made_once_per_thread() {
        let made = AtomicU32::new(0);
        let ran = AtomicU32::new(0);
        run_with(
            500,
            || {
                made.fetch_add(1, Ordering::Relaxed);
                0usize
            },
            |s, _| {
                *s += 1;
                ran.fetch_add(1, Ordering::Relaxed);
            },
        );
        assert_eq!(ran.load(Ordering::Relaxed), 500);
        let made = made.load(Ordering::Relaxed) as usize;
        assert!(made >= 1 && made <= threads(), "{made} scratch values");
    }

    /// A task that panics on any thread makes the region's caller panic,
    /// after the region has ended; the pool serves the next region.
    #[test]
    fn a_panicking_task_fails_the_region_and_the_pool_goes_on() {
        // One task panics (on whichever thread claims it), or every task
        // (the caller's and the workers' both: the region must not leave a
        // worker's panic behind for the next one to report).
        for bad in [Some(0), Some(37), Some(99), None] {
            let r = std::panic::catch_unwind(|| {
                run(100, |i| {
                    if bad.is_none_or(|b| b == i) {
                        panic!("task {i}");
                    }
                    std::thread::sleep(Duration::from_micros(50));
                })
            });
            assert!(r.is_err(), "the panic of {bad:?} was lost");
        }
        // The next regions succeed.
        let n = AtomicU32::new(0);
        run(100, |_| {
            std::thread::sleep(Duration::from_micros(20));
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 100);
        let n = AtomicU32::new(0);
        run(100, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 100);
    }
}
