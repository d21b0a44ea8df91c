//! Turning logits into the next token: logit processors and samplers.
//!
//! The processors run in a fixed order on one sequence's logits row:
//! logit bias → repetition penalty (prompt and output tokens) → presence and
//! frequency penalties (output tokens) → vocabulary mask (ids the tokenizer
//! does not know are never sampled) → temperature → top-k → top-p → min-p →
//! a draw with the counter-based uniform of [`rng::uniform`]. Temperature 0
//! is greedy (ties go to the lowest id). Logprobs are those of the model's
//! distribution after the penalties and mask, before temperature and
//! truncation.
//!
//! The same function is written for the device later; the draw depends only
//! on (seed, step), so a seeded sequence gives the same tokens whatever else
//! is in the batch.

pub mod rng;

use std::collections::HashMap;

/// How one sequence samples. Fields hold only valid values (`validate`
/// checks the wire request before one is built).
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
    /// Alternatives to report with each token's logprob (`None`: no logprobs).
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

    fn needs_history(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// The tokens a sequence has seen, as the penalties need them.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Output token → count.
    output: HashMap<u32, u32>,
    /// Distinct prompt tokens.
    prompt: std::collections::HashSet<u32>,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        TokenHistory { output: HashMap::new(), prompt: prompt.iter().copied().collect() }
    }

    pub fn push(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
    }
}

/// One sampled token with the logprobs asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Logprob of `token` (always computed; cheap next to the model).
    pub logprob: f32,
    /// The `n` most likely tokens and their logprobs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Applies logit bias and penalties and masks ids at or above `valid_vocab`,
/// in place.
fn process(logits: &mut [f32], valid_vocab: usize, params: &SamplingParams, history: &TokenHistory) {
    for &(id, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += bias;
        }
    }
    if params.needs_history() {
        let rep = params.repetition_penalty;
        if rep != 1.0 {
            let seen = history.prompt.iter().chain(history.output.keys());
            let mut done = std::collections::HashSet::new();
            for &id in seen {
                if done.insert(id) {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l > 0.0 { *l / rep } else { *l * rep };
                    }
                }
            }
        }
        for (&id, &count) in &history.output {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= params.frequency_penalty * count as f32 + params.presence_penalty;
            }
        }
    }
    for l in logits.iter_mut().skip(valid_vocab) {
        *l = f32::NEG_INFINITY;
    }
}

/// Log-softmax of `logits` into a new vector (f64 accumulation).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Samples one token from a row of logits (modified in place).
///
/// `step` is the index of the token being generated (0 for the first), the
/// counter of the seeded draw.
pub fn sample(logits: &mut [f32], valid_vocab: usize, params: &SamplingParams, history: &TokenHistory, step: u64) -> Sampled {
    process(logits, valid_vocab, params, history);
    let logprobs = log_softmax(logits);
    let token = if params.temperature == 0.0 { argmax(logits) } else { draw(logits, params, step) };
    let top = match params.logprobs {
        Some(n) if n > 0 => top_n(&logprobs, n as usize),
        _ => vec![],
    };
    Sampled { token: token as u32, logprob: logprobs[token], top }
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logprobs.len()).filter(|&i| logprobs[i].is_finite()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

/// Temperature, top-k, top-p, min-p, then an inverse-CDF draw over the
/// surviving candidates sorted by probability (ties by id).
fn draw(logits: &[f32], params: &SamplingParams, step: u64) -> usize {
    let t = params.temperature;
    let mut cand: Vec<(usize, f32)> =
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i, l / t)).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        cand.truncate(params.top_k as usize);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let floor = params.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let kept = &probs[..keep];
    let total: f64 = kept.iter().sum();
    let target = rng::uniform(params.seed, step) * total;
    let mut cum = 0.0;
    for (i, p) in kept.iter().enumerate() {
        cum += p;
        if target < cum {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
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
    fn top_k_one_is_greedy_and_top_p_truncates() {
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
    fn penalties_and_bias_change_the_choice() {
        let mut h = TokenHistory::new(&[0]);
        h.push(1);
        h.push(1);
        // Repetition penalty on a positive logit divides it.
        let mut l = vec![2.0, 1.9, 0.0];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 2);
        // Frequency penalty scales with the count; presence does not.
        let mut l = vec![0.0, 1.0, 0.5];
        let p = SamplingParams { frequency_penalty: 0.3, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 2);
        let mut l = vec![0.0, 1.0, 0.5];
        let p = SamplingParams { presence_penalty: 0.3, ..SamplingParams::greedy() };
        assert_eq!(sample(&mut l, 3, &p, &h, 0).token, 1);
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
