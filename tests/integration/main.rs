//! The integration test binary: one binary for all integration tests, to
//! save link time. Modules by area.

mod ahead;
mod common;
#[cfg(feature = "gpu-tests")]
mod cuda;
mod deploy;
mod golden;
mod http;
mod invariance;
mod loader;
mod quickstart;
mod serving;
