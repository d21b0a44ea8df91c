//! Native routes: `/generate` and `/generate_stream` in the shape of
//! text-generation-inference, and `/tokenize`, `/detokenize`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Json, Response};
use futures_util::StreamExt;

use super::AppState;
use super::chat::{messages, render};
use super::completions::validate_blocking;
use super::error::ApiError;
use super::extract::JsonBody;
use super::generation::{self, Piece, TokenOut};
use super::sse::{self, Formatter};
use super::wire::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, TgiDetails, TgiStreamDetails, TgiStreamResponse, TgiToken,
    TokenizeRequest, TokenizeResponse,
};
use crate::validate::{GenerationInput, PromptInput, Validated};

fn tgi_token(t: &TokenOut) -> TgiToken {
    TgiToken { id: t.id, text: t.text.clone(), logprob: t.logprob, special: t.special }
}

/// Validates a native request; returns it with the input text and whether
/// details, full text and sampling were asked for.
async fn prepare(state: &Arc<AppState>, req: GenerateRequest) -> Result<(Validated, String, bool, bool), ApiError> {
    let inputs = req.inputs.ok_or_else(|| ApiError::bad_request("`inputs` is required").with_param("inputs"))?;
    let p = req.parameters.unwrap_or_default();
    let unsupported = [
        ("best_of", p.best_of.is_some_and(|b| b > 1)),
        ("decoder_input_details", p.decoder_input_details.unwrap_or(false)),
        ("typical_p", p.typical_p.is_some()),
        ("watermark", p.watermark.unwrap_or(false)),
        ("truncate", p.truncate.is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(ApiError::bad_request(format!("`{name}` is not supported")).with_param(*name));
    }
    if p.temperature.is_some_and(|t| t <= 0.0) {
        return Err(
            ApiError::bad_request("`temperature` must be strictly positive (use `do_sample: false` for greedy)").with_param("temperature")
        );
    }
    // Sampling when asked for, or when a sampling parameter is given.
    let sample = p.do_sample.unwrap_or(false) || p.temperature.is_some() || p.top_k.is_some() || p.top_p.is_some();
    let g = GenerationInput {
        max_tokens: p.max_new_tokens,
        max_tokens_param: "max_new_tokens",
        temperature: Some(if sample { p.temperature.unwrap_or(1.0) } else { 0.0 }),
        top_p: p.top_p,
        top_k: p.top_k,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        stop: p.stop.unwrap_or_default(),
        logprobs: Some(p.top_n_tokens.unwrap_or(0)),
        logprobs_cap: 20,
        ..Default::default()
    };
    let v = validate_blocking(state, PromptInput::Text(inputs.clone()), g).await?;
    let full = p.return_full_text.unwrap_or(false);
    let details = p.details.unwrap_or(false);
    Ok((v, if full { inputs } else { String::new() }, details, sample))
}

pub async fn generate(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    async {
        let arrived = Instant::now();
        let (v, prefix, details, sample) = prepare(&state, req).await?;
        let mut streams = generation::start(&state.engine, &state.tokenizer, &v, true, arrived, state.server.log_prompts).await?;
        let seed = streams.first().map(|_| v.requests(arrived)[0].params.seed);
        let r = generation::collect(streams.remove(0)).await?;
        let top = v.params.logprobs.is_some_and(|k| k > 0);
        let details = details.then(|| TgiDetails {
            finish_reason: r.finish.tgi(),
            generated_tokens: r.completion_tokens,
            seed: if sample && v.seeded { seed } else { None },
            prefill: vec![],
            top_tokens: top.then(|| {
                r.tokens
                    .iter()
                    .map(|t| {
                        t.top.iter().map(|(id, text, lp)| TgiToken { id: *id, text: text.clone(), logprob: *lp, special: false }).collect()
                    })
                    .collect()
            }),
            tokens: r.tokens.iter().map(tgi_token).collect(),
        });
        Ok::<_, ApiError>(Json(GenerateResponse { generated_text: prefix + &r.text, details }).into_response())
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

pub async fn generate_stream(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    async {
        let arrived = Instant::now();
        let (v, prefix, _, sample) = prepare(&state, req).await?;
        let seed = (sample && v.seeded).then_some(v.params.seed);
        let input_length = v.prompts[0].ids.len();
        let streams = generation::start(&state.engine, &state.tokenizer, &v, true, arrived, state.server.log_prompts).await?;
        let pieces = futures_util::stream::select_all(streams.into_iter().map(|s| s.into_stream().boxed()));
        let f = TgiStream { prev: None, text: prefix, seed, input_length };
        Ok::<_, ApiError>(sse::response(sse::events(pieces, f), Duration::from_secs(state.server.sse_keepalive_secs)))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// One event per token; the last one carries the full text and details.
/// Events are held back by one so the last can be completed.
struct TgiStream {
    prev: Option<TgiStreamResponse>,
    text: String,
    seed: Option<u64>,
    input_length: usize,
}

impl Formatter for TgiStream {
    fn piece(&mut self, piece: Piece) -> (Vec<Event>, bool) {
        match piece {
            Piece::Text { text, tokens, .. } => {
                self.text.push_str(&text);
                let mut out = vec![];
                match tokens.first() {
                    Some(t) => {
                        if let Some(prev) = self.prev.take() {
                            out.push(sse::json_event(&prev));
                        }
                        let mut token = tgi_token(t);
                        token.text = text;
                        let top = (!t.top.is_empty()).then(|| {
                            t.top.iter().map(|(id, s, lp)| TgiToken { id: *id, text: s.clone(), logprob: *lp, special: false }).collect()
                        });
                        self.prev = Some(TgiStreamResponse { index: 0, token, top_tokens: top, generated_text: None, details: None });
                    }
                    None => {
                        if let Some(prev) = self.prev.as_mut() {
                            prev.token.text.push_str(&text);
                        }
                    }
                }
                (out, false)
            }
            Piece::End { finish, completion_tokens, .. } => {
                let mut last = self.prev.take().unwrap_or(TgiStreamResponse {
                    index: 0,
                    token: TgiToken { id: 0, text: String::new(), logprob: 0.0, special: true },
                    top_tokens: None,
                    generated_text: None,
                    details: None,
                });
                last.generated_text = Some(std::mem::take(&mut self.text));
                last.details = Some(TgiStreamDetails {
                    finish_reason: finish.tgi(),
                    generated_tokens: completion_tokens,
                    seed: self.seed,
                    input_length: self.input_length,
                });
                (vec![sse::json_event(&last)], false)
            }
            // text-generation-inference streams end without [DONE].
            Piece::Error { error, .. } => (vec![error.sse_event()], true),
        }
    }

    fn finish(&mut self) -> Vec<Event> {
        vec![]
    }
}

pub async fn tokenize(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<TokenizeRequest>) -> Response {
    async {
        state.check_model(req.model.as_deref())?;
        let limit = state.validator.limits().max_prompt_chars;
        let (text, chat) = match (req.prompt, req.messages) {
            (Some(p), None) => (p, false),
            (None, Some(m)) => (render(&state, &messages(&m)?, req.add_generation_prompt.unwrap_or(true))?, true),
            _ => return Err(ApiError::bad_request("send exactly one of `prompt` or `messages`").with_param("prompt")),
        };
        if text.chars().count() > limit {
            return Err(ApiError::bad_request(format!("the text is longer than {limit} characters")).with_param("prompt"));
        }
        let tok = state.tokenizer.clone();
        let tokens = tokio::task::spawn_blocking(move || if chat { tok.encode_plain(&text) } else { tok.encode(&text) })
            .await
            .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))?
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e}")).with_param("prompt"))?;
        Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: state.max_model_len(), tokens }).into_response())
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

pub async fn detokenize(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<DetokenizeRequest>) -> Response {
    async {
        state.check_model(req.model.as_deref())?;
        if req.tokens.len() > state.validator.limits().max_total_tokens {
            return Err(ApiError::bad_request("too many tokens").with_param("tokens"));
        }
        let ids = req.tokens.iter().map(|&t| state.validator.token_id("tokens", t)).collect::<Result<Vec<u32>, _>>()?;
        let prompt =
            state.tokenizer.decode(&ids, false).map_err(|e| ApiError::bad_request(format!("cannot decode: {e}")).with_param("tokens"))?;
        Ok(Json(DetokenizeResponse { prompt }).into_response())
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}
