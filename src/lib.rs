//! mamba-serve: a text-generation server for Mamba state-space language
//! models.
//!
//! Code map (dependencies point down this list, never up):
//! - [`api`]: HTTP (axum) routes, wire types, SSE, errors as OpenAI JSON.
//! - [`validate`]: wire request → [`engine::Request`], every limit checked once.
//! - [`engine`]: the step loop on its own thread, the bounded queue, the
//!   scheduler, sequences and their state slots.
//! - [`model`]: checkpoints (config, safetensors), the forward pass written
//!   once for Mamba-1, Falcon-Mamba and Mamba-2, the state pool.
//! - [`sampling`]: logit processors and samplers.
//! - [`backend`]: the fused ops a Mamba step needs, on CPU and CUDA.
//! - [`tokenizer`], [`config`]: leaves.

pub mod api;
pub mod backend;
pub mod bench;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod tokenizer;
pub mod validate;
