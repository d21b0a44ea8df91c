//! The engine: one thread that owns the model and all scheduling state, fed
//! through a bounded queue, answering each request on its own channel.
//!
//! The async world holds an [`EngineHandle`]: `submit` either queues a
//! request at once or refuses it at once (queue full, draining, engine
//! dead); it never waits. The step loop (`step_loop`) admits queued
//! requests into free state slots, plans each step with the pure
//! `scheduler`, runs one batched forward pass, samples on the device and
//! sends each sequence its token. It never waits on a client: per-request
//! channels hold every event a request can produce.

pub mod offline;
mod request;
pub mod scheduler;
pub mod slots;
mod step_loop;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

pub use request::{EngineError, Event, FinishReason, Request, SubmitError};

use crate::metrics::Metrics;
use crate::model::{ModelConfig, ModelError, Runner};

/// Queue bound and scheduling knobs (the step size itself is the model's
/// `max_batch_tokens`).
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub max_queue: usize,
    pub prefill_chunk: usize,
    /// Ids at or above this are never sampled.
    pub valid_vocab: usize,
    /// Queue the next decode step before reading the tokens of the last
    /// (see `step_loop`).
    pub step_ahead: bool,
}

/// Facts about the loaded model that the API and logs need.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub config: ModelConfig,
    pub backend: String,
    pub slots: usize,
    pub state_bytes_per_slot: usize,
    pub valid_vocab: usize,
}

/// A request in the queue with the channel its events go to.
pub(crate) struct Submission {
    pub request: Request,
    pub events: tokio::sync::mpsc::Sender<Event>,
}

/// State shared between the handle and the engine thread.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    /// Queued, not yet admitted.
    pub queued: AtomicI64,
    /// Sequences holding a slot.
    pub running: AtomicI64,
    pub draining: AtomicBool,
    /// Set at the drain deadline: cut running sequences.
    pub abort: AtomicBool,
    /// Set when the loop has exited or a device error made it unusable.
    pub dead: AtomicBool,
    /// Asks the loop to end (process shutdown).
    pub stop: AtomicBool,
    /// Milliseconds since `epoch` at the loop's last turn.
    pub heartbeat_ms: AtomicU64,
    pub epoch: Instant,
}

/// The async side's handle on the engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    queue: SyncSender<Submission>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    /// The loop's thread, joined by [`EngineHandle::stop`].
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The receiving end of one request's events.
pub type EventStream = tokio::sync::mpsc::Receiver<Event>;

impl EngineHandle {
    /// Starts the engine thread. `load` runs on that thread (so the device
    /// context lives there); this returns once it has succeeded or failed.
    pub fn spawn<F>(load: F, opts: EngineOptions, metrics: Arc<Metrics>) -> Result<EngineHandle, ModelError>
    where
        F: FnOnce() -> Result<Box<dyn Runner>, ModelError> + Send + 'static,
    {
        let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel::<Submission>(opts.max_queue);
        let shared = Arc::new(Shared {
            metrics,
            queued: AtomicI64::new(0),
            running: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<EngineInfo, ModelError>>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // Whatever happens, the handle learns the loop is gone.
                struct Dead(Arc<Shared>);
                impl Drop for Dead {
                    fn drop(&mut self) {
                        self.0.dead.store(true, Ordering::SeqCst);
                    }
                }
                let _dead = Dead(thread_shared.clone());
                let runner = match load() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let o = runner.options();
                let info = EngineInfo {
                    config: runner.config().clone(),
                    backend: runner.backend_name(),
                    slots: o.n_slots,
                    state_bytes_per_slot: runner.slot_len() * 4,
                    valid_vocab: opts.valid_vocab.min(runner.config().vocab_size),
                };
                let _ = ready_tx.send(Ok(info));
                step_loop::run(runner, queue_rx, thread_shared, opts);
            })
            .map_err(|e| ModelError::Batch(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| ModelError::Batch("the engine thread died while loading".into()))??;
        shared.metrics.slots_total.store(info.slots as i64, Ordering::Relaxed);
        shared.metrics.state_bytes_per_slot.store(info.state_bytes_per_slot as i64, Ordering::Relaxed);
        Ok(EngineHandle { queue: queue_tx, shared, info: Arc::new(info), thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Queues a request, or refuses it at once.
    pub fn submit(&self, request: Request) -> Result<EventStream, SubmitError> {
        if self.shared.dead.load(Ordering::SeqCst) {
            return Err(SubmitError::Dead);
        }
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        // Every event a request can produce fits, so the engine never waits.
        let (tx, rx) = tokio::sync::mpsc::channel(request.max_tokens + 4);
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Submission { request, events: tx }) {
            Ok(()) => {
                self.shared.metrics.queue_depth.store(self.shared.queued.load(Ordering::SeqCst), Ordering::Relaxed);
                Ok(rx)
            }
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Dead,
                })
            }
        }
    }

    /// Stops admitting: new submissions are refused, queued ones fail with
    /// `Draining`, running ones continue.
    pub fn start_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Cuts running sequences with `Draining` (the drain deadline passed).
    pub fn abort_running(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
    }

    /// Ends the loop and waits for its thread, which releases the device
    /// before the process exits (device teardown racing a live thread can
    /// crash at exit). Whatever still runs fails with `Stopped`.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Sequences holding a slot plus requests queued.
    pub fn in_flight(&self) -> i64 {
        self.shared.running.load(Ordering::SeqCst) + self.shared.queued.load(Ordering::SeqCst)
    }

    /// The loop is alive and turned within `max_silence`.
    pub fn is_healthy(&self, max_silence: Duration) -> bool {
        if self.shared.dead.load(Ordering::SeqCst) {
            return false;
        }
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.shared.heartbeat_ms.load(Ordering::SeqCst)) <= max_silence.as_millis() as u64
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }
}
