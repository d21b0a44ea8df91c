//! Turning logits into the next token: what a request asks for
//! ([`SamplingParams`]), what the penalties need to remember
//! ([`TokenHistory`]), and the per-step [`SampleRow`] a backend samples from.
//!
//! The arithmetic is a backend op (`Backend::sample`): the CPU backend's is
//! the reference, the CUDA backend's runs over the whole batch on the device
//! so only token ids and requested logprobs come back. The draw depends only
//! on (seed, step), so a seeded sequence gives the same tokens whatever else
//! is in the batch.

pub use crate::backend::rng;

pub use crate::backend::cpu::sample::argmax;
pub use crate::backend::{SampleRow, SampledToken};

/// How one sequence samples. Built by `validate`, so fields hold valid
/// values only.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: u32,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 1 means off; > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these ids.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
    /// Alternatives to report with each token's logprob (`None`: none).
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: vec![],
            seed: 0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    pub fn needs_history(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// The tokens a sequence has seen, as the penalties need them.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// (id, times generated), sorted by id, each id once; prompt ids enter
    /// with 0. Kept sorted as tokens arrive, so a step's row is a copy,
    /// not a sort.
    counts: Vec<(u32, u32)>,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        let mut counts: Vec<(u32, u32)> = prompt.iter().map(|&t| (t, 0)).collect();
        counts.sort_unstable();
        counts.dedup();
        TokenHistory { counts }
    }

    pub fn push(&mut self, token: u32) {
        match self.counts.binary_search_by_key(&token, |&(t, _)| t) {
            Ok(i) => self.counts[i].1 += 1,
            Err(i) => self.counts.insert(i, (token, 1)),
        }
    }

    /// The row a backend samples the token at `step` from.
    pub fn row(&self, params: &SamplingParams, step: u64, valid_vocab: usize) -> SampleRow {
        let seen = if params.needs_history() { self.counts.clone() } else { vec![] };
        SampleRow {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            seed: params.seed,
            step,
            top_logprobs: params.logprobs.unwrap_or(0),
            valid_vocab: valid_vocab as u32,
            seen,
            logit_bias: params.logit_bias.clone(),
        }
    }
}

/// Samples from one row of host logits (modified in place) with the
/// reference sampler.
pub fn sample(logits: &mut [f32], valid_vocab: usize, params: &SamplingParams, history: &TokenHistory, step: u64) -> SampledToken {
    crate::backend::cpu::sample::sample_row(logits, &history.row(params, step, valid_vocab))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, seed: 1, ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_argmax_and_lowest_id_on_ties() {
        let mut l = vec![0.1, 3.0, 3.0, -1.0];
        let s = sample(&mut l, 4, &SamplingParams::greedy(), &TokenHistory::default(), 0);
        assert_eq!(s.token, 1);
    }

    #[test]
    fn padded_vocabulary_is_never_sampled() {
        let mut l = vec![0.0, 1.0, 50.0, 60.0];
        let s = sample(&mut l, 2, &SamplingParams::greedy(), &TokenHistory::default(), 0);
        assert_eq!(s.token, 1);
        for step in 0..200 {
            let mut l = vec![0.0, 1.0, 50.0, 60.0];
            assert!(sample(&mut l, 2, &params(5.0), &TokenHistory::default(), step).token < 2);
        }
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let base = vec![0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // p = 0.1, 0.2, 0.7
        let mut counts = [0usize; 3];
        for step in 0..10_000 {
            let mut l = base.clone();
            let a = sample(&mut l, 3, &params(1.0), &TokenHistory::default(), step).token;
            let mut l = base.clone();
            assert_eq!(a, sample(&mut l, 3, &params(1.0), &TokenHistory::default(), step).token);
            counts[a as usize] += 1;
        }
        let f: Vec<f64> = counts.iter().map(|&c| c as f64 / 10_000.0).collect();
        assert!((f[0] - 0.1).abs() < 0.02 && (f[1] - 0.2).abs() < 0.02 && (f[2] - 0.7).abs() < 0.02, "{f:?}");
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_and_min_p_truncate() {
        for step in 0..100 {
            let mut l = vec![1.0, 2.0, 1.5];
            let p = SamplingParams { top_k: 1, ..params(1.0) };
            assert_eq!(sample(&mut l, 3, &p, &TokenHistory::default(), step).token, 1);
            // p = 0.7, 0.2, 0.1: top_p 0.6 keeps only the first.
            let mut l = vec![(7.0f32).ln(), (2.0f32).ln(), 0.0];
            let p = SamplingParams { top_p: 0.6, ..params(1.0) };
            assert_eq!(sample(&mut l, 3, &p, &TokenHistory::default(), step).token, 0);
            // min_p 0.2: 0.1 < 0.2 × 0.7 goes, 0.2 stays.
            let mut l = vec![(7.0f32).ln(), (2.0f32).ln(), 0.0];
            let p = SamplingParams { min_p: 0.2, ..params(1.0) };
            assert_ne!(sample(&mut l, 3, &p, &TokenHistory::default(), step).token, 2);
        }
    }

    #[test]
    fn history_counts_generated_ids_sorted_with_prompt_ids_at_zero() {
        let mut h = TokenHistory::new(&[9, 3, 9, 7]);
        for t in [3, 12, 3, 1] {
            h.push(t);
        }
        let p = SamplingParams { presence_penalty: 0.5, ..params(1.0) };
        assert_eq!(h.row(&p, 0, 16).seen, vec![(1, 1), (3, 2), (7, 0), (9, 0), (12, 1)]);
        // No penalty on: nothing to send.
        assert!(h.row(&params(1.0), 0, 16).seen.is_empty());
    }

    #[test]
    fn penalties_and_bias_change_the_choice() {
        let mut h = TokenHistory::new(&[0]);
        h.push(1);
        h.push(1);
        // Repetition penalty on a positive logit divides it (prompt ids too).
        let mut l = vec![0.5, 0.4, 0.3];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 2);
        // Frequency penalty scales with the count; presence does not.
        let mut l = vec![0.0, 1.0, 0.5];
        let p = SamplingParams { frequency_penalty: 0.3, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 2);
        let mut l = vec![0.0, 1.0, 0.5];
        let p = SamplingParams { presence_penalty: 0.3, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 1);
        // Prompt-only ids get no presence penalty.
        let mut l = vec![1.0, 0.0, 0.9];
        let p = SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 0);
        let mut l = vec![0.0, 1.0, 0.5];
        let p = SamplingParams { logit_bias: vec![(0, 5.0)], ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &TokenHistory::default(), 0).token, 0);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut l = vec![1.0, 3.0, 2.0, 0.0];
        let p = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() };
        let s = sample(&mut l, 4, &p, &TokenHistory::default(), 0);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f64 = [1.0f64, 3.0, 2.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((s.logprob as f64 - (3.0 - total.ln())).abs() < 1e-6);
    }
}
