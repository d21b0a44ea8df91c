//! Wire types: the JSON shapes of OpenAI's completion and chat APIs, of
//! text-generation-inference's native routes, and of tokenize/detokenize.
//! Unknown request fields are refused (the parser names them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::validate::{GenerationInput, PromptInput, ValidationError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

/// Declares an OpenAI request type: the fields the completion and chat
/// routes share, then the route's own. (serde cannot combine `flatten`
/// with `deny_unknown_fields`, which the API needs, so the shared fields
/// are written into each type here rather than nested.) `max_tokens_first`
/// says which token limit wins when a request gives both `max_tokens` and
/// `max_completion_tokens`.
macro_rules! openai_request {
    ($(#[$attr:meta])* $name:ident, max_tokens_first: $max_first:literal { $($(#[$fattr:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$attr])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub model: Option<String>,
            pub max_tokens: Option<u64>,
            pub max_completion_tokens: Option<u64>,
            pub temperature: Option<f64>,
            pub top_p: Option<f64>,
            pub n: Option<u64>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            pub stop: Option<StopInput>,
            pub seed: Option<u64>,
            pub presence_penalty: Option<f64>,
            pub frequency_penalty: Option<f64>,
            pub logit_bias: Option<BTreeMap<String, f64>>,
            pub user: Option<String>,
            // Extensions.
            pub top_k: Option<i64>,
            pub min_p: Option<f64>,
            pub repetition_penalty: Option<f64>,
            pub stop_token_ids: Option<Vec<i64>>,
            pub ignore_eos: Option<bool>,
            $($(#[$fattr])* pub $field: $ty,)*
        }

        impl $name {
            /// Whether to stream, and whether a stream ends with a usage
            /// chunk; `stream_options` without `stream` is refused.
            pub fn stream_mode(&self) -> Result<(bool, bool), ApiError> {
                let stream = self.stream.unwrap_or(false);
                if self.stream_options.is_some() && !stream {
                    let e = ApiError::bad_request("`stream_options` is only allowed with `stream: true`");
                    return Err(e.with_param("stream_options"));
                }
                Ok((stream, self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)))
            }

            /// The shared generation settings, moved out of the request;
            /// `logprobs` and its cap are the route's.
            pub fn generation_input(&mut self, logprobs: Option<u64>, logprobs_cap: u64) -> GenerationInput {
                let (first, second) = if $max_first {
                    ((self.max_tokens, "max_tokens"), (self.max_completion_tokens, "max_completion_tokens"))
                } else {
                    ((self.max_completion_tokens, "max_completion_tokens"), (self.max_tokens, "max_tokens"))
                };
                let (max_tokens, max_tokens_param) = if first.0.is_some() { first } else { second };
                GenerationInput {
                    max_tokens,
                    max_tokens_param,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    logit_bias: self.logit_bias.take().map(|m| m.into_iter().collect()),
                    seed: self.seed,
                    n: self.n,
                    stop: self.stop.take().map(StopInput::into_vec).unwrap_or_default(),
                    stop_token_ids: self.stop_token_ids.take().unwrap_or_default(),
                    ignore_eos: self.ignore_eos.unwrap_or(false),
                    logprobs,
                    logprobs_cap,
                }
            }
        }
    };
}

openai_request! {
    /// `/v1/completions`. `max_tokens` is its own limit's name
    /// (`max_completion_tokens` an alias).
    CompletionRequest, max_tokens_first: true {
        prompt: Option<Value>,
        logprobs: Option<u64>,
        echo: Option<bool>,
        best_of: Option<u64>,
        suffix: Option<String>,
    }
}

openai_request! {
    /// `/v1/chat/completions`. `max_completion_tokens` is its own limit's
    /// name (`max_tokens` the older one).
    ChatRequest, max_tokens_first: false {
        messages: Option<Vec<ChatMessageIn>>,
        logprobs: Option<bool>,
        top_logprobs: Option<u64>,
        add_generation_prompt: Option<bool>,
    }
}

/// Reads OpenAI's `prompt`: a string, a list of strings, a list of token
/// ids, or a list of lists of token ids.
pub fn prompt_input(v: Option<&Value>) -> Result<PromptInput, ValidationError> {
    let bad = |m: &str| ValidationError::new("prompt", m.to_string());
    let ids = |items: &[Value]| -> Result<Vec<i64>, ValidationError> {
        items.iter().map(|x| x.as_i64().ok_or_else(|| bad(&format!("token ids in `prompt` must be integers, got {x}")))).collect()
    };
    match v {
        None | Some(Value::Null) => Err(bad("`prompt` is required")),
        Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
        Some(Value::Array(items)) => match items.first() {
            None => Err(bad("`prompt` must not be empty")),
            Some(Value::String(_)) => items
                .iter()
                .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad("a list `prompt` must hold only strings")))
                .collect::<Result<_, _>>()
                .map(PromptInput::Texts),
            Some(Value::Array(_)) => items
                .iter()
                .map(|x| match x {
                    Value::Array(inner) => ids(inner),
                    _ => Err(bad("a list of token-id lists must hold only lists")),
                })
                .collect::<Result<_, _>>()
                .map(PromptInput::IdsBatch),
            Some(_) => ids(items).map(PromptInput::Ids),
        },
        Some(other) => Err(bad(&format!("`prompt` must be a string, a list of strings or token ids, got {other}"))),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// A response's token counts, tallied as its choices finish: each prompt
/// counts once (with the first of its `n` choices), every choice's output.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageTally {
    prompt: usize,
    completion: usize,
}

impl UsageTally {
    pub fn add(&mut self, choice: usize, n: usize, prompt_tokens: usize, completion_tokens: usize) {
        if choice % n.max(1) == 0 {
            self.prompt += prompt_tokens;
        }
        self.completion += completion_tokens;
    }

    pub fn usage(self) -> Usage {
        Usage { prompt_tokens: self.prompt, completion_tokens: self.completion, total_tokens: self.prompt + self.completion }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Chat message content: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ChatPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<ChatContent>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

// ---- text-generation-inference native routes ----

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    pub best_of: Option<u64>,
    pub decoder_input_details: Option<bool>,
    pub details: Option<bool>,
    pub do_sample: Option<bool>,
    pub frequency_penalty: Option<f64>,
    pub max_new_tokens: Option<u64>,
    pub repetition_penalty: Option<f64>,
    pub return_full_text: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_n_tokens: Option<u64>,
    pub top_p: Option<f64>,
    pub truncate: Option<u64>,
    pub typical_p: Option<f64>,
    pub watermark: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub inputs: Option<String>,
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
    pub stream: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TgiToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TgiDetails {
    pub finish_reason: &'static str,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<TgiToken>,
    pub tokens: Vec<TgiToken>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<Vec<TgiToken>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<TgiDetails>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TgiStreamDetails {
    pub finish_reason: &'static str,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub input_length: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TgiStreamResponse {
    pub index: usize,
    pub token: TgiToken,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<TgiToken>>,
    pub generated_text: Option<String>,
    pub details: Option<TgiStreamDetails>,
}

// ---- tokenize / detokenize / models ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_prompt_shape_reads() {
        assert!(matches!(prompt_input(Some(&json!("hi"))), Ok(PromptInput::Text(_))));
        assert!(matches!(prompt_input(Some(&json!(["a", "b"]))), Ok(PromptInput::Texts(v)) if v.len() == 2));
        assert!(matches!(prompt_input(Some(&json!([1, 2]))), Ok(PromptInput::Ids(v)) if v == vec![1, 2]));
        assert!(matches!(prompt_input(Some(&json!([[1], [2, 3]]))), Ok(PromptInput::IdsBatch(v)) if v.len() == 2));
    }

    #[test]
    fn malformed_prompts_are_refused_with_the_param() {
        for bad in [json!(null), json!([]), json!([1.5]), json!(["7", 1]), json!([[1], 2]), json!({"a": 1}), json!(true), json!([1e30])] {
            let e = prompt_input(Some(&bad)).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
        assert!(prompt_input(None).is_err());
    }
}
