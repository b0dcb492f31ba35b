//! Time per phase of a pass, when the environment variable
//! `DRAMATIS_PROFILE` is set: the training passes, a prompt's tensor path
//! and the CPU engine's pass. Each phase on a device then waits for it
//! before and after (a GPU run slows a little; the shares become
//! attributable); unset, a phase is a plain call.

type PhaseTimes = std::collections::HashMap<&'static str, (f64, u64)>;
static PHASES: std::sync::LazyLock<std::sync::Mutex<PhaseTimes>> =
    std::sync::LazyLock::new(Default::default);
static PROFILE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("DRAMATIS_PROFILE").is_some());

/// The phases timed so far, longest first: name, seconds, calls.
pub fn profile_report() -> Vec<(&'static str, f64, u64)> {
    let mut v: Vec<_> = PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, (s, n))| (*k, *s, *n))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Runs `f`, timing it as `name` when profiling, waiting for `device`
/// before and after.
pub(crate) fn phase<T>(
    device: &candle_core::Device,
    name: &'static str,
    f: impl FnOnce() -> crate::Result<T>,
) -> crate::Result<T> {
    if !*PROFILE {
        return f();
    }
    device.synchronize()?;
    timed(name, || {
        let out = f()?;
        device.synchronize()?;
        Ok(out)
    })
}

/// Runs `f` (work on the host's threads: nothing to wait for), timing it as
/// `name` when profiling.
pub(crate) fn timed<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !*PROFILE {
        return f();
    }
    let start = std::time::Instant::now();
    let out = f();
    let mut p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    let e = p.entry(name).or_default();
    e.0 += start.elapsed().as_secs_f64();
    e.1 += 1;
    out
}
