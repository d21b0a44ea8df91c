//! Counter-based randomness: the uniform number a sequence draws at step `i`
//! depends only on its seed and `i`, never on what else is in the batch or
//! on which device samples. The CUDA sampler computes the same function.

/// SplitMix64: a tiny, well-mixed 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

/// The SplitMix64 output function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in [0, 1) with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A fresh, unpredictable-enough 64-bit value (clock and a process-wide
/// counter, mixed): for unseeded sampling and ids, never for secrets.
pub fn fresh_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    mix64(nanos ^ mix64(COUNTER.fetch_add(1, Ordering::Relaxed)))
}

/// The uniform draw in [0, 1) of a sequence with `seed` at step `step`
/// (53 random bits).
#[inline]
pub fn uniform(seed: u64, step: u64) -> f64 {
    let z = mix64(seed ^ mix64(step.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        for step in 0..1000 {
            let u = uniform(42, step);
            assert!((0.0..1.0).contains(&u));
            assert_eq!(u, uniform(42, step));
        }
        assert_ne!(uniform(42, 0), uniform(43, 0));
    }

    #[test]
    fn uniform_is_roughly_uniform() {
        let n = 20_000;
        let mean: f64 = (0..n).map(|i| uniform(7, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let below_tenth = (0..n).filter(|&i| uniform(7, i) < 0.1).count() as f64 / n as f64;
        assert!((below_tenth - 0.1).abs() < 0.01, "P(u < 0.1) = {below_tenth}");
    }
}
