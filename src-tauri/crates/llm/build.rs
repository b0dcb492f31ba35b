//! With the `cuda` feature, compiles this crate's kernels (kernels/train.cu
//! and kernels/flash.cu for training, kernels/infer.cu for decoding) to PTX with nvcc, as
//! candle's own kernels are; without it, nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/train.cu");
    println!("cargo::rerun-if-changed=kernels/infer.cu");
    println!("cargo::rerun-if-changed=kernels/flash.cu");
    println!("cargo::rerun-if-changed=kernels/tensor_core.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // PTX for the oldest architecture with bf16 arithmetic (or the one asked
    // for); the driver compiles it for the GPU at hand on first use.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var_os("CUDA_ROOT")
        .or_else(|| std::env::var_os("CUDA_PATH"))
        .map(|r| std::path::PathBuf::from(r).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    for name in ["train", "infer", "flash"] {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("kernels/{name}.cu"))
            .arg("-o")
            .arg(out.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (the cuda feature needs nvcc)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on kernels/{name}.cu");
    }
}
