//! Fixture helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use mamba_serve::backend::cpu::CpuBackend;
use mamba_serve::model::{Checkpoint, Model, ModelConfig, ModelOptions};
use serde::Deserialize;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// Every fixture model folder (those with a reference.json), sorted.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected the committed fixture models, found {v:?}");
    v
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub model_type: String,
    pub prompts: Vec<PromptRef>,
}

#[derive(Debug, Deserialize)]
pub struct PromptRef {
    pub text: String,
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
    #[serde(default)]
    pub step_logits: Vec<Vec<f32>>,
}

pub fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json readable");
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn load_cpu(dir: &Path, opts: ModelOptions) -> Result<Model<CpuBackend>, Box<dyn std::error::Error>> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    Ok(Model::load(CpuBackend::new(), cfg, &ckpt, opts, &mut |_| {})?)
}

pub fn opts(slots: usize, tokens: usize) -> ModelOptions {
    ModelOptions { n_slots: slots, max_batch_tokens: tokens, max_batch_seqs: slots }
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The device the server tests run on: `cpu`, or what MAMBA_TEST_DEVICE says
/// (the GPU run sets `cuda`).
pub fn test_device() -> String {
    std::env::var("MAMBA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The `mamba-serve` binary the tests start: the one cargo built, or
/// MAMBA_TEST_SERVE_BIN (a GPU run staged elsewhere).
pub fn serve_binary() -> std::path::PathBuf {
    std::env::var_os("MAMBA_TEST_SERVE_BIN").map(Into::into).unwrap_or_else(|| env!("CARGO_BIN_EXE_mamba-serve").into())
}
