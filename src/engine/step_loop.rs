//! The step loop: the one thread that owns the model.
//!
//! Each turn: admit queued requests into free slots (resetting the slot's
//! state), drop sequences whose client went away, plan the step, run one
//! batched forward pass with sampling, and send every sequence its token or
//! its end. A failed step fails the sequences in it and frees their slots;
//! the loop goes on serving.
//!
//! Steps overlap the host: while the host waits for a step's tokens, the
//! next step, when it is certain (every sequence decodes again), is already
//! queued, fed the tokens on the device. A slot freed meanwhile is reset
//! after that step in the device's order, and the sequence that takes it
//! runs only once that step is collected.

use std::collections::HashMap;
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
    /// Unique for the engine's life (slots are reused).
    id: u64,
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

/// A step queued on the device whose tokens are not yet read.
struct Launched {
    items: Vec<LaunchedItem>,
    started: Instant,
}

/// One chunk of a launched step.
struct LaunchedItem {
    /// The sequence's `Running::id`.
    seq: u64,
    decode: bool,
    tokens: usize,
    /// Whether the chunk samples a token.
    sampled: bool,
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
    /// Ids given to admitted sequences.
    admitted: u64,
    /// The step queued ahead, collected next turn.
    in_flight: Option<Launched>,
    /// When the last step's tokens were read.
    collected_at: Instant,
}

pub(super) fn run(runner: Box<dyn Runner>, queue: Receiver<Submission>, shared: Arc<Shared>, opts: EngineOptions) {
    let model = runner.options();
    let budget = Budget { max_tokens: model.max_batch_tokens, max_seqs: model.max_batch_seqs, prefill_chunk: opts.prefill_chunk };
    let mut l = Loop {
        slots: SlotAllocator::new(model.n_slots),
        runner,
        shared,
        opts,
        running: vec![],
        steps: 0,
        budget,
        admitted: 0,
        in_flight: None,
        collected_at: Instant::now(),
    };
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
        if l.running.is_empty() && l.in_flight.is_none() {
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
            self.admitted += 1;
            self.running.push(Running {
                id: self.admitted,
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

    /// One turn of decoding: the step in flight (or a new one from the
    /// plan) is collected and its tokens sent; where the next step is
    /// certain to be one decode token for each of the same sequences, it
    /// is queued first, fed on the device, so the device never waits for
    /// the host between steps.
    fn step(&mut self) {
        let current = match self.in_flight.take() {
            Some(l) => l,
            None => match self.launch_planned() {
                Some(l) => l,
                None => return,
            },
        };
        // Each running sequence's index by id; nothing leaves `running`
        // before the tokens below are sent.
        let index: HashMap<u64, usize> = self.running.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        let ahead = self.launch_ahead(&current, &index);
        let result = self.runner.collect();
        let now = Instant::now();
        self.shared.metrics.step.observe(now.duration_since(current.started.max(self.collected_at)).as_secs_f64());
        self.collected_at = now;
        let sampled = match result {
            Ok(s) => s,
            Err(e) => {
                // Nothing launched is left (`collect`'s contract): a step
                // queued ahead fails with this one.
                self.note_error(&e);
                let msg = e.to_string();
                let failed = current.items.iter().filter_map(|i| index.get(&i.seq));
                self.retire(failed.map(|&i| (i, Exit::Failed(EngineError::StepFailed(msg.clone())))).collect());
                return;
            }
        };
        let mut done: Vec<(usize, Exit)> = vec![];
        for (item, token) in current.items.iter().zip(sampled) {
            // A sequence that ended while its step was queued behind
            // another: its token is dropped.
            let Some(&seq) = index.get(&item.seq) else { continue };
            let r = &mut self.running[seq];
            if item.decode {
                r.pending = None;
            } else {
                r.fed += item.tokens;
                self.shared.metrics.prompt_tokens.fetch_add(item.tokens as u64, Ordering::Relaxed);
            }
            let Some(t) = token else { continue };
            if r.request.stop_ids.contains(&t.token) {
                done.push((seq, Exit::Finished(FinishReason::StopToken(t.token))));
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
                    done.push((seq, Exit::Cancelled));
                    continue;
                }
                Err(TrySendError::Full(_)) => unreachable!("event channels hold max_tokens + 4 events"),
            }
            if r.generated >= r.request.max_tokens {
                done.push((seq, Exit::Finished(FinishReason::Length)));
            } else {
                r.pending = Some(t.token);
            }
        }
        if !done.is_empty() {
            self.retire(done);
        }
        self.in_flight = ahead;
    }

    /// Plans a step and launches it. None when there is nothing to run or
    /// the launch failed (its sequences are failed).
    fn launch_planned(&mut self) -> Option<Launched> {
        let states: Vec<SeqState> = self.running.iter().map(|r| SeqState { prompt_left: r.request.prompt.len() - r.fed }).collect();
        let plan = scheduler::plan(&states, self.budget, self.steps);
        self.steps += 1;
        if plan.is_empty() {
            return None;
        }
        let valid_vocab = self.opts.valid_vocab;
        let mut chunks = Vec::with_capacity(plan.len());
        let mut rows: Vec<Option<SampleRow>> = Vec::with_capacity(plan.len());
        let mut items = Vec::with_capacity(plan.len());
        for item in &plan {
            let r = &self.running[item.seq];
            let sampled = if item.decode {
                let token = r.pending.as_ref().expect("a decoding sequence has a pending token");
                chunks.push(SeqChunk { slot: r.slot, tokens: std::slice::from_ref(token), is_prompt: false });
                rows.push(Some(r.history.row(&r.request.params, r.generated as u64, valid_vocab)));
                true
            } else {
                let end = r.fed + item.tokens;
                chunks.push(SeqChunk { slot: r.slot, tokens: &r.request.prompt[r.fed..end], is_prompt: true });
                let last = end == r.request.prompt.len();
                rows.push(last.then(|| r.history.row(&r.request.params, 0, valid_vocab)));
                last
            };
            items.push(LaunchedItem { seq: r.id, decode: item.decode, tokens: item.tokens, sampled });
        }
        let started = Instant::now();
        let result = self.runner.launch(&chunks, &rows);
        drop(chunks);
        if let Err(e) = result {
            self.note_error(&e);
            let msg = e.to_string();
            self.retire(plan.iter().map(|i| (i.seq, Exit::Failed(EngineError::StepFailed(msg.clone())))).collect());
            return None;
        }
        Some(Launched { items, started })
    }

    /// Queues the step after `current` when it is known: every running
    /// sequence is in `current` and samples a token there, none has a
    /// penalty (which needs that token first), one at least may want
    /// another token, and nobody waits for a slot that could take them in.
    /// A sequence that `current` ends (by length or a stop id) loses its
    /// share of the step.
    fn launch_ahead(&mut self, current: &Launched, index: &HashMap<u64, usize>) -> Option<Launched> {
        if !self.opts.step_ahead || current.items.len() != self.running.len() || !current.items.iter().all(|i| i.sampled) {
            return None;
        }
        let s = &self.shared;
        if s.draining.load(Ordering::SeqCst) || s.abort.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
            return None;
        }
        if s.queued.load(Ordering::SeqCst) > 0 && self.slots.free() > 0 {
            return None;
        }
        let mut rows = Vec::with_capacity(current.items.len());
        let mut wanted = false;
        for item in &current.items {
            let r = &self.running[*index.get(&item.seq)?];
            if r.request.params.needs_history() || r.events.is_closed() {
                return None;
            }
            // The token `current` samples is this sequence's number
            // `generated`; this step samples the next, wasted on a sequence
            // that `current` ends (its slot is reset after it, in order).
            wanted |= r.generated + 1 < r.request.max_tokens;
            rows.push(r.history.row(&r.request.params, r.generated as u64 + 1, self.opts.valid_vocab));
        }
        if !wanted {
            return None;
        }
        let started = Instant::now();
        if let Err(e) = self.runner.launch_followup(&rows) {
            // `current` is still collected; its sequences carry on.
            self.note_error(&e);
            return None;
        }
        self.shared.metrics.steps_ahead.fetch_add(1, Ordering::Relaxed);
        let items = current.items.iter().map(|i| LaunchedItem { seq: i.seq, decode: true, tokens: 1, sampled: true }).collect();
        Some(Launched { items, started })
    }
}
