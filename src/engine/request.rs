//! What goes into the engine and what comes out, in token ids only.

use std::time::Instant;

use crate::sampling::SamplingParams;

/// A validated generation request. `validate` builds it; the engine trusts
/// every field.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids, all inside the vocabulary, at least one.
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    pub params: SamplingParams,
    /// Ids that end generation when sampled (EOS and the client's stop
    /// token ids); the stopping id is not emitted.
    pub stop_ids: Vec<u32>,
    /// When the request arrived, for queue and first-token times.
    pub arrived: Instant,
}

/// Why a sequence ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop id was sampled.
    StopToken(u32),
}

/// Why the engine could not finish a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the server is shutting down")]
    Draining,
    #[error("generation failed: {0}")]
    StepFailed(String),
    #[error("the engine stopped")]
    Stopped,
}

/// What the engine sends a request, in order: `Admitted`, then `Token`s,
/// then exactly one of `Finished` or `Failed` (`Failed` may also come first,
/// instead of `Admitted`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request holds a state slot; generation has begun.
    Admitted {
        queue_seconds: f64,
    },
    Token {
        id: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        generated_tokens: usize,
    },
    Failed(EngineError),
}

/// Why a submission was refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the server is shutting down")]
    Draining,
    #[error("the engine is not running")]
    Dead,
}
