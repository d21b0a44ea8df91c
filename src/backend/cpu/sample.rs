//! The CPU sampler: one row of logits to one token, exactly as
//! [`crate::backend::SampleRow`] specifies. It is the reference for the
//! device sampler.

use crate::backend::rng;
use crate::backend::{SampleRow, SampledToken};

/// Applies bias and penalties and masks padded ids, in place.
fn process(logits: &mut [f32], row: &SampleRow) {
    for &(id, bias) in &row.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += bias;
        }
    }
    for &(id, count) in &row.seen {
        let Some(l) = logits.get_mut(id as usize) else { continue };
        if row.repetition_penalty != 1.0 {
            *l = if *l > 0.0 { *l / row.repetition_penalty } else { *l * row.repetition_penalty };
        }
        if count > 0 {
            *l -= row.frequency_penalty * count as f32 + row.presence_penalty;
        }
    }
    for l in logits.iter_mut().skip(row.valid_vocab as usize) {
        *l = f32::NEG_INFINITY;
    }
}

/// Log-softmax with f64 accumulation.
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

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logprobs.len()).filter(|&i| logprobs[i].is_finite()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    let order = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, order);
    idx.truncate(n);
    idx.sort_by(order);
    idx.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

/// Temperature, top-k, top-p, min-p, then the seeded inverse-CDF draw.
fn draw(logits: &[f32], row: &SampleRow) -> usize {
    let t = row.temperature;
    let mut cand: Vec<(usize, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i, l / t)).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    // Descending by scaled logit, ties to the lower id: a total order, so
    // selecting the top k first and sorting only them gives the same list.
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = row.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, order);
        cand.truncate(k);
    }
    cand.sort_by(order);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if row.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= row.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if row.min_p > 0.0 {
        let floor = row.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let kept = &probs[..keep];
    let total: f64 = kept.iter().sum();
    let target = rng::uniform(row.seed, row.step) * total;
    let mut cum = 0.0;
    for (i, p) in kept.iter().enumerate() {
        cum += p;
        if target < cum {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

/// Samples one token from `logits` (modified in place).
pub fn sample_row(logits: &mut [f32], row: &SampleRow) -> SampledToken {
    process(logits, row);
    let logprobs = log_softmax(logits);
    let token = if row.temperature == 0.0 { argmax(logits) } else { draw(logits, row) };
    let top = if row.top_logprobs > 0 { top_n(&logprobs, row.top_logprobs as usize) } else { vec![] };
    SampledToken { token: token as u32, logprob: logprobs[token], top }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The candidate list as the specification states it: every finite
    /// logit sorted (descending, ties to the lower id), then cut to top k.
    fn sorted_then_cut(logits: &[f32], t: f32, k: usize) -> Vec<(usize, f32)> {
        let mut c: Vec<(usize, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i, l / t)).collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if k > 0 {
            c.truncate(k);
        }
        c
    }

    #[test]
    fn top_k_selection_draws_what_the_full_sort_would() {
        let mut rng = rng::SplitMix64::new(3);
        for case in 0..200u64 {
            // Coarse values, so ties between ids are common.
            let n = 50 + (case as usize % 7) * 13;
            let logits: Vec<f32> = (0..n).map(|_| (rng.next_f32() * 8.0).floor() - 4.0).collect();
            let k = [1, 2, 5, 17, n - 1, n, n + 3][case as usize % 7] as u32;
            let row = SampleRow {
                temperature: 0.7,
                top_k: k,
                top_p: if case % 3 == 0 { 0.8 } else { 1.0 },
                min_p: if case % 5 == 0 { 0.1 } else { 0.0 },
                seed: case,
                step: case * 7,
                ..SampleRow::greedy(n)
            };
            // The reference: only the ids the full sort keeps stay finite,
            // then the draw without top-k (which sorts everything).
            let mut masked = vec![f32::NEG_INFINITY; n];
            for (i, _) in sorted_then_cut(&logits, row.temperature, k as usize) {
                masked[i] = logits[i];
            }
            let want = draw(&masked, &SampleRow { top_k: 0, ..row.clone() });
            assert_eq!(draw(&logits, &row), want, "case {case}: n {n} k {k}");
        }
    }
}
