//! The engine: the step loop that owns the model, and the offline
//! single-sequence generator.

pub mod offline;
