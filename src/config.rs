//! Settings: `config/default.toml` (which documents every key and is the
//! single source of defaults) < a file given with `--config` < environment
//! variables `MAMBA_SERVE_<SECTION>_<KEY>` < command-line flags. Validated
//! once; the result is passed explicitly to whoever needs it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("unknown setting `{key}` in {origin}")]
    UnknownKey { key: String, origin: String },
    #[error("setting `{key}` from {origin}: {detail}")]
    BadValue { key: String, origin: String, detail: String },
    #[error("invalid settings: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub engine: EngineSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub cors_allow_origins: Vec<String>,
    pub log_prompts: bool,
    pub replica_name: String,
    pub drain_timeout_secs: u64,
    pub sse_keepalive_secs: u64,
    pub request_read_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub path: String,
    pub served_name: String,
    pub device: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub slots: usize,
    pub gpu_memory_fraction: f64,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    pub max_queue: usize,
    pub step_ahead: bool,
    pub max_prompt_tokens: usize,
    pub max_total_tokens: usize,
    pub max_prompt_chars: usize,
    pub default_max_tokens: usize,
    pub max_n: usize,
    pub max_batch_prompts: usize,
    pub max_stop: usize,
    pub max_stop_chars: usize,
    pub max_logprobs: usize,
}

/// Overlays `over` onto `base`, refusing keys `base` does not have.
fn overlay(base: &mut Table, over: &Table, prefix: &str, origin: &str) -> Result<(), ConfigError> {
    for (k, v) in over {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (base.get_mut(k), v) {
            (None, _) => return Err(ConfigError::UnknownKey { key, origin: origin.into() }),
            (Some(Value::Table(b)), Value::Table(o)) => overlay(b, o, &key, origin)?,
            (Some(Value::Table(_)), _) => {
                return Err(ConfigError::BadValue { key, origin: origin.into(), detail: "expected a section".into() });
            }
            (Some(slot), v) => *slot = v.clone(),
        }
    }
    Ok(())
}

/// Parses an environment value as the type of the default it replaces.
fn parse_env_value(default: &Value, raw: &str) -> Result<Value, String> {
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        _ => {
            let wrapped = format!("v = {raw}");
            let t: Table = wrapped.parse().map_err(|e: toml::de::Error| format!("not a valid value: {}", e.message()))?;
            Ok(t["v"].clone())
        }
    }
}

impl Settings {
    /// Defaults, then `file`, then the environment, then `flags` (dotted
    /// keys such as "server.port" with TOML values).
    pub fn load(file: Option<&Path>, env: &[(String, String)], flags: &[(&str, Value)]) -> Result<Self, ConfigError> {
        let mut table: Table = DEFAULT_TOML.parse().expect("config/default.toml is valid TOML");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.into(), source: e })?;
            let t: Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { path: path.into(), detail: e.to_string() })?;
            overlay(&mut table, &t, "", &path.display().to_string())?;
        }
        let prefix = "MAMBA_SERVE_";
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(prefix) else { continue };
            let mut found = false;
            for (section, keys) in table.iter_mut() {
                let Value::Table(keys) = keys else { continue };
                let section_prefix = format!("{}_", section.to_uppercase());
                let Some(key) = rest.strip_prefix(&section_prefix) else { continue };
                if let Some(slot) = keys.get_mut(&key.to_lowercase()) {
                    *slot = parse_env_value(slot, raw).map_err(|detail| ConfigError::BadValue {
                        key: format!("{section}.{}", key.to_lowercase()),
                        origin: format!("environment variable {name}"),
                        detail,
                    })?;
                    found = true;
                }
            }
            if !found {
                return Err(ConfigError::UnknownKey { key: name.clone(), origin: "the environment".into() });
            }
        }
        for (key, value) in flags {
            let (section, k) = key.split_once('.').expect("flag keys are section.key");
            let slot = table
                .get_mut(section)
                .and_then(Value::as_table_mut)
                .and_then(|t| t.get_mut(k))
                .ok_or_else(|| ConfigError::UnknownKey { key: key.to_string(), origin: "command-line flags".into() })?;
            *slot = value.clone();
        }
        let settings: Settings =
            Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Relations between settings that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if e.max_batch_tokens == 0 || e.prefill_chunk == 0 {
            return fail("engine.max_batch_tokens and engine.prefill_chunk must be positive".into());
        }
        if !(e.gpu_memory_fraction > 0.0 && e.gpu_memory_fraction <= 1.0) {
            return fail(format!("engine.gpu_memory_fraction must be in (0, 1], got {}", e.gpu_memory_fraction));
        }
        if e.max_prompt_tokens == 0 || e.max_total_tokens == 0 {
            return fail("engine.max_prompt_tokens and engine.max_total_tokens must be positive".into());
        }
        if e.default_max_tokens == 0 || e.max_n == 0 || e.max_batch_prompts == 0 {
            return fail("engine.default_max_tokens, engine.max_n and engine.max_batch_prompts must be positive".into());
        }
        if self.server.max_body_bytes < 1024 {
            return fail(format!("server.max_body_bytes must be at least 1024, got {}", self.server.max_body_bytes));
        }
        if self.server.api_keys.iter().any(|k| k.is_empty()) {
            return fail("server.api_keys must not contain an empty key".into());
        }
        if self.server.sse_keepalive_secs == 0 || self.server.request_read_timeout_secs == 0 {
            return fail("server.sse_keepalive_secs and server.request_read_timeout_secs must be positive".into());
        }
        self.model.device.parse::<crate::model::DeviceChoice>().map(|_| ()).or_else(|m| fail(format!("model.device: {m}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() -> Result<(), ConfigError> {
        let s = Settings::load(None, &[], &[])?;
        assert_eq!(s.server.port, 8080);
        assert!(s.server.api_keys.is_empty());
        assert_eq!(s.engine.max_stop, 4);
        Ok(())
    }

    #[test]
    fn file_then_env_then_flags() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[engine]\nslots = 4\n")?;
        let env = vec![
            ("MAMBA_SERVE_SERVER_PORT".to_string(), "9100".to_string()),
            ("MAMBA_SERVE_SERVER_API_KEYS".to_string(), "[\"a\", \"b\"]".to_string()),
        ];
        let s = Settings::load(Some(&f), &env, &[("engine.slots", Value::Integer(7))])?;
        assert_eq!((s.server.port, s.server.host.as_str(), s.engine.slots), (9100, "0.0.0.0", 7));
        assert_eq!(s.server.api_keys, vec!["a", "b"]);
        let s = Settings::load(Some(&f), &[], &[])?;
        assert_eq!(s.server.port, 9000);
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[server]\nprot = 9000\n")?;
        let e = Settings::load(Some(&f), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("unknown setting `server.prot`"), "{e}");
        let env = vec![("MAMBA_SERVE_SERVER_PORT".to_string(), "many".to_string())];
        let e = Settings::load(None, &env, &[]).unwrap_err().to_string();
        assert!(e.contains("server.port") && e.contains("MAMBA_SERVE_SERVER_PORT"), "{e}");
        let env = vec![("MAMBA_SERVE_SERVER_PORTS".to_string(), "1".to_string())];
        assert!(Settings::load(None, &env, &[]).unwrap_err().to_string().contains("MAMBA_SERVE_SERVER_PORTS"));
        let e = Settings::load(None, &[], &[("engine.gpu_memory_fraction", Value::Float(1.5))]).unwrap_err().to_string();
        assert!(e.contains("gpu_memory_fraction"), "{e}");
        let e = Settings::load(None, &[], &[("model.device", Value::String("tpu".into()))]).unwrap_err().to_string();
        assert!(e.contains("model.device"), "{e}");
        Ok(())
    }
}
