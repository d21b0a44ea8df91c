//! `POST /v1/completions`: OpenAI's text completions, streamed or not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Json, Response};
use futures_util::StreamExt;

use super::error::ApiError;
use super::extract::JsonBody;
use super::generation::{self, Piece, TokenOut};
use super::sse::{self, Formatter};
use super::wire::{self, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageTally};
use super::{AppState, response_id, unix_now};
use crate::validate::{GenerationInput, Validated};

pub async fn handle(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<CompletionRequest>) -> Response {
    run(state, req).await.unwrap_or_else(IntoResponse::into_response)
}

/// Token-level logprobs in the completions shape; offsets start at `base`.
fn logprobs(tokens: &[TokenOut], base: usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = base;
    for t in tokens {
        lp.tokens.push(t.text.clone());
        lp.token_logprobs.push(t.logprob);
        // Distinct ids can share a text (partial UTF-8 decodes to U+FFFD);
        // the map keeps the likeliest, which comes first.
        let mut top = BTreeMap::new();
        for (_, text, l) in &t.top {
            top.entry(text.clone()).or_insert(*l);
        }
        lp.top_logprobs.push(top);
        lp.text_offset.push(offset);
        offset += t.text.len();
    }
    lp
}

/// Validation off the async threads (tokenizing a long prompt is CPU work).
pub(super) async fn validate_blocking(
    state: &Arc<AppState>,
    prompt: crate::validate::PromptInput,
    g: GenerationInput,
) -> Result<Validated, ApiError> {
    let st = state.clone();
    let v = tokio::task::spawn_blocking(move || st.validator.generation(&prompt, &g))
        .await
        .map_err(|e| ApiError::internal(format!("validation task failed: {e}")))?
        .map_err(ApiError::from)?;
    // Prompt text is private: only its size is logged, unless configured.
    let tokens: Vec<usize> = v.prompts.iter().map(|p| p.ids.len()).collect();
    if state.server.log_prompts {
        let texts: Vec<&str> = v.prompts.iter().map(|p| p.text.as_deref().unwrap_or("<token ids>")).collect();
        tracing::debug!(?tokens, prompts = ?texts, n = v.n, max_tokens = v.max_tokens, "validated");
    } else {
        tracing::debug!(?tokens, n = v.n, max_tokens = v.max_tokens, "validated");
    }
    Ok(v)
}

async fn run(state: Arc<AppState>, mut req: CompletionRequest) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let model = state.check_model(req.model.as_deref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("`suffix` is not supported").with_param("suffix"));
    }
    if req.best_of.is_some_and(|b| b != 1 && Some(b) != req.n) {
        return Err(ApiError::bad_request("`best_of` other than 1 (or equal to `n`) is not supported").with_param("best_of"));
    }
    let echo = req.echo.unwrap_or(false);
    if echo && req.logprobs.is_some() {
        return Err(ApiError::bad_request("`echo` together with `logprobs` (prompt logprobs) is not supported").with_param("echo"));
    }
    let (stream, include_usage) = req.stream_mode()?;
    let prompt = wire::prompt_input(req.prompt.as_ref())?;
    let g = req.generation_input(req.logprobs, 5);
    let v = validate_blocking(&state, prompt, g).await?;
    let want_tokens = v.params.logprobs.is_some();
    // Echo text: the prompt as sent, or its ids decoded.
    let echoes: Vec<String> = if echo {
        v.prompts
            .iter()
            .map(|p| p.text.clone().map_or_else(|| state.tokenizer.decode(&p.ids, false), Ok))
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::internal(format!("cannot decode the prompt: {e}")))?
    } else {
        vec![]
    };
    let streams = generation::start(&state.engine, &state.tokenizer, &v, want_tokens, arrived, state.server.log_prompts).await?;
    let id = response_id("cmpl");
    let created = unix_now();
    let n = v.n;
    if stream {
        let pieces = futures_util::stream::select_all(streams.into_iter().map(|s| s.into_stream().boxed()));
        let f = CompletionStream {
            id,
            created,
            model,
            n,
            include_usage,
            want_tokens,
            echoes,
            echoed: vec![false; v.prompts.len() * n],
            usage: UsageTally::default(),
            offsets: vec![0; v.prompts.len() * n],
        };
        let keepalive = Duration::from_secs(state.server.sse_keepalive_secs);
        return Ok(sse::response(sse::events(pieces, f), keepalive));
    }
    let results = futures_util::future::try_join_all(streams.into_iter().map(generation::collect)).await?;
    let mut usage = UsageTally::default();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            usage.add(i, n, r.prompt_tokens, r.completion_tokens);
            let prefix = echoes.get(i / n).cloned().unwrap_or_default();
            let lp = want_tokens.then(|| logprobs(&r.tokens, prefix.len()));
            CompletionChoice { index: i, text: prefix + &r.text, logprobs: lp, finish_reason: Some(r.finish.openai()) }
        })
        .collect();
    Ok(Json(CompletionResponse { id, object: "text_completion", created, model, choices, usage: Some(usage.usage()) }).into_response())
}

/// Formats completion chunks.
struct CompletionStream {
    id: String,
    created: u64,
    model: String,
    n: usize,
    include_usage: bool,
    want_tokens: bool,
    echoes: Vec<String>,
    echoed: Vec<bool>,
    usage: UsageTally,
    /// Characters sent so far per choice (logprob text offsets).
    offsets: Vec<usize>,
}

impl CompletionStream {
    fn chunk(&self, choice: CompletionChoice) -> Event {
        sse::json_event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
        })
    }
}

impl Formatter for CompletionStream {
    fn piece(&mut self, piece: Piece) -> (Vec<Event>, bool) {
        let mut out = vec![];
        let choice = match &piece {
            Piece::Text { choice, .. } | Piece::End { choice, .. } | Piece::Error { choice, .. } => *choice,
        };
        if !self.echoes.is_empty() && !self.echoed[choice] {
            self.echoed[choice] = true;
            let text = self.echoes[choice / self.n].clone();
            self.offsets[choice] += text.len();
            out.push(self.chunk(CompletionChoice { index: choice, text, logprobs: None, finish_reason: None }));
        }
        match piece {
            Piece::Text { text, tokens, .. } => {
                if text.is_empty() && tokens.is_empty() {
                    return (out, false);
                }
                let lp = self.want_tokens.then(|| logprobs(&tokens, self.offsets[choice]));
                self.offsets[choice] += text.len();
                out.push(self.chunk(CompletionChoice { index: choice, text, logprobs: lp, finish_reason: None }));
                (out, false)
            }
            Piece::End { finish, prompt_tokens, completion_tokens, .. } => {
                self.usage.add(choice, self.n, prompt_tokens, completion_tokens);
                out.push(self.chunk(CompletionChoice {
                    index: choice,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(finish.openai()),
                }));
                (out, false)
            }
            Piece::Error { error, .. } => {
                let (end, stop) = sse::error_end(&error);
                out.extend(end);
                (out, stop)
            }
        }
    }

    fn finish(&mut self) -> Vec<Event> {
        sse::closing(self.include_usage.then(|| {
            sse::json_event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(self.usage.usage()),
            })
        }))
    }
}
