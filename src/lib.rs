//! mamba-serve: a text-generation server for Mamba state-space language
//! models.
//!
//! Code map (dependencies point down this list, never up):
//! - [`api`]: HTTP (axum) routes, wire types, SSE, errors as OpenAI JSON.
//! - [`validate`]: wire request → [`engine::Request`], every limit checked once.
//! - [`engine`]: the step loop on its own thread, the bounded queue, the
//!   scheduler, sequences and their state slots.
//! - [`model`]: checkpoints (config, safetensors), the forward pass written
//!   once for Mamba-1, Falcon-Mamba and Mamba-2, the state pool.
//! - [`sampling`]: logit processors and samplers.
//! - [`backend`]: the fused ops a Mamba step needs, on CPU and CUDA.
//! - [`tokenizer`], [`config`]: leaves.

pub mod api;
pub mod backend;
pub mod bench;
pub mod config;
pub mod engine;
pub mod loadtest;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod sampling;
pub mod tokenizer;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use config::Settings;
use engine::{EngineHandle, EngineOptions};
use model::{Checkpoint, DeviceChoice, ModelConfig, ModelOptions};

/// The bundled default model, relative to the repository root (or the
/// image's working directory).
pub const DEFAULT_MODEL_DIR: &str = "models/shakespeare-mamba";

/// Why the server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("{0}")]
    NoModel(String),
}

/// The model folder the settings name, or the bundled default (looked up
/// from the working directory, then next to the executable).
pub fn model_dir(settings: &Settings) -> Result<PathBuf, BuildError> {
    if !settings.model.path.is_empty() {
        return Ok(PathBuf::from(&settings.model.path));
    }
    let mut candidates = vec![PathBuf::from(DEFAULT_MODEL_DIR)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(DEFAULT_MODEL_DIR));
        }
    }
    candidates.into_iter().find(|p| p.join("config.json").exists()).ok_or_else(|| {
        BuildError::NoModel(format!("no model given and the bundled default ({DEFAULT_MODEL_DIR}) was not found; pass --model DIR"))
    })
}

/// This machine's host name (the default replica name).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let name = if ok { String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap_or(&[])).into_owned() } else { String::new() };
    if name.is_empty() { "mamba-serve".into() } else { name }
}

/// A built server: the router (usable without a socket) and its engine.
pub struct Server {
    pub router: axum::Router,
    pub state: Arc<api::AppState>,
}

/// Loads the tokenizer and model named by `settings`, starts the engine and
/// builds the router.
pub fn build(settings: &Settings) -> Result<Server, BuildError> {
    let dir = model_dir(settings)?;
    build_from(settings, &dir)
}

/// [`build`] for an explicit model folder.
pub fn build_from(settings: &Settings, dir: &Path) -> Result<Server, BuildError> {
    let tokenizer = Arc::new(tokenizer::Tokenizer::from_dir(dir)?);
    let cfg = ModelConfig::from_dir(dir)?;
    let device: DeviceChoice = settings.model.device.parse().map_err(|e: String| config::ConfigError::Invalid(e))?;
    let e = &settings.engine;
    let slots = e.slots;
    let opts = ModelOptions { n_slots: slots, max_batch_tokens: e.max_batch_tokens.max(slots), max_batch_seqs: slots };
    let valid_vocab = tokenizer.vocab_size().min(cfg.vocab_size);
    let mut eos = cfg.eos_token_ids.clone();
    eos.extend_from_slice(tokenizer.eos_ids());
    eos.retain(|&t| (t as usize) < cfg.vocab_size);
    eos.sort_unstable();
    eos.dedup();
    let metrics = Arc::new(metrics::Metrics::default());
    let load_dir = dir.to_path_buf();
    let ckpt = Checkpoint::open(dir)?;
    let dtype = {
        use model::TensorSource;
        ["backbone.embeddings.weight", "backbone.embedding.weight"]
            .iter()
            .find_map(|n| ckpt.get(n).ok().flatten().map(|t| t.dtype.to_string()))
            .unwrap_or_else(|| "unknown".into())
    };
    drop(ckpt);
    let label = dir.display().to_string();
    let pool_memory_fraction = e.gpu_memory_fraction;
    let engine = EngineHandle::spawn(
        move || {
            let ckpt = Checkpoint::open(&load_dir)?;
            let mut progress = progress::reporter(&label);
            let dev = model::DeviceOptions { pool_memory_fraction, ..Default::default() };
            let (runner, why) = model::load_with(device, dev, cfg, &ckpt, opts, &mut progress)?;
            tracing::info!(backend = %runner.backend_name(), "{why}");
            Ok(runner)
        },
        EngineOptions { max_queue: e.max_queue, prefill_chunk: e.prefill_chunk, valid_vocab, step_ahead: e.step_ahead },
        metrics.clone(),
    )?;
    let info = engine.info().clone();
    let model_name = if settings.model.served_name.is_empty() {
        dir.canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    } else {
        settings.model.served_name.clone()
    };
    tracing::info!(
        model = %model_name,
        arch = info.config.arch.model_type(),
        dtype = %dtype,
        backend = %info.backend,
        slots = info.slots,
        state_bytes_per_slot = info.state_bytes_per_slot,
        pool_bytes = info.slots * info.state_bytes_per_slot,
        "model loaded"
    );
    let validator = validate::Validator::new(settings.engine.clone(), tokenizer.clone(), info.valid_vocab, eos);
    let replica = if settings.server.replica_name.is_empty() { host_name() } else { settings.server.replica_name.clone() };
    let state = Arc::new(api::AppState {
        engine,
        validator,
        tokenizer,
        server: settings.server.clone(),
        model_name,
        created: api::unix_now(),
        metrics,
        replica,
    });
    Ok(Server { router: api::router(state.clone()), state })
}
