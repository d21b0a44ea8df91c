//! One request's generations, above the engine: submission, admission,
//! incremental detokenization, stop strings, finish reasons. Every endpoint
//! formats the [`Piece`]s this yields in its own wire shape.
//!
//! A client that goes away drops its [`ChoiceStream`]s, which drops the
//! engine's event receivers; the engine frees the slots at its next step.

use std::sync::Arc;
use std::time::Instant;

use futures_util::Stream;

use super::error::ApiError;
use crate::engine::{EngineHandle, Event, EventStream, FinishReason};
use crate::tokenizer::{DecodeStream, StopMatcher, Tokenizer};
use crate::validate::Validated;

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    /// An end-of-sequence or stop token id.
    StopToken,
    /// A stop string matched.
    StopString,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::StopToken | Finish::StopString => "stop",
        }
    }

    /// text-generation-inference's `finish_reason`.
    pub fn tgi(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::StopToken => "eos_token",
            Finish::StopString => "stop_sequence",
        }
    }
}

/// One generated token with what logprob listings need.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    /// (id, text, logprob) of the requested alternatives, best first.
    pub top: Vec<(u32, String, f32)>,
    pub special: bool,
}

/// What a choice produces, in order: `Text`s, then one `End` or `Error`.
#[derive(Debug, Clone)]
pub enum Piece {
    /// New text (possibly empty while a character or stop string is
    /// incomplete) and the tokens that produced it.
    Text {
        choice: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    End {
        choice: usize,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error {
        choice: usize,
        error: ApiError,
    },
}

/// The pieces of one choice, pulled from the engine's events.
pub struct ChoiceStream {
    pub index: usize,
    events: Option<EventStream>,
    tokenizer: Arc<Tokenizer>,
    decode: DecodeStream,
    stop: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    want_tokens: bool,
    pending_end: Option<Finish>,
    done: bool,
    /// The text so far, kept only when outputs are logged.
    log_text: Option<String>,
}

impl ChoiceStream {
    fn token_out(&self, id: u32, logprob: f32, top: Vec<(u32, f32)>) -> TokenOut {
        let t = &self.tokenizer;
        TokenOut {
            id,
            text: t.token_text(id),
            logprob,
            top: top.into_iter().map(|(i, lp)| (i, t.token_text(i), lp)).collect(),
            special: t.is_special(id),
        }
    }

    fn end(&mut self, finish: Finish) -> Piece {
        self.done = true;
        self.events = None;
        if let Some(text) = &self.log_text {
            tracing::debug!(choice = self.index, ?finish, output = %text, "generated");
        }
        Piece::End { choice: self.index, finish, prompt_tokens: self.prompt_tokens, completion_tokens: self.completion_tokens }
    }

    fn fail(&mut self, error: ApiError) -> Piece {
        self.done = true;
        self.events = None;
        Piece::Error { choice: self.index, error }
    }

    /// The next piece, or `None` after the end.
    pub async fn next_piece(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        if let Some(f) = self.pending_end.take() {
            return Some(self.end(f));
        }
        loop {
            let events = self.events.as_mut()?;
            match events.recv().await {
                Some(Event::Admitted { .. }) => continue,
                Some(Event::Token { id, logprob, top }) => {
                    self.completion_tokens += 1;
                    let token = self.want_tokens.then(|| self.token_out(id, logprob, top));
                    let text = match self.decode.step(&self.tokenizer, id) {
                        Ok(t) => t.unwrap_or_default(),
                        Err(e) => return Some(self.fail(ApiError::internal(format!("detokenization failed: {e}")))),
                    };
                    let out = self.stop.push(&text);
                    if let Some(log) = self.log_text.as_mut() {
                        log.push_str(&out.emit);
                    }
                    if out.stopped {
                        // Dropping the receiver now tells the engine to free
                        // the slot at its next step; the end follows.
                        self.events = None;
                        self.pending_end = Some(Finish::StopString);
                    }
                    return Some(Piece::Text { choice: self.index, text: out.emit, tokens: token.into_iter().collect() });
                }
                Some(Event::Finished { reason, prompt_tokens, generated_tokens }) => {
                    self.prompt_tokens = prompt_tokens;
                    self.completion_tokens = generated_tokens;
                    let tail = match self.decode.flush(&self.tokenizer) {
                        Ok(t) => t,
                        Err(e) => return Some(self.fail(ApiError::internal(format!("detokenization failed: {e}")))),
                    };
                    let mut out = self.stop.push(&tail);
                    let finish = if out.stopped {
                        Finish::StopString
                    } else {
                        out.emit.push_str(&self.stop.flush());
                        match reason {
                            FinishReason::Length => Finish::Length,
                            FinishReason::StopToken(_) => Finish::StopToken,
                        }
                    };
                    if let Some(log) = self.log_text.as_mut() {
                        log.push_str(&out.emit);
                    }
                    if out.emit.is_empty() {
                        return Some(self.end(finish));
                    }
                    self.pending_end = Some(finish);
                    return Some(Piece::Text { choice: self.index, text: out.emit, tokens: vec![] });
                }
                Some(Event::Failed(e)) => return Some(self.fail(e.into())),
                None => return Some(self.fail(ApiError::engine_unavailable())),
            }
        }
    }

    /// This choice as a `Stream` of pieces.
    pub fn into_stream(self) -> impl Stream<Item = Piece> + Send {
        futures_util::stream::unfold(self, |mut s| async move { s.next_piece().await.map(|p| (p, s)) })
    }
}

/// Submits every (prompt, choice) of a validated request and waits until
/// each is admitted to a state slot, so a refusal (queue full, draining)
/// becomes a status code before any response byte. Dropping the result
/// cancels everything.
pub async fn start(
    engine: &EngineHandle,
    tokenizer: &Arc<Tokenizer>,
    v: &Validated,
    want_tokens: bool,
    arrived: Instant,
    log_outputs: bool,
) -> Result<Vec<ChoiceStream>, ApiError> {
    let requests = v.requests(arrived);
    let mut streams = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let prompt_tokens = request.prompt.len();
        let events = engine.submit(request)?;
        streams.push(ChoiceStream {
            index,
            events: Some(events),
            tokenizer: tokenizer.clone(),
            decode: DecodeStream::new(true),
            stop: StopMatcher::new(v.stop_strings.clone()),
            prompt_tokens,
            completion_tokens: 0,
            want_tokens,
            pending_end: None,
            done: false,
            log_text: log_outputs.then(String::new),
        });
    }
    for s in &mut streams {
        let events = s.events.as_mut().expect("fresh streams hold their receiver");
        match events.recv().await {
            Some(Event::Admitted { .. }) => {}
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(other) => return Err(ApiError::internal(format!("unexpected first engine event {other:?}"))),
            None => return Err(ApiError::engine_unavailable()),
        }
    }
    Ok(streams)
}

/// Runs choices to completion (non-streaming responses).
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub async fn collect(mut s: ChoiceStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = vec![];
    while let Some(p) = s.next_piece().await {
        match p {
            Piece::Text { text: t, tokens: ts, .. } => {
                text.push_str(&t);
                tokens.extend(ts);
            }
            Piece::End { finish, prompt_tokens, completion_tokens, .. } => {
                return Ok(Collected { text, tokens, finish, prompt_tokens, completion_tokens });
            }
            Piece::Error { error, .. } => return Err(error),
        }
    }
    Err(ApiError::engine_unavailable())
}
