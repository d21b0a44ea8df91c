//! The CUDA backend: the same ops as the CPU oracle, on one GPU.
//!
//! cudarc with dynamic loading, so a binary built here runs on machines
//! without CUDA (then [`CudaBackend::new`] reports why the GPU is not usable
//! and the caller falls back to the CPU). Kernels come from `kernels/*.cu`,
//! compiled at start-up by NVRTC for the device ([`kernels`]); large matrix
//! products go through cuBLAS with fp32 accumulation ([`blas`]); sampling
//! runs on the device ([`sample`]).
//!
//! Everything runs on one non-default stream, in order, so the ops can be
//! recorded into CUDA graphs and replayed (`Backend::begin_capture`).
//! Weights keep their stored dtype; activations and states are f32.
//! A device error is returned as [`BackendError::Device`], never hidden;
//! after one, the context is unusable and every later call fails too.

mod blas;
mod block;
pub mod ceilings;
mod kernels;
mod sample;
mod stack;
mod tail;

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaGraph, CudaStream, result, sys};

use self::blas::{Blas, Gemm};
use self::kernels::{Args, Kernel, Kernels};
use super::checks::{self, check};
use super::{
    Backend, BackendError, ConvArgs, DType, HostMatrix, Mamba1Block, Mamba1DecodeBlock, Mamba1ScanArgs, Mamba1Stack, Mamba1StackShape,
    Mamba1StepArgs, Mamba1TailArgs, Mamba2ScanArgs, NormedLinear, Packed, ProjConv, Result, SampleRow, SampledToken, View, ViewMut,
};
use super::{mamba1_tail_ops, rmsnorm_linear_then_conv};

/// `n` rounded up to a multiple of 16 bytes (shared-memory layouts).
fn r16(n: usize) -> usize {
    n.next_multiple_of(16)
}

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Up to this many rows, products use the GEMV kernel (f32 activations).
const GEMV_MAX_ROWS: usize = 8;
/// A GEMV grid takes more output columns per block only while it keeps at
/// least this many blocks (about 8 per multiprocessor).
const GEMV_MIN_BLOCKS: usize = 1024;
/// 16-byte weight chunks per column each GEMV thread reads (its share of K).
const GEMV_CHUNKS_PER_THREAD: usize = 2;
/// Products with at least this many output columns use the streaming GEMV
/// (one column group per warp at least), with at most this many blocks of
/// 4 warps per multiprocessor.
const GEMV_STREAM_MIN_COLS: usize = 2048;
const GEMV_STREAM_BLOCKS_PER_SM: u32 = 8;
/// Except one-row products without a prologue or epilogue (out_proj at
/// batch 1): they take the block-split GEMV with SPLIT_COLS columns and
/// SPLIT_THREADS threads a block. Found by measurement on an H200
/// (docs/perf-notes.md, versions 14 and 15), not derived: mamba-2.8b's
/// out_proj (k 5120) 2.48 → 2.15 ms a step with 256 (2.39 with 128);
/// mamba-1.4b's (k 4096) was fastest at 128 while x_proj ran as its own
/// kernel before the step (1.18 against 1.24 ms), and is at 256 since
/// x_proj folds into in_proj (1.11–1.12 against 1.24 ms with 128).
const SPLIT_COLS: usize = 4;
const SPLIT_THREADS: u32 = 256;
/// The tiled prefill scan (`mamba1_scan_tiled`, d_state up to
/// SCAN_TILE_MAX_STATE): channels per block, tokens per staged chunk, and
/// floats per channel of a part summary (16 states, the sum of dt, padding).
const SCAN_TILE_MAX_STATE: usize = 16;
const SCAN_TILE_CHANNELS: usize = 32;
const SCAN_TILE_TOKENS: usize = 32;
const SCAN_RECORD: usize = 20;
/// A prefill scan whose grid would have fewer blocks than this many per
/// multiprocessor splits long segments in time, into parts of at least
/// SCAN_MIN_PART tokens and at most SCAN_MAX_PARTS parts (which bounds the
/// summaries), so that the grid fills the GPU (7 blocks of the output pass
/// fit on a multiprocessor). Each part but a segment's last is also run by
/// the summary pass, ~75% of the output pass's time per token. Measured on
/// an H200 (CUDA events, 10 launches averaged), one 2048-token segment of
/// 4096 channels: 274 µs unsplit (128 blocks), 146 µs in 5 parts, 142 µs in
/// 6 (what this gives), 148 µs in 7.
const SCAN_SPLIT_BLOCKS_PER_SM: usize = 5;
const SCAN_MIN_PART: usize = 128;
const SCAN_MAX_PARTS: usize = 64;
/// Packed rows per thread of the windowed conv1d (`CONV_RUN` in
/// kernels/conv.cu).
const CONV_RUN_ROWS: usize = 32;
/// Sequences per block of the decode conv step, and its largest kernel
/// (`kernels/conv.cu`).
const CONV_STEP_SEQS: u32 = 4;
const CONV_STEP_MAX_K: usize = 8;
/// Up to this many sequences, the fused decode step gives each thread one
/// state (more threads, shorter dependency chains) instead of four.
const STEP_ONE_STATE_MAX_SEQS: usize = 2;
/// Decode conv steps of at most this many sequences launch as programmatic
/// dependents ([`CudaBackend::launch_dependent`]).
const DEPENDENT_LAUNCH_MAX_SEQS: usize = 16;
/// The wide decode step (`kernels/step.cu`): sequences per group (one
/// thread updates a channel's states of a group) and stages of buffered
/// copies (two groups in flight while one is updated).
const STEP_WIDE_SEQS: usize = 4;
const STEP_WIDE_STAGES: usize = 3;
/// Floats of one sequence's part of a stage in the wide step's lean kernel
/// (`STEP_LEAN_SEQ` in `kernels/step.cu`).
const STEP_LEAN_SEQ_FLOATS: usize = 644;
/// Up to this many sequences, the decode step computes dt inside its kernel.
const STEP_FUSED_DT_MAX_SEQS: usize = 16;
/// Products of at most this many multiply-adds also stay on the exact f32
/// activation path (so tiny models match the CPU closely).
const SMALL_GEMM_MACS: usize = 1 << 24;
/// 16-bit products with k up to this (and a multiple of 8), f32
/// activations and at most SHORTK_MAX_ROWS rows take the short-k
/// tensor-core kernel instead of cuBLAS, which needs the activation
/// converted by a kernel of its own first (`kernels/shortk.cu`): dt_proj,
/// whose k is dt_rank, at decode batches. Measured on mamba-1.4b's dt_proj
/// (k 128, n 4096): 5.7 µs at 256 rows against 7.4 for the conversion and
/// cuBLAS; at 1024 rows and in prefill cuBLAS's pipelined kernels win.
const SHORTK_MAX_K: usize = 256;
const SHORTK_MAX_ROWS: usize = 256;
/// Its output tile (rows and columns), and threads a block.
const SHORTK_TILE: u32 = 64;
const SHORTK_THREADS: u32 = 256;

fn dev(op: &'static str) -> impl Fn(result::DriverError) -> BackendError {
    move |e| BackendError::Device { op, detail: e.to_string() }
}

/// How a GEMV combines its result with the output, and the RMS-norm
/// prologue (norm weight, eps) applied to x.
#[derive(Clone, Copy)]
struct GemvMode<'a> {
    accumulate: bool,
    norm: Option<(&'a CudaVec, f32)>,
    /// The conv step folded into the epilogue: `ConvEpilogue` of
    /// `kernels/gemv.cu`, as the words of its C layout.
    conv: Option<[u64; CONV_EPILOGUE_WORDS]>,
    /// x_proj folded into the conv epilogue (one row, streaming path):
    /// `XProjEpilogue` of `kernels/gemv.cu`, as the words of its C layout.
    xproj: Option<[u64; XPROJ_EPILOGUE_WORDS]>,
}

impl GemvMode<'_> {
    const STORE: GemvMode<'static> = GemvMode { accumulate: false, norm: None, conv: None, xproj: None };
}

/// 8-byte words of `XProjEpilogue` (32 bytes).
const XPROJ_EPILOGUE_WORDS: usize = 4;
/// The most x_proj outputs the fused epilogue sums (`XPROJ_MAX` in
/// `kernels/gemv.cu`: 32 lanes × XPROJ_J outputs each).
const XPROJ_MAX: usize = 288;

/// 8-byte words of `ConvEpilogue` (80 bytes).
const CONV_EPILOGUE_WORDS: usize = 10;

/// The activation operand of a cuBLAS product: f32 (rounded to the
/// weights' 16-bit type first when they have one), or already 16-bit.
enum GemmInput<'a> {
    F32(View<'a, CudaVec>),
    Half { ptr: u64, stride: usize, rows: usize },
}

impl GemmInput<'_> {
    fn rows(&self) -> usize {
        match self {
            GemmInput::F32(v) => v.rows,
            GemmInput::Half { rows, .. } => *rows,
        }
    }
}

/// Device memory owned by the backend: freed on drop, once the backend's
/// stream has finished with it.
pub struct DevBuf {
    ptr: u64,
    bytes: usize,
    stream: Arc<CudaStream>,
}

impl DevBuf {
    fn alloc(stream: &Arc<CudaStream>, bytes: usize, what: &'static str) -> Result<Self> {
        if bytes == 0 {
            return Ok(DevBuf { ptr: 0, bytes, stream: stream.clone() });
        }
        stream.context().bind_to_thread().map_err(dev("bind context"))?;
        // SAFETY: a plain allocation; the pointer is freed once, on drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory { what, bytes },
            _ => BackendError::Device { op: "alloc", detail: e.to_string() },
        })?;
        Ok(DevBuf { ptr, bytes, stream: stream.clone() })
    }

    /// Zeroes the first `bytes` bytes in stream order. (The synchronous
    /// memset runs on the legacy default stream, which the backend's
    /// non-blocking stream does not wait for: a zeroing queued there behind
    /// other work, another backend's in the same process included, could
    /// land after the writes and launches that follow it.)
    fn zero(&self, bytes: usize, what: &'static str) -> Result<()> {
        check(what, bytes <= self.bytes, || format!("zeroing {bytes} bytes of {}", self.bytes))?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: [ptr, ptr + bytes) lies inside this allocation (checked).
        unsafe { result::memset_d8_async(self.ptr, 0, bytes, self.stream.cu_stream()) }.map_err(dev(what))
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr == 0 || self.stream.context().bind_to_thread().is_err() {
            return;
        }
        // cuMemFree need not wait for queued work: without this wait a
        // buffer replaced while a launch still reads or writes it (a scratch
        // buffer grown, a stack table rebuilt) could be handed to another
        // allocation, another backend's in the same process included, and
        // the late launch would corrupt it. Buffers are dropped only outside
        // graph recording, rarely (growth, re-preparation, unloading).
        // SAFETY: plain stream synchronisation; the pointer was allocated by
        // malloc_sync and is freed only here.
        unsafe {
            let _ = result::stream::synchronize(self.stream.cu_stream());
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// f32 activations or states.
pub struct CudaVec {
    buf: DevBuf,
    len: usize,
}

/// u32 ids, offsets or slot indices.
pub struct CudaIds {
    buf: DevBuf,
    len: usize,
    /// What the last write put at the buffer's start (only writes put
    /// anything there): a write of the same ids is skipped, so a decode
    /// step re-sends only what changed (its token ids, not its slots).
    written: Vec<u32>,
}

/// A weight matrix `[rows, cols]` in its stored dtype.
pub struct CudaMat {
    buf: DevBuf,
    dtype: DType,
    rows: usize,
    cols: usize,
}

impl checks::Buffer for CudaVec {
    fn len(&self) -> usize {
        self.len
    }
}

impl checks::Buffer for CudaIds {
    fn len(&self) -> usize {
        self.len
    }
}

impl checks::Matrix for CudaMat {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

impl CudaVec {
    fn at(&self, offset: usize) -> u64 {
        self.buf.ptr + 4 * offset as u64
    }
}

/// A recorded CUDA graph (see `Backend::begin_capture`).
pub struct CudaGraphHandle(CudaGraph);

// SAFETY: a graph is launched only by the thread that owns the backend; it
// moves between threads only together with the backend, never shared.
unsafe impl Send for CudaGraphHandle {}

/// Pinned host memory that small uploads go through, so they do not wait
/// for the device. Space is reused after every synchronisation.
struct Staging {
    ptr: *mut u8,
    cap: usize,
    used: usize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed only here.
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

/// Buffers some ops need besides their arguments, sized at start-up
/// ([`Backend::reserve_scratch`]) or grown outside graph recording.
struct Scratch {
    /// 16-bit copies of activations for tensor-core products.
    half: DevBuf,
    /// The 16-bit copy a decode kernel writes of its output ([`HalfCopy`]).
    half_copy: DevBuf,
    /// Sampling: per-row parameters and outputs, processed logits, keys, weights.
    params: DevBuf,
    /// The words last uploaded into `params` (a batch with the same words
    /// skips the upload).
    params_words: Vec<u32>,
    out: DevBuf,
    proc: DevBuf,
    keys: DevBuf,
    weights: DevBuf,
    /// Plain greedy sampling split over blocks: each part's maximum, id and
    /// sum (16 bytes a part), and a counter a row (zero between launches).
    greedy: DevBuf,
    greedy_counts: DevBuf,
}

/// A dense 16-bit copy of an op's f32 output that the kernel writing the
/// output also wrote (the large-batch decode conv and step), so that the
/// tensor-core product reading that output next skips its conversion
/// kernel. Valid only until the next launch or copy: [`CudaBackend::launch_as`]
/// clears it, and the product takes it before launching anything.
#[derive(Clone, Copy, PartialEq)]
struct HalfCopy {
    /// Where the f32 output starts, and its shape.
    of: u64,
    rows: usize,
    cols: usize,
    stride: usize,
    dtype: DType,
}

/// The one-row block-split shape (columns a block, threads a block) from
/// `MAMBA_SERVE_SPLIT_OUT` (`R,T`, or `0` to stream), for comparisons;
/// else the default.
fn split_out_shape() -> Option<(usize, u32)> {
    std::env::var("MAMBA_SERVE_SPLIT_OUT").map_or(Some((SPLIT_COLS, SPLIT_THREADS)), |v| parse_split(&v))
}

/// `R,T` (or `R`: SPLIT_THREADS) as a block-split shape; `None` for
/// anything else (`0` among them).
fn parse_split(v: &str) -> Option<(usize, u32)> {
    let mut parts = v.split(',').map(|p| p.trim().parse::<usize>().ok());
    let r = parts.next().flatten().filter(|r| [1, 2, 4].contains(r))?;
    let threads = parts.next().flatten().map_or(SPLIT_THREADS, |t| t.next_multiple_of(32).clamp(32, 256) as u32);
    Some((r, threads))
}

/// One GPU, one stream, the compiled kernels and a cuBLAS handle.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: Blas,
    _blas_workspace: DevBuf,
    staging: RefCell<Staging>,
    scratch: RefCell<Scratch>,
    /// Pinned memory for sampled tokens, kept between samplings.
    readbacks: RefCell<Vec<sample::Readback>>,
    /// Time steps of a large decode batch (`mamba1_step`), `[rows, d_inner]`.
    step_dt: RefCell<CudaVec>,
    /// Per-part summaries of a time-split prefill scan.
    scan_parts: RefCell<DevBuf>,
    capturing: Cell<bool>,
    launches: Cell<u64>,
    /// Per-launch timing events, when `MAMBA_SERVE_CUDA_PROFILE` is set:
    /// a table of time per kernel is printed to stderr on drop.
    profile: Option<RefCell<Vec<(String, CudaEvent, CudaEvent)>>>,
    /// The instrumented kernels' record ring and the file it is written to
    /// on drop, when `MAMBA_SERVE_TIMELINE` names one (see
    /// `kernels/prelude.cu`, `tl_mark`).
    timeline: Option<(DevBuf, std::path::PathBuf)>,
    name: String,
    sm: (i32, i32),
    /// Multiprocessors.
    sms: u32,
    /// Launch small decode steps' kernels as programmatic dependents (sm_90
    /// and later; `MAMBA_SERVE_NO_PDL` turns it off, for comparisons).
    dependent_launch: bool,
    /// Whether the wide decode step takes its lean kernel where it can
    /// (`MAMBA_SERVE_NO_LEAN_STEP` turns it off, for comparisons).
    lean_step: bool,
    /// See [`HalfCopy`]: the copy in `scratch.half_copy`, if one is valid.
    half_copy: Cell<Option<HalfCopy>>,
    /// The 16-bit weight type of the last tensor-core product: the type a
    /// decode kernel writes its 16-bit copy in.
    half_type: Cell<Option<DType>>,
    /// Whether decode kernels write those copies (`MAMBA_SERVE_NO_HALF_COPY`
    /// turns it off, for comparisons).
    write_half_copies: bool,
    /// Whether short-k 16-bit products take their own kernel
    /// (`MAMBA_SERVE_NO_SHORTK` sends them to cuBLAS, for comparisons).
    short_k_products: bool,
    /// Whether the 4-tap decode conv may move its state through shared
    /// memory (`MAMBA_SERVE_NO_STAGED_CONV` turns it off, for comparisons).
    staged_conv: bool,
    /// Whether one-sequence Mamba-1 decode steps may run as one kernel,
    /// and the stack prepared for it (`stack.rs`). Off unless
    /// `MAMBA_SERVE_STACK` is set or [`CudaBackend::set_fused_stack`] turns
    /// it on: correct, but not yet faster than the per-layer kernels
    /// (docs/perf-notes.md, version 12).
    fused_stack: bool,
    stack: RefCell<Option<stack::Prepared>>,
    stack_launches: Cell<u64>,
    /// Whether one-sequence Mamba-1 decode tails (x_proj, the step,
    /// out_proj) run as one kernel (`tail.rs`). Off unless `MAMBA_SERVE_TAIL`
    /// is set or [`CudaBackend::set_fused_tail`] turns it on: correct, but
    /// only 1-2 % faster at mamba-1.4b and slower at the other shapes
    /// measured (docs/perf-notes.md, version 13). And its flags
    /// (`kernels/step.cu`): bit 0 lets the next kernel launch as soon as the
    /// kernel's copies are issued, unless `MAMBA_SERVE_TAIL_LATE` is set.
    fused_tail: bool,
    tail_flags: u32,
    /// Whether batches of plain greedy rows take the split sampling kernel
    /// (`MAMBA_SERVE_NO_SPLIT_GREEDY` turns it off, for comparisons).
    split_greedy: bool,
    /// One-row products with many columns and no prologue or epilogue
    /// (out_proj at batch 1) run as the block-split GEMV with (columns a
    /// block, threads a block) `split_out` rather than streaming
    /// (SPLIT_COLS, SPLIT_THREADS; `MAMBA_SERVE_SPLIT_OUT=R,T` sets another
    /// shape and `MAMBA_SERVE_SPLIT_OUT=0` streams them, for comparisons).
    split_out: Option<(usize, u32)>,
    /// Whether step inputs and sampling parameters equal to what the device
    /// holds are sent again (`MAMBA_SERVE_RESEND`, for comparisons).
    resend: bool,
    /// Sampled tokens reach the host by a copy after the kernels instead
    /// of being written into mapped host memory (for comparisons).
    copy_readback: bool,
    /// Whether one-sequence Mamba-1 decode blocks fold x_proj into
    /// in_proj's conv epilogue (`block.rs`; `MAMBA_SERVE_NO_FOLD_XPROJ`
    /// turns it off, for comparisons), the per-layer accumulators it adds
    /// into, and the blocks run so.
    fold_x_proj: bool,
    xproj_acc: RefCell<Option<block::Accumulators>>,
    xproj_folded: Cell<u64>,
    /// The fused tail's grid barrier word.
    tail_barrier: DevBuf,
    /// The last shape's tail plan (`None`: the kernel does not fit it).
    tail_plans: RefCell<tail::LastPlan>,
    tail_launches: Cell<u64>,
}

// SAFETY: the raw pointers inside (pinned staging memory, cuBLAS handle)
// are owned by this value and used only by the thread that holds it.
unsafe impl Send for CudaBackend {}

/// Why no CUDA library set can be used here, or `None` when they load.
fn missing_libraries() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries.
    let present = unsafe {
        [
            ("libcuda (the NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    (!missing.is_empty()).then(|| format!("cannot load {} (not installed or not on the library path)", missing.join(", ")))
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles the kernels and creates the cuBLAS
    /// handle. Fails with [`BackendError::Unavailable`] when there is no
    /// usable GPU, saying why.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = missing_libraries() {
            return Err(BackendError::Unavailable("cuda", why));
        }
        let unavailable = |what: &str, e: result::DriverError| BackendError::Unavailable("cuda", format!("{what}: {e}"));
        result::init().map_err(|e| unavailable("the driver did not initialise", e))?;
        let count = CudaContext::device_count().map_err(|e| unavailable("cannot count devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::Unavailable("cuda", format!("no GPU {ordinal}: {count} visible")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable("cannot open the GPU", e))?;
        // One stream, in order: cudarc's per-buffer events would only add
        // work, and they break graph capture.
        // SAFETY: no cudarc-managed buffer is shared across streams here.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev("create stream"))?;
        let sm = ctx.compute_capability().map_err(dev("compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(dev("device attribute"))?;
        let timeline = match std::env::var_os("MAMBA_SERVE_TIMELINE") {
            Some(path) => {
                let ring = DevBuf::alloc(&stream, TIMELINE_BYTES, "timeline ring")?;
                // The ring's record count, its first word.
                ring.zero(8, "timeline ring")?;
                Some((ring, std::path::PathBuf::from(path)))
            }
            None => None,
        };
        let tail_barrier = DevBuf::alloc(&stream, 4, "tail barrier")?;
        tail_barrier.zero(4, "tail barrier")?;
        let kernels = Kernels::compile(&ctx, sm.0, sm.1, timeline.as_ref().map(|(ring, _)| (ring.ptr, TIMELINE_RECORDS)), &stream)?;
        let workspace = DevBuf::alloc(&stream, blas::WORKSPACE_BYTES, "cuBLAS workspace")?;
        let blas = Blas::new(stream.cu_stream(), workspace.ptr)?;
        const STAGING: usize = 4 << 20;
        // SAFETY: pinned host allocation, freed by Staging's drop.
        let ptr = unsafe { result::malloc_host(STAGING, 0) }.map_err(dev("pinned host memory"))? as *mut u8;
        let staging = RefCell::new(Staging { ptr, cap: STAGING, used: 0 });
        let empty = || DevBuf::alloc(&stream, 0, "scratch");
        let step_dt = RefCell::new(CudaVec { buf: empty()?, len: 0 });
        let scan_parts = RefCell::new(empty()?);
        let scratch = RefCell::new(Scratch {
            half: empty()?,
            half_copy: empty()?,
            params: empty()?,
            params_words: vec![],
            out: empty()?,
            proc: empty()?,
            keys: empty()?,
            weights: empty()?,
            greedy: empty()?,
            greedy_counts: empty()?,
        });
        Ok(CudaBackend {
            ctx,
            stream,
            kernels,
            blas,
            _blas_workspace: workspace,
            staging,
            scratch,
            readbacks: RefCell::new(vec![]),
            step_dt,
            scan_parts,
            capturing: Cell::new(false),
            launches: Cell::new(0),
            profile: std::env::var_os("MAMBA_SERVE_CUDA_PROFILE").map(|_| RefCell::new(vec![])),
            timeline,
            name: format!("cuda:{ordinal} ({name}, sm_{}{})", sm.0, sm.1),
            sm,
            sms: sms.max(1) as u32,
            dependent_launch: sm.0 >= 9 && std::env::var_os("MAMBA_SERVE_NO_PDL").is_none(),
            lean_step: std::env::var_os("MAMBA_SERVE_NO_LEAN_STEP").is_none(),
            half_copy: Cell::new(None),
            half_type: Cell::new(None),
            write_half_copies: std::env::var_os("MAMBA_SERVE_NO_HALF_COPY").is_none(),
            short_k_products: std::env::var_os("MAMBA_SERVE_NO_SHORTK").is_none(),
            staged_conv: std::env::var_os("MAMBA_SERVE_NO_STAGED_CONV").is_none(),
            fused_stack: std::env::var_os("MAMBA_SERVE_STACK").is_some(),
            stack: RefCell::new(None),
            stack_launches: Cell::new(0),
            fused_tail: std::env::var_os("MAMBA_SERVE_TAIL").is_some(),
            tail_flags: std::env::var_os("MAMBA_SERVE_TAIL_LATE").is_none() as u32,
            split_greedy: std::env::var_os("MAMBA_SERVE_NO_SPLIT_GREEDY").is_none(),
            split_out: split_out_shape(),
            resend: std::env::var_os("MAMBA_SERVE_RESEND").is_some(),
            copy_readback: std::env::var_os("MAMBA_SERVE_COPY_READBACK").is_some(),
            fold_x_proj: std::env::var_os("MAMBA_SERVE_NO_FOLD_XPROJ").is_none(),
            xproj_acc: RefCell::new(None),
            xproj_folded: Cell::new(0),
            tail_barrier,
            tail_plans: RefCell::new(None),
            tail_launches: Cell::new(0),
        })
    }

    /// Lets models loaded after this run one-sequence Mamba-1 decode steps
    /// through the fused stack kernel (`stack.rs`), or stops them.
    pub fn set_fused_stack(&mut self, on: bool) {
        self.fused_stack = on;
    }

    /// Launches of the fused stack kernel so far (`stack.rs`).
    pub fn fused_stack_launches(&self) -> u64 {
        self.stack_launches.get()
    }

    /// Lets one-sequence Mamba-1 decode tails run as one kernel
    /// (`tail.rs`), or makes them run as three ops.
    pub fn set_fused_tail(&mut self, on: bool) {
        self.fused_tail = on;
    }

    /// Launches of the fused decode tail so far (`tail.rs`).
    pub fn fused_tail_launches(&self) -> u64 {
        self.tail_launches.get()
    }

    /// Decode blocks run with x_proj folded in so far (`block.rs`).
    pub fn x_proj_folded_blocks(&self) -> u64 {
        self.xproj_folded.get()
    }

    /// Bytes of shared memory a block may opt in to (the fused kernels'
    /// layouts are planned against it).
    fn max_shared_optin(&self) -> Result<usize> {
        let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        Ok(self.ctx.attribute(attr).map_err(dev("device attribute"))? as usize)
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.sm
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(dev("bind context"))
    }

    fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    fn launch(&self, k: Kernel, args: Args, grid: (u32, u32, u32), block: u32) -> Result<()> {
        self.launch_as(k, args, grid, block, false)
    }

    /// [`CudaBackend::launch`] as a programmatic dependent launch where
    /// the GPU has it: for the kernels of small decode steps (GEMVs, the
    /// fused step, the conv step of few sequences), whose 3–5 µs of ramp
    /// and drain then overlap. Each such kernel calls `grid_dep_sync` before
    /// reading anything but weights. Measured on an H200, it pays for small
    /// steps (mamba-130m batch 1: 0.416 → 0.350 ms a step; mamba-1.4b:
    /// 1.353 → 1.309 ms) and made no difference beyond noise at 64 to 1024
    /// sequences, so the large-batch kernels launch plainly.
    fn launch_dependent(&self, k: Kernel, args: Args, grid: (u32, u32, u32), block: u32) -> Result<()> {
        self.launch_as(k, args, grid, block, self.dependent_launch)
    }

    fn launch_as(&self, k: Kernel, args: Args, grid: (u32, u32, u32), block: u32, dependent: bool) -> Result<()> {
        self.half_copy.set(None);
        self.profiled(
            || format!("{k:?}"),
            || {
                self.launches.set(self.launches.get() + 1);
                args.launch(self.kernels.get(k), self.cu_stream(), grid, block, dependent)
            },
        )
    }

    /// Runs `f` (one launch), bracketed by timing events when profiling and
    /// not recording a graph.
    fn profiled(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(profile) = &self.profile else { return f() };
        if self.capturing.get() {
            return f();
        }
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(dev("event"))?;
        let end = self.ctx.new_event(flags).map_err(dev("event"))?;
        start.record(&self.stream).map_err(dev("event record"))?;
        f()?;
        end.record(&self.stream).map_err(dev("event record"))?;
        profile.borrow_mut().push((name(), start, end));
        Ok(())
    }

    fn no_capture(&self, op: &'static str) -> Result<()> {
        check(op, !self.capturing.get(), || "not allowed while a graph is being recorded".into())
    }

    /// Copies host bytes to the device through pinned staging memory.
    fn upload_bytes(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.half_copy.set(None);
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut st = self.staging.borrow_mut();
        if src.len() > st.cap {
            // Large uploads (weights) go straight from pageable memory.
            drop(st);
            // SAFETY: dst holds at least src.len() bytes (checked by callers);
            // a pageable copy has finished reading src when it returns.
            return unsafe { result::memcpy_htod_async(dst, src, self.cu_stream()) }.map_err(dev("upload"));
        }
        if st.used + src.len() > st.cap {
            // Earlier copies may still read the staging area: wait for them.
            // SAFETY: plain stream synchronisation.
            unsafe { result::stream::synchronize(self.cu_stream()) }.map_err(dev("synchronize"))?;
            st.used = 0;
        }
        let at = st.used;
        // SAFETY: [at, at + len) lies inside the pinned allocation, and no
        // queued copy reads it (space is reused only after a sync).
        let staged = unsafe {
            let p = st.ptr.add(at);
            std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len());
            std::slice::from_raw_parts(p, src.len())
        };
        st.used = (at + src.len()).next_multiple_of(64);
        // SAFETY: as above; dst holds at least src.len() bytes.
        unsafe { result::memcpy_htod_async(dst, staged, self.cu_stream()) }.map_err(dev("upload"))
    }

    /// Copies device bytes to the host and waits for them.
    fn download<T: Copy + Default>(&self, src: u64, len: usize) -> Result<Vec<T>> {
        self.no_capture("read")?;
        self.bind()?;
        let mut out = vec![T::default(); len];
        if len > 0 {
            // SAFETY: src holds len elements (checked by callers); `out` is
            // pageable, so the copy has finished when the call returns.
            unsafe { result::memcpy_dtoh_async(&mut out[..], src, self.cu_stream()) }.map_err(dev("read"))?;
        }
        self.sync()?;
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: plain stream synchronisation.
        unsafe { result::stream::synchronize(self.cu_stream()) }.map_err(dev("synchronize"))?;
        self.staging.borrow_mut().used = 0;
        Ok(())
    }

    /// Grows a scratch buffer to at least `bytes` (never while recording).
    fn ensure(&self, buf: &mut DevBuf, bytes: usize, what: &'static str) -> Result<()> {
        if buf.bytes >= bytes {
            return Ok(());
        }
        self.no_capture(what)?;
        *buf = DevBuf::alloc(&self.stream, bytes, what)?;
        Ok(())
    }

    /// A decode-sized product (see `kernels/gemv.cu`): `out (+)= x · wᵀ`,
    /// with the RMS-norm prologue when `norm` is given (then x must take
    /// the vector path: [`CudaBackend::gemv_vec`]).
    fn gemv(
        &self,
        x: View<'_, CudaVec>,
        w: &CudaMat,
        bias: Option<&CudaVec>,
        out: &ViewMut<'_, CudaVec>,
        mode: GemvMode<'_>,
    ) -> Result<()> {
        let args = || {
            Args::new()
                .ptr(x.buf.at(x.offset))
                .i32(x.stride)
                .i32(x.rows)
                .ptr(w.buf.ptr)
                .i32(w.rows)
                .i32(w.cols)
                .ptr(bias.map_or(0, |b| b.buf.ptr))
                .ptr(out.buf.at(out.offset))
                .i32(out.stride)
                .u32(mode.accumulate as u32)
                .ptr(mode.norm.map_or(0, |(n, _)| n.buf.ptr))
                .f32(mode.norm.map_or(0.0, |(_, eps)| eps))
                .words(&mode.conv.unwrap_or([0; CONV_EPILOGUE_WORDS]))
        };
        if !Self::gemv_vec(&x, w) {
            check("linear", mode.norm.is_none(), || "the norm prologue needs the vector path".into())?;
            let k = match w.dtype {
                DType::F32 => Kernel::GemvF32Scalar,
                DType::BF16 => Kernel::GemvBf16Scalar,
                DType::F16 => Kernel::GemvF16Scalar,
            };
            let grid = ((w.rows as u32).div_ceil(4), (x.rows as u32).div_ceil(8), 1);
            return self.launch_dependent(k, args(), grid, 128);
        }
        // Rows of x per block: the smallest tile holding them all (at most
        // 8; more rows take several tiles, the weights re-read from L2).
        let mt = x.rows.min(8).next_power_of_two();
        let plain = mode.norm.is_none() && mode.conv.is_none() && x.rows == 1;
        let split = self.split_out.filter(|_| plain && w.rows >= GEMV_STREAM_MIN_COLS);
        if let Some(r) = Self::gemv_stream_cols(w, mt).filter(|_| split.is_none()) {
            // Many columns: warps stream column groups with loads in flight
            // across groups; as many columns a group as keep a group per warp.
            let groups = w.rows.div_ceil(r) as u32;
            let blocks = groups.div_ceil(4).min(self.sms * GEMV_STREAM_BLOCKS_PER_SM);
            let grid = (blocks, (x.rows as u32).div_ceil(mt as u32), 1);
            if let Some(xp) = mode.xproj {
                check("linear", mt == 1 && mode.norm.is_some(), || "x_proj folds into a one-row normed product".into())?;
                let k = Kernel::gemv_stream_xproj(w.dtype, r).expect("every r chosen here has a kernel");
                return self.launch_dependent(k, args().words(&xp), grid, 128);
            }
            let k = Kernel::gemv_stream(w.dtype, mode.norm.is_some(), mt, r).expect("every (mt, r) chosen here has a kernel");
            return self.launch_dependent(k, args(), grid, 128);
        }
        check("linear", mode.xproj.is_none(), || "x_proj folds only into the streaming product".into())?;
        // Output columns per block: as many as keep the grid at least
        // GEMV_MIN_BLOCKS blocks (more loads in flight per thread).
        let mut r = if w.rows >= 4 * GEMV_MIN_BLOCKS {
            4
        } else if w.rows >= 2 * GEMV_MIN_BLOCKS {
            2
        } else {
            1
        };
        if mt == 8 {
            r = r.min(2);
        }
        if let Some((forced, _)) = split {
            r = forced;
        }
        let k = Kernel::gemv(w.dtype, mode.norm.is_some(), mt, r).expect("every (mt, r) chosen here has a kernel");
        // Threads split K so that each reads about GEMV_CHUNKS_PER_THREAD
        // 16-byte chunks per column.
        let chunks = w.cols / 8;
        let threads = chunks.div_ceil(GEMV_CHUNKS_PER_THREAD).next_multiple_of(32).clamp(32, 256) as u32;
        let threads = split.map_or(threads, |(_, t)| t);
        let grid = ((w.rows as u32).div_ceil(r as u32), (x.rows as u32).div_ceil(mt as u32), 1);
        self.launch_dependent(k, args(), grid, threads)
    }

    /// The 16-bit copy a large-batch decode kernel writes alongside its
    /// output `out` of `rows` rows: in the type of the last tensor-core
    /// product, when the next product over it will take one (more than
    /// GEMV_MAX_ROWS rows) and the reserved scratch holds it.
    fn half_copy_for(&self, rows: usize, out: &ViewMut<'_, CudaVec>) -> Result<Option<HalfCopy>> {
        let Some(dtype) = self.half_type.get().filter(|_| self.write_half_copies && rows > GEMV_MAX_ROWS) else { return Ok(None) };
        let bytes = rows * out.cols * 2;
        let mut scratch = self.scratch.borrow_mut();
        if !self.capturing.get() {
            self.ensure(&mut scratch.half_copy, bytes, "half activations")?;
        }
        let fits = scratch.half_copy.bytes >= bytes;
        Ok(fits.then_some(HalfCopy { of: out.buf.at(out.offset), rows, cols: out.cols, stride: out.stride, dtype }))
    }

    /// A kernel's `half, half_dt` arguments for `copy`: where to write it and
    /// its 16-bit type code (1 bf16, 2 f16), or (null, 0) for none.
    fn half_copy_args(&self, copy: Option<HalfCopy>) -> (u64, u32) {
        match copy.map(|c| c.dtype) {
            Some(dtype) if dtype != DType::F32 => (self.scratch.borrow().half_copy.ptr, kernels::dtype_code(dtype)),
            _ => (0, 0),
        }
    }

    /// The streaming GEMV's columns a group for a product of `w` over
    /// tiles of `mt` rows, or `None` when it takes the block-split kernel.
    fn gemv_stream_cols(w: &CudaMat, mt: usize) -> Option<usize> {
        (w.rows >= GEMV_STREAM_MIN_COLS)
            .then(|| [4, 2, 1].into_iter().find(|&r| w.rows / r >= GEMV_STREAM_MIN_COLS && r * mt <= 16).unwrap_or(1))
    }

    /// Whether a mixer's entry runs as one kernel: the norm, in_proj and
    /// the conv step (decode, up to GEMV_MAX_ROWS sequences).
    fn entry_fuses(p: &NormedLinear<'_, Self>, conv: &ProjConv<'_, Self>, batch: &Packed<'_, Self>) -> bool {
        batch.single_token
            && p.rows == batch.n_seqs
            && p.rows <= GEMV_MAX_ROWS
            && Self::gemv_vec(&View::dense(p.x, p.rows, p.w.cols), p.w)
            && (1..=CONV_STEP_MAX_K).contains(&conv.kernel)
    }

    /// A mixer's entry as one kernel ([`CudaBackend::entry_fuses`]), with
    /// x_proj folded in when `xproj` is given (`XProjEpilogue`).
    #[allow(clippy::too_many_arguments)]
    fn fused_entry(
        &self,
        p: NormedLinear<'_, Self>,
        normed: &CudaVec,
        proj: ViewMut<'_, CudaVec>,
        conv: ProjConv<'_, Self>,
        batch: &Packed<'_, Self>,
        conv_out: ViewMut<'_, CudaVec>,
        xproj: Option<[u64; XPROJ_EPILOGUE_WORDS]>,
    ) -> Result<()> {
        checks::rmsnorm_linear(&p, normed, &proj)?;
        let (start, channels) = (conv.start, conv.channels);
        let ViewMut { buf, offset, rows, cols, stride } = proj;
        let args = conv.args(View { buf: &*buf, offset, rows, cols, stride });
        checks::conv1d(&args, batch, &conv_out)?;
        let (state, slot_stride, layer_off) = Self::ssm_layout_args(args.state, args.layout, args.layer);
        let k = args.kernel as u64;
        let epilogue = [
            args.weight.buf.ptr,
            args.bias.map_or(0, |b| b.buf.ptr),
            k | (args.activation.code() as u64) << 32,
            state,
            slot_stride,
            layer_off,
            batch.slots.buf.ptr,
            start as u64 | (channels as u64) << 32,
            conv_out.buf.at(conv_out.offset),
            conv_out.stride as u64,
        ];
        let out = ViewMut { buf, offset, rows, cols, stride };
        let mode = GemvMode { norm: Some((p.norm, p.eps)), conv: Some(epilogue), xproj, ..GemvMode::STORE };
        self.gemv(View::dense(p.x, p.rows, p.w.cols), p.w, p.bias, &out, mode)
    }

    /// Whether a product can take the GEMV's 16-byte vector path.
    fn gemv_vec(x: &View<'_, CudaVec>, w: &CudaMat) -> bool {
        w.cols % 8 == 0 && x.offset % 4 == 0 && x.stride % 4 == 0
    }

    /// Whether a product runs as a GEMV (decode-sized batches and tiny
    /// products) rather than on tensor cores through cuBLAS. Above
    /// GEMV_MAX_ROWS every output column would re-read x (L1/L2 traffic of
    /// 2 × rows / columns per block times the weights).
    fn use_gemv(rows: usize, w: &CudaMat) -> bool {
        let macs = rows * w.rows * w.cols;
        rows <= GEMV_MAX_ROWS || (w.dtype != DType::F32 && macs <= SMALL_GEMM_MACS) || w.cols == 0
    }

    /// The short-k tensor-core kernel for this product, if it takes it
    /// (SHORTK_MAX_K, SHORTK_MAX_ROWS; x's rows 16-byte aligned).
    fn short_k(&self, x: &View<'_, CudaVec>, w: &CudaMat) -> Option<Kernel> {
        let fits = self.short_k_products
            && x.rows <= SHORTK_MAX_ROWS
            && w.cols <= SHORTK_MAX_K
            && w.cols % 8 == 0
            && x.offset % 4 == 0
            && x.stride % 4 == 0;
        match w.dtype {
            DType::BF16 if fits => Some(Kernel::ShortKBf16),
            DType::F16 if fits => Some(Kernel::ShortKF16),
            _ => None,
        }
    }

    /// `out = x · wᵀ (+ bias)`, or `out += ...` with `accumulate`, by the
    /// short-k kernel (see [`CudaBackend::short_k`]).
    fn short_k_product(
        &self,
        kernel: Kernel,
        x: View<'_, CudaVec>,
        w: &CudaMat,
        bias: Option<&CudaVec>,
        out: &ViewMut<'_, CudaVec>,
        accumulate: bool,
    ) -> Result<()> {
        // Later 16-bit copies take the weights' type, as after any product.
        self.half_type.set(Some(w.dtype));
        let (m, n, k) = (x.rows, w.rows, w.cols);
        let args = Args::new()
            .ptr(x.buf.at(x.offset))
            .i32(x.stride)
            .i32(m)
            .ptr(w.buf.ptr)
            .i32(n)
            .i32(k)
            .ptr(bias.map_or(0, |b| b.buf.ptr))
            .ptr(out.buf.at(out.offset))
            .i32(out.stride)
            .u32(accumulate as u32);
        let grid = ((n as u32).div_ceil(SHORTK_TILE), (m as u32).div_ceil(SHORTK_TILE), 1);
        self.launch(kernel, args, grid, SHORTK_THREADS)
    }

    /// `out = x · wᵀ (+ bias)` through cuBLAS, or `out += ...` with
    /// `accumulate`. 16-bit weights take 16-bit activations: `x` is either
    /// an f32 view rounded here, or already converted (`GemmInput::Half`).
    fn blas_gemm(&self, x: GemmInput<'_>, w: &CudaMat, bias: Option<&CudaVec>, out: &ViewMut<'_, CudaVec>, accumulate: bool) -> Result<()> {
        let copy = self.half_copy.take();
        if w.dtype != DType::F32 {
            self.half_type.set(Some(w.dtype));
        }
        let (m, n, k) = (x.rows(), w.rows, w.cols);
        let out_ptr = out.buf.at(out.offset);
        if let Some(b) = bias {
            let args = Args::new().ptr(b.buf.ptr).ptr(out_ptr).i32(m).i32(n).i32(out.stride).u32(accumulate as u32);
            self.launch(Kernel::BiasRows, args, ((n as u32).div_ceil(ROW_THREADS), (m as u32).min(65535), 1), ROW_THREADS)?;
        }
        let beta = if bias.is_some() || accumulate { 1.0 } else { 0.0 };
        let (x_ptr, x_stride) = match x {
            GemmInput::F32(v) if copy == Some(HalfCopy { of: v.buf.at(v.offset), rows: m, cols: k, stride: v.stride, dtype: w.dtype }) => {
                // The kernel that wrote this activation also wrote its 16-bit copy.
                (self.scratch.borrow().half_copy.ptr, k)
            }
            GemmInput::F32(v) if w.dtype != DType::F32 => {
                // Tensor cores take 16-bit operands: round this activation once.
                let half = self.half_scratch(m * k * 2)?;
                self.to_half(&v, half, w.dtype)?;
                (half, k)
            }
            GemmInput::F32(v) => (v.buf.at(v.offset), v.stride),
            GemmInput::Half { ptr, stride, .. } => (ptr, stride),
        };
        let g = Gemm { m, n, k, x: x_ptr, x_stride, w: w.buf.ptr, dtype: w.dtype, out: out_ptr, out_stride: out.stride, beta };
        self.profiled(
            || format!("cublas gemm m{m} n{n} k{k} {}", w.dtype),
            || {
                self.launches.set(self.launches.get() + 1);
                self.blas.gemm(&g)
            },
        )
    }

    /// The scratch for 16-bit activations, grown to `bytes` if needed.
    fn half_scratch(&self, bytes: usize) -> Result<u64> {
        let mut scratch = self.scratch.borrow_mut();
        self.ensure(&mut scratch.half, bytes, "half activations")?;
        Ok(scratch.half.ptr)
    }

    /// Dense 16-bit copy (`dtype`) of an f32 view at `dst`.
    fn to_half(&self, v: &View<'_, CudaVec>, dst: u64, dtype: DType) -> Result<()> {
        let (m, k) = (v.rows, v.cols);
        let args = Args::new().ptr(v.buf.at(v.offset)).i32(m).i32(k).i32(v.stride).ptr(dst).u32(kernels::dtype_code(dtype));
        if k % 8 == 0 && v.offset % 4 == 0 && v.stride % 4 == 0 {
            // Eight columns per thread: two 16-byte loads, one 16-byte store.
            let grid = ((k as u32 / 8).div_ceil(ROW_THREADS), (m as u32).min(65535), 1);
            return self.launch(Kernel::ToHalf8, args, grid, ROW_THREADS);
        }
        self.launch(Kernel::ToHalf, args, ((k as u32).div_ceil(ROW_THREADS), (m as u32).min(65535), 1), ROW_THREADS)
    }

    fn ssm_layout_args(state: &CudaVec, layout: super::PoolLayout, layer: usize) -> (u64, u64, u64) {
        (state.buf.ptr, layout.per_slot() as u64, (layer * layout.per_layer) as u64)
    }
}

/// The arguments every packed-scan kernel starts with: the inputs and their
/// strides, the parameters, the gate (or none), the state pool and the
/// packed batch's offsets and slots.
#[allow(clippy::too_many_arguments)]
fn scan_args(
    x: &View<'_, CudaVec>,
    dt: &View<'_, CudaVec>,
    dt_bias: &CudaVec,
    a: &CudaVec,
    b: &View<'_, CudaVec>,
    c: &View<'_, CudaVec>,
    skip: &CudaVec,
    z: Option<&View<'_, CudaVec>>,
    (state, slot_stride, layer_off): (u64, u64, u64),
    batch: &Packed<'_, CudaBackend>,
) -> Args {
    Args::new()
        .ptr(x.buf.at(x.offset))
        .i32(x.stride)
        .ptr(dt.buf.at(dt.offset))
        .i32(dt.stride)
        .ptr(dt_bias.buf.ptr)
        .ptr(a.buf.ptr)
        .ptr(b.buf.at(b.offset))
        .i32(b.stride)
        .ptr(c.buf.at(c.offset))
        .i32(c.stride)
        .ptr(skip.buf.ptr)
        .ptr(z.map_or(0, |z| z.buf.at(z.offset)))
        .i32(z.map_or(0, |z| z.stride))
        .ptr(state)
        .u64(slot_stride)
        .u64(layer_off)
        .ptr(batch.cu_seqlens.buf.ptr)
        .ptr(batch.slots.buf.ptr)
}

/// Threads per channel group of the packed scan for `d_state`.
fn scan_lanes(d_state: usize) -> usize {
    d_state.next_power_of_two().clamp(4, 32)
}

/// How the tiled prefill scan splits segments in time: `(part_len, parts)`
/// over the packed rows, or `None` to run each segment in one piece. Splits
/// when the grid would have fewer than SCAN_SPLIT_BLOCKS_PER_SM blocks per
/// multiprocessor and an average segment makes at least two parts; the part
/// length aims at that many blocks for segments of the average length. The
/// lengths themselves stay on the device, so the grid's parts cover all
/// packed rows and blocks of (segment, part) pairs that do not meet return
/// at once.
fn scan_split(n_seqs: usize, n_tokens: usize, blocks_per_seq: usize, sms: usize) -> Option<(usize, usize)> {
    let blocks = n_seqs * blocks_per_seq;
    let target = sms * SCAN_SPLIT_BLOCKS_PER_SM;
    let avg = n_tokens / n_seqs.max(1);
    if blocks == 0 || blocks >= target || avg < 2 * SCAN_MIN_PART {
        return None;
    }
    let pieces = target.div_ceil(blocks);
    let part_len = avg.div_ceil(pieces).max(SCAN_MIN_PART).max(n_tokens.div_ceil(SCAN_MAX_PARTS)).next_multiple_of(SCAN_TILE_TOKENS);
    let n_parts = n_tokens.div_ceil(part_len);
    (n_parts >= 2).then_some((part_len, n_parts))
}

impl Backend for CudaBackend {
    type Vec = CudaVec;
    type Ids = CudaIds;
    type Mat = CudaMat;
    type Graph = CudaGraphHandle;
    type Sampling = sample::CudaSampling;

    fn describe(&self) -> String {
        format!("{} (weights as stored, f32 activations and state)", self.name)
    }

    fn alloc(&self, len: usize) -> Result<CudaVec> {
        Ok(CudaVec { buf: DevBuf::alloc(&self.stream, len * 4, "activations")?, len })
    }

    fn alloc_ids(&self, len: usize) -> Result<CudaIds> {
        let buf = DevBuf::alloc(&self.stream, len * 4, "ids")?;
        // Zeroed, so that every id the buffer holds is a valid token (a
        // padded graph step may embed ids past the ones written).
        buf.zero(buf.bytes, "ids")?;
        Ok(CudaIds { buf, len, written: vec![] })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaVec> {
        let v = self.alloc(data.len())?;
        self.upload_bytes(v.buf.ptr, bytes_of(data))?;
        Ok(v)
    }

    fn upload_matrix(&self, m: &HostMatrix<'_>) -> Result<CudaMat> {
        let expected = m.rows * m.cols * m.dtype.size();
        check("upload_matrix", m.bytes.len() == expected, || {
            format!("{}: {} bytes for [{}, {}] {}", m.name, m.bytes.len(), m.rows, m.cols, m.dtype)
        })?;
        let buf = DevBuf::alloc(&self.stream, expected, "weights")?;
        self.upload_bytes(buf.ptr, m.bytes)?;
        // The source may be a memory map that goes away: finish the copy.
        self.sync()?;
        Ok(CudaMat { buf, dtype: m.dtype, rows: m.rows, cols: m.cols })
    }

    fn write_ids(&self, dst: &mut CudaIds, src: &[u32]) -> Result<()> {
        check("write_ids", src.len() <= dst.len, || format!("{} ids into a buffer of {}", src.len(), dst.len))?;
        if dst.written == src && !self.capturing.get() && !self.resend {
            return Ok(());
        }
        dst.written.clear();
        self.upload_bytes(dst.buf.ptr, bytes_of(src))?;
        dst.written.extend_from_slice(src);
        Ok(())
    }

    fn write(&self, dst: &mut CudaVec, offset: usize, src: &[f32]) -> Result<()> {
        check("write", offset + src.len() <= dst.len, || format!("{}+{} > {}", offset, src.len(), dst.len))?;
        self.upload_bytes(dst.at(offset), bytes_of(src))
    }

    fn read(&self, src: &CudaVec, offset: usize, len: usize) -> Result<Vec<f32>> {
        check("read", offset + len <= src.len, || format!("{offset}+{len} > {}", src.len))?;
        self.download(src.at(offset), len)
    }

    fn fill(&self, dst: &mut CudaVec, offset: usize, len: usize, value: f32) -> Result<()> {
        check("fill", offset + len <= dst.len, || format!("{offset}+{len} > {}", dst.len))?;
        if len == 0 {
            return Ok(());
        }
        let grid = (len as u32).div_ceil(ROW_THREADS).min(65535);
        self.launch(Kernel::Fill, Args::new().ptr(dst.at(offset)).u64(len as u64).f32(value), (grid, 1, 1), ROW_THREADS)
    }

    fn copy_within(&self, buf: &mut CudaVec, src: usize, dst: usize, len: usize) -> Result<()> {
        self.half_copy.set(None);
        check("copy_within", src + len <= buf.len && dst + len <= buf.len, || {
            format!("copy {len} from {src} to {dst} in a buffer of {}", buf.len)
        })?;
        check("copy_within", src + len <= dst || dst + len <= src, || "ranges overlap".to_string())?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges were checked to lie inside the buffer.
        unsafe { result::memcpy_dtod_async(buf.at(dst), buf.at(src), len * 4, self.cu_stream()) }.map_err(dev("copy"))
    }

    fn synchronize(&self) -> Result<()> {
        self.no_capture("synchronize")?;
        self.bind()?;
        self.sync()
    }

    fn embed(&self, table: &CudaMat, ids: &CudaIds, n: usize, out: &mut CudaVec) -> Result<()> {
        checks::embed::<Self>(table, ids, n, out)?;
        let d = table.cols;
        if n == 0 {
            return Ok(());
        }
        let k = match table.dtype {
            DType::F32 => Kernel::EmbedF32,
            DType::BF16 => Kernel::EmbedBf16,
            DType::F16 => Kernel::EmbedF16,
        };
        let args = Args::new().ptr(table.buf.ptr).ptr(ids.buf.ptr).ptr(out.buf.ptr).i32(d).u32(table.rows as u32);
        self.launch(k, args, (n as u32, 1, 1), ROW_THREADS)
    }

    fn linear(&self, x: View<'_, CudaVec>, w: &CudaMat, bias: Option<&CudaVec>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::linear::<Self>(&x, w, bias, &out)?;
        if x.rows == 0 || w.rows == 0 {
            return Ok(());
        }
        if Self::use_gemv(x.rows, w) {
            self.gemv(x, w, bias, &out, GemvMode::STORE)
        } else if let Some(kernel) = self.short_k(&x, w) {
            self.short_k_product(kernel, x, w, bias, &out, false)
        } else {
            self.blas_gemm(GemmInput::F32(x), w, bias, &out, false)
        }
    }

    fn linear_add(&self, x: View<'_, CudaVec>, w: &CudaMat, bias: Option<&CudaVec>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::linear::<Self>(&x, w, bias, &out)?;
        if x.rows == 0 || w.rows == 0 {
            return Ok(());
        }
        if Self::use_gemv(x.rows, w) {
            self.gemv(x, w, bias, &out, GemvMode { accumulate: true, ..GemvMode::STORE })
        } else if let Some(kernel) = self.short_k(&x, w) {
            self.short_k_product(kernel, x, w, bias, &out, true)
        } else {
            self.blas_gemm(GemmInput::F32(x), w, bias, &out, true)
        }
    }

    fn rmsnorm_linear(&self, p: NormedLinear<'_, Self>, normed: &mut CudaVec, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::rmsnorm_linear(&p, normed, &out)?;
        let NormedLinear { x, rows, norm, eps, w, bias } = p;
        if rows == 0 || w.rows == 0 {
            return Ok(());
        }
        let k = w.cols;
        let xv = View::dense(x, rows, k);
        if rows <= GEMV_MAX_ROWS && Self::gemv_vec(&xv, w) {
            // Decode: the norm folded into the product, nothing written between.
            return self.gemv(xv, w, bias, &out, GemvMode { norm: Some((norm, eps)), ..GemvMode::STORE });
        }
        // One block a row; rows of a width the vector kernel takes are read
        // once, as 16-byte pieces held in registers.
        // `half`: the kernels' dtype code of what the norm writes (0 f32).
        let norm_rows = |dst: u64, half: u32| {
            let a = Args::new().ptr(x.buf.ptr).ptr(norm.buf.ptr).f32(eps).i32(k).ptr(dst).u32(half);
            let (kernel, threads) = if k % 4 == 0 && k <= 16 * 1024 {
                (Kernel::RmsNormRows4, (k / 16).next_multiple_of(32).clamp(32, 1024) as u32)
            } else {
                (Kernel::RmsNormRows, if rows < 128 { 1024 } else { ROW_THREADS })
            };
            self.launch(kernel, a, (rows as u32, 1, 1), threads)
        };
        if !Self::use_gemv(rows, w) && w.dtype != DType::F32 {
            // The norm writes the 16-bit activations the tensor cores take.
            let half = self.half_scratch(rows * k * 2)?;
            norm_rows(half, kernels::dtype_code(w.dtype))?;
            let input = GemmInput::Half { ptr: half, stride: k, rows };
            return self.blas_gemm(input, w, bias, &out, false);
        }
        norm_rows(normed.buf.ptr, 0)?;
        self.linear(View::dense(normed, rows, k), w, bias, out)
    }

    fn rmsnorm_linear_conv(
        &self,
        p: NormedLinear<'_, Self>,
        normed: &mut CudaVec,
        proj: ViewMut<'_, CudaVec>,
        conv: ProjConv<'_, Self>,
        batch: &Packed<'_, Self>,
        conv_out: ViewMut<'_, CudaVec>,
    ) -> Result<()> {
        if !Self::entry_fuses(&p, &conv, batch) {
            return rmsnorm_linear_then_conv(self, p, normed, proj, conv, batch, conv_out);
        }
        // Decode: the norm, in_proj and the conv step in one kernel.
        self.fused_entry(p, normed, proj, conv, batch, conv_out, None)
    }

    fn conv1d(&self, args: ConvArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::conv1d(&args, batch, &out)?;
        let (ch, k) = (args.x.cols, args.kernel);
        if batch.n_tokens == 0 || ch == 0 {
            return Ok(());
        }
        let (state, slot_stride, layer_off) = Self::ssm_layout_args(args.state, args.layout, args.layer);
        let blocks = (ch as u32).div_ceil(128);
        let bias = args.bias.map_or(0, |b| b.buf.ptr);
        let x = args.x.buf.at(args.x.offset);
        let o = out.buf.at(out.offset);
        let act = args.activation.code();
        // Every conv kernel's arguments start with the input, taps, bias,
        // activation and the state pool.
        let head = || {
            Args::new()
                .ptr(x)
                .i32(args.x.stride)
                .ptr(args.weight.buf.ptr)
                .ptr(bias)
                .i32(k)
                .u32(act)
                .ptr(state)
                .u64(slot_stride)
                .u64(layer_off)
        };
        if batch.single_token {
            check("conv1d", k <= CONV_STEP_MAX_K, || format!("kernel size {k} above {CONV_STEP_MAX_K}"))?;
            let groups = (batch.n_seqs as u32).div_ceil(CONV_STEP_SEQS);
            let grid = (blocks, groups, 1);
            let a = head().ptr(batch.slots.buf.ptr).i32(batch.n_seqs).i32(ch).ptr(o).i32(out.stride);
            if batch.n_seqs <= DEPENDENT_LAUNCH_MAX_SEQS {
                return self.launch_dependent(Kernel::ConvStep, a.ptr(0).u32(0), grid, 128);
            }
            let copy = self.half_copy_for(batch.n_seqs, &out)?;
            let (half, half_dt) = self.half_copy_args(copy);
            // Four channels a thread, in 16-byte pieces, where everything
            // is aligned for them.
            let aligned = [x, o, state, args.weight.buf.ptr, bias].iter().all(|p| p % 16 == 0)
                && [ch, args.x.stride, out.stride, slot_stride as usize, layer_off as usize].iter().all(|v| v % 4 == 0);
            let (kernel, grid) = if k == 4 && aligned {
                // The staged kernel (fewer registers, whole-row state
                // copies) where the plain one's blocks would not all be
                // resident at once: measured faster at 256 sequences of
                // mamba-1.4b (512 blocks against 396 resident), slower at
                // 32 to 128 (one wave either way).
                let grid = ((ch as u32 / 4).div_ceil(128), groups, 1);
                let resident = self.kernels.resident_blocks(Kernel::ConvStep4, 128, 0)?;
                let staged = self.staged_conv && grid.0 * grid.1 > resident * self.sms;
                (if staged { Kernel::ConvStep4Staged } else { Kernel::ConvStep4 }, grid)
            } else {
                (Kernel::ConvStep, grid)
            };
            self.launch(kernel, a.ptr(half).u32(half_dt), grid, 128)?;
            self.half_copy.set(copy);
            return Ok(());
        }
        let a = head().ptr(batch.cu_seqlens.buf.ptr).ptr(batch.slots.buf.ptr).i32(batch.n_seqs);
        // Each thread runs one channel over CONV_RUN_ROWS rows with its
        // window in registers; the one-row-per-block kernel is left for
        // kernels wider than the register windows.
        let runs = batch.n_tokens.div_ceil(CONV_RUN_ROWS);
        let windowed = match k {
            ..=4 => Some(Kernel::ConvRunsK4),
            5..=8 => Some(Kernel::ConvRunsK8),
            _ => None,
        };
        match windowed {
            Some(kern) if runs <= u16::MAX as usize => {
                let a = a.i32(batch.n_tokens).i32(ch).ptr(o).i32(out.stride);
                self.launch(kern, a, (blocks, runs as u32, 1), 128)?;
            }
            _ => {
                let a = a.i32(ch).ptr(o).i32(out.stride);
                self.launch(Kernel::ConvPacked, a, (batch.n_tokens as u32, blocks, 1), 128)?;
            }
        }
        if k > 1 {
            let a = Args::new()
                .ptr(x)
                .i32(args.x.stride)
                .i32(k)
                .ptr(state)
                .u64(slot_stride)
                .u64(layer_off)
                .ptr(batch.cu_seqlens.buf.ptr)
                .ptr(batch.slots.buf.ptr)
                .i32(ch);
            self.launch(Kernel::ConvState, a, (blocks, batch.n_seqs as u32, 1), 128)?;
        }
        Ok(())
    }

    fn rms_norm_columns(&self, x: ViewMut<'_, CudaVec>, groups: &[(usize, usize)], eps: f32) -> Result<()> {
        checks::rms_norm_columns(&x, groups)?;
        check("rms_norm_columns", groups.len() <= 4, || format!("{} groups, at most 4", groups.len()))?;
        if x.rows == 0 || groups.is_empty() {
            return Ok(());
        }
        let mut a = Args::new().ptr(x.buf.at(x.offset)).i32(x.stride);
        for i in 0..4 {
            let (s, l) = groups.get(i).copied().unwrap_or((0, 0));
            a = a.i32(s).i32(l);
        }
        self.launch(Kernel::RmsNormColumns, a.f32(eps), (x.rows as u32, groups.len() as u32, 1), 128)
    }

    fn mamba1_scan(&self, args: Mamba1ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::mamba1_scan(&args, batch, &out)?;
        let (d, n, t) = (args.x.cols, args.d_state, batch.n_tokens);
        check("mamba1_scan", (1..=128).contains(&n), || format!("state size {n} outside 1..=128"))?;
        if t == 0 || d == 0 {
            return Ok(());
        }
        let (state, slot_stride, layer_off) = Self::ssm_layout_args(args.state, args.layout, args.layer);
        let common = || {
            let z = Some(&args.z);
            scan_args(&args.x, &args.dt, args.dt_bias, args.a, &args.b, &args.c, args.skip, z, (state, slot_stride, layer_off), batch)
        };
        if n <= SCAN_TILE_MAX_STATE {
            let tiled_args =
                |part_len: usize, parts: u64| common().i32(d).i32(n).ptr(out.buf.at(out.offset)).i32(out.stride).i32(part_len).ptr(parts);
            let blocks = d.div_ceil(SCAN_TILE_CHANNELS);
            let grid = (blocks as u32, batch.n_seqs as u32, 1);
            let sms = self.sms as usize;
            if let Some((part_len, n_parts)) = scan_split(batch.n_seqs, t, blocks, sms) {
                // Few long segments: split them in time so they fill the GPU.
                let mut parts = self.scan_parts.borrow_mut();
                self.ensure(&mut parts, (n_parts + batch.n_seqs) * d * SCAN_RECORD * 4, "scan part summaries")?;
                let grid = (grid.0, grid.1, n_parts as u32);
                self.launch(Kernel::Mamba1ScanTiledSummary, tiled_args(part_len, parts.ptr), grid, 128)?;
                return self.launch(Kernel::Mamba1ScanTiled, tiled_args(part_len, parts.ptr), grid, 128);
            }
            return self.launch(Kernel::Mamba1ScanTiled, tiled_args(0, 0), grid, 128);
        }
        // Larger states: 32 lanes per channel, 4 channels per block.
        let grid = ((d as u32).div_ceil(4), batch.n_seqs as u32, 1);
        let k = Kernel::Mamba1ScanL32;
        let a = common()
            .ptr(batch.prompt.buf.ptr)
            .i32(d)
            .i32(n)
            .i32(1)
            .i32(1)
            .f32(0.0)
            .f32(f32::INFINITY)
            .ptr(out.buf.at(out.offset))
            .i32(out.stride);
        self.launch(k, a, grid, 128)
    }

    fn prepare_mamba1_decode(&self, blocks: &[Mamba1Block<'_, Self>], shape: &Mamba1StackShape) -> Result<bool> {
        self.no_capture("prepare_mamba1_decode")?;
        self.bind()?;
        block::prepare(self, blocks, shape)?;
        stack::prepare(self, blocks, shape)
    }

    fn mamba1_decode_block(&self, args: Mamba1DecodeBlock<'_, Self>, batch: &Packed<'_, Self>) -> Result<()> {
        self.bind()?;
        block::run(self, args, batch)
    }

    fn mamba1_decode_tail(&self, args: Mamba1TailArgs<'_, Self>, batch: &Packed<'_, Self>) -> Result<()> {
        self.bind()?;
        if tail::launch(self, &args, batch)? {
            return Ok(());
        }
        mamba1_tail_ops(self, args, batch)
    }

    fn mamba1_stack_step(&self, args: Mamba1Stack<'_, Self>, batch: &Packed<'_, Self>) -> Result<bool> {
        self.bind()?;
        stack::step(self, args, batch)
    }

    fn mamba1_step(&self, args: Mamba1StepArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::mamba1_step(&args, batch, &out)?;
        let (d, n, r, s) = (args.x.cols, args.ssm.d_state, args.ssm.dt_rank, batch.n_seqs);
        let v4 = n % 4 == 0 && s > STEP_ONE_STATE_MAX_SEQS;
        let lanes = if v4 { n / 4 } else { n }.next_power_of_two();
        check("mamba1_step", lanes <= 32, || format!("state size {n} too large for the step kernel"))?;
        if s == 0 || d == 0 {
            return Ok(());
        }
        let k = match (args.ssm.dt_proj.dtype, v4) {
            (DType::F32, true) => Kernel::Mamba1StepF32V4,
            (DType::BF16, true) => Kernel::Mamba1StepBf16V4,
            (DType::F16, true) => Kernel::Mamba1StepF16V4,
            (DType::F32, false) => Kernel::Mamba1StepF32V1,
            (DType::BF16, false) => Kernel::Mamba1StepBf16V1,
            (DType::F16, false) => Kernel::Mamba1StepF16V1,
        };
        let (state, slot_stride, layer_off) = Self::ssm_layout_args(args.state, args.layout, args.layer);
        // Large batches: dt_low · dt_projᵀ as one matrix product (the weights
        // read once), not one dot product per (sequence, channel).
        let mut step_dt = self.step_dt.borrow_mut();
        let dtpre = if s > STEP_FUSED_DT_MAX_SEQS {
            self.ensure(&mut step_dt.buf, s * d * 4, "time steps")?;
            step_dt.len = step_dt.buf.bytes / 4;
            self.linear(args.xdbl.columns(0, r), args.ssm.dt_proj, None, ViewMut::dense(&mut step_dt, s, d))?;
            Some(step_dt.buf.ptr)
        } else {
            None
        };
        let vec_dot = r % 8 == 0 && args.xdbl.offset % 4 == 0 && args.xdbl.stride % 4 == 0;
        let a = Args::new()
            .ptr(args.x.buf.at(args.x.offset))
            .i32(args.x.stride)
            .ptr(args.xdbl.buf.at(args.xdbl.offset))
            .i32(args.xdbl.stride)
            .ptr(args.ssm.dt_proj.buf.ptr)
            .ptr(dtpre.unwrap_or(0))
            .i32(d)
            .ptr(args.ssm.dt_bias.buf.ptr)
            .ptr(args.ssm.a.buf.ptr)
            .ptr(args.ssm.skip.buf.ptr)
            .ptr(args.z.buf.at(args.z.offset))
            .i32(args.z.stride)
            .ptr(state)
            .u64(slot_stride)
            .u64(layer_off)
            .ptr(batch.slots.buf.ptr)
            .i32(s)
            .i32(d)
            .i32(n)
            .i32(r)
            .u32(args.ssm.norm_eps.is_some() as u32)
            .f32(args.ssm.norm_eps.unwrap_or(0.0))
            .i32(lanes)
            .u32(vec_dot as u32)
            .ptr(out.buf.at(out.offset))
            .i32(out.stride);
        drop(step_dt);
        // Only the wide step writes the 16-bit copy.
        let copy = if dtpre.is_some() && v4 { self.half_copy_for(s, &out)? } else { None };
        let (half, half_dt) = self.half_copy_args(copy);
        let a = a.ptr(half).u32(half_dt);
        let cpb = 128 / lanes as u32;
        if dtpre.is_some() && v4 {
            // The wide step: each block walks every gridDim.y-th group of
            // sequences, with one wave of blocks resident. Its lean kernel
            // takes the common case: 16 states, no norms, and x, z, dt and
            // B | C in 16-byte aligned rows (dt is dense, `d` wide).
            let aligned = |v: &View<'_, CudaVec>, from: usize| (v.offset + from) % 4 == 0 && v.stride % 4 == 0;
            let lean = self.lean_step
                && n == 16
                && args.ssm.norm_eps.is_none()
                && d % 4 == 0
                && aligned(&args.x, 0)
                && aligned(&args.z, 0)
                && aligned(&args.xdbl, r);
            let (kernel, seq_floats) = if lean {
                (Kernel::Mamba1StepLean, STEP_LEAN_SEQ_FLOATS)
            } else {
                (Kernel::Mamba1StepWide, 128 * 4 + 2 * n + 3 * cpb as usize)
            };
            let (chunks, groups) = (d.div_ceil(cpb as usize), s.div_ceil(STEP_WIDE_SEQS));
            let shared = STEP_WIDE_STAGES * STEP_WIDE_SEQS * seq_floats * 4;
            check("mamba1_step", shared <= 48 << 10, || format!("state size {n} too large for the wide step"))?;
            let resident = self.kernels.resident_blocks(kernel, 128, shared)? as usize;
            let per_chunk = (self.sms as usize * resident / chunks).clamp(1, groups);
            let a = a.shared_bytes(shared as u32);
            self.launch(kernel, a, (chunks as u32, per_chunk as u32, 1), 128)?;
            self.half_copy.set(copy);
            return Ok(());
        }
        self.launch_dependent(k, a, ((d as u32).div_ceil(cpb), s as u32, 1), 128)
    }

    fn mamba2_scan(&self, args: Mamba2ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::mamba2_scan(&args, batch, &out)?;
        let (h, p, g, n) = (args.n_heads, args.head_dim, args.n_groups, args.d_state);
        let t = batch.n_tokens;
        check("mamba2_scan", (1..=128).contains(&n), || format!("state size {n} outside 1..=128"))?;
        if t == 0 || h * p == 0 {
            return Ok(());
        }
        let lanes = scan_lanes(n);
        let k = match lanes {
            4 => Kernel::Mamba2ScanL4,
            8 => Kernel::Mamba2ScanL8,
            16 => Kernel::Mamba2ScanL16,
            _ => Kernel::Mamba2ScanL32,
        };
        let (state, slot_stride, layer_off) = Self::ssm_layout_args(args.state, args.layout, args.layer);
        let channels = h * p;
        let a =
            scan_args(&args.x, &args.dt, args.dt_bias, args.a, &args.b, &args.c, args.skip, None, (state, slot_stride, layer_off), batch)
                .ptr(batch.prompt.buf.ptr)
                .i32(channels)
                .i32(n)
                .i32(p)
                .i32(h / g)
                .f32(args.dt_limit.0)
                .f32(args.dt_limit.1)
                .ptr(out.buf.at(out.offset))
                .i32(out.stride);
        let cpb = 128 / lanes;
        self.launch(k, a, ((channels as u32).div_ceil(cpb as u32), batch.n_seqs as u32, 1), 128)
    }

    fn gated_rmsnorm(
        &self,
        y: View<'_, CudaVec>,
        z: View<'_, CudaVec>,
        weight: &CudaVec,
        eps: f32,
        group_size: usize,
        out: ViewMut<'_, CudaVec>,
    ) -> Result<()> {
        checks::gated_rmsnorm(&y, &z, weight, group_size, &out)?;
        let d = y.cols;
        if y.rows == 0 {
            return Ok(());
        }
        let a = Args::new()
            .ptr(y.buf.at(y.offset))
            .i32(y.stride)
            .ptr(z.buf.at(z.offset))
            .i32(z.stride)
            .ptr(weight.buf.ptr)
            .f32(eps)
            .i32(group_size)
            .ptr(out.buf.at(out.offset))
            .i32(out.stride);
        self.launch(Kernel::GatedRmsNorm, a, (y.rows as u32, (d / group_size) as u32, 1), ROW_THREADS)
    }

    fn sample_start(&self, logits: View<'_, CudaVec>, rows: &[&SampleRow], feed: Option<&mut CudaIds>) -> Result<sample::CudaSampling> {
        checks::sample(&logits, rows, feed.as_deref())?;
        self.no_capture("sample")?;
        sample::start(self, logits, rows, feed)
    }

    fn sample_finish(&self, started: sample::CudaSampling) -> Result<Vec<SampledToken>> {
        self.bind()?;
        sample::finish(self, started)
    }

    fn gather_rows(&self, src: View<'_, CudaVec>, rows: &CudaIds, n: usize, out: ViewMut<'_, CudaVec>) -> Result<()> {
        checks::gather_rows::<Self>(&src, rows, n, &out)?;
        if n == 0 {
            return Ok(());
        }
        let a = Args::new()
            .ptr(src.buf.at(src.offset))
            .i32(src.stride)
            .ptr(rows.buf.ptr)
            .ptr(out.buf.at(out.offset))
            .i32(out.stride)
            .i32(src.cols);
        self.launch(Kernel::GatherRows, a, (n as u32, 1, 1), ROW_THREADS)
    }

    fn reserve_scratch(&self, max_rows: usize, max_cols: usize, sample_rows: usize, vocab: usize) -> Result<()> {
        let mut s = self.scratch.borrow_mut();
        let s = &mut *s;
        self.ensure(&mut s.half, max_rows * max_cols * 2, "half activations")?;
        self.ensure(&mut s.half_copy, max_rows * max_cols * 2, "half activations")?;
        let mut dt = self.step_dt.borrow_mut();
        self.ensure(&mut dt.buf, max_rows * max_cols * 4, "time steps")?;
        dt.len = dt.buf.bytes / 4;
        sample::reserve(self, s, sample_rows, vocab)
    }

    fn free_memory(&self) -> Option<usize> {
        self.bind().ok()?;
        result::mem_get_info().ok().map(|(free, _total)| free)
    }

    fn launches(&self) -> u64 {
        self.launches.get()
    }

    fn begin_capture(&self) -> Result<bool> {
        self.no_capture("begin_capture")?;
        self.bind()?;
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(dev("begin graph capture"))?;
        self.capturing.set(true);
        Ok(true)
    }

    fn end_capture(&self) -> Result<CudaGraphHandle> {
        check("end_capture", self.capturing.get(), || "no graph is being recorded".into())?;
        self.capturing.set(false);
        self.bind()?;
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(dev("end graph capture"))?
            .ok_or_else(|| BackendError::Device { op: "end graph capture", detail: "nothing was recorded".into() })?;
        graph.upload().map_err(dev("upload graph"))?;
        Ok(CudaGraphHandle(graph))
    }

    fn replay(&self, graph: &CudaGraphHandle) -> Result<()> {
        self.no_capture("replay")?;
        self.launches.set(self.launches.get() + 1);
        graph.0.launch().map_err(dev("graph launch"))
    }
}

/// Records of the timeline ring (the kernels' `TL_CAP`), three words each,
/// after a word counting them.
const TIMELINE_RECORDS: usize = 1 << 23;
const TIMELINE_BYTES: usize = 8 * (1 + 3 * TIMELINE_RECORDS);
/// The most recent records written to the timeline file.
const TIMELINE_KEEP: usize = 600_000;

impl CudaBackend {
    /// Writes the newest TIMELINE_KEEP records of the timeline ring, oldest
    /// first, as little-endian u64 triples (time ns, tag/event/sm/block,
    /// blocks/threads) after their count.
    fn write_timeline(&self) -> Result<()> {
        let Some((ring, path)) = &self.timeline else { return Ok(()) };
        self.sync()?;
        let mut words = vec![0u64; 1 + 3 * TIMELINE_RECORDS];
        // SAFETY: reads the whole ring into a buffer of its size.
        unsafe { result::memcpy_dtoh_sync(&mut words[..], ring.ptr) }.map_err(dev("timeline read"))?;
        let total = words[0] as usize;
        let keep = total.min(TIMELINE_KEEP).min(TIMELINE_RECORDS);
        let mut bytes = Vec::with_capacity(8 + 24 * keep);
        bytes.extend_from_slice(&(keep as u64).to_le_bytes());
        for i in total - keep..total {
            let at = 1 + 3 * (i % TIMELINE_RECORDS);
            for w in &words[at..at + 3] {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        std::fs::write(path, bytes).map_err(|e| BackendError::Device { op: "timeline write", detail: e.to_string() })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Err(e) = self.write_timeline() {
            eprintln!("timeline not written: {e}");
        }
        let Some(profile) = self.profile.take() else { return };
        if self.sync().is_err() {
            return;
        }
        let mut by_name: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        for (name, start, end) in profile.into_inner() {
            let ms = start.elapsed_ms(&end).unwrap_or(f32::NAN) as f64;
            let e = by_name.entry(name).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let mut rows: Vec<_> = by_name.into_iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let total: f64 = rows.iter().map(|r| r.1.1).sum();
        eprintln!("kernel profile ({}): {total:.3} ms in launches", self.name);
        for (name, (count, ms)) in rows {
            eprintln!("{:>10.3} ms {:>5.1}% {count:>7} × {:>9.2} us  {name}", ms, 100.0 * ms / total, 1e3 * ms / count as f64);
        }
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: the callers pass u32, u64 and f32 slices, which reinterpret as
    // bytes with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::{XPROJ_EPILOGUE_WORDS, XPROJ_MAX, parse_split};

    /// The host's limits on the x_proj fold are the kernel's: as many
    /// outputs as its lanes hold, and its epilogue struct's size.
    #[test]
    fn the_x_proj_fold_limits_match_the_kernel() {
        let src = include_str!("../../../kernels/gemv.cu");
        let per_lane: usize = src
            .lines()
            .find_map(|l| l.strip_prefix("#define XPROJ_J "))
            .and_then(|v| v.trim().parse().ok())
            .expect("gemv.cu defines XPROJ_J");
        assert_eq!(XPROJ_MAX, 32 * per_lane);
        let fields = src.split("struct XProjEpilogue {").nth(1).and_then(|t| t.split("};").next()).expect("the struct");
        let (pointers, ints) = (fields.matches('*').count(), fields.matches("int n;").count());
        assert_eq!((pointers, ints), (3, 1), "three pointers and the output count");
        assert_eq!(XPROJ_EPILOGUE_WORDS * 8, pointers * 8 + 8, "the int is padded to 8 bytes");
    }

    #[test]
    fn block_split_shapes_parse_from_the_comparison_variable() {
        assert_eq!(parse_split("4,128"), Some((4, 128)));
        assert_eq!(parse_split(" 2 , 100 "), Some((2, 128)), "threads are whole warps");
        assert_eq!(parse_split("1,999"), Some((1, 256)), "at most 8 warps");
        assert_eq!(parse_split("4"), Some((4, 256)), "SPLIT_THREADS when not given");
        assert_eq!(parse_split("0"), None, "streaming");
        assert_eq!(parse_split("3,128"), None, "no kernel takes 3 columns");
        assert_eq!(parse_split("x"), None);
    }
}
