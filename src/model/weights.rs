//! Tensor names, expected shapes, and the upload of a checkpoint's weights
//! to a backend.
//!
//! Names are those of Hugging Face transformers (`backbone.layers.N.mixer.*`);
//! the original state-spaces spelling `backbone.embedding.weight` and files
//! saved without the `backbone.` prefix are accepted. Dimensions are taken
//! from the tensors (config values that disagree are reported and
//! overridden), then every tensor's shape is checked before upload.

use std::collections::HashMap;

use super::ModelError;
use super::checkpoint::{TensorData, TensorSource};
use super::config::{Arch, ModelConfig};
use crate::backend::{Backend, HostMatrix, widen};

/// Weights of one Mamba block.
pub struct LayerWeights<B: Backend> {
    /// Pre-mixer RMSNorm weight `[hidden]`.
    pub norm: B::Vec,
    pub in_proj: B::Mat,
    pub in_proj_bias: Option<B::Vec>,
    /// Depthwise conv taps `[conv_dim, k]`.
    pub conv_w: B::Vec,
    pub conv_b: Option<B::Vec>,
    pub mixer: MixerWeights<B>,
    pub out_proj: B::Mat,
    pub out_proj_bias: Option<B::Vec>,
}

/// The part of a block that differs between Mamba-1 and Mamba-2.
pub enum MixerWeights<B: Backend> {
    /// Mamba-1 and Falcon-Mamba.
    Selective {
        /// `[dt_rank + 2 * d_state, d_inner]`.
        x_proj: B::Mat,
        /// `[d_inner, dt_rank]`.
        dt_proj: B::Mat,
        dt_bias: B::Vec,
        /// `-exp(A_log)`, `[d_inner, d_state]`.
        a: B::Vec,
        d: B::Vec,
    },
    /// Mamba-2.
    Ssd {
        dt_bias: B::Vec,
        /// `-exp(A_log)`, `[n_heads]`.
        a: B::Vec,
        d: B::Vec,
        /// Gated RMSNorm weight `[d_inner]`.
        norm: B::Vec,
    },
}

/// All weights of a model on a backend.
pub struct Weights<B: Backend> {
    pub embed: B::Mat,
    pub layers: Vec<LayerWeights<B>>,
    pub norm_f: B::Vec,
    /// `None` when tied to the embedding.
    pub lm_head: Option<B::Mat>,
}

/// How far an upload has got.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

fn layer(l: usize, suffix: &str) -> String {
    format!("backbone.layers.{l}.{suffix}")
}

/// Every tensor a model of `cfg` reads, with its shape, in canonical names.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, di, n, k) = (cfg.hidden_size, cfg.d_inner, cfg.d_state, cfg.d_conv);
    let mut v = vec![("backbone.embeddings.weight".to_string(), vec![cfg.vocab_size, d])];
    for l in 0..cfg.n_layers {
        v.push((layer(l, "norm.weight"), vec![d]));
        v.push((layer(l, "mixer.in_proj.weight"), vec![cfg.in_proj_dim(), d]));
        if cfg.use_bias {
            v.push((layer(l, "mixer.in_proj.bias"), vec![cfg.in_proj_dim()]));
            v.push((layer(l, "mixer.out_proj.bias"), vec![d]));
        }
        v.push((layer(l, "mixer.conv1d.weight"), vec![cfg.conv_dim(), 1, k]));
        if cfg.use_conv_bias {
            v.push((layer(l, "mixer.conv1d.bias"), vec![cfg.conv_dim()]));
        }
        v.push((layer(l, "mixer.out_proj.weight"), vec![d, di]));
        match cfg.arch {
            Arch::Mamba1 | Arch::FalconMamba => {
                v.push((layer(l, "mixer.x_proj.weight"), vec![cfg.dt_rank + 2 * n, di]));
                v.push((layer(l, "mixer.dt_proj.weight"), vec![di, cfg.dt_rank]));
                v.push((layer(l, "mixer.dt_proj.bias"), vec![di]));
                v.push((layer(l, "mixer.A_log"), vec![di, n]));
                v.push((layer(l, "mixer.D"), vec![di]));
            }
            Arch::Mamba2 => {
                let h = cfg.n_heads;
                v.push((layer(l, "mixer.dt_bias"), vec![h]));
                v.push((layer(l, "mixer.A_log"), vec![h]));
                v.push((layer(l, "mixer.D"), vec![h]));
                v.push((layer(l, "mixer.norm.weight"), vec![di]));
            }
        }
    }
    v.push(("backbone.norm_f.weight".to_string(), vec![d]));
    if !cfg.tie_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    v
}

/// Looks a tensor up under its canonical name or an accepted variant.
fn find<'s>(src: &'s dyn TensorSource, name: &str) -> Result<Option<TensorData<'s>>, ModelError> {
    let mut candidates = vec![name.to_string()];
    if let Some(rest) = name.strip_prefix("backbone.") {
        candidates.push(rest.to_string());
    }
    if name == "backbone.embeddings.weight" {
        candidates.push("backbone.embedding.weight".into());
        candidates.push("embedding.weight".into());
    }
    for c in candidates {
        if let Some(t) = src.get(&c)? {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

fn require<'s>(src: &'s dyn TensorSource, name: &str) -> Result<TensorData<'s>, ModelError> {
    find(src, name)?.ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), origin: src.origin() })
}

/// Settles the dimensions of `cfg` from the tensor shapes. Config values
/// that disagree are logged and replaced; only shapes that cannot be
/// reconciled are errors.
pub fn resolve_dims(mut cfg: ModelConfig, src: &dyn TensorSource) -> Result<ModelConfig, ModelError> {
    let emb = require(src, "backbone.embeddings.weight")?;
    let bad = |name: &str, expected: String, got: &[usize]| ModelError::BadShape { name: name.to_string(), expected, got: got.to_vec() };
    if emb.shape.len() != 2 || emb.shape[1] != cfg.hidden_size {
        return Err(bad("backbone.embeddings.weight", format!("[vocab, {}]", cfg.hidden_size), &emb.shape));
    }
    if emb.shape[0] != cfg.vocab_size {
        if emb.shape[0] < cfg.vocab_size {
            return Err(bad(
                "backbone.embeddings.weight",
                format!("[{}, {}] (vocab_size rows)", cfg.vocab_size, cfg.hidden_size),
                &emb.shape,
            ));
        }
        tracing::warn!(config = cfg.vocab_size, tensor = emb.shape[0], "vocab_size differs from the embedding rows; using the rows");
        cfg.vocab_size = emb.shape[0];
    }
    let shape_of = |name: &str| -> Result<Vec<usize>, ModelError> { Ok(require(src, &layer(0, name))?.shape) };
    let conv = shape_of("mixer.conv1d.weight")?;
    let k = *conv.last().unwrap_or(&0);
    if (conv.len() != 3 || conv[1] != 1) && conv.len() != 2 {
        return Err(bad(&layer(0, "mixer.conv1d.weight"), "[channels, 1, kernel]".into(), &conv));
    }
    let set = |what: &str, slot: &mut usize, value: usize| {
        if *slot != value {
            tracing::warn!(field = what, config = *slot, tensors = value, "config disagrees with the tensor shapes; using the tensors");
            *slot = value;
        }
    };
    set("conv_kernel", &mut cfg.d_conv, k);
    match cfg.arch {
        Arch::Mamba1 | Arch::FalconMamba => {
            let a_log = shape_of("mixer.A_log")?;
            let dt = shape_of("mixer.dt_proj.weight")?;
            if a_log.len() != 2 || dt.len() != 2 {
                return Err(bad(&layer(0, "mixer.A_log"), "[d_inner, state_size]".into(), &a_log));
            }
            set("intermediate_size", &mut cfg.d_inner, a_log[0]);
            set("state_size", &mut cfg.d_state, a_log[1]);
            set("time_step_rank", &mut cfg.dt_rank, dt[1]);
        }
        Arch::Mamba2 => {
            let a_log = shape_of("mixer.A_log")?;
            let norm = shape_of("mixer.norm.weight")?;
            if a_log.len() != 1 || norm.len() != 1 {
                return Err(bad(&layer(0, "mixer.A_log"), "[num_heads]".into(), &a_log));
            }
            set("intermediate_size", &mut cfg.d_inner, norm[0]);
            set("num_heads", &mut cfg.n_heads, a_log[0]);
            if cfg.n_heads == 0 || cfg.d_inner % cfg.n_heads != 0 {
                return Err(bad(&layer(0, "mixer.A_log"), format!("[num_heads] dividing d_inner {}", cfg.d_inner), &a_log));
            }
            let head_dim = cfg.d_inner / cfg.n_heads;
            set("head_dim", &mut cfg.head_dim, head_dim);
            let bc = conv[0].saturating_sub(cfg.d_inner);
            if bc == 0 || bc % (2 * cfg.d_state) != 0 {
                return Err(bad(
                    &layer(0, "mixer.conv1d.weight"),
                    format!("[d_inner + 2 × n_groups × state_size = {} + 2 × g × {}, 1, k]", cfg.d_inner, cfg.d_state),
                    &conv,
                ));
            }
            set("n_groups", &mut cfg.n_groups, bc / (2 * cfg.d_state));
            let in_proj = shape_of("mixer.in_proj.weight")?;
            let want = cfg.in_proj_dim();
            if in_proj.first() != Some(&want) {
                let extra = in_proj.first().copied().unwrap_or(0) as i64 - want as i64;
                let why = if extra > 0 { " (extra rows mean a gated MLP (d_mlp > 0), which is not supported)" } else { "" };
                return Err(bad(&layer(0, "mixer.in_proj.weight"), format!("[{want}, {}]{why}", cfg.hidden_size), &in_proj));
            }
        }
    }
    cfg.validate().map_err(|detail| ModelError::Config { path: src.origin().into(), detail })?;
    Ok(cfg)
}

/// Fetches tensors by canonical name, checks their shapes, counts progress.
struct Fetcher<'s, 'p> {
    src: &'s dyn TensorSource,
    shapes: HashMap<String, Vec<usize>>,
    state: LoadProgress,
    progress: &'p mut dyn FnMut(LoadProgress),
}

impl<'s> Fetcher<'s, '_> {
    fn get(&mut self, name: &str) -> Result<TensorData<'s>, ModelError> {
        let t = require(self.src, name)?;
        let want = &self.shapes[name];
        // A `[c, 1, k]` conv weight may be stored as `[c, k]`.
        let squeezed: Vec<usize> = want.iter().copied().filter(|&x| x != 1).collect();
        let got: Vec<usize> = t.shape.iter().copied().filter(|&x| x != 1).collect();
        if &t.shape != want && got != squeezed {
            return Err(ModelError::BadShape { name: name.to_string(), expected: format!("{want:?}"), got: t.shape.clone() });
        }
        let expected_bytes = want.iter().product::<usize>() * t.dtype.size();
        if t.bytes.len() != expected_bytes {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: format!("{want:?} ({expected_bytes} bytes)"),
                got: t.shape.clone(),
            });
        }
        self.state.tensors_done += 1;
        self.state.bytes_done += t.bytes.len() as u64;
        (self.progress)(self.state);
        Ok(t)
    }
}

/// Uploads all weights of `cfg` from `src` to `backend`, checking every
/// shape. `progress` is called after each tensor.
pub fn upload<B: Backend>(
    backend: &B,
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Weights<B>, ModelError> {
    let expected = expected_tensors(cfg);
    let tensors_total = expected.len();
    let bytes_total = src.total_bytes();
    let state = LoadProgress { tensors_done: 0, tensors_total, bytes_done: 0, bytes_total };
    let shapes: HashMap<String, Vec<usize>> = expected.into_iter().collect();

    let mut fetcher = Fetcher { src, shapes, state, progress };
    let mut fetch = |name: &str| fetcher.get(name);
    let vector = |t: TensorData<'_>| -> Result<B::Vec, ModelError> { Ok(backend.upload(&widen(&t.bytes, t.dtype))?) };
    let matrix = |name: &str, t: TensorData<'_>| -> Result<B::Mat, ModelError> {
        let rows = t.shape[0];
        let cols = t.shape[1..].iter().product();
        Ok(backend.upload_matrix(&HostMatrix { name, dtype: t.dtype, rows, cols, bytes: &t.bytes })?)
    };
    let neg_exp = |t: TensorData<'_>| -> Result<B::Vec, ModelError> {
        let a: Vec<f32> = widen(&t.bytes, t.dtype).iter().map(|v| -v.exp()).collect();
        Ok(backend.upload(&a)?)
    };

    let name = "backbone.embeddings.weight";
    let embed = matrix(name, fetch(name)?)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let n = |s: &str| layer(l, s);
        let norm = vector(fetch(&n("norm.weight"))?)?;
        let in_proj = matrix(&n("mixer.in_proj.weight"), fetch(&n("mixer.in_proj.weight"))?)?;
        let in_proj_bias = if cfg.use_bias { Some(vector(fetch(&n("mixer.in_proj.bias"))?)?) } else { None };
        let conv_w = vector(fetch(&n("mixer.conv1d.weight"))?)?;
        let conv_b = if cfg.use_conv_bias { Some(vector(fetch(&n("mixer.conv1d.bias"))?)?) } else { None };
        let mixer = match cfg.arch {
            Arch::Mamba1 | Arch::FalconMamba => MixerWeights::Selective {
                x_proj: matrix(&n("mixer.x_proj.weight"), fetch(&n("mixer.x_proj.weight"))?)?,
                dt_proj: matrix(&n("mixer.dt_proj.weight"), fetch(&n("mixer.dt_proj.weight"))?)?,
                dt_bias: vector(fetch(&n("mixer.dt_proj.bias"))?)?,
                a: neg_exp(fetch(&n("mixer.A_log"))?)?,
                d: vector(fetch(&n("mixer.D"))?)?,
            },
            Arch::Mamba2 => MixerWeights::Ssd {
                dt_bias: vector(fetch(&n("mixer.dt_bias"))?)?,
                a: neg_exp(fetch(&n("mixer.A_log"))?)?,
                d: vector(fetch(&n("mixer.D"))?)?,
                norm: vector(fetch(&n("mixer.norm.weight"))?)?,
            },
        };
        let out_proj = matrix(&n("mixer.out_proj.weight"), fetch(&n("mixer.out_proj.weight"))?)?;
        let out_proj_bias = if cfg.use_bias { Some(vector(fetch(&n("mixer.out_proj.bias"))?)?) } else { None };
        layers.push(LayerWeights { norm, in_proj, in_proj_bias, conv_w, conv_b, mixer, out_proj, out_proj_bias });
    }
    let norm_f = vector(fetch("backbone.norm_f.weight")?)?;
    let lm_head = if cfg.tie_embeddings { None } else { Some(matrix("lm_head.weight", fetch("lm_head.weight")?)?) };
    Ok(Weights { embed, layers, norm_f, lm_head })
}
