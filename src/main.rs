//! The `mamba-serve` command line: wiring only. Each subcommand parses its
//! flags, loads what it needs and hands over to the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use mamba_serve::backend::DType;
use mamba_serve::engine::offline;
use mamba_serve::model::{
    self, Checkpoint, DeviceChoice, LoadProgress, ModelConfig, ModelOptions, RandomWeights, Runner, shapes,
};
use mamba_serve::sampling::SamplingParams;
use mamba_serve::tokenizer::{DecodeStream, Tokenizer};

#[derive(Parser)]
#[command(name = "mamba-serve", version, about = "A text-generation server for Mamba state-space language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure prefill and decode speed of the model alone.
    Bench(BenchArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 is off.
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Print one JSON object (ids, text, timings) as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// A model folder to benchmark.
    #[arg(long, conflicts_with = "random_shape", required_unless_present = "random_shape")]
    model: Option<PathBuf>,
    /// A public checkpoint shape with random weights (mamba-130m, mamba-1.4b, mamba2-130m, ...).
    #[arg(long)]
    random_shape: Option<String>,
    /// Weight dtype for --random-shape: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Prompt lengths for prefill, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prompt_len: Vec<usize>,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batch: Vec<usize>,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Tokens per forward during prefill.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Print the report as JSON only.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench(a),
    }
}

/// Logs load progress every ~10 % of the bytes.
fn progress_logger() -> impl FnMut(LoadProgress) {
    let mut next = 0.0;
    move |p: LoadProgress| {
        let frac = p.bytes_done as f64 / p.bytes_total.max(1) as f64;
        if frac >= next || p.tensors_done == p.tensors_total {
            tracing::debug!(tensors = p.tensors_done, of = p.tensors_total, mb = p.bytes_done / 1_000_000, "loading weights");
            next = frac + 0.1;
        }
    }
}

fn load_dir(dir: &Path, device: DeviceChoice, opts: ModelOptions) -> Result<Box<dyn Runner>> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let (runner, why) = model::load(device, cfg, &ckpt, opts, &mut progress_logger())?;
    tracing::info!(backend = %runner.backend_name(), "{why}");
    Ok(runner)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let tok = Tokenizer::from_dir(&a.model)?;
    let opts = ModelOptions { n_slots: 1, max_batch_tokens: 512, max_batch_seqs: 1 };
    let mut runner = load_dir(&a.model, a.device, opts)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let cfg = runner.config().clone();
    let mut prompt = tok.encode(&a.prompt)?;
    if prompt.is_empty() {
        match tok.bos_id().or(cfg.bos_token_id) {
            Some(bos) => prompt.push(bos),
            None => bail!("the prompt encodes to no tokens and the tokenizer has no BOS token to start from"),
        }
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!("the tokenizer produced id {bad}, outside the model's vocabulary of {}", cfg.vocab_size);
    }
    if !(a.temperature >= 0.0) || !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let params = SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, seed: a.seed, ..Default::default() };
    let mut eos: Vec<u32> = cfg.eos_token_ids.clone();
    eos.extend_from_slice(tok.eos_ids());
    if a.ignore_eos {
        eos.clear();
    }
    let valid_vocab = tok.vocab_size().min(cfg.vocab_size);
    let mut stream = DecodeStream::new(true);
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let mut emit_err = None;
    let output = offline::generate(runner.as_mut(), &prompt, a.max_tokens, &params, valid_vocab, &eos, &mut |id| {
        match stream.step(&tok, id) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
            Ok(None) => {}
            Err(e) => emit_err = Some(e),
        }
    })?;
    if let Some(e) = emit_err {
        return Err(e.into());
    }
    let rest = stream.flush(&tok)?;
    text.push_str(&rest);
    out.write_all(rest.as_bytes())?;
    writeln!(out)?;
    if a.json {
        let n = output.generated.len();
        let json = serde_json::json!({
            "prompt_ids": prompt,
            "generated_ids": output.generated,
            "text": text,
            "finish_reason": if output.stopped_by_eos { "stop" } else { "length" },
            "backend": runner.backend_name(),
            "timings": {
                "load_s": load_seconds,
                "prefill_s": output.prefill_seconds,
                "decode_s": output.decode_seconds,
                "prefill_tokens_per_s": prompt.len() as f64 / output.prefill_seconds.max(1e-9),
                "decode_tokens_per_s": if n > 1 { (n - 1) as f64 / output.decode_seconds.max(1e-9) } else { 0.0 },
            }
        });
        writeln!(out, "{json}")?;
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let opts = ModelOptions { n_slots: max_batch, max_batch_tokens: a.chunk.max(max_batch), max_batch_seqs: max_batch };
    let (mut runner, name, params) = if let Some(name) = &a.random_shape {
        let cfg = shapes::public_shape(name).with_context(|| format!("unknown shape {name}; known: {}", shapes::NAMES.join(", ")))?;
        let dtype = match a.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => bail!("unknown --dtype {other} (bf16, f16 or f32)"),
        };
        let params = shapes::param_count(&cfg);
        let src = RandomWeights::new(dtype, model::weights::expected_tensors(&cfg), 1);
        let (runner, why) = model::load(a.device, cfg, &src, opts, &mut progress_logger())?;
        tracing::info!(backend = %runner.backend_name(), "{why}");
        (runner, format!("{name} (random {dtype})"), params)
    } else {
        let dir = a.model.as_ref().context("--model or --random-shape is required")?;
        let runner = load_dir(dir, a.device, opts)?;
        let params = shapes::param_count(runner.config());
        (runner, dir.display().to_string(), params)
    };
    // What a decode step reads: every weight once, at the width the backend
    // computes with (f32 on the CPU backend).
    let width = if runner.backend_name().starts_with("cpu") { 4 } else { 2 };
    let weight_bytes = (params * width) as u64;
    let report = mamba_serve::bench::run(runner.as_mut(), name, params, weight_bytes, &a.prompt_len, &a.batch, a.steps)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", mamba_serve::bench::table(&report));
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
