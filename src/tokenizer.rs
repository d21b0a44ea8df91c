//! Text ↔ token ids: the `tokenizers` crate over a checkpoint's
//! `tokenizer.json`, incremental detokenization that only ever emits
//! complete UTF-8, and stop-string matching across token boundaries.
//!
//! Nothing here knows the model or the engine; the engine deals in ids only,
//! and a request's stream turns them into text with a [`DecodeStream`] and a
//! [`StopMatcher`].

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: missing tokenizer.json (mamba-serve needs the Hugging Face fast-tokenizer file next to config.json)")]
    Missing { path: PathBuf },
    #[error("cannot load {path}: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("the chat template does not compile: {0}")]
    Template(String),
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// One chat message as the template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A checkpoint's tokenizer and the parts of `tokenizer_config.json` that
/// matter for serving.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids the model may emit and be fed; rows above this are padding.
    vocab_size: usize,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    chat_template: Option<String>,
    /// The compiled template, rendered as Hugging Face does (Jinja with
    /// trim_blocks and lstrip_blocks, Python string methods, raise_exception).
    chat_env: Option<minijinja::Environment<'static>>,
    eos_token: Option<String>,
    bos_token: Option<String>,
    model_max_length: Option<usize>,
}

/// A token string in tokenizer_config.json is either a string or
/// `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TokenizerError::Missing { path });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load { path: path.clone(), detail: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| TokenizerError::Load { path: cfg_path.clone(), detail: e.to_string() })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Load { path: cfg_path.clone(), detail: e.to_string() })?
        } else {
            Value::Null
        };
        let eos_token = token_string(cfg.get("eos_token"));
        let bos_token = token_string(cfg.get("bos_token"));
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(items)) => items
                .iter()
                .find_map(|t| (t.get("name")?.as_str()? == "default").then(|| t.get("template")?.as_str().map(str::to_owned)).flatten()),
            _ => None,
        };
        let model_max_length = cfg.get("model_max_length").and_then(Value::as_f64).filter(|&x| x > 0.0 && x < 1e12).map(|x| x as usize);
        let eos_ids = eos_token.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect();
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let vocab_size = inner.get_vocab_size(true);
        let chat_env = match &chat_template {
            Some(t) => Some(Self::compile_template(t).map_err(|e| TokenizerError::Load { path: cfg_path.clone(), detail: e.to_string() })?),
            None => None,
        };
        Ok(Tokenizer { inner, vocab_size, eos_ids, bos_id, chat_template, chat_env, eos_token, bos_token, model_max_length })
    }

    fn compile_template(template: &str) -> Result<minijinja::Environment<'static>, TokenizerError> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template.to_string()).map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(env)
    }

    /// Renders messages with the checkpoint's chat template; `None` when the
    /// checkpoint has none.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Option<Result<String, TokenizerError>> {
        let env = self.chat_env.as_ref()?;
        let render = || -> Result<String, minijinja::Error> {
            let t = env.get_template("chat")?;
            t.render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
        };
        Some(render().map_err(|e| TokenizerError::Render(e.to_string())))
    }

    /// Number of ids the tokenizer knows (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// End-of-sequence ids named by tokenizer_config.json.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Encodes text as the reference does (`add_special_tokens=True`: the
    /// tokenizer's own post-processor decides whether a BOS is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text with no special tokens added (chat prompts, whose
    /// template already wrote them).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The text of one token as it would appear on its own (lossy for
    /// partial UTF-8), for logprob listings.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The id of an exact token string, if the vocabulary has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a special (added) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }
}

/// Incremental detokenization: feed ids one at a time, get back text only
/// once it is complete UTF-8.
///
/// Byte-level BPE splits multi-byte characters across tokens; decoding a
/// prefix of such a split gives U+FFFD. The stream keeps a window of recent
/// ids, decodes it with and without the newest ones, and emits the
/// difference only when it does not end in a replacement character.
pub struct DecodeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl DecodeStream {
    pub fn new(skip_special: bool) -> Self {
        DecodeStream { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special }
    }

    /// Adds one id; returns newly completed text, if any.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.to_string(),
                None => {
                    // Decoders that rewrite the join (cleanup of spaces):
                    // take what follows the common prefix.
                    let common = full.char_indices().zip(prefix.chars()).take_while(|((_, a), b)| a == b).count();
                    full.chars().skip(common).collect()
                }
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the very end),
    /// decoded lossily. Call once when the sequence ends.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).unwrap_or("").to_string())
    }
}

/// Finds stop strings in streamed text. Text that could still be the start
/// of a stop string is held back; a matched stop string is never emitted.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send now.
    pub emit: String,
    /// A stop string matched; the sequence ends after `emit`.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome { emit: text.to_string(), stopped: false };
        }
        self.pending.push_str(text);
        // The earliest complete match wins.
        let hit = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = hit {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome { emit, stopped: true };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome { emit, stopped: false }
    }

    /// Held-back text, released when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pushes_is_caught_and_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome { emit: "hello ".into(), stopped: false });
        assert_eq!(m.push("N"), StopOutcome { emit: "".into(), stopped: false });
        assert_eq!(m.push("D tail"), StopOutcome { emit: "".into(), stopped: true });
    }

    #[test]
    fn false_start_of_a_stop_string_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E").emit, "");
        assert_eq!(m.push("x").emit, "Ex");
        assert_eq!(m.push("EN").emit, "");
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("hello world"), StopOutcome { emit: "hel".into(), stopped: true });
    }

    #[test]
    fn multibyte_stop_strings_cut_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["世界".into()]);
        assert_eq!(m.push("你好世").emit, "你好");
        assert_eq!(m.push("界!"), StopOutcome { emit: "".into(), stopped: true });
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), StopOutcome { emit: "abc".into(), stopped: false });
    }
}
