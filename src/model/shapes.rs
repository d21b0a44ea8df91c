//! The shapes of public Mamba-family checkpoints, for benchmarks with random
//! weights (`mamba-serve bench --random-shape NAME`).

use super::config::{Arch, Dialect, ModelConfig};
use crate::backend::Activation;

/// Names accepted by [`public_shape`].
pub const NAMES: &[&str] = &[
    "mamba-130m",
    "mamba-370m",
    "mamba-790m",
    "mamba-1.4b",
    "mamba-2.8b",
    "falcon-mamba-7b",
    "mamba2-130m",
    "mamba2-370m",
    "mamba2-780m",
    "mamba2-1.3b",
    "mamba2-2.7b",
    "mamba-codestral-7b",
];

/// The configuration of a public checkpoint by name.
pub fn public_shape(name: &str) -> Option<ModelConfig> {
    let m1 = |arch, d: usize, layers, vocab, tied| ModelConfig {
        arch,
        dialect: Dialect::HuggingFace,
        hidden_size: d,
        n_layers: layers,
        vocab_size: vocab,
        d_inner: 2 * d,
        d_state: 16,
        d_conv: 4,
        dt_rank: d.div_ceil(16),
        n_heads: 0,
        head_dim: 0,
        n_groups: 0,
        chunk_size: 256,
        norm_eps: 1e-5,
        mixer_rms_eps: 1e-6,
        use_bias: false,
        use_conv_bias: true,
        tie_embeddings: tied,
        residual_in_fp32: true,
        activation: Activation::Silu,
        time_step_limit: (0.0, f32::INFINITY),
        bos_token_id: Some(0),
        eos_token_ids: vec![0],
        pad_token_id: Some(0),
    };
    let m2 = |d: usize, layers, vocab, groups, tied| ModelConfig {
        arch: Arch::Mamba2,
        n_heads: 2 * d / 64,
        head_dim: 64,
        n_groups: groups,
        d_state: 128,
        ..m1(Arch::Mamba2, d, layers, vocab, tied)
    };
    Some(match name {
        "mamba-130m" => m1(Arch::Mamba1, 768, 24, 50280, true),
        "mamba-370m" => m1(Arch::Mamba1, 1024, 48, 50280, true),
        "mamba-790m" => m1(Arch::Mamba1, 1536, 48, 50280, true),
        "mamba-1.4b" => m1(Arch::Mamba1, 2048, 48, 50280, true),
        "mamba-2.8b" => m1(Arch::Mamba1, 2560, 64, 50280, true),
        "falcon-mamba-7b" => m1(Arch::FalconMamba, 4096, 64, 65024, false),
        "mamba2-130m" => m2(768, 24, 50288, 1, true),
        "mamba2-370m" => m2(1024, 48, 50288, 1, true),
        "mamba2-780m" => m2(1536, 48, 50288, 1, true),
        "mamba2-1.3b" => m2(2048, 48, 50288, 1, true),
        "mamba2-2.7b" => m2(2560, 64, 50288, 1, true),
        "mamba-codestral-7b" => m2(4096, 64, 32768, 8, false),
        _ => return None,
    })
}

/// Parameters of a model of this configuration (all tensors it reads).
pub fn param_count(cfg: &ModelConfig) -> usize {
    super::weights::expected_tensors(cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_checkpoints() {
        // Published counts (see the research notes): an exact match shows the
        // shapes, and so the benchmark's byte and FLOP limits, are right.
        for (name, want) in [
            ("mamba-130m", 129_135_360),
            ("mamba-370m", 371_516_416),
            ("mamba-1.4b", 1_372_178_432),
            ("mamba-2.8b", 2_768_345_600),
            ("mamba2-130m", 128_989_632),
            ("mamba-codestral-7b", 7_285_403_648),
        ] {
            let cfg = public_shape(name).expect("known name");
            assert_eq!(param_count(&cfg), want, "{name}");
        }
    }

    #[test]
    fn every_name_resolves_and_validates() {
        for name in NAMES {
            let cfg = public_shape(name).expect("listed name resolves");
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(public_shape("gpt-2").is_none());
    }
}
