//! The `mamba-serve` command line: wiring only. Each subcommand parses its
//! flags, loads what it needs and hands over to the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use mamba_serve::backend::DType;
use mamba_serve::config::Settings;
use mamba_serve::engine::offline;
use mamba_serve::model::{self, Checkpoint, DeviceChoice, ModelConfig, ModelOptions, RandomWeights, Runner, shapes};
use mamba_serve::sampling::SamplingParams;
use mamba_serve::tokenizer::{DecodeStream, Tokenizer};

#[derive(Parser)]
#[command(name = "mamba-serve", version, about = "A text-generation server for Mamba state-space language models")]
struct Cli {
    /// What to run; with none, `serve` with its defaults (the bundled model
    /// on 127.0.0.1:8080).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate text for one prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure prefill and decode speed of the model alone.
    Bench(BenchArgs),
    /// Load a running server with concurrent completion requests.
    Loadtest(LoadtestArgs),
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Hugging Face model folder; default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A TOML settings file (see config/default.toml for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// State slots (concurrent sequences); 0 chooses.
    #[arg(long)]
    slots: Option<usize>,
    /// Name served in /v1/models.
    #[arg(long)]
    served_name: Option<String>,
    /// Require this Bearer key (repeat for several).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
}

#[derive(Args)]
struct LoadtestArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Words per prompt.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long)]
    stream: bool,
    /// Model name to send (default: the server's).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the report as JSON only.
    #[arg(long)]
    json: bool,
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
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Timed prefill runs per prompt length (the median is reported).
    #[arg(long, default_value_t = 3)]
    prefill_runs: usize,
    /// Tokens per forward during prefill.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Run decode steps one op at a time instead of replaying recorded graphs.
    #[arg(long)]
    no_graphs: bool,
    /// Run decode steps one at a time, each after the last one's tokens are
    /// read, instead of queueing each before reading the last (as the
    /// server does: `engine.step_ahead`).
    #[arg(long)]
    no_step_ahead: bool,
    /// Skip measuring the GPU's copy bandwidth and bf16 matrix rate (the
    /// limits every figure is set against).
    #[arg(long)]
    no_ceilings: bool,
    /// Also time cuBLAS on the product shapes of this model (prefill and
    /// decode batches), with f32 and bf16 outputs.
    #[arg(long)]
    gemm_survey: bool,
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
        None => serve(ServeArgs::default()),
        Some(Command::Serve(a)) => serve(a),
        Some(Command::Generate(a)) => generate(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Loadtest(a)) => loadtest(a),
    }
}

fn loadtest(a: LoadtestArgs) -> Result<()> {
    let spec = mamba_serve::loadtest::LoadSpec {
        url: a.url,
        model: a.model,
        api_key: a.api_key,
        concurrency: a.concurrency,
        requests: a.requests,
        prompt_len: a.prompt_len,
        max_tokens: a.max_tokens,
        stream: a.stream,
        timeout: std::time::Duration::from_secs(a.timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(mamba_serve::loadtest::run(spec));
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", mamba_serve::loadtest::table(&report));
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.completed == 0 {
        bail!("no request completed");
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    use toml::Value;
    let mut flags: Vec<(&str, Value)> = vec![];
    if let Some(m) = &a.model {
        flags.push(("model.path", Value::String(m.display().to_string())));
    }
    if let Some(h) = a.host {
        flags.push(("server.host", Value::String(h)));
    }
    if let Some(p) = a.port {
        flags.push(("server.port", Value::Integer(p as i64)));
    }
    if let Some(d) = a.device {
        flags.push(("model.device", Value::String(d)));
    }
    if let Some(s) = a.slots {
        flags.push(("engine.slots", Value::Integer(s as i64)));
    }
    if let Some(n) = a.served_name {
        flags.push(("model.served_name", Value::String(n)));
    }
    if !a.api_keys.is_empty() {
        flags.push(("server.api_keys", Value::Array(a.api_keys.into_iter().map(Value::String).collect())));
    }
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("MAMBA_SERVE_")).collect();
    let settings = Settings::load(a.config.as_deref(), &env, &flags)?;
    let server = mamba_serve::build(&settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let stopped = runtime.block_on(async {
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let name = &server.state.model_name;
        let shown_host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
        let auth = if settings.server.api_keys.is_empty() { String::new() } else { " -H 'Authorization: Bearer <key>'".to_string() };
        eprintln!("mamba-serve is listening on http://{local}");
        eprintln!("try it:");
        eprintln!(
            "  curl -s http://{shown_host}:{}/v1/completions -H 'Content-Type: application/json'{auth} -d '{{\"model\": \"{name}\", \"prompt\": \"ROMEO:\", \"max_tokens\": 48}}'",
            local.port()
        );
        anyhow::Ok(mamba_serve::api::server::serve(listener, server.router.clone(), server.state.clone()).await?)
    })?;
    // Release the device on the engine's own thread before the process exits.
    server.state.engine.stop();
    drop(runtime);
    match stopped {
        mamba_serve::api::server::Stopped::Drained => {
            tracing::info!("drained; exiting");
            Ok(())
        }
        mamba_serve::api::server::Stopped::EngineDied => bail!("the engine stopped unexpectedly"),
    }
}

fn load_dir(dir: &Path, device: DeviceChoice, opts: ModelOptions) -> Result<Box<dyn Runner>> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let (runner, why) = model::load(device, cfg, &ckpt, opts, &mut mamba_serve::progress::reporter("weights"))?;
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
    // Written so that NaN fails too.
    let settings_ok = (0.0..).contains(&a.temperature) && a.top_p > 0.0 && a.top_p <= 1.0;
    if !settings_ok {
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
    let output =
        offline::generate(runner.as_mut(), &prompt, a.max_tokens, &params, valid_vocab, &eos, &mut |id| match stream.step(&tok, id) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
            Ok(None) => {}
            Err(e) => emit_err = Some(e),
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
    let dev = model::DeviceOptions { graphs: !a.no_graphs, ..Default::default() };
    // The ceilings are measured first, while the GPU's memory is free.
    let ceilings = match a.device {
        _ if a.no_ceilings => None,
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(mamba_serve::backend::cuda::ceilings::measure(n)?),
        DeviceChoice::Auto => mamba_serve::backend::cuda::ceilings::measure(0).ok(),
    };
    if let Some(c) = &ceilings {
        tracing::info!(device = %c.device, copy_gb_per_s = c.copy_gb_per_s, bf16_tflop_per_s = c.bf16_tflop_per_s, "ceilings measured");
    }
    if a.gemm_survey {
        let name = a.random_shape.as_deref().context("--gemm-survey needs --random-shape")?;
        let cfg = shapes::public_shape(name).with_context(|| format!("unknown shape {name}"))?;
        let (d, di, r, n) = (cfg.hidden_size, cfg.d_inner, cfg.dt_rank, cfg.d_state);
        let ordinal = if let DeviceChoice::Cuda(o) = a.device { o } else { 0 };
        let mut list = vec![];
        for m in [16, 64, 256, 1024, 2048] {
            list.extend([(m, 2 * di, d), (m, d, di), (m, r + 2 * n, di), (m, di, r)]);
        }
        for line in mamba_serve::backend::cuda::ceilings::gemm_survey(ordinal, &list)? {
            println!("{line}");
        }
    }
    let (mut runner, name, params, width) = if let Some(name) = &a.random_shape {
        let cfg = shapes::public_shape(name).with_context(|| format!("unknown shape {name}; known: {}", shapes::NAMES.join(", ")))?;
        let dtype = match a.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => bail!("unknown --dtype {other} (bf16, f16 or f32)"),
        };
        let params = shapes::param_count(&cfg);
        let src = RandomWeights::new(dtype, model::weights::expected_tensors(&cfg), 1);
        let (runner, why) = model::load_with(a.device, dev, cfg, &src, opts, &mut mamba_serve::progress::reporter("weights"))?;
        tracing::info!(backend = %runner.backend_name(), "{why}");
        (runner, format!("{name} (random {dtype})"), params, dtype.size())
    } else {
        let dir = a.model.as_ref().context("--model or --random-shape is required")?;
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let (runner, why) = model::load_with(a.device, dev, cfg, &ckpt, opts, &mut mamba_serve::progress::reporter("weights"))?;
        tracing::info!(backend = %runner.backend_name(), "{why}");
        let params = shapes::param_count(runner.config());
        (runner, dir.display().to_string(), params, 2)
    };
    // What a decode step reads: every weight once, at the width the backend
    // computes with (f32 on the CPU backend, the stored dtype on a GPU).
    let width = if runner.backend_name().starts_with("cpu") { 4 } else { width };
    let weight_bytes = (params * width) as u64;
    let plan = mamba_serve::bench::BenchPlan {
        prompt_lens: &a.prompt_len,
        batches: &a.batch,
        steps: a.steps,
        prefill_runs: a.prefill_runs,
        graphs: !a.no_graphs && !runner.backend_name().starts_with("cpu"),
        step_ahead: !a.no_step_ahead,
        ceilings: ceilings.map(|c| mamba_serve::bench::Ceilings { copy_gb_per_s: c.copy_gb_per_s, bf16_tflop_per_s: c.bf16_tflop_per_s }),
    };
    let report = mamba_serve::bench::run(runner.as_mut(), name, params, weight_bytes, &plan)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", mamba_serve::bench::table(&report));
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
