//! Validation, once: what a client asked for → [`engine::Request`]s whose
//! fields cannot hold invalid values. Every limit is checked here, every
//! client token id is checked against the vocabulary, and a prompt is
//! refused by its length in characters before it is tokenized. Nothing
//! downstream re-checks.
//!
//! The API turns each endpoint's wire request into the neutral
//! [`GenerationInput`] and [`PromptInput`]; this module knows no HTTP.

use std::sync::Arc;
use std::time::Instant;

use crate::config::EngineSettings;
use crate::engine::Request;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// A refused request: what is wrong, and with which parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationError {
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ValidationError {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        ValidationError { message: message.into(), param: Some(param.to_string()), code: None }
    }

    fn context_length(message: String) -> Self {
        ValidationError { message, param: Some("prompt".into()), code: Some("context_length_exceeded") }
    }
}

/// A prompt as the client sent it.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdsBatch(Vec<Vec<i64>>),
    /// A rendered chat prompt: its template wrote any special tokens, so
    /// none are added when it is tokenized.
    Chat(String),
}

/// The generation parameters common to every endpoint; `None` means the
/// client did not say.
#[derive(Debug, Clone, Default)]
pub struct GenerationInput {
    pub max_tokens: Option<u64>,
    /// The name the client used for `max_tokens` (for error messages).
    pub max_tokens_param: &'static str,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<Vec<(String, f64)>>,
    pub seed: Option<u64>,
    pub n: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: bool,
    /// Alternatives per token (0 with `want_logprobs` means only the
    /// chosen token's logprob).
    pub logprobs: Option<u64>,
    /// Largest `logprobs` this endpoint allows (5 for completions, 20 for chat).
    pub logprobs_cap: u64,
}

/// One prompt, tokenized and checked.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The prompt text (for `echo`), when the client sent text.
    pub text: Option<String>,
}

/// A validated request: prompts, how many choices each, and the engine
/// requests to submit.
#[derive(Debug, Clone)]
pub struct Validated {
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Whether the client supplied a seed (else each choice draws one).
    pub seeded: bool,
}

impl Validated {
    /// Engine requests in (prompt, choice) order: index `p * n + c`.
    pub fn requests(&self, arrived: Instant) -> Vec<Request> {
        let mut out = Vec::with_capacity(self.prompts.len() * self.n);
        for p in &self.prompts {
            for c in 0..self.n {
                let seed = if self.seeded { self.params.seed.wrapping_add(c as u64) } else { crate::backend::rng::fresh_u64() };
                out.push(Request {
                    prompt: p.ids.clone(),
                    max_tokens: self.max_tokens,
                    params: SamplingParams { seed, ..self.params.clone() },
                    stop_ids: self.stop_ids.clone(),
                    arrived,
                });
            }
        }
        out
    }
}

/// Checks requests against the configured limits and the tokenizer.
pub struct Validator {
    limits: EngineSettings,
    tokenizer: Arc<Tokenizer>,
    /// Ids the model may be fed and may emit.
    vocab: usize,
    eos_ids: Vec<u32>,
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64, lo_open: bool, default: f64) -> Result<f64, ValidationError> {
    let Some(x) = v else { return Ok(default) };
    let ok = x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && x <= hi;
    if ok {
        Ok(x)
    } else {
        let open = if lo_open { "(" } else { "[" };
        Err(ValidationError::new(param, format!("`{param}` must be in {open}{lo}, {hi}], got {x}")))
    }
}

impl Validator {
    pub fn new(limits: EngineSettings, tokenizer: Arc<Tokenizer>, vocab: usize, eos_ids: Vec<u32>) -> Self {
        Validator { limits, tokenizer, vocab, eos_ids }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn limits(&self) -> &EngineSettings {
        &self.limits
    }

    /// Checks a token id from the client.
    pub fn token_id(&self, param: &str, id: i64) -> Result<u32, ValidationError> {
        if id >= 0 && (id as u64) < self.vocab as u64 {
            Ok(id as u32)
        } else {
            Err(ValidationError::new(param, format!("token id {id} in `{param}` is outside the vocabulary [0, {})", self.vocab)))
        }
    }

    /// Tokenizes and checks one text prompt.
    fn text_prompt(&self, text: &str, chat: bool) -> Result<Prompt, ValidationError> {
        let param = if chat { "messages" } else { "prompt" };
        if text.is_empty() {
            return Err(ValidationError::new(param, format!("`{param}` must not be empty")));
        }
        // Refuse by size before paying for tokenization.
        let chars = text.chars().count();
        if chars > self.limits.max_prompt_chars {
            return Err(ValidationError::context_length(format!(
                "the prompt has {chars} characters; this server accepts at most {}",
                self.limits.max_prompt_chars
            )));
        }
        let ids = if chat { self.tokenizer.encode_plain(text) } else { self.tokenizer.encode(text) }
            .map_err(|e| ValidationError::new(param, format!("cannot tokenize `{param}`: {e}")))?;
        if ids.is_empty() {
            return Err(ValidationError::new(param, format!("`{param}` encodes to no tokens")));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ValidationError::new("prompt", format!("the tokenizer produced id {bad}, outside the model's vocabulary")));
        }
        Ok(Prompt { ids, text: Some(text.to_string()) })
    }

    fn id_prompt(&self, ids: &[i64]) -> Result<Prompt, ValidationError> {
        if ids.is_empty() {
            return Err(ValidationError::new("prompt", "`prompt` must not be empty"));
        }
        let ids = ids.iter().map(|&i| self.token_id("prompt", i)).collect::<Result<Vec<u32>, _>>()?;
        Ok(Prompt { ids, text: None })
    }

    fn prompts(&self, input: &PromptInput) -> Result<Vec<Prompt>, ValidationError> {
        let batch_cap = |n: usize| {
            if n == 0 {
                Err(ValidationError::new("prompt", "`prompt` must not be empty"))
            } else if n > self.limits.max_batch_prompts {
                Err(ValidationError::new(
                    "prompt",
                    format!("{n} prompts in one request; at most {} are accepted", self.limits.max_batch_prompts),
                ))
            } else {
                Ok(())
            }
        };
        let prompts = match input {
            PromptInput::Text(t) => vec![self.text_prompt(t, false)?],
            PromptInput::Texts(ts) => {
                batch_cap(ts.len())?;
                ts.iter().map(|t| self.text_prompt(t, false)).collect::<Result<_, _>>()?
            }
            PromptInput::Ids(ids) => vec![self.id_prompt(ids)?],
            PromptInput::IdsBatch(b) => {
                batch_cap(b.len())?;
                b.iter().map(|ids| self.id_prompt(ids)).collect::<Result<_, _>>()?
            }
            PromptInput::Chat(t) => vec![self.text_prompt(t, true)?],
        };
        for p in &prompts {
            if p.ids.len() > self.limits.max_prompt_tokens {
                return Err(ValidationError::context_length(format!(
                    "this server's maximum prompt length is {} tokens; the prompt has {} tokens",
                    self.limits.max_prompt_tokens,
                    p.ids.len()
                )));
            }
        }
        Ok(prompts)
    }

    /// Validates a whole generation request.
    pub fn generation(&self, prompt: &PromptInput, g: &GenerationInput) -> Result<Validated, ValidationError> {
        let prompts = self.prompts(prompt)?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let mt_param = if g.max_tokens_param.is_empty() { "max_tokens" } else { g.max_tokens_param };
        let max_tokens = match g.max_tokens {
            None => self.limits.default_max_tokens.min(self.limits.max_total_tokens.saturating_sub(longest)).max(1),
            Some(0) => return Err(ValidationError::new(mt_param, format!("`{mt_param}` must be at least 1"))),
            Some(m) => m.min(usize::MAX as u64) as usize,
        };
        if longest + max_tokens > self.limits.max_total_tokens {
            return Err(ValidationError {
                message: format!(
                    "this server's maximum context length is {} tokens; the prompt has {longest} tokens and `{mt_param}` asks for {max_tokens} more",
                    self.limits.max_total_tokens
                ),
                param: Some(mt_param.to_string()),
                code: Some("context_length_exceeded"),
            });
        }
        let temperature = range("temperature", g.temperature, 0.0, 2.0, false, 1.0)? as f32;
        let top_p = range("top_p", g.top_p, 0.0, 1.0, true, 1.0)? as f32;
        let min_p = range("min_p", g.min_p, 0.0, 1.0, false, 0.0)? as f32;
        let presence_penalty = range("presence_penalty", g.presence_penalty, -2.0, 2.0, false, 0.0)? as f32;
        let frequency_penalty = range("frequency_penalty", g.frequency_penalty, -2.0, 2.0, false, 0.0)? as f32;
        let repetition_penalty = range("repetition_penalty", g.repetition_penalty, 0.0, 10.0, true, 1.0)? as f32;
        let top_k = match g.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 && k <= u32::MAX as i64 => k as u32,
            Some(k) => {
                return Err(ValidationError::new("top_k", format!("`top_k` must be a positive integer, or -1 or 0 for no limit; got {k}")));
            }
        };
        let n = match g.n {
            None => 1,
            Some(n) if n >= 1 && n as usize <= self.limits.max_n => n as usize,
            Some(n) => return Err(ValidationError::new("n", format!("`n` must be between 1 and {}, got {n}", self.limits.max_n))),
        };
        if prompts.len() * n > self.limits.max_batch_prompts.max(self.limits.max_n) {
            return Err(ValidationError::new(
                "n",
                format!("{} prompts × n = {n} is more completions than this server makes for one request", prompts.len()),
            ));
        }
        if g.stop.len() > self.limits.max_stop {
            return Err(ValidationError::new(
                "stop",
                format!("at most {} stop sequences are accepted, got {}", self.limits.max_stop, g.stop.len()),
            ));
        }
        for s in &g.stop {
            if s.is_empty() {
                return Err(ValidationError::new("stop", "stop sequences must not be empty"));
            }
            if s.chars().count() > self.limits.max_stop_chars {
                return Err(ValidationError::new(
                    "stop",
                    format!("stop sequences may have at most {} characters", self.limits.max_stop_chars),
                ));
            }
        }
        let mut stop_ids: Vec<u32> = g.stop_token_ids.iter().map(|&i| self.token_id("stop_token_ids", i)).collect::<Result<_, _>>()?;
        if !g.ignore_eos {
            stop_ids.extend(self.eos_ids.iter().copied());
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let logit_bias = match &g.logit_bias {
            None => vec![],
            Some(entries) => entries
                .iter()
                .map(|(k, v)| {
                    let id: i64 = k
                        .trim()
                        .parse()
                        .map_err(|_| ValidationError::new("logit_bias", format!("`logit_bias` keys must be token ids, got \"{k}\"")))?;
                    let id = self.token_id("logit_bias", id)?;
                    if !(v.is_finite() && (-100.0..=100.0).contains(v)) {
                        return Err(ValidationError::new("logit_bias", format!("`logit_bias` values must be in [-100, 100], got {v}")));
                    }
                    Ok((id, *v as f32))
                })
                .collect::<Result<_, _>>()?,
        };
        let logprobs = match g.logprobs {
            None => None,
            Some(k) => {
                let cap = g.logprobs_cap.min(self.limits.max_logprobs as u64);
                if k > cap {
                    return Err(ValidationError::new(
                        if g.logprobs_cap == 5 { "logprobs" } else { "top_logprobs" },
                        format!("at most {cap} alternatives per token can be returned, got {k}"),
                    ));
                }
                Some(k as u32)
            }
        };
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed: g.seed.unwrap_or(0),
            logprobs,
        };
        Ok(Validated { prompts, n, max_tokens, params, stop_ids, stop_strings: g.stop.clone(), seeded: g.seed.is_some() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn validator() -> Validator {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mamba1-tiny");
        let tok = Arc::new(Tokenizer::from_dir(&dir).expect("fixture tokenizer"));
        let mut limits = crate::config::Settings::load(None, &[], &[]).expect("defaults").engine;
        limits.max_prompt_tokens = 64;
        limits.max_total_tokens = 80;
        limits.max_prompt_chars = 1000;
        Validator::new(limits, tok, 500, vec![0])
    }

    fn text(s: &str) -> PromptInput {
        PromptInput::Text(s.into())
    }

    fn err(p: &PromptInput, g: &GenerationInput) -> ValidationError {
        validator().generation(p, g).expect_err("should be refused")
    }

    #[test]
    fn defaults_are_filled_and_eos_stops() {
        let v = validator().generation(&text("hello"), &GenerationInput::default()).expect("valid");
        assert_eq!(v.max_tokens, 16);
        assert_eq!(v.params.temperature, 1.0);
        assert_eq!(v.stop_ids, vec![0]);
        assert_eq!(v.requests(Instant::now()).len(), 1);
    }

    #[test]
    fn empty_and_oversized_prompts_are_refused() {
        assert_eq!(err(&text(""), &GenerationInput::default()).param.as_deref(), Some("prompt"));
        let long = "x".repeat(1001);
        let e = err(&text(&long), &GenerationInput::default());
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("1001 characters"));
        assert_eq!(err(&PromptInput::Ids(vec![]), &GenerationInput::default()).param.as_deref(), Some("prompt"));
        assert_eq!(err(&PromptInput::IdsBatch(vec![]), &GenerationInput::default()).param.as_deref(), Some("prompt"));
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_refused() {
        for bad in [-1, 500, 4_294_967_296] {
            let e = err(&PromptInput::Ids(vec![1, bad]), &GenerationInput::default());
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
        let g = GenerationInput { stop_token_ids: vec![9999], ..Default::default() };
        assert_eq!(err(&text("hi"), &g).param.as_deref(), Some("stop_token_ids"));
        let g = GenerationInput { logit_bias: Some(vec![("abc".into(), 1.0)]), ..Default::default() };
        assert_eq!(err(&text("hi"), &g).param.as_deref(), Some("logit_bias"));
        let g = GenerationInput { logit_bias: Some(vec![("600".into(), 1.0)]), ..Default::default() };
        assert_eq!(err(&text("hi"), &g).param.as_deref(), Some("logit_bias"));
        let g = GenerationInput { logit_bias: Some(vec![("6".into(), 1e9)]), ..Default::default() };
        assert_eq!(err(&text("hi"), &g).param.as_deref(), Some("logit_bias"));
    }

    #[test]
    fn context_limits_name_both_numbers() {
        let g = GenerationInput { max_tokens: Some(79), ..Default::default() };
        let e = err(&text("hello there"), &g);
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("80 tokens"), "{}", e.message);
        let g = GenerationInput { max_tokens: Some(0), max_tokens_param: "max_tokens", ..Default::default() };
        assert_eq!(err(&text("hi"), &g).param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn parameter_ranges() {
        let cases: Vec<(GenerationInput, &str)> = vec![
            (GenerationInput { temperature: Some(-0.1), ..Default::default() }, "temperature"),
            (GenerationInput { temperature: Some(2.5), ..Default::default() }, "temperature"),
            (GenerationInput { top_p: Some(0.0), ..Default::default() }, "top_p"),
            (GenerationInput { top_p: Some(1.1), ..Default::default() }, "top_p"),
            (GenerationInput { top_k: Some(-2), ..Default::default() }, "top_k"),
            (GenerationInput { presence_penalty: Some(2.5), ..Default::default() }, "presence_penalty"),
            (GenerationInput { frequency_penalty: Some(-3.0), ..Default::default() }, "frequency_penalty"),
            (GenerationInput { n: Some(0), ..Default::default() }, "n"),
            (GenerationInput { n: Some(1000), ..Default::default() }, "n"),
            (GenerationInput { stop: vec!["a".into(); 5], ..Default::default() }, "stop"),
            (GenerationInput { stop: vec!["".into()], ..Default::default() }, "stop"),
            (GenerationInput { stop: vec!["x".repeat(300)], ..Default::default() }, "stop"),
            (GenerationInput { logprobs: Some(6), logprobs_cap: 5, ..Default::default() }, "logprobs"),
            (GenerationInput { min_p: Some(1.5), ..Default::default() }, "min_p"),
            (GenerationInput { repetition_penalty: Some(0.0), ..Default::default() }, "repetition_penalty"),
        ];
        for (g, param) in cases {
            assert_eq!(err(&text("hi"), &g).param.as_deref(), Some(param), "{g:?}");
        }
        let ok = GenerationInput { temperature: Some(0.0), top_p: Some(1.0), top_k: Some(-1), ..Default::default() };
        assert!(validator().generation(&text("hi"), &ok).is_ok());
    }

    #[test]
    fn seeded_choices_differ_but_repeat() {
        let g = GenerationInput { n: Some(3), seed: Some(7), ..Default::default() };
        let v = validator().generation(&PromptInput::Texts(vec!["a".into(), "b".into()]), &g).expect("valid");
        let seeds: Vec<u64> = v.requests(Instant::now()).iter().map(|r| r.params.seed).collect();
        assert_eq!(seeds, vec![7, 8, 9, 7, 8, 9]);
    }

    #[test]
    fn ignore_eos_drops_the_eos_stop() {
        let g = GenerationInput { ignore_eos: true, stop_token_ids: vec![5], ..Default::default() };
        assert_eq!(validator().generation(&text("hi"), &g).expect("valid").stop_ids, vec![5]);
    }
}
