//! Host side of the whole-stack decode kernel (`kernels/stack.cu`): one
//! launch runs every Mamba-1 block of a one-sequence decode step, with the
//! weights streamed into shared memory by the copy engine while the blocks
//! of the grid hand each other activations as tagged words.
//!
//! [`prepare`] checks the shapes, lays out shared memory and uploads the
//! table of layer weights once; [`step`] launches the kernel when a step
//! is one sequence's token and the weights are the prepared ones.

use super::kernels::{Args, Kernel};
use super::{CudaBackend, CudaMat, CudaVec, DevBuf, bytes_of, r16};
use crate::backend::checks::{Buffer, Matrix};
use crate::backend::{DType, Mamba1Block, Mamba1Stack, Mamba1StackShape, Packed, Result};

/// Pointers per layer in the table (`STACK_LAYER_WORDS` in stack.cu).
const LAYER_WORDS: usize = 12;
/// Ring stages at most (`STACK_MAX_STAGES`).
const MAX_STAGES: usize = 48;
/// Consumer warps, stages in flight and bytes a stage, unless
/// `MAMBA_SERVE_STACK_TUNE=warps,depth,stage_kib` says otherwise.
const WARPS: usize = 8;
const DEPTH: usize = 6;
const STAGE_BYTES: usize = 8 << 10;

/// The launch shape and shared-memory layout, fixed at prepare.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kernel: Kernel,
    blocks: u32,
    warps: usize,
    stage_bytes: usize,
    stages: usize,
    depth: usize,
    /// Channels a partition unit holds (their per-channel slices stay
    /// 16-byte aligned for the bulk copies).
    unit: usize,
    /// in_proj rows (phase A) and channels (phase C) a block holds at most.
    max_a: usize,
    max_c: usize,
    off_side_a: usize,
    side_a: usize,
    off_side_c: usize,
    side_c: usize,
    off_x: usize,
    off_red: usize,
    off_xc: usize,
    off_z: usize,
    off_dbl: usize,
    off_sum: usize,
    off_layers: usize,
    off_bars: usize,
    off_ring: usize,
    shared: usize,
    /// Grid barriers before the reads of other blocks' values too
    /// (`MAMBA_SERVE_STACK_BARRIERS`, for comparisons).
    barriers: bool,
}

/// A prepared stack: its plan, the weights it was prepared for and their
/// table on the device, the tagged words blocks hand each other values in,
/// and the launch counter their tags start from.
pub(super) struct Prepared {
    plan: Plan,
    shape: Mamba1StackShape,
    key: Vec<u64>,
    table: DevBuf,
    tagged: DevBuf,
    sync: DevBuf,
}

/// The table's words for these blocks (the `StackLayer` order).
fn table_words<'b>(blocks: &'b [Mamba1Block<'_, CudaBackend>]) -> impl Iterator<Item = u64> + 'b {
    let vec = |v: Option<&CudaVec>| v.map_or(0, |v| v.buf.ptr);
    blocks.iter().flat_map(move |b| {
        [
            b.in_proj.buf.ptr,
            vec(b.in_proj_bias),
            b.norm.buf.ptr,
            b.conv_w.buf.ptr,
            vec(b.conv_b),
            b.x_proj.buf.ptr,
            b.dt_proj.buf.ptr,
            b.dt_bias.buf.ptr,
            b.a.buf.ptr,
            b.skip.buf.ptr,
            b.out_proj.buf.ptr,
            vec(b.out_proj_bias),
        ]
    })
}

/// Why these blocks cannot take the fused stack, or `None` when they can.
fn unsupported(blocks: &[Mamba1Block<'_, CudaBackend>], s: &Mamba1StackShape) -> Option<String> {
    let (d, e, n, r, k) = (s.d_model, s.d_inner, s.d_state, s.dt_rank, s.d_conv);
    if blocks.is_empty() {
        return Some("no blocks".into());
    }
    if d % 8 != 0 || e % 8 != 0 {
        return Some(format!("d_model {d} and d_inner {e} must be multiples of 8"));
    }
    if !(n.is_power_of_two() && n <= 32) || r == 0 || k == 0 {
        return Some(format!("d_state {n} must be a power of two up to 32, dt_rank {r} and d_conv {k} positive"));
    }
    let dtype = blocks[0].in_proj.dtype;
    let mat = |m: &CudaMat, rows: usize, cols: usize| m.dtype == dtype && m.rows() == rows && m.cols() == cols;
    let vec = |v: &CudaVec, len: usize| v.len() == len;
    let opt = |v: Option<&CudaVec>, len: usize| v.is_none_or(|v| v.len() == len);
    for (l, b) in blocks.iter().enumerate() {
        let ok = mat(b.in_proj, 2 * e, d)
            && mat(b.x_proj, r + 2 * n, e)
            && mat(b.dt_proj, e, r)
            && mat(b.out_proj, d, e)
            && vec(b.norm, d)
            && vec(b.conv_w, e * k)
            && opt(b.conv_b, e)
            && opt(b.in_proj_bias, 2 * e)
            && vec(b.dt_bias, e)
            && vec(b.a, e * n)
            && vec(b.skip, e)
            && opt(b.out_proj_bias, d);
        if !ok {
            return Some(format!("block {l}'s weights are not all {dtype} of the stack's shapes"));
        }
    }
    None
}

/// Lays out shared memory for `sms` blocks of `warps` consumer warps each,
/// within `max_shared` bytes a block.
fn plan(s: &Mamba1StackShape, layers: usize, dtype: DType, sms: usize, max_shared: usize, tune: (usize, usize, usize)) -> Option<Plan> {
    let (warps, depth, stage_kib) = tune;
    let (d, e, n, r, k) = (s.d_model, s.d_inner, s.d_state, s.dt_rank, s.d_conv);
    let ds = dtype.size();
    let threads = 32 * warps;
    // Four channels' dt_proj rows are 16-byte aligned unless a 16-bit
    // rank is odd; every other per-channel slice is 4, 4 k, 4 (k - 1) or
    // 4 d_state bytes.
    let unit = if (4 * r * ds) % 16 == 0 { 4 } else { 8 };
    let max_a = (2 * e / unit).div_ceil(sms) * unit;
    let max_c = (e / unit).div_ceil(sms) * unit;
    let rows_b = (r + 2 * n).div_ceil(sms);
    let rows_d = d.div_ceil(sms);
    // Epilogues give a thread each row.
    if max_a > threads || rows_b > threads || rows_d > threads {
        return None;
    }
    let stage_bytes = r16((stage_kib << 10).max(d * ds).max(e * ds));
    // Norm weights, conv taps, conv bias and the conv window (SideA).
    let side_a = (r16(d * 4) + r16(max_a * k * 4) + max_a * 4 + max_a * (k - 1) * 4).next_multiple_of(128);
    // dt_proj rows, A, D, dt bias and the SSM state (SideC).
    let side_c = (r16(max_c * r * ds) + 2 * max_c * n * 4 + 2 * max_c * 4).next_multiple_of(128);
    // The product sums of a phase's rows.
    let sums = max_a.max(rows_b).max(rows_d);
    let mut at = 0;
    let mut take = |bytes: usize| {
        let o = at;
        at += bytes.next_multiple_of(128);
        o
    };
    let off_side_a = take(2 * side_a);
    let off_side_c = take(2 * side_c);
    // x permuted in whole tiles of 32 chunks (`xpos` in stack.cu).
    let off_x = take(d.max(e).next_multiple_of(256) * 4);
    let off_red = take(sums * 4);
    let off_xc = take(max_c * 4);
    let off_z = take(max_c * 4);
    let off_dbl = take((r + 2 * n) * 4);
    let off_sum = take(32 * 4);
    let off_layers = take(layers * LAYER_WORDS * 8);
    let off_bars = take((2 * MAX_STAGES + 8) * 8);
    let off_ring = at;
    let stages = (max_shared.checked_sub(off_ring)? / stage_bytes).min(MAX_STAGES);
    if stages < 2 {
        return None;
    }
    let kernel = match dtype {
        DType::F32 => Kernel::Mamba1StackF32,
        DType::BF16 => Kernel::Mamba1StackBf16,
        DType::F16 => Kernel::Mamba1StackF16,
    };
    Some(Plan {
        kernel,
        blocks: sms as u32,
        warps,
        stage_bytes,
        stages,
        depth: depth.clamp(1, stages),
        unit,
        max_a,
        max_c,
        off_side_a,
        side_a,
        off_side_c,
        side_c,
        off_x,
        off_red,
        off_xc,
        off_z,
        off_dbl,
        off_sum,
        off_layers,
        off_bars,
        off_ring,
        shared: off_ring + stages * stage_bytes,
        barriers: std::env::var_os("MAMBA_SERVE_STACK_BARRIERS").is_some(),
    })
}

/// `MAMBA_SERVE_STACK_TUNE=warps,depth,stage_kib`, for measurements.
fn tune() -> (usize, usize, usize) {
    let default = (WARPS, DEPTH, STAGE_BYTES >> 10);
    let Ok(v) = std::env::var("MAMBA_SERVE_STACK_TUNE") else { return default };
    let f: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match f[..] {
        [w, d, s] if (1..=31).contains(&w) && d >= 1 && s >= 1 => (w, d, s),
        _ => {
            tracing::warn!(value = %v, "MAMBA_SERVE_STACK_TUNE is warps,depth,stage_kib; using the defaults");
            default
        }
    }
}

/// [`crate::backend::Backend::prepare_mamba1_stack`] on the GPU.
pub fn prepare(be: &CudaBackend, blocks: &[Mamba1Block<'_, CudaBackend>], shape: &Mamba1StackShape) -> Result<bool> {
    *be.stack.borrow_mut() = None;
    if !be.fused_stack || be.sm.0 < 9 {
        return Ok(false);
    }
    if let Some(why) = unsupported(blocks, shape) {
        tracing::debug!("decode steps run block by block: {why}");
        return Ok(false);
    }
    let max_shared = be.max_shared_optin()?;
    let dtype = blocks[0].in_proj.dtype;
    let Some(plan) = plan(shape, blocks.len(), dtype, be.sms as usize, max_shared, tune()) else {
        tracing::debug!("decode steps run block by block: the stack's buffers do not fit shared memory");
        return Ok(false);
    };
    be.kernels.allow_shared(plan.kernel, plan.shared)?;
    let key: Vec<u64> = table_words(blocks).collect();
    let table = DevBuf::alloc(&be.stream, key.len() * 8, "stack table")?;
    be.upload_bytes(table.ptr, bytes_of(&key))?;
    // Tags of all ones: no launch's (its first layer's tags start at 0).
    let (d, e, n, r) = (shape.d_model, shape.d_inner, shape.d_state, shape.dt_rank);
    let words = d + 3 * e + r + 2 * n;
    let tagged = DevBuf::alloc(&be.stream, words * 8, "stack activations")?;
    be.upload_bytes(tagged.ptr, &vec![0xff; words * 8])?;
    let sync = DevBuf::alloc(&be.stream, 12, "stack launch counter")?;
    be.upload_bytes(sync.ptr, &[0; 12])?;
    be.sync()?;
    tracing::info!(
        blocks = plan.blocks,
        warps = plan.warps,
        stages = plan.stages,
        stage_bytes = plan.stage_bytes,
        depth = plan.depth,
        shared = plan.shared,
        "single-sequence decode steps run the fused stack kernel"
    );
    *be.stack.borrow_mut() = Some(Prepared { plan, shape: *shape, key, table, tagged, sync });
    Ok(true)
}

/// [`crate::backend::Backend::mamba1_stack_step`] on the GPU.
pub fn step(be: &CudaBackend, a: Mamba1Stack<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>) -> Result<bool> {
    let stack = be.stack.borrow();
    let Some(st) = stack.as_ref() else { return Ok(false) };
    let s = &a.shape;
    let (d, e, n, r, k) = (s.d_model, s.d_inner, s.d_state, s.dt_rank, s.d_conv);
    let fits = batch.n_seqs == 1
        && batch.n_tokens == 1
        && *s == st.shape
        && a.state.conv_layout.per_layer == e * (k - 1)
        && a.state.ssm_layout.per_layer == e * n
        && a.state.conv_layout.n_layers == a.blocks.len()
        && a.state.ssm_layout.n_layers == a.blocks.len()
        && a.state.conv_state.len() >= a.state.conv_layout.len()
        && a.state.ssm_state.len() >= a.state.ssm_layout.len()
        && a.state.residual.len() >= d
        && batch.slots.len() >= 1;
    // The prepared weights (compared in place: nothing is allocated a step).
    if !fits || !table_words(a.blocks).eq(st.key.iter().copied()) {
        return Ok(false);
    }
    let p = &st.plan;
    let mut args = Args::new()
        .ptr(st.table.ptr)
        .ptr(a.state.residual.buf.ptr)
        .ptr(st.tagged.ptr)
        .ptr(a.state.conv_state.buf.ptr)
        .ptr(a.state.ssm_state.buf.ptr)
        .ptr(batch.slots.buf.ptr)
        .ptr(st.sync.ptr)
        .u64(a.state.conv_layout.per_slot() as u64)
        .u64(a.state.conv_layout.per_layer as u64)
        .u64(a.state.ssm_layout.per_slot() as u64)
        .u64(a.state.ssm_layout.per_layer as u64);
    // The int and float fields, in StackParams order, two to a word.
    let ints: [u32; 30] = [
        a.blocks.len() as u32,
        d as u32,
        e as u32,
        n as u32,
        r as u32,
        k as u32,
        s.activation.code(),
        s.mixer_norm_eps.is_some() as u32,
        s.norm_eps.to_bits(),
        s.mixer_norm_eps.unwrap_or(0.0).to_bits(),
        p.stage_bytes as u32,
        p.stages as u32,
        p.depth as u32,
        p.unit as u32,
        p.max_a as u32,
        p.max_c as u32,
        p.off_ring as u32,
        p.off_side_a as u32,
        p.side_a as u32,
        p.off_side_c as u32,
        p.side_c as u32,
        p.off_x as u32,
        p.off_red as u32,
        p.barriers as u32,
        p.off_xc as u32,
        p.off_z as u32,
        p.off_dbl as u32,
        p.off_layers as u32,
        p.off_bars as u32,
        p.off_sum as u32,
    ];
    for pair in ints.chunks(2) {
        args = args.u64(pair[0] as u64 | (pair[1] as u64) << 32);
    }
    let args = args.shared_bytes(p.shared as u32);
    be.launch(p.kernel, args, (p.blocks, 1, 1), 32 * (p.warps as u32 + 1))?;
    be.stack_launches.set(be.stack_launches.get() + 1);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Activation;

    fn shape(d: usize, e: usize, n: usize, r: usize, k: usize) -> Mamba1StackShape {
        Mamba1StackShape {
            d_model: d,
            d_inner: e,
            d_state: n,
            dt_rank: r,
            d_conv: k,
            activation: Activation::Silu,
            norm_eps: 1e-5,
            mixer_norm_eps: None,
        }
    }

    #[test]
    fn real_shapes_fit_an_h200_block_and_regions_do_not_overlap() {
        // mamba-130m .. mamba-2.8b and falcon-mamba-7b on 132 multiprocessors,
        // 227 KiB a block. Falcon-Mamba-7b's side buffers (64 channels of
        // 256-wide dt_proj rows a block, twice) leave a ring of 3 stages.
        for (d, e, r, layers, stages) in
            [(768, 1536, 48, 24, 8), (2048, 4096, 128, 48, 8), (2560, 5120, 160, 64, 8), (4096, 8192, 256, 64, 3)]
        {
            let p = plan(&shape(d, e, 16, r, 4), layers, DType::BF16, 132, 232_448, (WARPS, DEPTH, 8)).expect("fits");
            assert!(p.shared <= 232_448 && p.stages >= stages, "{d}: {p:?}");
            assert!(p.stage_bytes >= e * 2, "{d}: a stage holds a whole out_proj row");
            assert_eq!(p.unit, 4);
            assert!(p.max_a * 132 >= 2 * e && p.max_c * 132 >= e);
            let mut parts = [
                (p.off_side_a, 2 * p.side_a),
                (p.off_side_c, 2 * p.side_c),
                (p.off_x, e.max(d).next_multiple_of(256) * 4),
                (p.off_red, p.max_a * 4),
                (p.off_xc, p.max_c * 4),
                (p.off_z, p.max_c * 4),
                (p.off_dbl, (r + 32) * 4),
                (p.off_sum, 128),
                (p.off_layers, layers * LAYER_WORDS * 8),
                (p.off_bars, (2 * MAX_STAGES + 8) * 8),
                (p.off_ring, p.stages * p.stage_bytes),
            ];
            parts.sort();
            for w in parts.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{d}: {w:?} overlap");
                assert_eq!(w[1].0 % 128, 0);
            }
        }
    }

    #[test]
    fn odd_ranks_take_eight_channel_units_and_oversized_shares_fall_back() {
        // A bf16 rank of 3: four channels' dt_proj rows are 24 bytes.
        assert_eq!(plan(&shape(48, 96, 16, 3, 4), 2, DType::BF16, 132, 232_448, (WARPS, DEPTH, 8)).expect("fits").unit, 8);
        assert_eq!(plan(&shape(48, 96, 16, 3, 4), 2, DType::F32, 132, 232_448, (WARPS, DEPTH, 8)).expect("fits").unit, 4);
        // Phase A's rows a block must not exceed the consumer threads.
        assert!(plan(&shape(4096, 8192, 16, 256, 4), 64, DType::BF16, 8, 232_448, (WARPS, DEPTH, 8)).is_none());
    }
}
