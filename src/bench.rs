//! `mamba-serve bench`: the engine-only benchmark. Prefill and decode speed
//! of a model on a backend, with no HTTP, queue or tokenizer in the way.
//!
//! Prefill: one sequence of each prompt length, the median of a few timed
//! forwards (chunked by the step size) after a warm-up. Decode: `batch`
//! sequences in distinct slots, one token each per step with greedy
//! sampling on the device (only token ids come back, as when serving),
//! timed over `steps` steps after a warm-up. On a GPU each figure is set
//! against its limit, from ceilings measured in the same run:
//! decode step >= (weight bytes + batch × 2 × state bytes) / copy bandwidth;
//! prefill >= 2 × params × tokens / bf16 matrix rate.

use std::time::Instant;

use serde::Serialize;

use crate::backend::SampleRow;
use crate::model::{ModelError, Runner, SeqChunk};

/// The machine ceilings the limits are computed from.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceilings {
    /// Device copy bandwidth, bytes read + written per second / 1e9.
    pub copy_gb_per_s: f64,
    /// Dense bf16 matrix-product rate, TFLOP/s.
    pub bf16_tflop_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    pub prompt_len: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// 2 × params × tokens / bf16 rate, as tokens per second.
    pub limit_tokens_per_s: Option<f64>,
    /// tokens_per_s / limit_tokens_per_s.
    pub fraction_of_limit: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Weight bytes + batch × 2 × state bytes, divided by the step time.
    pub effective_gb_per_s: f64,
    /// (weight bytes + batch × 2 × state bytes) / copy bandwidth.
    pub limit_step_ms: Option<f64>,
    /// limit_step_ms / step_ms.
    pub fraction_of_limit: Option<f64>,
    /// Kernels and library calls one step's forward pass issues (the
    /// recorded graph's nodes when graphs are on); sampling not counted.
    pub kernels_per_step: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    pub params: usize,
    pub weight_bytes: u64,
    pub state_bytes_per_seq: usize,
    pub graphs: bool,
    pub step_ahead: bool,
    pub ceilings: Option<Ceilings>,
    pub prefill: Vec<PrefillResult>,
    pub decode: Vec<DecodeResult>,
}

/// What to measure.
pub struct BenchPlan<'a> {
    pub prompt_lens: &'a [usize],
    pub batches: &'a [usize],
    pub steps: usize,
    /// Timed prefill runs per length (the median is reported).
    pub prefill_runs: usize,
    pub graphs: bool,
    /// Queue each decode step before reading the last one's tokens, fed
    /// on the device (as the engine does).
    pub step_ahead: bool,
    pub ceilings: Option<Ceilings>,
}

/// Pseudo-random token ids below `vocab` (no tokenizer needed).
fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut rng = crate::backend::rng::SplitMix64::new(salt);
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `prompt` through slot 0 from a fresh state, sampling its next token.
fn prefill_once(runner: &mut dyn Runner, prompt: &[u32], vocab: usize) -> Result<f64, ModelError> {
    let chunk = runner.options().max_batch_tokens;
    runner.reset_slot(0)?;
    let start = Instant::now();
    let pieces: Vec<&[u32]> = prompt.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let row = (i + 1 == pieces.len()).then(|| SampleRow::greedy(vocab));
        runner.forward_sample(&[SeqChunk { slot: 0, tokens: piece, is_prompt: true }], &[row])?;
    }
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(
    runner: &mut dyn Runner,
    model: String,
    params: usize,
    weight_bytes: u64,
    plan: &BenchPlan<'_>,
) -> Result<BenchReport, ModelError> {
    let cfg = runner.config().clone();
    let opts = runner.options();
    let vocab = cfg.vocab_size;
    let ids_below = vocab.clamp(1, 1000);
    let mut prefill = vec![];
    for &len in plan.prompt_lens {
        let prompt = tokens(len, ids_below, len as u64);
        for _ in 0..2 {
            prefill_once(runner, &prompt, vocab)?;
        }
        let runs = plan.prefill_runs.max(1);
        let seconds = median((0..runs).map(|_| prefill_once(runner, &prompt, vocab)).collect::<Result<_, _>>()?);
        let tokens_per_s = len as f64 / seconds;
        let limit = plan.ceilings.map(|c| c.bf16_tflop_per_s * 1e12 / (2.0 * params as f64));
        prefill.push(PrefillResult {
            prompt_len: len,
            seconds,
            tokens_per_s,
            limit_tokens_per_s: limit,
            fraction_of_limit: limit.map(|l| tokens_per_s / l),
        });
    }
    let mut decode = vec![];
    for &batch in plan.batches {
        if batch > opts.n_slots || batch > opts.max_batch_seqs || batch > opts.max_batch_tokens {
            return Err(ModelError::Batch(format!("batch {batch} exceeds the pool or step size {opts:?}")));
        }
        for slot in 0..batch {
            runner.reset_slot(slot)?;
        }
        let ids = tokens(batch, ids_below, 7 + batch as u64);
        let rows: Vec<Option<SampleRow>> = (0..batch).map(|_| Some(SampleRow::greedy(vocab))).collect();
        let chunks: Vec<SeqChunk<'_>> = (0..batch).map(|s| SeqChunk { slot: s, tokens: &ids[s..s + 1], is_prompt: false }).collect();
        // The first step records the graph (when graphs are on): its launch
        // count is the forward pass's, plus the replay and the sampler.
        let before = runner.launches();
        runner.forward_sample(&chunks, &rows)?;
        let first = runner.launches() - before;
        let kernels_per_step = (first > 0).then(|| first.saturating_sub(1 + plan.graphs as u64));
        // Warm-up, long enough for the GPU's clocks to settle; then the
        // timed steps. Ahead, each step is queued, fed the last one's tokens
        // on the device, before those tokens are read (one step stays in
        // flight throughout, collected at the end).
        let ahead = plan.step_ahead;
        let greedy: Vec<SampleRow> = rows.iter().flatten().cloned().collect();
        if ahead {
            runner.launch(&chunks, &rows)?;
        }
        let step = |runner: &mut dyn Runner| -> Result<(), ModelError> {
            if ahead {
                runner.launch_followup(&greedy)?;
                runner.collect().map(|_| ())
            } else {
                runner.forward_sample(&chunks, &rows).map(|_| ())
            }
        };
        for _ in 0..8 {
            step(runner)?;
        }
        let start = Instant::now();
        for _ in 0..plan.steps {
            step(runner)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        if ahead {
            runner.collect()?;
        }
        let step_s = seconds / plan.steps as f64;
        let bytes = weight_bytes as f64 + (batch * 2 * cfg.state_bytes()) as f64;
        let limit_step_ms = plan.ceilings.map(|c| bytes / (c.copy_gb_per_s * 1e9) * 1e3);
        decode.push(DecodeResult {
            batch,
            steps: plan.steps,
            step_ms: step_s * 1e3,
            tokens_per_s: (batch * plan.steps) as f64 / seconds,
            effective_gb_per_s: bytes / step_s / 1e9,
            limit_step_ms,
            fraction_of_limit: limit_step_ms.map(|l| l / (step_s * 1e3)),
            kernels_per_step,
        });
    }
    Ok(BenchReport {
        model,
        backend: runner.backend_name(),
        params,
        weight_bytes,
        state_bytes_per_seq: cfg.state_bytes(),
        graphs: plan.graphs,
        step_ahead: plan.step_ahead,
        ceilings: plan.ceilings,
        prefill,
        decode,
    })
}

fn pct(f: Option<f64>) -> String {
    f.map_or("-".into(), |f| format!("{:.1}%", f * 100.0))
}

/// The report as a plain-text table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "model {} on {}\nparams {:.1} M, weights {:.1} MB as run, state {:.2} MB per sequence, graphs {}, step ahead {}\n",
        r.model,
        r.backend,
        r.params as f64 / 1e6,
        r.weight_bytes as f64 / 1e6,
        r.state_bytes_per_seq as f64 / 1e6,
        if r.graphs { "on" } else { "off" },
        if r.step_ahead { "on" } else { "off" }
    );
    if let Some(c) = r.ceilings {
        s.push_str(&format!("ceilings: copy {:.0} GB/s, bf16 matmul {:.0} TFLOP/s\n", c.copy_gb_per_s, c.bf16_tflop_per_s));
    }
    s.push_str("\nprefill  prompt_len  seconds   tokens/s   of limit\n");
    for p in &r.prefill {
        s.push_str(&format!(
            "         {:>10}  {:>7.4}  {:>9.1}  {:>9}\n",
            p.prompt_len,
            p.seconds,
            p.tokens_per_s,
            pct(p.fraction_of_limit)
        ));
    }
    s.push_str("\ndecode   batch  step_ms   tokens/s  effective GB/s  limit_ms  of limit  kernels/step\n");
    for d in &r.decode {
        s.push_str(&format!(
            "         {:>5}  {:>7.3}  {:>9.1}  {:>14.1}  {:>8}  {:>8}  {:>12}\n",
            d.batch,
            d.step_ms,
            d.tokens_per_s,
            d.effective_gb_per_s,
            d.limit_step_ms.map_or("-".into(), |l| format!("{l:.3}")),
            pct(d.fraction_of_limit),
            d.kernels_per_step.map_or("-".into(), |k| k.to_string())
        ));
    }
    s
}
