//! `mamba-serve bench`: the engine-only benchmark. Prefill and decode speed
//! of a model on a backend, with no HTTP, queue or tokenizer in the way.
//!
//! Prefill: one sequence of each prompt length, timed over a whole forward
//! (chunked by the step size). Decode: `batch` sequences in distinct slots,
//! one token each per step, timed over `steps` steps after a warm-up. Each
//! figure comes with the bytes a decode step must move (weights once, every
//! state read and written) so it can be set against a bandwidth limit.

use std::time::Instant;

use serde::Serialize;

use crate::model::{ModelError, Runner, SeqChunk};

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    pub prompt_len: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Weight bytes + batch × 2 × state bytes, divided by the step time.
    pub effective_gb_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    pub params: usize,
    pub weight_bytes: u64,
    pub state_bytes_per_seq: usize,
    pub prefill: Vec<PrefillResult>,
    pub decode: Vec<DecodeResult>,
}

/// Pseudo-random token ids below `vocab` (no tokenizer needed).
fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut rng = crate::backend::rng::SplitMix64::new(salt);
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

pub fn run(
    runner: &mut dyn Runner,
    model: String,
    params: usize,
    weight_bytes: u64,
    prompt_lens: &[usize],
    batches: &[usize],
    steps: usize,
) -> Result<BenchReport, ModelError> {
    let cfg = runner.config().clone();
    let opts = runner.options();
    let vocab = cfg.vocab_size.min(1000).max(1);
    let mut prefill = vec![];
    for &len in prompt_lens {
        let prompt = tokens(len, vocab, len as u64);
        // Warm-up with a short chunk, then the timed prompt.
        runner.reset_slot(0)?;
        runner.forward(&[SeqChunk { slot: 0, tokens: &prompt[..len.min(8)], is_prompt: true }])?;
        runner.reset_slot(0)?;
        let start = Instant::now();
        for piece in prompt.chunks(opts.max_batch_tokens) {
            runner.forward(&[SeqChunk { slot: 0, tokens: piece, is_prompt: true }])?;
        }
        let seconds = start.elapsed().as_secs_f64();
        prefill.push(PrefillResult { prompt_len: len, seconds, tokens_per_s: len as f64 / seconds });
    }
    let mut decode = vec![];
    for &batch in batches {
        if batch > opts.n_slots || batch > opts.max_batch_seqs || batch > opts.max_batch_tokens {
            return Err(ModelError::Batch(format!("batch {batch} exceeds the pool or step size {opts:?}")));
        }
        for slot in 0..batch {
            runner.reset_slot(slot)?;
        }
        let ids = tokens(batch, vocab, 7 + batch as u64);
        let step = |runner: &mut dyn Runner| -> Result<(), ModelError> {
            let chunks: Vec<SeqChunk<'_>> =
                (0..batch).map(|s| SeqChunk { slot: s, tokens: &ids[s..s + 1], is_prompt: false }).collect();
            runner.forward(&chunks).map(|_| ())
        };
        for _ in 0..2 {
            step(runner)?;
        }
        let start = Instant::now();
        for _ in 0..steps {
            step(runner)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let step_s = seconds / steps as f64;
        let bytes = weight_bytes as f64 + (batch * 2 * cfg.state_bytes()) as f64;
        decode.push(DecodeResult {
            batch,
            steps,
            step_ms: step_s * 1e3,
            tokens_per_s: (batch * steps) as f64 / seconds,
            effective_gb_per_s: bytes / step_s / 1e9,
        });
    }
    Ok(BenchReport {
        model,
        backend: runner.backend_name(),
        params,
        weight_bytes,
        state_bytes_per_seq: cfg.state_bytes(),
        prefill,
        decode,
    })
}

/// The report as a plain-text table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "model {} on {}\nparams {:.1} M, weights {:.1} MB as run, state {:.2} MB per sequence\n\n",
        r.model,
        r.backend,
        r.params as f64 / 1e6,
        r.weight_bytes as f64 / 1e6,
        r.state_bytes_per_seq as f64 / 1e6
    );
    s.push_str("prefill  prompt_len  seconds   tokens/s\n");
    for p in &r.prefill {
        s.push_str(&format!("         {:>10}  {:>7.3}  {:>9.1}\n", p.prompt_len, p.seconds, p.tokens_per_s));
    }
    s.push_str("\ndecode   batch  step_ms   tokens/s  effective GB/s\n");
    for d in &r.decode {
        s.push_str(&format!("         {:>5}  {:>7.2}  {:>9.1}  {:>14.2}\n", d.batch, d.step_ms, d.tokens_per_s, d.effective_gb_per_s));
    }
    s
}
