//! The step loop: the one thread that owns the model.
//!
//! Each turn: admit queued requests into free slots (resetting the slot's
//! state), drop sequences whose client went away, plan the step, run one
//! batched forward pass with sampling, and send every sequence its token or
//! its end. A failed step fails the sequences in it and frees their slots;
//! the loop goes on serving.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use super::scheduler::{self, Budget, SeqState};
use super::slots::SlotAllocator;
use super::{EngineError, EngineOptions, Event, FinishReason, Request, Shared, Submission};
use crate::backend::{BackendError, SampleRow};
use crate::model::{ModelError, Runner, SeqChunk};
use crate::sampling::TokenHistory;

/// A sequence holding a slot.
struct Running {
    request: Request,
    events: tokio::sync::mpsc::Sender<Event>,
    slot: usize,
    /// Prompt tokens already run.
    fed: usize,
    generated: usize,
    history: TokenHistory,
    /// The last sampled token, to be fed next step.
    pending: Option<u32>,
    last_token_at: Option<Instant>,
}

/// How a running sequence leaves the pool.
enum Exit {
    Finished(FinishReason),
    Failed(EngineError),
    /// The client went away; nobody to tell.
    Cancelled,
}

struct Loop {
    runner: Box<dyn Runner>,
    shared: Arc<Shared>,
    opts: EngineOptions,
    slots: SlotAllocator,
    running: Vec<Running>,
    steps: usize,
    budget: Budget,
}

pub(super) fn run(runner: Box<dyn Runner>, queue: Receiver<Submission>, shared: Arc<Shared>, opts: EngineOptions) {
    let model = runner.options();
    let budget = Budget { max_tokens: model.max_batch_tokens, max_seqs: model.max_batch_seqs, prefill_chunk: opts.prefill_chunk };
    let mut l = Loop { slots: SlotAllocator::new(model.n_slots), runner, shared, opts, running: vec![], steps: 0, budget };
    let mut queue_open = true;
    loop {
        l.beat();
        if l.shared.stop.load(Ordering::SeqCst) {
            let all: Vec<usize> = (0..l.running.len()).collect();
            l.retire(all.into_iter().map(|i| (i, Exit::Failed(EngineError::Stopped))).collect());
            while let Ok(sub) = queue.try_recv() {
                l.shared.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = sub.events.try_send(Event::Failed(EngineError::Stopped));
            }
            break;
        }
        if l.shared.abort.load(Ordering::SeqCst) {
            let all: Vec<usize> = (0..l.running.len()).collect();
            l.retire(all.into_iter().map(|i| (i, Exit::Failed(EngineError::Draining))).collect());
        }
        if queue_open {
            queue_open = l.admit(&queue);
        }
        l.drop_cancelled();
        l.publish();
        if l.running.is_empty() {
            if !queue_open {
                break;
            }
            continue;
        }
        l.step();
    }
    // The model (and its device memory) is released here, on this thread.
    drop(l);
    tracing::info!("engine loop finished");
}

impl Loop {
    fn beat(&self) {
        let ms = self.shared.epoch.elapsed().as_millis() as u64;
        self.shared.heartbeat_ms.store(ms, Ordering::SeqCst);
    }

    fn publish(&self) {
        let m = &self.shared.metrics;
        self.shared.running.store(self.running.len() as i64, Ordering::SeqCst);
        m.running.store(self.running.len() as i64, Ordering::Relaxed);
        m.slots_used.store(self.slots.used() as i64, Ordering::Relaxed);
        m.queue_depth.store(self.shared.queued.load(Ordering::SeqCst), Ordering::Relaxed);
    }

    /// Moves queued requests into free slots. Blocks briefly when there is
    /// nothing to run. Returns false once every handle is gone.
    fn admit(&mut self, queue: &Receiver<Submission>) -> bool {
        let draining = self.shared.draining.load(Ordering::SeqCst);
        loop {
            // While draining, pull everything to answer it; otherwise only
            // what free slots can take.
            if self.slots.free() == 0 && !draining {
                return true;
            }
            let next = if self.running.is_empty() {
                match queue.recv_timeout(Duration::from_millis(100)) {
                    Ok(s) => Ok(s),
                    Err(RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
                    Err(RecvTimeoutError::Disconnected) => Err(TryRecvError::Disconnected),
                }
            } else {
                queue.try_recv()
            };
            let sub = match next {
                Ok(s) => s,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let waited = sub.request.arrived.elapsed().as_secs_f64();
            if sub.events.is_closed() {
                self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if draining {
                let _ = sub.events.try_send(Event::Failed(EngineError::Draining));
                continue;
            }
            let slot = self.slots.take().expect("a free slot was checked above");
            if let Err(e) = self.runner.reset_slot(slot) {
                self.slots.give_back(slot);
                let _ = sub.events.try_send(Event::Failed(EngineError::StepFailed(e.to_string())));
                self.note_error(&e);
                continue;
            }
            self.shared.metrics.queue_wait.observe(waited);
            if sub.events.try_send(Event::Admitted { queue_seconds: waited }).is_err() {
                self.slots.give_back(slot);
                continue;
            }
            let history = TokenHistory::new(&sub.request.prompt);
            self.running.push(Running {
                request: sub.request,
                events: sub.events,
                slot,
                fed: 0,
                generated: 0,
                history,
                pending: None,
                last_token_at: None,
            });
            self.publish();
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].events.is_closed()).collect();
        if !gone.is_empty() {
            self.shared.metrics.cancelled.fetch_add(gone.len() as u64, Ordering::Relaxed);
            self.retire(gone.into_iter().map(|i| (i, Exit::Cancelled)).collect());
        }
    }

    /// Removes the sequences at the given indices (any order), telling each
    /// how it ended and returning its slot.
    fn retire(&mut self, mut exits: Vec<(usize, Exit)>) {
        // Highest index first: `swap_remove` then only moves sequences that
        // are staying.
        exits.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        exits.dedup_by_key(|e| e.0);
        for (i, exit) in exits {
            let r = self.running.swap_remove(i);
            match exit {
                Exit::Finished(reason) => {
                    let _ =
                        r.events.try_send(Event::Finished { reason, prompt_tokens: r.request.prompt.len(), generated_tokens: r.generated });
                }
                Exit::Failed(e) => {
                    let _ = r.events.try_send(Event::Failed(e));
                }
                Exit::Cancelled => {}
            }
            self.slots.give_back(r.slot);
        }
        self.publish();
    }

    fn note_error(&self, e: &ModelError) {
        self.shared.metrics.engine_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "engine step failed");
        // A device error may leave the device unusable: report unhealthy so
        // an orchestrator restarts the process.
        if matches!(e, ModelError::Backend(BackendError::Device { .. } | BackendError::OutOfMemory { .. })) {
            self.shared.dead.store(true, Ordering::SeqCst);
        }
    }

    fn step(&mut self) {
        let states: Vec<SeqState> = self.running.iter().map(|r| SeqState { prompt_left: r.request.prompt.len() - r.fed }).collect();
        let plan = scheduler::plan(&states, self.budget, self.steps);
        self.steps += 1;
        if plan.is_empty() {
            return;
        }
        let valid_vocab = self.opts.valid_vocab;
        let mut chunks = Vec::with_capacity(plan.len());
        let mut rows: Vec<Option<SampleRow>> = Vec::with_capacity(plan.len());
        for item in &plan {
            let r = &self.running[item.seq];
            if item.decode {
                let token = r.pending.as_ref().expect("a decoding sequence has a pending token");
                chunks.push(SeqChunk { slot: r.slot, tokens: std::slice::from_ref(token), is_prompt: false });
                rows.push(Some(r.history.row(&r.request.params, r.generated as u64, valid_vocab)));
            } else {
                let end = r.fed + item.tokens;
                chunks.push(SeqChunk { slot: r.slot, tokens: &r.request.prompt[r.fed..end], is_prompt: true });
                let last = end == r.request.prompt.len();
                rows.push(last.then(|| r.history.row(&r.request.params, 0, valid_vocab)));
            }
        }
        let started = Instant::now();
        let result = self.runner.forward_sample(&chunks, &rows);
        drop(chunks);
        self.shared.metrics.step.observe(started.elapsed().as_secs_f64());
        let sampled = match result {
            Ok(s) => s,
            Err(e) => {
                self.note_error(&e);
                let msg = e.to_string();
                self.retire(plan.iter().map(|i| (i.seq, Exit::Failed(EngineError::StepFailed(msg.clone())))).collect());
                return;
            }
        };
        let now = Instant::now();
        let mut done: Vec<(usize, Exit)> = vec![];
        for (item, token) in plan.iter().zip(sampled) {
            let r = &mut self.running[item.seq];
            if item.decode {
                r.pending = None;
            } else {
                r.fed += item.tokens;
                self.shared.metrics.prompt_tokens.fetch_add(item.tokens as u64, Ordering::Relaxed);
            }
            let Some(t) = token else { continue };
            if r.request.stop_ids.contains(&t.token) {
                done.push((item.seq, Exit::Finished(FinishReason::StopToken(t.token))));
                continue;
            }
            r.generated += 1;
            r.history.push(t.token);
            let m = &self.shared.metrics;
            m.generated_tokens.fetch_add(1, Ordering::Relaxed);
            match r.last_token_at {
                None => m.ttft.observe(now.duration_since(r.request.arrived).as_secs_f64()),
                Some(prev) => m.inter_token.observe(now.duration_since(prev).as_secs_f64()),
            }
            r.last_token_at = Some(now);
            match r.events.try_send(Event::Token { id: t.token, logprob: t.logprob, top: t.top }) {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => {
                    self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    done.push((item.seq, Exit::Cancelled));
                    continue;
                }
                Err(TrySendError::Full(_)) => unreachable!("event channels hold max_tokens + 4 events"),
            }
            if r.generated >= r.request.max_tokens {
                done.push((item.seq, Exit::Finished(FinishReason::Length)));
            } else {
                r.pending = Some(t.token);
            }
        }
        if !done.is_empty() {
            self.retire(done);
        }
    }
}
