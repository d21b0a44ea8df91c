//! The `Backend` contract: the few fused operations one Mamba step needs, and
//! nothing else. Not a tensor library.
//!
//! A backend owns device memory (`Vec` of f32 activations or states, `Ids` of
//! u32 indices, `Mat` of weights in their stored dtype) and runs the ops on
//! it. Every op that touches recurrent state takes the state pool buffer, the
//! layer index and the slot index of each sequence, so states are read and
//! written in place; no op gathers states into a temporary batch.
//!
//! This module knows no Mamba checkpoint and no request: the model layer
//! (`crate::model`) composes these ops into a forward pass, and the engine
//! never sees them. Every op has a CPU implementation (`cpu/`), which is the
//! oracle for the CUDA one (`cuda/`).

pub mod checks;
pub mod cpu;
pub mod cuda;
pub mod rng;

use std::fmt;

/// Element type of a checkpoint tensor as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Widens little-endian bytes of `dtype` to f32.
pub fn widen(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// A 2-D weight matrix borrowed from a checkpoint, row-major `[rows, cols]`,
/// little-endian bytes in its stored dtype.
#[derive(Debug, Clone, Copy)]
pub struct HostMatrix<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

/// The pointwise nonlinearity named by a checkpoint's `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu,
    /// GELU with the exact erf form.
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Identity,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "linear" | "identity" => Activation::Identity,
            _ => return None,
        })
    }

    /// The code the CUDA kernels switch on.
    pub fn code(self) -> u32 {
        match self {
            Activation::Identity => 0,
            Activation::Silu => 1,
            Activation::Relu => 2,
            Activation::Gelu => 3,
            Activation::GeluTanh => 4,
        }
    }
}

/// A strided row-major view `[rows, cols]` into a buffer: element `(r, c)`
/// lives at `offset + r * stride + c`.
pub struct View<'a, T> {
    pub buf: &'a T,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<T> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for View<'_, T> {}

impl<'a, T> View<'a, T> {
    /// The whole buffer seen as a dense `[rows, cols]` matrix.
    pub fn dense(buf: &'a T, rows: usize, cols: usize) -> Self {
        View { buf, offset: 0, rows, cols, stride: cols }
    }

    /// Columns `[start, start + len)` of this view.
    pub fn columns(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.cols, "column range {start}+{len} outside {} columns", self.cols);
        View { offset: self.offset + start, cols: len, ..self }
    }
}

/// The mutable counterpart of [`View`].
pub struct ViewMut<'a, T> {
    pub buf: &'a mut T,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a, T> ViewMut<'a, T> {
    pub fn dense(buf: &'a mut T, rows: usize, cols: usize) -> Self {
        ViewMut { buf, offset: 0, rows, cols, stride: cols }
    }

    pub fn columns(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.cols, "column range {start}+{len} outside {} columns", self.cols);
        ViewMut { offset: self.offset + start, cols: len, ..self }
    }
}

/// A packed batch of token segments, one per sequence, as the device sees it.
///
/// Tokens of all sequences are concatenated (`n_tokens` rows in every
/// activation); sequence `s` owns rows `cu_seqlens[s] .. cu_seqlens[s + 1]`
/// and state slot `slots[s]`. A decode step is the case where every segment
/// has length one. `prompt[s]` is 1 when the segment holds prompt tokens and 0
/// when it holds a generated token fed back (the reference applies
/// Mamba-2's `time_step_limit` to the former only).
pub struct Packed<'a, B: Backend + ?Sized> {
    pub n_tokens: usize,
    pub n_seqs: usize,
    /// `[n_seqs + 1]` row offsets.
    pub cu_seqlens: &'a B::Ids,
    /// `[n_seqs]` state-slot indices, all distinct, except that
    /// [`PAD_SLOT`] marks a padding row of a captured graph's batch: its
    /// state reads as zeros and is never written. Only backends with graphs
    /// ([`Backend::begin_capture`]) are given padding rows.
    pub slots: &'a B::Ids,
    /// `[n_seqs]` 1 for prompt segments, 0 for generated-token segments.
    pub prompt: &'a B::Ids,
    /// True when every segment has exactly one token.
    pub single_token: bool,
}

/// The slot index of a padding row (see [`Packed::slots`]).
pub const PAD_SLOT: u32 = u32::MAX;

/// Shape of the per-slot, per-layer recurrent state in a pool buffer.
///
/// Pools are slot-major: the state of slot `s`, layer `l` starts at
/// `(s * n_layers + l) * per_layer` elements, so one slot's whole state is
/// one contiguous block (cheap to snapshot, copy or export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    pub n_slots: usize,
    pub n_layers: usize,
    /// Elements per (slot, layer).
    pub per_layer: usize,
}

impl PoolLayout {
    pub fn per_slot(&self) -> usize {
        self.n_layers * self.per_layer
    }
    pub fn len(&self) -> usize {
        self.n_slots * self.per_slot()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn offset(&self, slot: usize, layer: usize) -> usize {
        (slot * self.n_layers + layer) * self.per_layer
    }
}

/// Arguments of the causal depthwise conv1d over a packed batch.
///
/// `x` is `[n_tokens, channels]`; the conv state of each (slot, layer) holds
/// the previous `k - 1` inputs per channel as `[channels, k - 1]` (oldest
/// first). Output row t is `act(bias + sum_j w[c, j] * x_{t - k + 1 + j})`
/// where inputs before the segment come from the state; afterwards the state
/// holds the last `k - 1` inputs.
pub struct ConvArgs<'a, B: Backend + ?Sized> {
    pub x: View<'a, B::Vec>,
    /// `[channels, k]` taps.
    pub weight: &'a B::Vec,
    /// `[channels]`, when the checkpoint has a conv bias.
    pub bias: Option<&'a B::Vec>,
    pub kernel: usize,
    pub activation: Activation,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
}

/// A product of RMS-normalised rows: `rmsnorm(x) · wᵀ (+ bias)` over the
/// first `rows` rows of the dense `[rows, w.cols]` buffer `x`, where
/// `rmsnorm(x) = x / sqrt(mean(x^2) + eps) * norm` per row.
pub struct NormedLinear<'a, B: Backend + ?Sized> {
    pub x: &'a B::Vec,
    pub rows: usize,
    pub norm: &'a B::Vec,
    pub eps: f32,
    pub w: &'a B::Mat,
    pub bias: Option<&'a B::Vec>,
}

impl<B: Backend + ?Sized> Clone for NormedLinear<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend + ?Sized> Copy for NormedLinear<'_, B> {}

/// [`Backend::rmsnorm_linear_conv`] as its two ops, one after the other.
pub fn rmsnorm_linear_then_conv<B: Backend + ?Sized>(
    b: &B,
    p: NormedLinear<'_, B>,
    normed: &mut B::Vec,
    proj: ViewMut<'_, B::Vec>,
    conv: ProjConv<'_, B>,
    batch: &Packed<'_, B>,
    conv_out: ViewMut<'_, B::Vec>,
) -> Result<()> {
    let ViewMut { buf, offset, rows, cols, stride } = proj;
    b.rmsnorm_linear(p, normed, ViewMut { buf: &mut *buf, offset, rows, cols, stride })?;
    b.conv1d(conv.args(View { buf: &*buf, offset, rows, cols, stride }), batch, conv_out)
}

/// The conv of a mixer's entry ([`Backend::rmsnorm_linear_conv`]): a
/// [`ConvArgs`] whose input is the columns `start..start + channels` of the
/// in_proj output.
pub struct ProjConv<'a, B: Backend + ?Sized> {
    pub start: usize,
    pub channels: usize,
    pub weight: &'a B::Vec,
    pub bias: Option<&'a B::Vec>,
    pub kernel: usize,
    pub activation: Activation,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
}

impl<'a, B: Backend + ?Sized> ProjConv<'a, B> {
    /// The conv's arguments, reading from `proj`.
    pub fn args(self, proj: View<'a, B::Vec>) -> ConvArgs<'a, B> {
        ConvArgs {
            x: proj.columns(self.start, self.channels),
            weight: self.weight,
            bias: self.bias,
            kernel: self.kernel,
            activation: self.activation,
            state: self.state,
            layout: self.layout,
            layer: self.layer,
        }
    }
}

/// Arguments of the Mamba-1 selective scan over a packed batch.
///
/// For each token t and channel d (state size n):
/// `dt = softplus(dt_in[t, d] + dt_bias[d])`,
/// `h[d, :] = exp(dt * a[d, :]) * h[d, :] + dt * b[t, :] * x[t, d]`,
/// `y[t, d] = (sum_n h[d, n] * c[t, n] + skip[d] * x[t, d]) * silu(z[t, d])`.
/// The state `h` of each (slot, layer) is `[channels, n]`, read at the start
/// and written back at the end of each segment.
pub struct Mamba1ScanArgs<'a, B: Backend + ?Sized> {
    pub x: View<'a, B::Vec>,
    /// Time steps before bias and softplus, `[n_tokens, channels]`.
    pub dt: View<'a, B::Vec>,
    pub dt_bias: &'a B::Vec,
    /// `a = -exp(A_log)`, `[channels, n]`.
    pub a: &'a B::Vec,
    pub b: View<'a, B::Vec>,
    pub c: View<'a, B::Vec>,
    /// The `D` skip weights, `[channels]`.
    pub skip: &'a B::Vec,
    pub z: View<'a, B::Vec>,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
    pub d_state: usize,
}

/// A Mamba-1 (or Falcon-Mamba) layer's selective-state parameters at
/// decode, shared by [`Mamba1StepArgs`] and [`Mamba1TailArgs`].
///
/// `xdbl` row s is `[dt_low (dt_rank) | B (d_state) | C (d_state)]`, the
/// output of x_proj. When `norm_eps` is set (Falcon-Mamba) the three parts
/// are first divided by their own RMS (weightless, that epsilon). Then
/// `dt = softplus(dt_low · dt_projᵀ + dt_bias)` and the state update and
/// output are those of [`Mamba1ScanArgs`] for one token.
pub struct Mamba1Ssm<'a, B: Backend + ?Sized> {
    /// `[channels, dt_rank]`.
    pub dt_proj: &'a B::Mat,
    pub dt_bias: &'a B::Vec,
    /// `a = -exp(A_log)`, `[channels, d_state]`.
    pub a: &'a B::Vec,
    pub skip: &'a B::Vec,
    pub norm_eps: Option<f32>,
    pub dt_rank: usize,
    pub d_state: usize,
}

// Only references and numbers: copyable whatever the backend is.
impl<B: Backend + ?Sized> Clone for Mamba1Ssm<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Mamba1Ssm<'_, B> {}

/// Arguments of the Mamba-1 single-token step, fused with what belongs
/// with it (see [`Mamba1Ssm`]): one token per sequence (row s is sequence
/// s).
pub struct Mamba1StepArgs<'a, B: Backend + ?Sized> {
    /// Conv output, `[n_seqs, channels]`.
    pub x: View<'a, B::Vec>,
    pub xdbl: View<'a, B::Vec>,
    pub ssm: Mamba1Ssm<'a, B>,
    pub z: View<'a, B::Vec>,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
}

/// Everything of a Mamba-1 (or Falcon-Mamba) block after its conv, for one
/// token per sequence ([`Backend::mamba1_decode_tail`]): `xdbl = x ·
/// x_projᵀ`, the step of [`Mamba1StepArgs`] over it into `y`, then
/// `residual += y · out_projᵀ (+ out_proj_bias)`. `xdbl` (`[n_seqs,
/// dt_rank + 2 d_state]`) and `y` (`[n_seqs, channels]`) are scratch the op
/// writes.
pub struct Mamba1TailArgs<'a, B: Backend + ?Sized> {
    /// Conv output, `[n_seqs, channels]`.
    pub x: View<'a, B::Vec>,
    pub z: View<'a, B::Vec>,
    /// `[dt_rank + 2 d_state, channels]`.
    pub x_proj: &'a B::Mat,
    pub ssm: Mamba1Ssm<'a, B>,
    /// `[d_model, channels]`.
    pub out_proj: &'a B::Mat,
    pub out_proj_bias: Option<&'a B::Vec>,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
    pub xdbl: &'a mut B::Vec,
    pub y: &'a mut B::Vec,
    /// `[n_seqs, d_model]`, added onto.
    pub residual: ViewMut<'a, B::Vec>,
}

/// [`Backend::mamba1_decode_tail`] as its three ops: x_proj, the step,
/// out_proj added onto the residual.
pub fn mamba1_tail_ops<B: Backend + ?Sized>(b: &B, a: Mamba1TailArgs<'_, B>, batch: &Packed<'_, B>) -> Result<()> {
    let t = batch.n_tokens;
    let w = a.ssm.dt_rank + 2 * a.ssm.d_state;
    let di = a.x.cols;
    b.linear(a.x, a.x_proj, None, ViewMut::dense(&mut *a.xdbl, t, w))?;
    let step =
        Mamba1StepArgs { x: a.x, xdbl: View::dense(&*a.xdbl, t, w), ssm: a.ssm, z: a.z, state: a.state, layout: a.layout, layer: a.layer };
    b.mamba1_step(step, batch, ViewMut::dense(&mut *a.y, t, di))?;
    b.linear_add(View::dense(&*a.y, t, di), a.out_proj, a.out_proj_bias, a.residual)
}

/// One Mamba-1 (or Falcon-Mamba) block's weights, as
/// [`Backend::mamba1_stack_step`] takes them.
pub struct Mamba1Block<'a, B: Backend + ?Sized> {
    /// The entry RMS norm's weights, `[d_model]`.
    pub norm: &'a B::Vec,
    /// `[2 d_inner, d_model]`: x then z.
    pub in_proj: &'a B::Mat,
    pub in_proj_bias: Option<&'a B::Vec>,
    /// `[d_inner, d_conv]`.
    pub conv_w: &'a B::Vec,
    pub conv_b: Option<&'a B::Vec>,
    /// `[dt_rank + 2 d_state, d_inner]`.
    pub x_proj: &'a B::Mat,
    /// `[d_inner, dt_rank]`.
    pub dt_proj: &'a B::Mat,
    pub dt_bias: &'a B::Vec,
    /// `a = -exp(A_log)`, `[d_inner, d_state]`.
    pub a: &'a B::Vec,
    pub skip: &'a B::Vec,
    /// `[d_model, d_inner]`.
    pub out_proj: &'a B::Mat,
    pub out_proj_bias: Option<&'a B::Vec>,
}

impl<'a, B: Backend + ?Sized> Mamba1Block<'a, B> {
    /// The block's selective-state parameters, with the stack's sizes.
    pub fn ssm(&self, shape: &Mamba1StackShape) -> Mamba1Ssm<'a, B> {
        Mamba1Ssm {
            dt_proj: self.dt_proj,
            dt_bias: self.dt_bias,
            a: self.a,
            skip: self.skip,
            norm_eps: shape.mixer_norm_eps,
            dt_rank: shape.dt_rank,
            d_state: shape.d_state,
        }
    }
}

/// One Mamba-1 (or Falcon-Mamba) block for one token per sequence
/// ([`Backend::mamba1_decode_block`]): its entry
/// ([`Backend::rmsnorm_linear_conv`] over `residual`, the conv over x, the
/// first `d_inner` columns of in_proj) then its tail ([`Mamba1TailArgs`],
/// with z the other `d_inner` columns), added onto `residual`.
pub struct Mamba1DecodeBlock<'a, B: Backend + ?Sized> {
    pub block: Mamba1Block<'a, B>,
    pub shape: Mamba1StackShape,
    /// This block's index, of `layers` blocks run in order each step.
    pub layer: usize,
    pub layers: usize,
    /// The residual stream's rows `[n_seqs, d_model]` are the block's
    /// input, and its output is added onto them.
    pub state: Mamba1DecodeState<'a, B>,
    /// Scratch the op may write: the normalised rows, in_proj's output
    /// (`[n_seqs, 2 d_inner]`), the conv's (`[n_seqs, d_inner]`), x_proj's
    /// (`[n_seqs, dt_rank + 2 d_state]`) and the step's (`[n_seqs, d_inner]`).
    pub normed: &'a mut B::Vec,
    pub proj: &'a mut B::Vec,
    pub conv_out: &'a mut B::Vec,
    pub xdbl: &'a mut B::Vec,
    pub y: &'a mut B::Vec,
}

/// A block's entry as [`Backend::rmsnorm_linear_conv`] takes it.
pub struct Mamba1Entry<'a, B: Backend + ?Sized> {
    pub product: NormedLinear<'a, B>,
    pub normed: &'a mut B::Vec,
    pub proj: ViewMut<'a, B::Vec>,
    pub conv: ProjConv<'a, B>,
    pub conv_out: ViewMut<'a, B::Vec>,
}

impl<B: Backend + ?Sized> Mamba1DecodeBlock<'_, B> {
    /// The block's entry over `rows` sequences.
    pub fn entry(&mut self, rows: usize) -> Mamba1Entry<'_, B> {
        let (blk, s) = (&self.block, &self.shape);
        let di = s.d_inner;
        Mamba1Entry {
            product: NormedLinear {
                x: &*self.state.residual,
                rows,
                norm: blk.norm,
                eps: s.norm_eps,
                w: blk.in_proj,
                bias: blk.in_proj_bias,
            },
            normed: &mut *self.normed,
            proj: ViewMut::dense(&mut *self.proj, rows, 2 * di),
            conv: ProjConv {
                start: 0,
                channels: di,
                weight: blk.conv_w,
                bias: blk.conv_b,
                kernel: s.d_conv,
                activation: s.activation,
                state: &mut *self.state.conv_state,
                layout: self.state.conv_layout,
                layer: self.layer,
            },
            conv_out: ViewMut::dense(&mut *self.conv_out, rows, di),
        }
    }
}

/// [`Backend::mamba1_decode_block`] as its two ops: the entry
/// ([`Backend::rmsnorm_linear_conv`]) and the tail
/// ([`Backend::mamba1_decode_tail`]).
pub fn mamba1_block_ops<B: Backend + ?Sized>(b: &B, mut a: Mamba1DecodeBlock<'_, B>, batch: &Packed<'_, B>) -> Result<()> {
    let t = batch.n_tokens;
    let e = a.entry(t);
    b.rmsnorm_linear_conv(e.product, e.normed, e.proj, e.conv, batch, e.conv_out)?;
    let (blk, s) = (&a.block, &a.shape);
    let di = s.d_inner;
    let tail = Mamba1TailArgs {
        x: View::dense(&*a.conv_out, t, di),
        z: View::dense(&*a.proj, t, 2 * di).columns(di, di),
        x_proj: blk.x_proj,
        ssm: blk.ssm(s),
        out_proj: blk.out_proj,
        out_proj_bias: blk.out_proj_bias,
        state: a.state.ssm_state,
        layout: a.state.ssm_layout,
        layer: a.layer,
        xdbl: a.xdbl,
        y: a.y,
        residual: ViewMut::dense(a.state.residual, t, s.d_model),
    };
    b.mamba1_decode_tail(tail, batch)
}

/// The sizes and options every block of a Mamba-1 stack shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mamba1StackShape {
    pub d_model: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    pub d_conv: usize,
    pub activation: Activation,
    /// The entry norms' epsilon.
    pub norm_eps: f32,
    /// Falcon-Mamba's weightless norms of dt, B and C, with this epsilon.
    pub mixer_norm_eps: Option<f32>,
}

/// A single-token step of one sequence through every block
/// ([`Backend::mamba1_stack_step`]): what each block's entry,
/// [`Mamba1StepArgs`] and out_proj would do, one block after the other,
/// for batch row 0.
pub struct Mamba1Stack<'a, B: Backend + ?Sized> {
    pub blocks: &'a [Mamba1Block<'a, B>],
    pub shape: Mamba1StackShape,
    /// The residual stream's row 0: the embedding in, the last block's
    /// output out.
    pub state: Mamba1DecodeState<'a, B>,
}

/// What Mamba-1 decode reads and writes besides the weights: the residual
/// stream and the state pools ([`Mamba1Stack`], [`Mamba1DecodeBlock`]).
pub struct Mamba1DecodeState<'a, B: Backend + ?Sized> {
    pub residual: &'a mut B::Vec,
    pub conv_state: &'a mut B::Vec,
    pub conv_layout: PoolLayout,
    pub ssm_state: &'a mut B::Vec,
    pub ssm_layout: PoolLayout,
}

/// Arguments of the Mamba-2 (SSD) scan over a packed batch.
///
/// Heads `h` of `head_dim` channels share the scalar `a[h]`, `dt_bias[h]`
/// and `skip[h]`; head h reads B and C of group `h / (n_heads / n_groups)`.
/// `dt = softplus(dt_in[t, h] + dt_bias[h])`, clamped to `dt_limit` for
/// prompt segments; `h[p, :] = exp(dt * a) * h[p, :] + dt * b[t, g, :] * x`;
/// `y[t, h, p] = sum_n h[p, n] * c[t, g, n] + skip[h] * x[t, h, p]`.
/// The state of each (slot, layer) is `[n_heads, head_dim, n]`.
pub struct Mamba2ScanArgs<'a, B: Backend + ?Sized> {
    pub x: View<'a, B::Vec>,
    pub dt: View<'a, B::Vec>,
    pub dt_bias: &'a B::Vec,
    pub a: &'a B::Vec,
    pub b: View<'a, B::Vec>,
    pub c: View<'a, B::Vec>,
    pub skip: &'a B::Vec,
    pub dt_limit: (f32, f32),
    pub n_heads: usize,
    pub head_dim: usize,
    pub n_groups: usize,
    pub d_state: usize,
    pub state: &'a mut B::Vec,
    pub layout: PoolLayout,
    pub layer: usize,
}

/// How one row of logits is turned into a token (plain data, so every
/// backend can take it; `crate::sampling` builds it from a request).
///
/// Order: logit bias → repetition penalty (every id in `seen`) → presence
/// and frequency penalties (ids with an output count) → ids at or above
/// `valid_vocab` masked → temperature (0 = greedy, ties to the lowest id) →
/// top-k → top-p → min-p → inverse-CDF draw over the survivors sorted by
/// probability (ties by id) with the uniform `rng::uniform(seed, step)`.
/// Logprobs are those after the penalties and mask, before temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub temperature: f32,
    /// 0 is off.
    pub top_k: u32,
    /// 1 is off.
    pub top_p: f32,
    /// 0 is off.
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Index of the token being drawn (0 for a sequence's first).
    pub step: u64,
    /// Alternatives to return with their logprobs (0: none).
    pub top_logprobs: u32,
    /// Ids at or above this are never chosen (padded embedding rows).
    pub valid_vocab: u32,
    /// (id, times it was generated) for every id seen in the prompt or the
    /// output; prompt-only ids have count 0. Empty when no penalty is on.
    pub seen: Vec<(u32, u32)>,
    pub logit_bias: Vec<(u32, f32)>,
}

impl SampleRow {
    /// Greedy, every processor off, over `valid_vocab` ids: the row other
    /// settings start from.
    pub fn greedy(valid_vocab: usize) -> Self {
        SampleRow {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            step: 0,
            top_logprobs: 0,
            valid_vocab: valid_vocab as u32,
            seen: vec![],
            logit_bias: vec![],
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely ids with their logprobs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Errors a backend reports. Messages name the op and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("unsupported weight dtype {dtype} for {name}")]
    UnsupportedDType { name: String, dtype: DType },
    #[error("device error in {op}: {detail}")]
    Device { op: &'static str, detail: String },
    #[error("kernel {kernel} failed to compile:\n{log}")]
    KernelCompile { kernel: String, log: String },
    #[error("out of device memory allocating {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: usize },
    #[error("backend {0} is not available: {1}")]
    Unavailable(&'static str, String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The operations a Mamba forward pass needs. All activations are f32
/// row-major; all weights are uploaded once.
pub trait Backend: Send + 'static {
    /// A device buffer of f32.
    type Vec: Send + checks::Buffer;
    /// A device buffer of u32 (token ids, offsets, slot indices).
    type Ids: Send + checks::Buffer;
    /// A weight matrix `[rows, cols]` on the device, in the dtype the
    /// backend's GEMM wants (the CUDA backend keeps the stored dtype).
    type Mat: Send + checks::Matrix;
    /// A recorded sequence of ops (see [`Backend::begin_capture`]).
    type Graph: Send;
    /// A sampling started and not yet read back
    /// ([`Backend::sample_start`]).
    type Sampling: Send;

    /// One line for logs: which device, which precision.
    fn describe(&self) -> String;

    /// `len` f32 values, their contents unspecified (a device buffer holds
    /// what a freed one left there).
    fn alloc(&self, len: usize) -> Result<Self::Vec>;
    /// `len` ids, all zero.
    fn alloc_ids(&self, len: usize) -> Result<Self::Ids>;
    fn upload(&self, data: &[f32]) -> Result<Self::Vec>;
    fn upload_matrix(&self, m: &HostMatrix<'_>) -> Result<Self::Mat>;
    fn write_ids(&self, dst: &mut Self::Ids, src: &[u32]) -> Result<()>;
    fn write(&self, dst: &mut Self::Vec, offset: usize, src: &[f32]) -> Result<()>;
    fn read(&self, src: &Self::Vec, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// Sets `dst[offset .. offset + len]` to `value`.
    fn fill(&self, dst: &mut Self::Vec, offset: usize, len: usize, value: f32) -> Result<()>;
    /// Copies `len` elements within one buffer (non-overlapping ranges).
    fn copy_within(&self, buf: &mut Self::Vec, src: usize, dst: usize, len: usize) -> Result<()>;
    /// Waits for all queued work; reports any asynchronous device error.
    fn synchronize(&self) -> Result<()>;

    /// `out[t, :] = f32(table[ids[t], :])` for t < n.
    fn embed(&self, table: &Self::Mat, ids: &Self::Ids, n: usize, out: &mut Self::Vec) -> Result<()>;

    /// `out = x · wᵀ (+ bias)`, x `[m, k]`, w `[n, k]`, out `[m, n]`;
    /// fp32 accumulation.
    fn linear(&self, x: View<'_, Self::Vec>, w: &Self::Mat, bias: Option<&Self::Vec>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// `out += x · wᵀ (+ bias)`: a product added onto what `out` holds (the
    /// residual add after a mixer's out_proj).
    fn linear_add(&self, x: View<'_, Self::Vec>, w: &Self::Mat, bias: Option<&Self::Vec>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// `out = rmsnorm(x) · wᵀ (+ bias)`, see [`NormedLinear`] (the block's
    /// norm before in_proj, and the final norm before the LM head).
    /// `normed` (at least `rows × w.cols`) is scratch a backend may use for
    /// the normalised rows; its contents afterwards are unspecified.
    fn rmsnorm_linear(&self, p: NormedLinear<'_, Self>, normed: &mut Self::Vec, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// A mixer's entry: `proj = rmsnorm(x) · wᵀ (+ bias)` as in
    /// [`Backend::rmsnorm_linear`], then the causal conv ([`Backend::conv1d`])
    /// over proj's conv columns into `conv_out`. Afterwards those columns
    /// of proj are unspecified: a backend that fuses the two (one token per
    /// sequence) need not write them. The default runs the two ops
    /// ([`rmsnorm_linear_then_conv`]).
    fn rmsnorm_linear_conv(
        &self,
        p: NormedLinear<'_, Self>,
        normed: &mut Self::Vec,
        proj: ViewMut<'_, Self::Vec>,
        conv: ProjConv<'_, Self>,
        batch: &Packed<'_, Self>,
        conv_out: ViewMut<'_, Self::Vec>,
    ) -> Result<()> {
        rmsnorm_linear_then_conv(self, p, normed, proj, conv, batch, conv_out)
    }

    /// Causal depthwise conv1d over a packed batch; see [`ConvArgs`].
    fn conv1d(&self, args: ConvArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// In-place weightless RMSNorm of column groups `[start, start + len)`
    /// of each row (Falcon-Mamba's norms of dt, B and C).
    fn rms_norm_columns(&self, x: ViewMut<'_, Self::Vec>, groups: &[(usize, usize)], eps: f32) -> Result<()>;

    /// Mamba-1 selective scan; see [`Mamba1ScanArgs`].
    fn mamba1_scan(&self, args: Mamba1ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// Mamba-1 decode step (every segment one token); see
    /// [`Mamba1StepArgs`].
    fn mamba1_step(&self, args: Mamba1StepArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// A Mamba-1 block after its conv, for one token per sequence; see
    /// [`Mamba1TailArgs`]. The default runs it as three ops.
    fn mamba1_decode_tail(&self, args: Mamba1TailArgs<'_, Self>, batch: &Packed<'_, Self>) -> Result<()> {
        mamba1_tail_ops(self, args, batch)
    }

    /// One Mamba-1 block for one token per sequence; see
    /// [`Mamba1DecodeBlock`]. The default runs its entry and its tail as
    /// two ops ([`mamba1_block_ops`]).
    fn mamba1_decode_block(&self, args: Mamba1DecodeBlock<'_, Self>, batch: &Packed<'_, Self>) -> Result<()> {
        mamba1_block_ops(self, args, batch)
    }

    /// Readies the one-token decode ops for these blocks, called once,
    /// after loading: a backend may upload a table of their weights for
    /// [`Backend::mamba1_stack_step`], or allocate scratch
    /// [`Backend::mamba1_decode_block`] keeps per block. `Ok(false)`: this
    /// backend has no fused stack for them, and the caller runs the blocks
    /// op by op.
    fn prepare_mamba1_decode(&self, _blocks: &[Mamba1Block<'_, Self>], _shape: &Mamba1StackShape) -> Result<bool> {
        Ok(false)
    }

    /// One decode token of one sequence (batch row 0, slot `slots[0]`)
    /// through every block in one op; see [`Mamba1Stack`]. `Ok(false)`
    /// when this backend does not run this case fused (nothing was done:
    /// run the blocks op by op).
    fn mamba1_stack_step(&self, _args: Mamba1Stack<'_, Self>, _batch: &Packed<'_, Self>) -> Result<bool> {
        Ok(false)
    }

    /// Mamba-2 SSD scan; see [`Mamba2ScanArgs`].
    fn mamba2_scan(&self, args: Mamba2ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// Mamba-2 gated RMSNorm: `g = y * silu(z)`, normalised per group of
    /// `group_size` channels, times `weight`.
    fn gated_rmsnorm(
        &self,
        y: View<'_, Self::Vec>,
        z: View<'_, Self::Vec>,
        weight: &Self::Vec,
        eps: f32,
        group_size: usize,
        out: ViewMut<'_, Self::Vec>,
    ) -> Result<()>;

    /// Samples one token from each row of `logits` (`[rows.len(), vocab]`);
    /// only ids and logprobs leave the device.
    fn sample(&self, logits: View<'_, Self::Vec>, rows: &[&SampleRow]) -> Result<Vec<SampledToken>> {
        let started = self.sample_start(logits, rows, None)?;
        self.sample_finish(started)
    }

    /// Starts [`Backend::sample`] without waiting for its tokens: work
    /// queued after it (the next step) runs while the host waits in
    /// [`Backend::sample_finish`]. With `feed`, row i's token is also
    /// written to `feed[i]`, where the next step's embedding reads it
    /// without a round trip through the host.
    fn sample_start(&self, logits: View<'_, Self::Vec>, rows: &[&SampleRow], feed: Option<&mut Self::Ids>) -> Result<Self::Sampling>;

    /// Waits for a started sampling and returns its tokens.
    fn sample_finish(&self, started: Self::Sampling) -> Result<Vec<SampledToken>>;

    /// `out[i, :] = src[rows[i], :]` for i < n.
    fn gather_rows(&self, src: View<'_, Self::Vec>, rows: &Self::Ids, n: usize, out: ViewMut<'_, Self::Vec>) -> Result<()>;

    /// Sizes the scratch space ops need beyond their arguments, once, before
    /// any graph is recorded: products over up to `max_rows` rows of up to
    /// `max_cols` inputs, and sampling of up to `sample_rows` rows of
    /// `vocab` logits.
    fn reserve_scratch(&self, _max_rows: usize, _max_cols: usize, _sample_rows: usize, _vocab: usize) -> Result<()> {
        Ok(())
    }

    /// Free device memory in bytes, for sizing the state pool; `None` on a
    /// backend without device memory of its own.
    fn free_memory(&self) -> Option<usize> {
        None
    }

    /// Kernel launches and library calls issued so far (a recorded graph's
    /// ops count when recorded; a replay counts once).
    fn launches(&self) -> u64 {
        0
    }

    /// Starts recording the ops that follow, without running them, into a
    /// graph that [`Backend::replay`] runs again; `Ok(false)` when the
    /// backend has no graphs (then nothing is recorded). While recording,
    /// ops must not read back or upload: only device work is captured.
    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }

    /// Ends a recording started by [`Backend::begin_capture`].
    fn end_capture(&self) -> Result<Self::Graph> {
        Err(BackendError::Unavailable("graphs", "this backend records no graphs".into()))
    }

    /// Runs a recorded graph: the same ops on the same buffers, reading
    /// whatever those buffers hold now.
    fn replay(&self, _graph: &Self::Graph) -> Result<()> {
        Err(BackendError::Unavailable("graphs", "this backend records no graphs".into()))
    }
}
