//! One sequence, generated in the calling thread with no queue: what
//! `mamba-serve generate` runs, and an independent path the server's output
//! is checked against.

use std::time::Instant;

use crate::model::{ModelError, Runner, SeqChunk};
use crate::sampling::{SamplingParams, TokenHistory};

/// Output of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    pub generated: Vec<u32>,
    /// True when an end-of-sequence id ended it (the id is not in `generated`).
    pub stopped_by_eos: bool,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates up to `max_tokens` after `prompt` in slot 0 of `runner`.
///
/// The prompt runs in chunks of the runner's step size; then one token per
/// step. `on_token` sees each token as it is chosen. Generation stops early
/// at any id in `eos`. `valid_vocab` bounds the ids that may be sampled.
pub fn generate(
    runner: &mut dyn Runner,
    prompt: &[u32],
    max_tokens: usize,
    params: &SamplingParams,
    valid_vocab: usize,
    eos: &[u32],
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Batch("the prompt has no tokens".into()));
    }
    let chunk = runner.options().max_batch_tokens;
    runner.reset_slot(0)?;
    let mut history = TokenHistory::new(prompt);
    let start = Instant::now();
    let pieces: Vec<&[u32]> = prompt.chunks(chunk).collect();
    let mut next = None;
    for (i, piece) in pieces.iter().enumerate() {
        let row = (i + 1 == pieces.len() && max_tokens > 0).then(|| history.row(params, 0, valid_vocab));
        next = runner.forward_sample(&[SeqChunk { slot: 0, tokens: piece, is_prompt: true }], &[row])?.pop().flatten();
    }
    let prefill_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut generated = Vec::with_capacity(max_tokens);
    let mut stopped_by_eos = false;
    for step in 0..max_tokens {
        let token = next.take().ok_or_else(|| ModelError::Batch("the runner returned no token".into()))?.token;
        if eos.contains(&token) {
            stopped_by_eos = true;
            break;
        }
        generated.push(token);
        history.push(token);
        on_token(token);
        if step + 1 < max_tokens {
            let row = history.row(params, step as u64 + 1, valid_vocab);
            next = runner.forward_sample(&[SeqChunk { slot: 0, tokens: &[token], is_prompt: false }], &[Some(row)])?.pop().flatten();
        }
    }
    Ok(Generation { generated, stopped_by_eos, prefill_seconds, decode_seconds: start.elapsed().as_secs_f64() })
}
