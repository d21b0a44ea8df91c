//! Where weights come from: a Hugging Face folder of safetensors files,
//! memory-mapped and read in their stored dtype, or random weights of a
//! named public shape for benchmarks.
//!
//! A folder holds `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Nothing is copied at open time; tensors are
//! borrowed from the maps when the model uploads them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use super::ModelError;
use crate::backend::DType;

/// One tensor as stored: dtype, shape and little-endian bytes.
pub struct TensorData<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

/// A provider of named tensors.
pub trait TensorSource {
    /// The tensor called `name`, or `None` when there is none.
    fn get(&self, name: &str) -> Result<Option<TensorData<'_>>, ModelError>;
    /// Every tensor name (for error messages and checks).
    fn names(&self) -> Vec<String>;
    /// Where the tensors come from, for messages.
    fn origin(&self) -> String;
    /// Total bytes of tensor data.
    fn total_bytes(&self) -> u64;
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section in the file.
    data_start: usize,
    tensors: HashMap<String, StoredTensor>,
}

/// A tensor's dtype, shape and byte range in the data section.
type StoredTensor = (Dtype, Vec<usize>, (usize, usize));

/// A Hugging Face checkpoint folder, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens the safetensors files of `dir` (single file or sharded).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io { path: index_path.clone(), source: e })?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Safetensors { path: index_path.clone(), detail: format!("index is not valid JSON: {e}") })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors { path: index_path.clone(), detail: "index has no `weight_map` object".into() })?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                "; only safetensors weights are read: this folder has pytorch_model.bin, convert it with transformers (`model.save_pretrained(dir, safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(ModelError::MissingFile {
                path: single,
                detail: format!("no model.safetensors or model.safetensors.index.json in {}{hint}", dir.display()),
            });
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = Self::open_shard(&path)?;
            for name in shard.tensors.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, index })
    }

    fn open_shard(path: &Path) -> Result<Shard, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::Io { path: path.to_path_buf(), source: e })?;
        // SAFETY: the map is read-only; a checkpoint rewritten while it is
        // being served is outside what any server can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io { path: path.to_path_buf(), source: e })?;
        let bad = |detail: String| ModelError::Safetensors { path: path.to_path_buf(), detail };
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            let hint = if matches!(e, safetensors::SafeTensorError::MetadataIncompleteBuffer) { " (the file is truncated)" } else { "" };
            bad(format!("{e}{hint}"))
        })?;
        let data_start = 8 + header_len;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, (info.dtype, info.shape.clone(), info.data_offsets)))
            .collect::<HashMap<_, _>>();
        for (name, (_, _, (_, end))) in &tensors {
            if data_start + end > map.len() {
                return Err(bad(format!("tensor {name} ends past the end of the file (the file is truncated)")));
            }
        }
        Ok(Shard { path: path.to_path_buf(), map, data_start, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl TensorSource for Checkpoint {
    fn get(&self, name: &str) -> Result<Option<TensorData<'_>>, ModelError> {
        let Some(&i) = self.index.get(name) else { return Ok(None) };
        let shard = &self.shards[i];
        let (dtype, shape, (start, end)) = &shard.tensors[name];
        let dtype = match dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedDType { name: name.to_owned(), dtype: format!("{other:?}"), path: shard.path.clone() });
            }
        };
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        Ok(Some(TensorData { dtype, shape: shape.clone(), bytes: Cow::Borrowed(bytes) }))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| (s.map.len() - s.data_start) as u64).sum()
    }
}

/// Deterministic random weights for a given set of names and shapes, in one
/// dtype: for benchmarks of public shapes without downloading them.
///
/// Values imitate a trained Mamba's ranges (so no NaN or overflow appears):
/// matrices ~ U(-a, a) with a = 1/sqrt(fan_in), norms 1, `A_log` = log(1..N),
/// `D` = 1, dt biases the inverse softplus of 0.01.
pub struct RandomWeights {
    dtype: DType,
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
}

impl RandomWeights {
    pub fn new(dtype: DType, shapes: Vec<(String, Vec<usize>)>, seed: u64) -> Self {
        RandomWeights { dtype, shapes: shapes.into_iter().collect(), seed }
    }

    fn values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = crate::backend::rng::SplitMix64::new(h);
        if name.ends_with("A_log") {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            return (0..n).map(|i| if cols > 1 { ((i % cols) + 1) as f32 } else { (i + 1) as f32 }.ln()).collect();
        }
        if name.ends_with(".D") || name.contains("norm") {
            return vec![1.0; n];
        }
        if name.ends_with("dt_bias") || name.ends_with("dt_proj.bias") {
            let dt = 0.01f32;
            return vec![dt + (-(-dt).exp_m1()).ln(); n];
        }
        if name.ends_with(".bias") {
            return vec![0.0; n];
        }
        let fan_in = if shape.len() >= 2 { shape[1..].iter().product::<usize>() } else { 1 };
        let a = 1.0 / (fan_in as f32).sqrt();
        (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * a).collect()
    }
}

impl TensorSource for RandomWeights {
    fn get(&self, name: &str) -> Result<Option<TensorData<'_>>, ModelError> {
        let Some(shape) = self.shapes.get(name) else { return Ok(None) };
        let values = self.values(name, shape);
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        };
        Ok(Some(TensorData { dtype: self.dtype, shape: shape.clone(), bytes: Cow::Owned(bytes) }))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shapes.keys().cloned().collect();
        v.sort();
        v
    }

    fn origin(&self) -> String {
        format!("random {} weights", self.dtype)
    }

    fn total_bytes(&self) -> u64 {
        self.shapes.values().map(|s| (s.iter().product::<usize>() * self.dtype.size()) as u64).sum()
    }
}
