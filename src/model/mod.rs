//! The model layer: a Mamba-family checkpoint turned into a forward pass over
//! packed batches, written once against [`crate::backend::Backend`].
//!
//! It owns the weights, the state pool (one fixed-size recurrent state per
//! slot, allocated once) and the activation workspace (sized for the largest
//! step, allocated once). It knows no request and no HTTP: the engine hands
//! it `(slot, tokens)` chunks and gets logits back.

pub mod checkpoint;
pub mod config;
mod forward;
pub mod shapes;
pub mod weights;

use std::path::PathBuf;

pub use checkpoint::{Checkpoint, RandomWeights, TensorSource};
pub use config::{Arch, ModelConfig};
pub use forward::{DeviceOptions, Model, ModelOptions, Runner, SeqChunk};
pub use weights::LoadProgress;

use crate::backend::{Backend, BackendError};

/// What can go wrong loading or running a model. Messages name the file or
/// tensor and say what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {detail}")]
    MissingFile { path: PathBuf, detail: String },
    #[error("bad config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("bad safetensors file {path}: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    #[error("tensor {name} is missing from {origin}")]
    MissingTensor { name: String, origin: String },
    #[error("tensor {name} has shape {got:?}, expected {expected}")]
    BadShape { name: String, expected: String, got: Vec<usize> },
    #[error("tensor {name} in {path} has dtype {dtype}; only F32, F16 and BF16 weights are supported")]
    UnsupportedDType { name: String, dtype: String, path: PathBuf },
    #[error("batch: {0}")]
    Batch(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;

/// Which device to run on, as the user asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device \"{s}\" (expected auto, cpu, cuda or cuda:N)")),
            },
        }
    }
}

/// Loads a model onto the chosen device and returns it with a sentence
/// saying which backend was chosen and why.
pub fn load(
    device: DeviceChoice,
    cfg: ModelConfig,
    src: &dyn TensorSource,
    opts: ModelOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(Box<dyn Runner>, String), ModelError> {
    load_with(device, DeviceOptions::default(), cfg, src, opts, progress)
}

/// [`load`] with explicit device options (pool share of GPU memory, graphs).
pub fn load_with(
    device: DeviceChoice,
    dev: DeviceOptions,
    cfg: ModelConfig,
    src: &dyn TensorSource,
    opts: ModelOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(Box<dyn Runner>, String), ModelError> {
    let cpu = |cfg, progress: &mut dyn FnMut(LoadProgress), why: String| -> Result<(Box<dyn Runner>, String), ModelError> {
        let m = Model::load_with(CpuBackend::new(), cfg, src, opts, dev, progress)?;
        Ok((Box::new(m), why))
    };
    match device {
        DeviceChoice::Cpu => cpu(cfg, progress, "cpu backend (asked for)".to_string()),
        DeviceChoice::Cuda(n) => {
            let b = CudaBackend::new(n)?;
            let why = format!("cuda backend (asked for): {}", b.describe());
            let m = Model::load_with(b, cfg, src, opts, dev, progress)?;
            Ok((Box::new(m), why))
        }
        DeviceChoice::Auto => match CudaBackend::new(0) {
            Ok(b) => {
                let why = format!("cuda backend (auto: a usable GPU was found): {}", b.describe());
                let m = Model::load_with(b, cfg, src, opts, dev, progress)?;
                Ok((Box::new(m), why))
            }
            Err(e) => cpu(cfg, progress, format!("cpu backend (auto: no usable GPU: {e})")),
        },
    }
}
