use candle_core::Device;

use crate::Result;

/// Which compute device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best the build supports: CUDA, then Metal, then CPU.
    #[default]
    Best,
    /// The CPU, always available.
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// The Apple GPU (needs the `metal` feature).
    Metal,
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        Ok(match self {
            Self::Best => default_device(),
            Self::Cpu => Device::Cpu,
            Self::Cuda(i) => single_stream(Device::new_cuda(i)?),
            Self::Metal => Device::new_metal(0)?,
        })
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best" | "auto" => Ok(Self::Best),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{other}`: use best, cpu, cuda, cuda:N or metal")
                }),
        }
    }
}

/// The best device this build supports and this machine has.
pub fn default_device() -> Device {
    let cuda = || {
        candle_core::utils::cuda_is_available()
            .then(|| Device::new_cuda(0).ok().map(single_stream))
            .flatten()
    };
    let metal = || {
        candle_core::utils::metal_is_available()
            .then(|| Device::new_metal(0).ok())
            .flatten()
    };
    cuda().or_else(metal).unwrap_or(Device::Cpu)
}

/// Two settings for a CUDA device. cudarc creates two CUDA events with
/// every allocation to order uses across streams; candle runs everything on
/// one stream per thread and never enters cudarc's multi-stream mode, so the
/// events are never recorded, only created and destroyed: thousands per
/// training step. Turn that off. And the stream-ordered allocator's pool
/// returns freed memory to the driver at every synchronization by default,
/// so a training step that reads its loss maps its memory again each time:
/// keep it (as PyTorch's caching allocator does).
#[allow(unsafe_code)]
fn single_stream(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // SAFETY: candle creates no extra streams, so no allocation is ever
        // used on a stream other than its own.
        unsafe { c.disable_event_tracking() };
        let keep = pool_attribute(
            c,
            cuda_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            Some(u64::MAX),
        );
        if keep.is_none() {
            tracing::warn!("cannot keep freed GPU memory pooled");
        }
    }
    d
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::sys as cuda_sys;

/// Sets (with `set`) or reads a u64 attribute of the device's default
/// memory pool; the attribute's value after the call.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn pool_attribute(
    c: &candle_core::CudaDevice,
    attr: cuda_sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::result::{device, mem_pool};
    let ctx = c.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut value = set.unwrap_or(0);
    // SAFETY: the device comes from a live context bound to this thread; the
    // pool attributes used here are u64.
    unsafe {
        let pool = device::get_default_mem_pool(ctx.cu_device()).ok()?;
        let ptr = (&mut value as *mut u64).cast();
        match set {
            Some(_) => mem_pool::set_attribute(pool, attr, ptr),
            None => mem_pool::get_attribute(pool, attr, ptr),
        }
        .ok()?;
    }
    Some(value)
}

/// The most GPU memory this process's tensors have held at once (the CUDA
/// allocator pool's high-water mark), for a CUDA device; `None` elsewhere.
pub fn gpu_memory_peak(d: &Device) -> Option<u64> {
    pool_peak(d, true)
}

/// The most GPU memory the CUDA allocator pool has held at once (its
/// high-water mark of reserved memory: the tensors' peak plus what
/// fragmentation kept), for a CUDA device; `None` elsewhere.
pub fn gpu_memory_reserved_peak(d: &Device) -> Option<u64> {
    pool_peak(d, false)
}

/// The pool's high-water mark of used (`used`) or reserved memory.
fn pool_peak(d: &Device, used: bool) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = d {
        use cuda_sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let attr = if used {
            CU_MEMPOOL_ATTR_USED_MEM_HIGH
        } else {
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH
        };
        return pool_attribute(c, attr, None);
    }
    let _ = (d, used);
    None
}

/// A short name for logs and the UI.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => format!("CPU ({} threads)", crate::cpu::threads::current()),
        Device::Cuda(_) => "CUDA".into(),
        Device::Metal(_) => "Metal".into(),
    }
}

/// A `kB` field of a /proc status file (`VmRSS`, `VmHWM`, ...) in bytes;
/// `None` where there is no /proc (macOS) or no such field.
pub fn proc_bytes(file: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(file).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The process's resident memory now (touched pages of mapped files count).
pub fn rss_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmRSS")
}

/// The process's peak resident memory so far.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmHWM")
}
