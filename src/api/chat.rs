//! `POST /v1/chat/completions`: OpenAI's chat API, with the checkpoint's
//! chat template rendered by a Jinja engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Json, Response};
use futures_util::StreamExt;

use super::completions::validate_blocking;
use super::error::ApiError;
use super::extract::JsonBody;
use super::generation::{self, Piece, TokenOut};
use super::sse::{self, Formatter};
use super::wire::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatContent, ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut, ChatRequest, ChatResponse,
    ChatTokenLogprob, TopLogprob, UsageTally,
};
use super::{AppState, response_id, unix_now};
use crate::tokenizer::ChatMessage;
use crate::validate::PromptInput;

pub async fn handle(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    run(state, req).await.unwrap_or_else(IntoResponse::into_response)
}

/// Wire messages → template messages (text content only).
pub(super) fn messages(msgs: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty").with_param("messages"));
    }
    msgs.iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(ChatContent::Text(t)) => t.clone(),
                Some(ChatContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad_request(format!("only text content parts are supported, got type `{}`", p.kind))
                                    .with_param("messages"));
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage { role: m.role.clone(), content })
        })
        .collect()
}

/// Renders messages with the checkpoint's template (400 when it has none).
pub(super) fn render(state: &AppState, msgs: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ApiError> {
    match state.tokenizer.render_chat(msgs, add_generation_prompt) {
        None => Err(ApiError::bad_request(
            "this model has no chat template (tokenizer_config.json has no `chat_template`); use /v1/completions with a plain prompt",
        )
        .with_param("messages")),
        Some(Err(e)) => Err(ApiError::bad_request(format!("cannot render the chat template: {e}")).with_param("messages")),
        Some(Ok(text)) => Ok(text),
    }
}

fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.text.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(_, text, l)| TopLogprob { token: text.clone(), logprob: *l, bytes: text.as_bytes().to_vec() })
                    .collect(),
            })
            .collect(),
    }
}

async fn run(state: Arc<AppState>, mut req: ChatRequest) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let model = state.check_model(req.model.as_deref())?;
    let msgs = messages(req.messages.as_deref().ok_or_else(|| ApiError::bad_request("`messages` is required").with_param("messages"))?)?;
    let rendered = render(&state, &msgs, req.add_generation_prompt.unwrap_or(true))?;
    let (stream, include_usage) = req.stream_mode()?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`").with_param("top_logprobs"));
    }
    let g = req.generation_input(want_logprobs.then(|| req.top_logprobs.unwrap_or(0)), 20);
    let v = validate_blocking(&state, PromptInput::Chat(rendered), g).await?;
    let streams = generation::start(&state.engine, &state.tokenizer, &v, want_logprobs, arrived, state.server.log_prompts).await?;
    let id = response_id("chatcmpl");
    let created = unix_now();
    if stream {
        let n = streams.len();
        let pieces = futures_util::stream::select_all(streams.into_iter().map(|s| s.into_stream().boxed()));
        let f = ChatStream { id, created, model, include_usage, want_logprobs, started: vec![false; n], usage: UsageTally::default() };
        return Ok(sse::response(sse::events(pieces, f), Duration::from_secs(state.server.sse_keepalive_secs)));
    }
    let results = futures_util::future::try_join_all(streams.into_iter().map(generation::collect)).await?;
    let n = results.len();
    let mut usage = UsageTally::default();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            usage.add(i, n, r.prompt_tokens, r.completion_tokens);
            ChatChoice {
                index: i,
                message: ChatMessageOut { role: "assistant", content: r.text },
                logprobs: want_logprobs.then(|| chat_logprobs(&r.tokens)),
                finish_reason: Some(r.finish.openai()),
            }
        })
        .collect();
    Ok(Json(ChatResponse { id, object: "chat.completion", created, model, choices, usage: usage.usage() }).into_response())
}

/// Formats chat completion chunks.
struct ChatStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    want_logprobs: bool,
    started: Vec<bool>,
    usage: UsageTally,
}

impl ChatStream {
    fn chunk(&self, choice: ChatChunkChoice) -> Event {
        sse::json_event(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
        })
    }
}

impl Formatter for ChatStream {
    fn piece(&mut self, piece: Piece) -> (Vec<Event>, bool) {
        let mut out = vec![];
        let choice = match &piece {
            Piece::Text { choice, .. } | Piece::End { choice, .. } | Piece::Error { choice, .. } => *choice,
        };
        if !self.started[choice] && !matches!(piece, Piece::Error { .. }) {
            self.started[choice] = true;
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
            out.push(self.chunk(ChatChunkChoice { index: choice, delta, logprobs: None, finish_reason: None }));
        }
        match piece {
            Piece::Text { text, tokens, .. } => {
                if text.is_empty() && tokens.is_empty() {
                    return (out, false);
                }
                let logprobs = self.want_logprobs.then(|| chat_logprobs(&tokens));
                let delta = ChatDelta { role: None, content: Some(text) };
                out.push(self.chunk(ChatChunkChoice { index: choice, delta, logprobs, finish_reason: None }));
                (out, false)
            }
            Piece::End { finish, prompt_tokens, completion_tokens, .. } => {
                self.usage.add(choice, self.started.len(), prompt_tokens, completion_tokens);
                out.push(self.chunk(ChatChunkChoice {
                    index: choice,
                    delta: ChatDelta::default(),
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
            sse::json_event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(self.usage.usage()),
            })
        }))
    }
}
