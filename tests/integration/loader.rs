//! Bad checkpoints get clear errors naming the file and the problem, never a
//! panic; both config dialects and both spellings of Infinity load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mamba_serve::model::{Checkpoint, ModelConfig, ModelError};
use mamba_serve::tokenizer::Tokenizer;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::common::*;

/// A copy of the first fixture in a temporary folder.
fn scratch_copy() -> (tempfile::TempDir, PathBuf) {
    let src = fixture_models().into_iter().find(|p| p.join("model.safetensors").exists()).expect("a single-file fixture");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dst = tmp.path().join("model");
    std::fs::create_dir(&dst).expect("mkdir");
    for e in std::fs::read_dir(&src).expect("read fixture") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
    (tmp, dst)
}

/// Rewrites model.safetensors through `edit`, which gets (name, dtype,
/// shape, bytes) of every tensor and returns the ones to write.
fn rewrite(dir: &Path, edit: impl Fn(Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let tensors: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let edited = edit(tensors);
    let views: Vec<(String, TensorView<'_>)> =
        edited.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view"))).collect();
    let out = safetensors::tensor::serialize(views, None::<HashMap<String, String>>).expect("serialize");
    std::fs::write(&path, out).expect("write");
}

fn load_err(dir: &Path) -> String {
    let result = (|| -> Result<(), ModelError> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        mamba_serve::model::Model::load(mamba_serve::backend::cpu::CpuBackend::new(), cfg, &ckpt, opts(1, 8), &mut |_| {})?;
        Ok(())
    })();
    match result {
        Ok(()) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_is_named() {
    let (_t, dir) = scratch_copy();
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    let e = load_err(&dir);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn unsupported_model_type_is_named() {
    let (_t, dir) = scratch_copy();
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["model_type"] = "jamba".into();
    std::fs::write(dir.join("config.json"), v.to_string()).expect("write");
    let e = load_err(&dir);
    assert!(e.contains("unsupported `model_type` \"jamba\"") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = scratch_copy();
    rewrite(&dir, |ts| ts.into_iter().filter(|t| t.0 != "backbone.layers.1.mixer.out_proj.weight").collect());
    let e = load_err(&dir);
    assert!(e.contains("backbone.layers.1.mixer.out_proj.weight is missing"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let (_t, dir) = scratch_copy();
    rewrite(&dir, |ts| {
        ts.into_iter()
            .map(|(n, d, s, b)| {
                if n == "backbone.layers.0.mixer.D" {
                    let half = s[0] / 2;
                    (n, d, vec![half], b[..half * 4].to_vec())
                } else {
                    (n, d, s, b)
                }
            })
            .collect()
    });
    let e = load_err(&dir);
    assert!(e.contains("backbone.layers.0.mixer.D has shape"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let (_t, dir) = scratch_copy();
    rewrite(&dir, |ts| {
        ts.into_iter()
            .map(|(n, d, s, b)| {
                if n == "backbone.norm_f.weight" {
                    let wide: Vec<u8> =
                        b.chunks(4).flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).to_le_bytes()).collect();
                    (n, Dtype::F64, s, wide)
                } else {
                    (n, d, s, b)
                }
            })
            .collect()
    });
    let e = load_err(&dir);
    assert!(e.contains("backbone.norm_f.weight") && e.contains("F64") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_file_is_reported_as_truncated() {
    let (_t, dir) = scratch_copy();
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).expect("stat").len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(len - 100).expect("truncate");
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn garbage_file_is_reported() {
    let (_t, dir) = scratch_copy();
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file at all").expect("write");
    let e = load_err(&dir);
    assert!(e.contains("bad safetensors file") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn pytorch_bin_only_says_how_to_convert() {
    let (_t, dir) = scratch_copy();
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    std::fs::write(dir.join("pytorch_model.bin"), b"pickle").expect("write");
    let e = load_err(&dir);
    assert!(e.contains("pytorch_model.bin") && e.contains("save_pretrained"), "{e}");
}

#[test]
fn missing_tokenizer_is_named() {
    let (_t, dir) = scratch_copy();
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    let e = Tokenizer::from_dir(&dir).err().expect("must fail").to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn sharded_bf16_checkpoint_opens_through_its_index() -> TestResult {
    let dir = fixture_models().into_iter().find(|p| p.join("model.safetensors.index.json").exists()).expect("a sharded fixture");
    let ckpt = Checkpoint::open(&dir)?;
    use mamba_serve::model::TensorSource;
    let t = ckpt.get("backbone.embeddings.weight")?.expect("embedding present");
    assert_eq!(t.dtype, mamba_serve::backend::DType::BF16);
    Ok(())
}

#[test]
fn every_dialect_config_parses() -> TestResult {
    let dir = fixtures_dir().join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p)?;
            ModelConfig::from_json(&text).map_err(|e| format!("{}: {e}", p.display()))?;
            n += 1;
        }
    }
    assert!(n >= 4, "expected the dialect configs in {}", dir.display());
    Ok(())
}
