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
pub use forward::{Model, ModelOptions, Runner, SeqChunk};
pub use weights::LoadProgress;

use crate::backend::BackendError;

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
    match device {
        DeviceChoice::Cpu => {
            let m = Model::load(CpuBackend::new(), cfg, src, opts, progress)?;
            Ok((Box::new(m), "cpu backend (asked for)".to_string()))
        }
        DeviceChoice::Auto => {
            let m = Model::load(CpuBackend::new(), cfg, src, opts, progress)?;
            Ok((Box::new(m), "cpu backend (this build has no CUDA backend)".to_string()))
        }
        DeviceChoice::Cuda(_) => Err(ModelError::Backend(BackendError::Unavailable("cuda", "this build has no CUDA backend".into()))),
    }
}
