//! `config.json` of a checkpoint: which architecture, which dimensions, which
//! options change the math.
//!
//! Two dialects are read: Hugging Face transformers' (`model_type`,
//! `hidden_size`, `num_hidden_layers`, `state_size`, ...) and the original
//! state-spaces one (`d_model`, `n_layer`, `ssm_cfg`, ...). Missing fields take
//! the defaults of the transformers config class of that `model_type`, which
//! is what the reference loads them as. Dimensions read here are provisional:
//! `model::weights` checks them against the tensor shapes, which win.
//!
//! Mamba-2 configs carry `time_step_limit: [0.0, Infinity]` (a bare
//! `Infinity`, not strict JSON) or `[0.0, {"__float__": "Infinity"}]`; both
//! load.

use std::path::Path;

use serde_json::{Map, Value};

use super::ModelError;
use crate::backend::Activation;

/// The architectures mamba-serve runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `mamba` (MambaForCausalLM).
    Mamba1,
    /// `falcon_mamba` (FalconMambaForCausalLM): Mamba-1 plus weightless RMS
    /// norms on dt, B and C.
    FalconMamba,
    /// `mamba2` (Mamba2ForCausalLM).
    Mamba2,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Mamba1 => "mamba",
            Arch::FalconMamba => "falcon_mamba",
            Arch::Mamba2 => "mamba2",
        }
    }
}

/// Which field names the config file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    HuggingFace,
    StateSpaces,
}

/// Everything about a checkpoint's architecture that the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub dialect: Dialect,
    pub hidden_size: usize,
    pub n_layers: usize,
    /// Embedding rows (padded vocabulary).
    pub vocab_size: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    /// Low-rank width of dt (Mamba-1, Falcon-Mamba).
    pub dt_rank: usize,
    /// Mamba-2 heads and their width.
    pub n_heads: usize,
    pub head_dim: usize,
    pub n_groups: usize,
    pub chunk_size: usize,
    pub norm_eps: f32,
    /// Epsilon of Falcon-Mamba's dt/B/C norms.
    pub mixer_rms_eps: f32,
    /// in_proj and out_proj carry biases.
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub tie_embeddings: bool,
    /// Accepted for completeness: the residual stream is always f32 here.
    pub residual_in_fp32: bool,
    /// Activation after the conv (the output gate is always SiLU, as in the
    /// reference).
    pub activation: Activation,
    /// Mamba-2 dt clamp (applied to prompt tokens, as the reference does).
    pub time_step_limit: (f32, f32),
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Width of the conv input: x for Mamba-1, x|B|C for Mamba-2.
    pub fn conv_dim(&self) -> usize {
        match self.arch {
            Arch::Mamba2 => self.d_inner + 2 * self.n_groups * self.d_state,
            _ => self.d_inner,
        }
    }

    /// Width of in_proj's output.
    pub fn in_proj_dim(&self) -> usize {
        match self.arch {
            Arch::Mamba2 => self.d_inner + self.conv_dim() + self.n_heads,
            _ => 2 * self.d_inner,
        }
    }

    /// f32 elements of conv state per layer per sequence.
    pub fn conv_state_len(&self) -> usize {
        self.conv_dim() * (self.d_conv - 1)
    }

    /// f32 elements of SSM state per layer per sequence.
    pub fn ssm_state_len(&self) -> usize {
        match self.arch {
            Arch::Mamba2 => self.n_heads * self.head_dim * self.d_state,
            _ => self.d_inner * self.d_state,
        }
    }

    /// Bytes of recurrent state one sequence holds (all layers, f32).
    pub fn state_bytes(&self) -> usize {
        4 * self.n_layers * (self.conv_state_len() + self.ssm_state_len())
    }

    /// Reads and parses `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io { path: path.clone(), source: e })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config { detail, .. } => ModelError::Config { path: path.clone(), detail },
            other => other,
        })
    }

    /// Parses the text of a config.json (the path in errors is left empty).
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let fail = |detail: String| ModelError::Config { path: Default::default(), detail };
        let value: Value = serde_json::from_str(&relax_nonfinite(text)).map_err(|e| fail(format!("not valid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| fail("the top level is not a JSON object".into()))?;
        let f = Fields { obj };
        f.parse().map_err(fail)
    }
}

/// Rewrites bare `Infinity`, `-Infinity` and `NaN` tokens (outside strings)
/// as `{"__float__": "..."}` objects, the form newer transformers write.
fn relax_nonfinite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
        if let Some(token) = token {
            out.push_str(&format!("{{\"__float__\": \"{token}\"}}"));
            rest = &rest[token.len()..];
            continue;
        }
        if ch == '"' {
            in_string = true;
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// A float field that may be a number or `{"__float__": "Infinity"}`.
fn as_float(v: &Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    match v.as_object()?.get("__float__")?.as_str()? {
        "Infinity" | "inf" => Some(f64::INFINITY),
        "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, names: &[&str]) -> Option<&Value> {
        names.iter().find_map(|n| self.obj.get(*n).filter(|v| !v.is_null()))
    }

    fn usize(&self, names: &[&str]) -> Result<Option<usize>, String> {
        match self.get(names) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| format!("`{}` must be a non-negative integer, got {v}", names[0]))
            }
        }
    }

    fn float(&self, names: &[&str]) -> Result<Option<f64>, String> {
        match self.get(names) {
            None => Ok(None),
            Some(v) => as_float(v).map(Some).ok_or_else(|| format!("`{}` must be a number, got {v}", names[0])),
        }
    }

    fn bool(&self, names: &[&str]) -> Result<Option<bool>, String> {
        match self.get(names) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| format!("`{}` must be true or false, got {v}", names[0])),
        }
    }

    fn token_ids(&self, name: &str) -> Result<Vec<u32>, String> {
        match self.get(&[name]) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| format!("`{name}` must hold token ids, got {v}"))).collect()
            }
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(|| format!("`{name}` must be a token id, got {v}")),
        }
    }

    fn parse(&self) -> Result<ModelConfig, String> {
        let (arch, dialect) = self.arch()?;
        let ssm_cfg = self.get(&["ssm_cfg"]).and_then(Value::as_object);
        let ssm = |name: &str| ssm_cfg.and_then(|m| m.get(name)).filter(|v| !v.is_null());
        let ssm_usize = |name: &str| -> Result<Option<usize>, String> {
            ssm(name).map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| format!("`ssm_cfg.{name}` must be an integer"))).transpose()
        };

        if dialect == Dialect::StateSpaces {
            if self.usize(&["d_intermediate"])?.unwrap_or(0) != 0 {
                return Err("`d_intermediate` > 0 (MLP blocks between mixers) is not supported".into());
            }
            if self.get(&["attn_layer_idx"]).and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
                return Err("`attn_layer_idx` is not empty: hybrid attention layers are not supported".into());
            }
            if self.bool(&["rms_norm"])? == Some(false) {
                return Err("`rms_norm: false` (LayerNorm blocks) is not supported; only RMSNorm checkpoints are".into());
            }
        }

        let hidden_size = self.usize(&["hidden_size", "d_model"])?.ok_or("missing `hidden_size` (or `d_model`)")?;
        let n_layers = self.usize(&["num_hidden_layers", "n_layer"])?.ok_or("missing `num_hidden_layers` (or `n_layer`)")?;
        let mut vocab_size = self.usize(&["vocab_size"])?.ok_or("missing `vocab_size`")?;
        if dialect == Dialect::StateSpaces {
            // The original code pads the embedding to a multiple.
            let multiple = self.usize(&["pad_vocab_size_multiple"])?.unwrap_or(8).max(1);
            vocab_size = vocab_size.div_ceil(multiple) * multiple;
        }
        let is2 = arch == Arch::Mamba2;
        let d_state = match self.usize(&["state_size"])? {
            Some(n) => n,
            None => ssm_usize("d_state")?.unwrap_or(if is2 { 128 } else { 16 }),
        };
        let d_conv = match self.usize(&["conv_kernel"])? {
            Some(k) => k,
            None => ssm_usize("d_conv")?.unwrap_or(4),
        };
        let expand = match self.usize(&["expand"])? {
            Some(e) => e,
            None => ssm_usize("expand")?.unwrap_or(2),
        };
        // `intermediate_size` when given (Falcon-Mamba configs can carry an
        // `expand` that disagrees with it); the tensors settle it later.
        let d_inner = self.usize(&["intermediate_size", "d_inner"])?.unwrap_or(expand * hidden_size);
        let dt_rank = match self.get(&["time_step_rank", "dt_rank"]) {
            None => hidden_size.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => hidden_size.div_ceil(16),
            Some(v) => v.as_u64().ok_or_else(|| format!("`time_step_rank` must be \"auto\" or an integer, got {v}"))? as usize,
        };
        let dt_rank = if dialect == Dialect::StateSpaces {
            match ssm("dt_rank") {
                Some(Value::String(s)) if s == "auto" => hidden_size.div_ceil(16),
                Some(v) => v.as_u64().ok_or("`ssm_cfg.dt_rank` must be \"auto\" or an integer")? as usize,
                None => dt_rank,
            }
        } else {
            dt_rank
        };
        let head_dim = match self.usize(&["head_dim"])? {
            Some(h) => h,
            None => ssm_usize("headdim")?.unwrap_or(64),
        };
        let n_heads = match self.usize(&["num_heads"])? {
            Some(h) => h,
            None => d_inner / head_dim.max(1),
        };
        let n_groups = match self.usize(&["n_groups"])? {
            Some(g) => g,
            None => ssm_usize("ngroups")?.unwrap_or(if dialect == Dialect::StateSpaces { 1 } else { 8 }),
        };
        let chunk_size = match self.usize(&["chunk_size"])? {
            Some(c) => c,
            None => ssm_usize("chunk_size")?.unwrap_or(256),
        };
        let norm_eps = self.float(&["layer_norm_epsilon", "norm_epsilon"])?.unwrap_or(1e-5) as f32;
        let mixer_rms_eps = self.float(&["mixer_rms_eps"])?.unwrap_or(1e-6) as f32;
        let use_bias = match self.bool(&["use_bias"])? {
            Some(b) => b,
            None => ssm("bias").and_then(Value::as_bool).unwrap_or(false),
        };
        let use_conv_bias = match self.bool(&["use_conv_bias"])? {
            Some(b) => b,
            None => ssm("conv_bias").and_then(Value::as_bool).unwrap_or(true),
        };
        let tie_default = match dialect {
            Dialect::StateSpaces => true,
            Dialect::HuggingFace => !is2,
        };
        let tie_embeddings = self.bool(&["tie_word_embeddings", "tie_embeddings"])?.unwrap_or(tie_default);
        let residual_in_fp32 = self.bool(&["residual_in_fp32"])?.unwrap_or(true);
        let act_name = self.get(&["hidden_act"]).and_then(Value::as_str).unwrap_or("silu");
        let activation = Activation::from_hf_name(act_name)
            .ok_or_else(|| format!("`hidden_act` \"{act_name}\" is not supported (use silu, relu, gelu or gelu_new)"))?;
        let time_step_limit = match self.get(&["time_step_limit"]).or_else(|| ssm("dt_limit")) {
            None => (0.0, f32::INFINITY),
            Some(Value::Array(v)) if v.len() == 2 => {
                let lo = as_float(&v[0]).ok_or("`time_step_limit` must hold two numbers")?;
                let hi = as_float(&v[1]).ok_or("`time_step_limit` must hold two numbers")?;
                if lo.is_nan() || hi.is_nan() || lo > hi {
                    return Err(format!("`time_step_limit` must be [low, high] with low <= high, got [{lo}, {hi}]"));
                }
                (lo as f32, hi as f32)
            }
            Some(v) => return Err(format!("`time_step_limit` must be a list of two numbers, got {v}")),
        };
        let (bos_default, eos_default, pad_default) = match (arch, dialect) {
            (_, Dialect::StateSpaces) => (None, None, None),
            (Arch::Mamba2, _) => (Some(0), Some(2), Some(1)),
            _ => (Some(0), Some(0), Some(0)),
        };
        let eos_token_ids = match self.get(&["eos_token_id"]) {
            Some(_) => self.token_ids("eos_token_id")?,
            None => eos_default.into_iter().collect(),
        };
        let single = |name: &str, default: Option<u32>| -> Result<Option<u32>, String> {
            match self.obj.get(name) {
                None => Ok(default),
                Some(Value::Null) => Ok(None),
                Some(_) => Ok(self.token_ids(name)?.first().copied()),
            }
        };

        let cfg = ModelConfig {
            arch,
            dialect,
            hidden_size,
            n_layers,
            vocab_size,
            d_inner,
            d_state,
            d_conv,
            dt_rank,
            n_heads,
            head_dim,
            n_groups,
            chunk_size,
            norm_eps,
            mixer_rms_eps,
            use_bias,
            use_conv_bias,
            tie_embeddings,
            residual_in_fp32,
            activation,
            time_step_limit,
            bos_token_id: single("bos_token_id", bos_default)?,
            eos_token_ids,
            pad_token_id: single("pad_token_id", pad_default)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn arch(&self) -> Result<(Arch, Dialect), String> {
        match self.get(&["model_type"]).and_then(Value::as_str) {
            Some("mamba") => Ok((Arch::Mamba1, Dialect::HuggingFace)),
            Some("falcon_mamba") => Ok((Arch::FalconMamba, Dialect::HuggingFace)),
            Some("mamba2") => Ok((Arch::Mamba2, Dialect::HuggingFace)),
            Some(other) => Err(format!(
                "unsupported `model_type` \"{other}\": mamba-serve runs \"mamba\", \"mamba2\" and \"falcon_mamba\" checkpoints"
            )),
            None if self.obj.contains_key("d_model") => {
                let layer = self.get(&["ssm_cfg"]).and_then(|c| c.get("layer")).and_then(Value::as_str).unwrap_or("Mamba1");
                match layer {
                    "Mamba1" => Ok((Arch::Mamba1, Dialect::StateSpaces)),
                    "Mamba2" => Ok((Arch::Mamba2, Dialect::StateSpaces)),
                    other => Err(format!("unsupported `ssm_cfg.layer` \"{other}\" (expected Mamba1 or Mamba2)")),
                }
            }
            None => Err("missing `model_type` (expected \"mamba\", \"mamba2\" or \"falcon_mamba\")".into()),
        }
    }
}

impl ModelConfig {
    /// Checks relations between fields that do not need the tensors.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.n_layers),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.d_inner),
            ("state_size", self.d_state),
            ("conv_kernel", self.d_conv),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(format!("`layer_norm_epsilon` must be a positive number, got {}", self.norm_eps));
        }
        match self.arch {
            Arch::Mamba2 => {
                if self.n_heads == 0 || self.head_dim == 0 || self.n_groups == 0 {
                    return Err("`num_heads`, `head_dim` and `n_groups` must be positive".into());
                }
                if self.n_heads * self.head_dim != self.d_inner {
                    return Err(format!(
                        "num_heads ({}) × head_dim ({}) must equal the intermediate size ({})",
                        self.n_heads, self.head_dim, self.d_inner
                    ));
                }
                if self.n_heads % self.n_groups != 0 {
                    return Err(format!("num_heads ({}) must be a multiple of n_groups ({})", self.n_heads, self.n_groups));
                }
            }
            _ => {
                if self.dt_rank == 0 {
                    return Err("`time_step_rank` must be positive".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_infinity_and_float_object_both_load() -> Result<(), ModelError> {
        let base = r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
            "num_heads": 8, "head_dim": 16, "n_groups": 1, "state_size": 16, "expand": 2, "time_step_limit": LIMIT}"#;
        let a = ModelConfig::from_json(&base.replace("LIMIT", "[0.0, Infinity]"))?;
        let b = ModelConfig::from_json(&base.replace("LIMIT", r#"[0.0, {"__float__": "Infinity"}]"#))?;
        assert_eq!(a.time_step_limit, (0.0, f32::INFINITY));
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn infinity_inside_strings_is_left_alone() {
        let s = relax_nonfinite(r#"{"name": "Infinity \"NaN\"", "x": -Infinity}"#);
        assert_eq!(s, r#"{"name": "Infinity \"NaN\"", "x": {"__float__": "-Infinity"}}"#);
    }

    #[test]
    fn auto_time_step_rank_is_ceil_hidden_over_16() -> Result<(), ModelError> {
        let c = ModelConfig::from_json(
            r#"{"model_type": "mamba", "hidden_size": 40, "num_hidden_layers": 1, "vocab_size": 10, "time_step_rank": "auto"}"#,
        )?;
        assert_eq!(c.dt_rank, 3);
        assert_eq!(c.d_inner, 80);
        assert!(c.tie_embeddings);
        Ok(())
    }

    #[test]
    fn state_spaces_dialect_is_read() -> Result<(), ModelError> {
        let c = ModelConfig::from_json(
            r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
               "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16,
               "tie_embeddings": true, "d_intermediate": 0, "attn_layer_idx": []}"#,
        )?;
        assert_eq!(c.arch, Arch::Mamba2);
        assert_eq!(c.dialect, Dialect::StateSpaces);
        assert_eq!(c.vocab_size, 50288);
        assert_eq!((c.d_state, c.head_dim, c.n_groups, c.n_heads), (128, 64, 1, 24));
        Ok(())
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let err = ModelConfig::from_json(r#"{"model_type": "llama", "hidden_size": 8}"#).unwrap_err().to_string();
        assert!(err.contains("unsupported `model_type` \"llama\""), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let err = ModelConfig::from_json(
            r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "num_heads": 3, "head_dim": 16}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_heads (3) × head_dim (16)"), "{err}");
    }
}
