//! The forward pass over a packed batch, the state pool and the workspace.
//!
//! One step takes any mix of sequences: prompt chunks (of any length,
//! continuing from whatever state the slot holds) and single generated
//! tokens. Every sequence's tokens are concatenated into one packed batch,
//! each layer runs once over all of them, and the logits of each sequence's
//! last token come back. A slot's state is reset by the caller when a new
//! sequence takes it.

use std::collections::{HashMap, VecDeque};

use super::ModelError;
use super::checkpoint::TensorSource;
use super::config::{Arch, ModelConfig};
use super::weights::{self, LayerWeights, LoadProgress, MixerWeights, Weights};
use crate::backend::{
    Backend, Mamba1Block, Mamba1DecodeBlock, Mamba1DecodeState, Mamba1ScanArgs, Mamba1Stack, Mamba1StackShape, Mamba2ScanArgs,
    NormedLinear, PAD_SLOT, Packed, PoolLayout, ProjConv, SampleRow, SampledToken, View, ViewMut,
};

/// Sizes fixed at load time: nothing is allocated per step.
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// State slots (concurrent sequences) in the pool; 0 chooses: from free
    /// memory on a GPU ([`DeviceOptions::pool_memory_fraction`]), 16 on the
    /// CPU.
    pub n_slots: usize,
    /// Most tokens one step may carry (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Most sequences one step may carry; 0: as many as the slots (at most
    /// `max_batch_tokens`).
    pub max_batch_seqs: usize,
}

/// How a model uses a device with memory and graphs of its own (ignored on
/// the CPU).
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Share of the device memory left free after the weights and the
    /// workspace that the state pool takes when `n_slots` is 0.
    pub pool_memory_fraction: f64,
    /// Record single-token steps as graphs per batch-size bucket and
    /// replay them.
    pub graphs: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions { pool_memory_fraction: 0.8, graphs: true }
    }
}

/// Slots chosen on a backend without device memory when asked to choose.
const CPU_DEFAULT_SLOTS: usize = 16;

/// Batch sizes single-token steps are recorded at: a step of n sequences
/// runs the graph of the smallest bucket >= n, the rest of it padding.
/// 1, 2, 4, 8, 16, then four steps between powers of two (16, 20, ... 32,
/// 40, ... 64, 80, ...): every power of two is a bucket of its own (batch
/// limits usually are) and padding stays under a quarter.
fn graph_buckets(max: usize) -> Vec<usize> {
    let mut v = vec![];
    let mut b = 1;
    while b < max {
        v.push(b);
        // Below 16 double; above, a quarter of the power of two at or below.
        b = if b < 16 { b * 2 } else { b + (1usize << b.ilog2()) / 4 };
    }
    v.push(max);
    v
}

#[cfg(test)]
mod tests {
    use super::graph_buckets;

    #[test]
    fn graph_buckets_hit_every_power_of_two_with_little_padding() {
        let b = graph_buckets(1024);
        assert_eq!(&b[..9], &[1, 2, 4, 8, 16, 20, 24, 28, 32]);
        for p in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            assert!(b.contains(&p), "{p} missing from {b:?}");
        }
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        // A step of n runs the smallest bucket >= n: under 25 % padding above 16.
        for n in 17..=1024 {
            let g = *b.iter().find(|&&g| g >= n).unwrap();
            assert!((g - n) * 4 < n, "batch {n} pads to {g}");
        }
        assert_eq!(graph_buckets(300).last(), Some(&300));
        assert_eq!(graph_buckets(1), vec![1]);
    }
}

/// One sequence's share of a step: its slot and the tokens to run.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    /// Prompt tokens (true) or one generated token fed back (false).
    pub is_prompt: bool,
}

/// Recurrent states of all slots: conv windows and SSM states, f32.
struct StatePool<B: Backend> {
    conv: B::Vec,
    ssm: B::Vec,
    conv_layout: PoolLayout,
    ssm_layout: PoolLayout,
}

impl<B: Backend> StatePool<B> {
    /// The pools with the residual stream, as Mamba-1 decode takes them.
    fn decode_state<'a>(&'a mut self, residual: &'a mut B::Vec) -> Mamba1DecodeState<'a, B> {
        Mamba1DecodeState {
            residual,
            conv_state: &mut self.conv,
            conv_layout: self.conv_layout,
            ssm_state: &mut self.ssm,
            ssm_layout: self.ssm_layout,
        }
    }
}

/// Activation buffers for the largest step.
struct Workspace<B: Backend> {
    ids: B::Ids,
    cu: B::Ids,
    slots: B::Ids,
    prompt: B::Ids,
    last_rows: B::Ids,
    residual: B::Vec,
    normed: B::Vec,
    proj: B::Vec,
    conv_out: B::Vec,
    xdbl: B::Vec,
    dt: B::Vec,
    y: B::Vec,
    gated: B::Vec,
    last: B::Vec,
    logits: B::Vec,
}

/// Recorded single-token steps, by bucket.
struct Graphs<B: Backend> {
    enabled: bool,
    /// `None` until the backend was asked whether it records graphs.
    supported: Option<bool>,
    buckets: Vec<usize>,
    recorded: HashMap<usize, B::Graph>,
}

/// A loaded model on a backend, with its state pool.
pub struct Model<B: Backend> {
    backend: B,
    cfg: ModelConfig,
    weights: Weights<B>,
    pool: StatePool<B>,
    ws: Workspace<B>,
    opts: ModelOptions,
    graphs: Graphs<B>,
    /// Whether the backend runs a one-sequence decode step through all
    /// blocks as one op ([`Backend::mamba1_stack_step`]).
    stack: bool,
    /// Steps launched and not yet collected, oldest first.
    pending: VecDeque<PendingStep<B>>,
    /// The slots of the last step run when every chunk of it sampled a
    /// token and the tokens went into the workspace's ids on the device:
    /// the sequences a follow-up step may decode.
    fed_slots: Option<Vec<usize>>,
}

/// A launched step's samplings: each run of consecutive sampled chunks,
/// from its first chunk.
struct PendingStep<B: Backend> {
    chunks: usize,
    runs: Vec<(usize, B::Sampling)>,
}

/// The token a follow-up step's chunks name: the device feeds the real one.
const FED: [u32; 1] = [0];

impl<B: Backend> Model<B> {
    /// Settles dimensions from the tensors, uploads the weights and
    /// allocates the state pool and workspace.
    pub fn load(
        backend: B,
        cfg: ModelConfig,
        src: &dyn TensorSource,
        opts: ModelOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self, ModelError> {
        Self::load_with(backend, cfg, src, opts, DeviceOptions::default(), progress)
    }

    /// [`Model::load`] with explicit device options. The workspace is
    /// allocated before the state pool, so a pool sized from free memory
    /// takes only what is left.
    pub fn load_with(
        backend: B,
        cfg: ModelConfig,
        src: &dyn TensorSource,
        mut opts: ModelOptions,
        dev: DeviceOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self, ModelError> {
        if opts.max_batch_tokens == 0 {
            return Err(ModelError::Batch(format!("batch tokens must be positive: {opts:?}")));
        }
        if !(dev.pool_memory_fraction > 0.0 && dev.pool_memory_fraction <= 1.0) {
            return Err(ModelError::Batch(format!("pool memory fraction {} outside (0, 1]", dev.pool_memory_fraction)));
        }
        let cfg = weights::resolve_dims(cfg, src)?;
        let weights = weights::upload(&backend, &cfg, src, progress)?;
        // Sequences per step: as asked, else bounded by the tokens (and by
        // the slots once they are known).
        let seq_cap = if opts.max_batch_seqs > 0 {
            opts.max_batch_seqs
        } else if opts.n_slots > 0 {
            opts.n_slots.min(opts.max_batch_tokens)
        } else {
            opts.max_batch_tokens
        };
        let (t, s) = (opts.max_batch_tokens, seq_cap);
        let widest_input = cfg.hidden_size.max(cfg.d_inner).max(cfg.dt_rank);
        backend.reserve_scratch(t, widest_input, s, cfg.vocab_size)?;
        let d = cfg.hidden_size;
        let di = cfg.d_inner;
        let xdbl = match cfg.arch {
            Arch::Mamba2 => 0,
            _ => cfg.dt_rank + 2 * cfg.d_state,
        };
        let ws = Workspace {
            ids: backend.alloc_ids(t)?,
            cu: backend.alloc_ids(s + 1)?,
            slots: backend.alloc_ids(s)?,
            prompt: backend.alloc_ids(s)?,
            last_rows: backend.alloc_ids(s)?,
            residual: backend.alloc(t * d)?,
            normed: backend.alloc(t * d)?,
            proj: backend.alloc(t * cfg.in_proj_dim())?,
            conv_out: backend.alloc(t * cfg.conv_dim())?,
            xdbl: backend.alloc(t * xdbl)?,
            dt: backend.alloc(if cfg.arch == Arch::Mamba2 { 0 } else { t * di })?,
            y: backend.alloc(t * di)?,
            gated: backend.alloc(if cfg.arch == Arch::Mamba2 { t * di } else { 0 })?,
            last: backend.alloc(s * d)?,
            logits: backend.alloc(s * cfg.vocab_size)?,
        };
        // Before the pool, which may take what memory is left.
        let stack = match mamba1_blocks(&weights) {
            Some(blocks) => backend.prepare_mamba1_decode(&blocks, &stack_shape(&cfg))?,
            None => false,
        };
        let slot_bytes = 4 * (cfg.conv_state_len() + cfg.ssm_state_len()) * cfg.n_layers;
        if opts.n_slots == 0 {
            opts.n_slots = match backend.free_memory() {
                None => CPU_DEFAULT_SLOTS,
                Some(free) => {
                    let n = (free as f64 * dev.pool_memory_fraction / slot_bytes as f64) as usize;
                    if n == 0 {
                        return Err(ModelError::Batch(format!(
                            "{free} bytes of device memory are free after the weights; one state slot needs {slot_bytes}"
                        )));
                    }
                    n
                }
            };
        }
        if opts.max_batch_seqs == 0 {
            opts.max_batch_seqs = s.min(opts.n_slots);
        }
        let conv_layout = PoolLayout { n_slots: opts.n_slots, n_layers: cfg.n_layers, per_layer: cfg.conv_state_len() };
        let ssm_layout = PoolLayout { n_slots: opts.n_slots, n_layers: cfg.n_layers, per_layer: cfg.ssm_state_len() };
        let mut pool =
            StatePool { conv: backend.alloc(conv_layout.len())?, ssm: backend.alloc(ssm_layout.len())?, conv_layout, ssm_layout };
        // Every slot starts at the zero state: device memory comes back
        // holding whatever a freed buffer left there.
        backend.fill(&mut pool.conv, 0, conv_layout.len(), 0.0)?;
        backend.fill(&mut pool.ssm, 0, ssm_layout.len(), 0.0)?;
        tracing::info!(
            slots = opts.n_slots,
            bytes_per_slot = slot_bytes,
            pool_bytes = slot_bytes * opts.n_slots,
            max_batch_seqs = opts.max_batch_seqs,
            max_batch_tokens = opts.max_batch_tokens,
            "state pool allocated"
        );
        let graphs = Graphs {
            enabled: dev.graphs,
            supported: None,
            buckets: graph_buckets(opts.max_batch_seqs.min(opts.max_batch_tokens)),
            recorded: HashMap::new(),
        };
        Ok(Model { backend, cfg, weights, pool, ws, opts, graphs, stack, pending: VecDeque::new(), fed_slots: None })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn options(&self) -> ModelOptions {
        self.opts
    }

    /// f32 elements of one slot's state (conv part first, then SSM).
    pub fn slot_len(&self) -> usize {
        self.pool.conv_layout.per_slot() + self.pool.ssm_layout.per_slot()
    }

    fn check_slot(&self, slot: usize) -> Result<(), ModelError> {
        if slot < self.opts.n_slots {
            Ok(())
        } else {
            Err(ModelError::Batch(format!("slot {slot} outside the pool of {}", self.opts.n_slots)))
        }
    }

    /// Zeroes a slot's state: what a new sequence starts from.
    pub fn reset_slot(&mut self, slot: usize) -> Result<(), ModelError> {
        self.check_slot(slot)?;
        let (c, s) = (self.pool.conv_layout, self.pool.ssm_layout);
        self.backend.fill(&mut self.pool.conv, c.offset(slot, 0), c.per_slot(), 0.0)?;
        self.backend.fill(&mut self.pool.ssm, s.offset(slot, 0), s.per_slot(), 0.0)?;
        Ok(())
    }

    /// Copies the whole state of slot `from` into slot `to`.
    pub fn copy_slot(&mut self, from: usize, to: usize) -> Result<(), ModelError> {
        self.check_slot(from)?;
        self.check_slot(to)?;
        if from == to {
            return Ok(());
        }
        let (c, s) = (self.pool.conv_layout, self.pool.ssm_layout);
        self.backend.copy_within(&mut self.pool.conv, c.offset(from, 0), c.offset(to, 0), c.per_slot())?;
        self.backend.copy_within(&mut self.pool.ssm, s.offset(from, 0), s.offset(to, 0), s.per_slot())?;
        Ok(())
    }

    /// A host copy of a slot's state (conv part, then SSM part).
    pub fn read_slot(&self, slot: usize) -> Result<Vec<f32>, ModelError> {
        self.check_slot(slot)?;
        let (c, s) = (self.pool.conv_layout, self.pool.ssm_layout);
        let mut v = self.backend.read(&self.pool.conv, c.offset(slot, 0), c.per_slot())?;
        v.extend(self.backend.read(&self.pool.ssm, s.offset(slot, 0), s.per_slot())?);
        Ok(v)
    }

    /// Overwrites a slot's state with a copy made by [`Model::read_slot`].
    pub fn write_slot(&mut self, slot: usize, data: &[f32]) -> Result<(), ModelError> {
        self.check_slot(slot)?;
        if data.len() != self.slot_len() {
            return Err(ModelError::Batch(format!("state of {} values for slots of {}", data.len(), self.slot_len())));
        }
        let (c, s) = (self.pool.conv_layout, self.pool.ssm_layout);
        let (conv, ssm) = data.split_at(c.per_slot());
        self.backend.write(&mut self.pool.conv, c.offset(slot, 0), conv)?;
        self.backend.write(&mut self.pool.ssm, s.offset(slot, 0), ssm)?;
        Ok(())
    }

    /// Runs one step over `chunks` and returns the logits of each chunk's
    /// last token, `[chunks.len(), vocab_size]` row-major, on the host.
    pub fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, ModelError> {
        if chunks.is_empty() {
            return Ok(vec![]);
        }
        self.run(chunks, false)?;
        Ok(self.backend.read(&self.ws.logits, 0, chunks.len() * self.cfg.vocab_size)?)
    }

    /// Runs one step and samples a token for every chunk whose entry in
    /// `rows` is `Some` (the chunks that end a prompt or decode a token);
    /// the logits stay on the device.
    pub fn forward_sample(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<Vec<Option<SampledToken>>, ModelError> {
        if !self.pending.is_empty() {
            return Err(ModelError::Batch(format!("{} launched steps are not collected", self.pending.len())));
        }
        self.launch(chunks, rows)?;
        self.collect()
    }

    /// [`Model::forward_sample`] without waiting for the tokens: the step
    /// is queued on the device and [`Model::collect`] returns its tokens.
    pub fn launch(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<(), ModelError> {
        if chunks.len() != rows.len() {
            return Err(ModelError::Batch(format!("{} chunks but {} sampling rows", chunks.len(), rows.len())));
        }
        if chunks.is_empty() {
            self.fed_slots = None;
            self.pending.push_back(PendingStep { chunks: 0, runs: vec![] });
            return Ok(());
        }
        self.run(chunks, false)?;
        let rows: Vec<Option<&SampleRow>> = rows.iter().map(Option::as_ref).collect();
        self.start_sampling(&rows, chunks.iter().map(|c| c.slot).collect())
    }

    /// Queues a decode step for every sequence of the last step run, each
    /// fed the token that step sampled for it, straight from the device:
    /// the host need not have read those tokens yet. `rows` samples the
    /// step's tokens, one a sequence in the last step's order. Allowed only
    /// when every chunk of the last step sampled a token.
    pub fn launch_followup(&mut self, rows: &[SampleRow]) -> Result<(), ModelError> {
        let slots = self
            .fed_slots
            .take()
            .ok_or_else(|| ModelError::Batch("no step to follow: the last step did not sample a token for every chunk".into()))?;
        if rows.len() != slots.len() {
            return Err(ModelError::Batch(format!("a follow-up of {} sequences with {} sampling rows", slots.len(), rows.len())));
        }
        let chunks: Vec<SeqChunk<'_>> = slots.iter().map(|&slot| SeqChunk { slot, tokens: &FED, is_prompt: false }).collect();
        self.run(&chunks, true)?;
        self.start_sampling(&rows.iter().map(Some).collect::<Vec<_>>(), slots)
    }

    /// The tokens of the oldest launched step not yet collected, waiting
    /// for them. After an error no launched step is left.
    pub fn collect(&mut self) -> Result<Vec<Option<SampledToken>>, ModelError> {
        let step = self.pending.pop_front().ok_or_else(|| ModelError::Batch("no launched step to collect".into()))?;
        let mut out = vec![None; step.chunks];
        for (start, started) in step.runs {
            match self.backend.sample_finish(started) {
                Ok(tokens) => {
                    for (j, t) in tokens.into_iter().enumerate() {
                        out[start + j] = Some(t);
                    }
                }
                Err(e) => {
                    self.pending.clear();
                    self.fed_slots = None;
                    return Err(e.into());
                }
            }
        }
        Ok(out)
    }

    /// Starts sampling the logits of the step just run and queues it as
    /// pending. When every chunk samples, the tokens also go into the ids
    /// a follow-up step embeds.
    fn start_sampling(&mut self, rows: &[Option<&SampleRow>], slots: Vec<usize>) -> Result<(), ModelError> {
        let v = self.cfg.vocab_size;
        let every = rows.iter().all(Option::is_some);
        let mut runs = vec![];
        // Consecutive runs of chunks that want a token share one call.
        let mut i = 0;
        while i < rows.len() {
            if rows[i].is_none() {
                i += 1;
                continue;
            }
            let start = i;
            while i < rows.len() && rows[i].is_some() {
                i += 1;
            }
            let batch: Vec<&SampleRow> = rows[start..i].iter().map(|r| r.expect("checked Some")).collect();
            let logits = View { buf: &self.ws.logits, offset: start * v, rows: i - start, cols: v, stride: v };
            let feed = every.then_some(&mut self.ws.ids);
            runs.push((start, self.backend.sample_start(logits, &batch, feed)?));
        }
        self.pending.push_back(PendingStep { chunks: rows.len(), runs });
        self.fed_slots = every.then_some(slots);
        Ok(())
    }

    /// The forward pass proper: leaves `[chunks.len(), vocab]` logits in
    /// the workspace.
    /// With `fed`, the chunks' tokens are already in the workspace's ids
    /// (sampled there by the step before) and are not uploaded.
    fn run(&mut self, chunks: &[SeqChunk<'_>], fed: bool) -> Result<(), ModelError> {
        self.fed_slots = None;
        let n_seqs = chunks.len();
        let n_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if n_seqs > self.opts.max_batch_seqs || n_tokens > self.opts.max_batch_tokens {
            return Err(ModelError::Batch(format!(
                "{n_seqs} sequences / {n_tokens} tokens exceed the step limits {} / {}",
                self.opts.max_batch_seqs, self.opts.max_batch_tokens
            )));
        }
        let mut ids = Vec::with_capacity(n_tokens);
        let mut cu = Vec::with_capacity(n_seqs + 1);
        let mut slots = Vec::with_capacity(n_seqs);
        let mut seen = vec![false; self.opts.n_slots];
        cu.push(0u32);
        for c in chunks {
            if c.tokens.is_empty() {
                return Err(ModelError::Batch(format!("empty chunk for slot {}", c.slot)));
            }
            self.check_slot(c.slot)?;
            if std::mem::replace(&mut seen[c.slot], true) {
                return Err(ModelError::Batch(format!("slot {} appears twice in one step", c.slot)));
            }
            if let Some(&bad) = c.tokens.iter().filter(|_| !fed).find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::Batch(format!("token id {bad} outside the vocabulary of {}", self.cfg.vocab_size)));
            }
            ids.extend_from_slice(c.tokens);
            cu.push(ids.len() as u32);
            slots.push(c.slot as u32);
        }
        let mut prompt: Vec<u32> = chunks.iter().map(|c| c.is_prompt as u32).collect();
        let single_token = n_tokens == n_seqs;

        if single_token && self.graphs.enabled && self.graphs.supported != Some(false) {
            // Pad to the bucket: padding rows feed token 0 into no slot.
            let bucket = self.graphs.buckets.iter().copied().find(|&b| b >= n_seqs).unwrap_or(n_seqs);
            ids.resize(bucket, 0);
            slots.resize(bucket, PAD_SLOT);
            prompt.resize(bucket, 0);
            let cu: Vec<u32> = (0..=bucket as u32).collect();
            self.upload_step((!fed).then_some(&ids[..]), &cu, &slots, &prompt, &[])?;
            if let Some(g) = self.graphs.recorded.get(&bucket) {
                return Ok(self.backend.replay(g)?);
            }
            if self.backend.begin_capture()? {
                self.graphs.supported = Some(true);
                let recorded = self.ops(bucket, bucket, true);
                // End the recording whatever happened, so the device is usable.
                let graph = self.backend.end_capture();
                recorded?;
                let graph = graph?;
                self.backend.replay(&graph)?;
                self.graphs.recorded.insert(bucket, graph);
                return Ok(());
            }
            self.graphs.supported = Some(false);
            ids.truncate(n_seqs);
            slots.truncate(n_seqs);
            prompt.truncate(n_seqs);
        }
        let last_rows: Vec<u32> = cu[1..].iter().map(|&e| e - 1).collect();
        self.upload_step((!fed).then_some(&ids[..]), &cu, &slots, &prompt, &last_rows)?;
        self.ops(n_tokens, n_seqs, single_token)
    }

    /// Writes a step's inputs to the workspace (the ids unless the device
    /// has put them there).
    fn upload_step(&mut self, ids: Option<&[u32]>, cu: &[u32], slots: &[u32], prompt: &[u32], last_rows: &[u32]) -> Result<(), ModelError> {
        let (b, ws) = (&self.backend, &mut self.ws);
        if let Some(ids) = ids {
            b.write_ids(&mut ws.ids, ids)?;
        }
        b.write_ids(&mut ws.cu, cu)?;
        b.write_ids(&mut ws.slots, slots)?;
        b.write_ids(&mut ws.prompt, prompt)?;
        if !last_rows.is_empty() {
            b.write_ids(&mut ws.last_rows, last_rows)?;
        }
        Ok(())
    }

    /// The device work of one step over the uploaded inputs: only backend
    /// ops, so it can be recorded as a graph.
    fn ops(&mut self, n_tokens: usize, n_seqs: usize, single_token: bool) -> Result<(), ModelError> {
        let Model { backend: b, cfg, weights: w, pool, ws, stack, .. } = self;
        let d = cfg.hidden_size;
        // The residual stream: each block reads its RMS norm (fused into
        // in_proj) and adds its mixer's output back (fused into out_proj).
        b.embed(&w.embed, &ws.ids, n_tokens, &mut ws.residual)?;
        let (p, cd) = (cfg.in_proj_dim(), cfg.conv_dim());
        // Mamba-1 splits in_proj into x | z, Mamba-2 into z | xBC | dt; the
        // conv runs over x (xBC).
        let conv_start = if cfg.arch == Arch::Mamba2 { cfg.d_inner } else { 0 };
        let batch = Packed { n_tokens, n_seqs, cu_seqlens: &ws.cu, slots: &ws.slots, prompt: &ws.prompt, single_token };
        // One sequence's decode token: every block in one op where the
        // backend has it.
        let one_token = *stack && single_token && n_seqs == 1;
        let shape = stack_shape(cfg);
        let fused = match one_token.then(|| mamba1_blocks(w)).flatten() {
            Some(blocks) => {
                let args = Mamba1Stack { blocks: &blocks, shape, state: pool.decode_state(&mut ws.residual) };
                b.mamba1_stack_step(args, &batch)?
            }
            None => false,
        };
        let layers = w.layers.len();
        for (l, lw) in w.layers.iter().enumerate().filter(|_| !fused) {
            // A Mamba-1 block at decode: one op, so that a backend can fuse
            // across its entry and its tail.
            if let Some(block) = mamba1_block(lw).filter(|_| single_token) {
                let args = Mamba1DecodeBlock {
                    block,
                    shape,
                    layer: l,
                    layers,
                    state: pool.decode_state(&mut ws.residual),
                    normed: &mut ws.normed,
                    proj: &mut ws.proj,
                    conv_out: &mut ws.conv_out,
                    xdbl: &mut ws.xdbl,
                    y: &mut ws.y,
                };
                b.mamba1_decode_block(args, &batch)?;
                continue;
            }
            let conv = ProjConv {
                start: conv_start,
                channels: cd,
                weight: &lw.conv_w,
                bias: lw.conv_b.as_ref(),
                kernel: cfg.d_conv,
                activation: cfg.activation,
                state: &mut pool.conv,
                layout: pool.conv_layout,
                layer: l,
            };
            let entry = NormedLinear {
                x: &ws.residual,
                rows: n_tokens,
                norm: &lw.norm,
                eps: cfg.norm_eps,
                w: &lw.in_proj,
                bias: lw.in_proj_bias.as_ref(),
            };
            let (proj, conv_out) = (ViewMut::dense(&mut ws.proj, n_tokens, p), ViewMut::dense(&mut ws.conv_out, n_tokens, cd));
            b.rmsnorm_linear_conv(entry, &mut ws.normed, proj, conv, &batch, conv_out)?;
            let bufs = MixerBuffers {
                proj: &ws.proj,
                conv_out: &ws.conv_out,
                xdbl: &mut ws.xdbl,
                dt: &mut ws.dt,
                y: &mut ws.y,
                gated: &mut ws.gated,
                residual: &mut ws.residual,
            };
            mixer(b, cfg, lw, l, pool, &batch, bufs)?;
        }
        // With one token per sequence, row i is sequence i's last token.
        let last = if single_token {
            &ws.residual
        } else {
            b.gather_rows(View::dense(&ws.residual, n_tokens, d), &ws.last_rows, n_seqs, ViewMut::dense(&mut ws.last, n_seqs, d))?;
            &ws.last
        };
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        let v = cfg.vocab_size;
        let logits = ViewMut::dense(&mut ws.logits, n_seqs, v);
        let head = NormedLinear { x: last, rows: n_seqs, norm: &w.norm_f, eps: cfg.norm_eps, w: head, bias: None };
        b.rmsnorm_linear(head, &mut ws.normed, logits)?;
        Ok(())
    }
}

/// Every block's weights for [`Backend::mamba1_stack_step`], when the
/// model is Mamba-1 (or Falcon-Mamba).
fn mamba1_blocks<B: Backend>(w: &Weights<B>) -> Option<Vec<Mamba1Block<'_, B>>> {
    w.layers.iter().map(mamba1_block).collect()
}

/// A block's weights as [`Mamba1Block`], when it is a Mamba-1 block.
fn mamba1_block<B: Backend>(lw: &LayerWeights<B>) -> Option<Mamba1Block<'_, B>> {
    match &lw.mixer {
        MixerWeights::Selective { x_proj, dt_proj, dt_bias, a, d } => Some(Mamba1Block {
            norm: &lw.norm,
            in_proj: &lw.in_proj,
            in_proj_bias: lw.in_proj_bias.as_ref(),
            conv_w: &lw.conv_w,
            conv_b: lw.conv_b.as_ref(),
            x_proj,
            dt_proj,
            dt_bias,
            a,
            skip: d,
            out_proj: &lw.out_proj,
            out_proj_bias: lw.out_proj_bias.as_ref(),
        }),
        MixerWeights::Ssd { .. } => None,
    }
}

fn stack_shape(cfg: &ModelConfig) -> Mamba1StackShape {
    Mamba1StackShape {
        d_model: cfg.hidden_size,
        d_inner: cfg.d_inner,
        d_state: cfg.d_state,
        dt_rank: cfg.dt_rank,
        d_conv: cfg.d_conv,
        activation: cfg.activation,
        norm_eps: cfg.norm_eps,
        mixer_norm_eps: (cfg.arch == Arch::FalconMamba).then_some(cfg.mixer_rms_eps),
    }
}

/// The workspace buffers one mixer reads and writes: it starts from
/// in_proj's output and the conv's, and adds out_proj's onto the residual
/// stream.
struct MixerBuffers<'a, B: Backend> {
    proj: &'a B::Vec,
    conv_out: &'a B::Vec,
    xdbl: &'a mut B::Vec,
    dt: &'a mut B::Vec,
    y: &'a mut B::Vec,
    gated: &'a mut B::Vec,
    residual: &'a mut B::Vec,
}

/// One mixer (the block minus its norm and residual add).
fn mixer<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    lw: &LayerWeights<B>,
    layer: usize,
    pool: &mut StatePool<B>,
    batch: &Packed<'_, B>,
    m: MixerBuffers<'_, B>,
) -> Result<(), ModelError> {
    let t = batch.n_tokens;
    let (d, di, n) = (cfg.hidden_size, cfg.d_inner, cfg.d_state);
    let p = cfg.in_proj_dim();
    let cd = cfg.conv_dim();
    let proj = View::dense(m.proj, t, p);
    // Mamba-1's z follows x in in_proj, Mamba-2's comes first.
    let z = match cfg.arch {
        Arch::Mamba2 => proj.columns(0, di),
        _ => proj.columns(di, di),
    };
    let xc = View::dense(m.conv_out, t, cd);

    match &lw.mixer {
        MixerWeights::Selective { x_proj, dt_proj, dt_bias, a, d: skip } => {
            let r = cfg.dt_rank;
            let w = r + 2 * n;
            b.linear(xc, x_proj, None, ViewMut::dense(m.xdbl, t, w))?;
            if cfg.arch == Arch::FalconMamba {
                b.rms_norm_columns(ViewMut::dense(m.xdbl, t, w), &[(0, r), (r, n), (r + n, n)], cfg.mixer_rms_eps)?;
            }
            let xdbl = View::dense(&*m.xdbl, t, w);
            b.linear(xdbl.columns(0, r), dt_proj, None, ViewMut::dense(m.dt, t, di))?;
            let args = Mamba1ScanArgs {
                x: xc,
                dt: View::dense(&*m.dt, t, di),
                dt_bias,
                a,
                b: xdbl.columns(r, n),
                c: xdbl.columns(r + n, n),
                skip,
                z,
                state: &mut pool.ssm,
                layout: pool.ssm_layout,
                layer,
                d_state: n,
            };
            b.mamba1_scan(args, batch, ViewMut::dense(m.y, t, di))?;
            b.linear_add(View::dense(&*m.y, t, di), &lw.out_proj, lw.out_proj_bias.as_ref(), ViewMut::dense(m.residual, t, d))?;
        }
        MixerWeights::Ssd { dt_bias, a, d: skip, norm } => {
            let gn = cfg.n_groups * n;
            let args = Mamba2ScanArgs {
                x: xc.columns(0, di),
                dt: proj.columns(di + cd, cfg.n_heads),
                dt_bias,
                a,
                b: xc.columns(di, gn),
                c: xc.columns(di + gn, gn),
                skip,
                dt_limit: cfg.time_step_limit,
                n_heads: cfg.n_heads,
                head_dim: cfg.head_dim,
                n_groups: cfg.n_groups,
                d_state: n,
                state: &mut pool.ssm,
                layout: pool.ssm_layout,
                layer,
            };
            b.mamba2_scan(args, batch, ViewMut::dense(m.y, t, di))?;
            // Normalised per group, as the original Mamba-2 (see DESIGN §4).
            let group = di / cfg.n_groups;
            b.gated_rmsnorm(View::dense(&*m.y, t, di), z, norm, cfg.norm_eps, group, ViewMut::dense(m.gated, t, di))?;
            b.linear_add(View::dense(&*m.gated, t, di), &lw.out_proj, lw.out_proj_bias.as_ref(), ViewMut::dense(m.residual, t, d))?;
        }
    }
    Ok(())
}

/// A loaded model behind a backend chosen at run time: what the engine and
/// the CLI hold. Object-safe, so one binary serves on any backend.
pub trait Runner: Send {
    fn config(&self) -> &ModelConfig;
    fn options(&self) -> ModelOptions;
    /// One line naming the backend and device.
    fn backend_name(&self) -> String;
    /// f32 values in one slot's state.
    fn slot_len(&self) -> usize;
    /// Host logits of each chunk's last token (tests and tools).
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, ModelError>;
    /// One step, sampling on the device where `rows[i]` is `Some`.
    fn forward_sample(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<Vec<Option<SampledToken>>, ModelError>;
    /// [`Runner::forward_sample`] without waiting for its tokens
    /// ([`Runner::collect`] returns them).
    fn launch(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<(), ModelError>;
    /// Queues a decode step for every sequence of the last launched step,
    /// fed on the device with the tokens that step sampled, before the host
    /// has them: the step runs while the host reads the last one's tokens.
    /// Only after a step that sampled a token for every chunk.
    fn launch_followup(&mut self, rows: &[SampleRow]) -> Result<(), ModelError>;
    /// Waits for the oldest launched step's tokens.
    fn collect(&mut self) -> Result<Vec<Option<SampledToken>>, ModelError>;
    fn reset_slot(&mut self, slot: usize) -> Result<(), ModelError>;
    fn copy_slot(&mut self, from: usize, to: usize) -> Result<(), ModelError>;
    fn read_slot(&self, slot: usize) -> Result<Vec<f32>, ModelError>;
    fn write_slot(&mut self, slot: usize, data: &[f32]) -> Result<(), ModelError>;
    /// Device kernel launches and library calls issued so far (0 where the
    /// backend does not count them); a graph replay counts once.
    fn launches(&self) -> u64 {
        0
    }
}

impl<B: Backend> Runner for Model<B> {
    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }
    fn options(&self) -> ModelOptions {
        Model::options(self)
    }
    fn backend_name(&self) -> String {
        self.backend.describe()
    }
    fn slot_len(&self) -> usize {
        Model::slot_len(self)
    }
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, ModelError> {
        Model::forward(self, chunks)
    }
    fn forward_sample(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<Vec<Option<SampledToken>>, ModelError> {
        Model::forward_sample(self, chunks, rows)
    }
    fn launch(&mut self, chunks: &[SeqChunk<'_>], rows: &[Option<SampleRow>]) -> Result<(), ModelError> {
        Model::launch(self, chunks, rows)
    }
    fn launch_followup(&mut self, rows: &[SampleRow]) -> Result<(), ModelError> {
        Model::launch_followup(self, rows)
    }
    fn collect(&mut self) -> Result<Vec<Option<SampledToken>>, ModelError> {
        Model::collect(self)
    }
    fn reset_slot(&mut self, slot: usize) -> Result<(), ModelError> {
        Model::reset_slot(self, slot)
    }
    fn copy_slot(&mut self, from: usize, to: usize) -> Result<(), ModelError> {
        Model::copy_slot(self, from, to)
    }
    fn read_slot(&self, slot: usize) -> Result<Vec<f32>, ModelError> {
        Model::read_slot(self, slot)
    }
    fn write_slot(&mut self, slot: usize, data: &[f32]) -> Result<(), ModelError> {
        Model::write_slot(self, slot, data)
    }
    fn launches(&self) -> u64 {
        self.backend.launches()
    }
}
