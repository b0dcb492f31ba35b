//! The CPU holds one copy of the weights: the GGUF file's pages, mapped,
//! and nothing beside them. Its own test binary, so no other test's
//! allocations share the process's resident memory.

use candle_core::Device;
use dramatis_llm::{Logits, PhiConfig, QuantType, Tensor, load_model, write_synthetic_gguf};

/// Resident memory of this process in bytes (mapped file pages that were
/// touched count, as they occupy memory).
fn rss() -> Option<u64> {
    dramatis_llm::rss_bytes()
}

#[test]
fn a_loaded_and_used_model_costs_its_file_once() {
    if rss().is_none() || !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("needs Linux's /proc and an AVX2 CPU (the kernels that read the file in place)");
        return;
    }
    // ≈ 60 MB of Q4_K blocks: big enough that a second copy could not hide in the slack.
    let cfg = PhiConfig {
        vocab_size: 16384,
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 8,
        num_attention_heads: 16,
        partial_rotary_factor: 0.5,
        rope_theta: 10000.0,
        layer_norm_eps: 1e-5,
        max_position_embeddings: 256,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    for quant in [QuantType::Q4K, QuantType::Q8_0] {
        write_synthetic_gguf(&cfg, quant, 3, &path, |_, _, _| {}).unwrap();
        let file = std::fs::metadata(&path).unwrap().len();
        let before = rss().unwrap();
        let model = load_model(&path, &Device::Cpu).unwrap();
        // Every layer's weights are read: all of the file's matrices are paged in.
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None, Logits::Last, None).unwrap();
        assert_eq!(logits.dims(), &[1, cfg.vocab_size]);
        let grown = rss().unwrap().saturating_sub(before);
        // The file once, plus 10% for the dense norms, biases and activations.
        assert!(
            grown as f64 <= file as f64 * 1.1,
            "{quant:?}: resident memory grew {grown} bytes for a {file}-byte file ({:.2}×)",
            grown as f64 / file as f64
        );
        // And the weights were really read (the mapping is resident, not skipped).
        assert!(
            grown as f64 >= file as f64 * 0.5,
            "{quant:?}: only {grown} of {file} bytes became resident"
        );
        drop(model);
    }
    // The engine's threads sleep when there is no work: an idle chat app costs no CPU.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let t0 = cpu_seconds().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let idle = cpu_seconds().unwrap() - t0;
    assert!(idle < 0.05, "{idle:.3} s of CPU used in 1 s of idling");
}

/// User + system CPU time of this process, in seconds.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime), counted after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
