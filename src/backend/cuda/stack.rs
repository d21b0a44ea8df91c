//! Host side of the whole-stack decode kernel (`kernels/stack.cu`): one
//! launch runs every Mamba-1 block of a one-sequence decode step, with the
//! weights streamed into shared memory by the copy engine while the blocks
//! of the grid meet at barriers between the phases of a layer.
//!
//! [`prepare`] checks the shapes, lays out shared memory and uploads the
//! table of layer weights once; [`step`] launches the kernel when a step
//! is one sequence's token and the weights are the prepared ones.

use super::kernels::{Args, Kernel};
use super::{CudaBackend, CudaMat, CudaVec, DevBuf, dev};
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
const SPIN_NS: usize = 0;

/// The launch shape and shared-memory layout, fixed at prepare.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kernel: Kernel,
    blocks: u32,
    warps: usize,
    stage_bytes: usize,
    stages: usize,
    depth: usize,
    max_ch: usize,
    off_side_a: usize,
    side_a: usize,
    off_side_c: usize,
    side_c: usize,
    off_x: usize,
    off_acc: usize,
    off_xc: usize,
    off_z: usize,
    off_dbl: usize,
    off_red: usize,
    off_layers: usize,
    off_bars: usize,
    off_ring: usize,
    shared: usize,
    /// Nanoseconds the grid barrier's spinning thread sleeps between polls
    /// (0: none).
    spin_ns: usize,
}

/// A prepared stack: its plan, the weights it was prepared for and their
/// table on the device, and the grid barrier's word.
pub(super) struct Prepared {
    plan: Plan,
    shape: Mamba1StackShape,
    key: Vec<u64>,
    table: DevBuf,
    barrier: DevBuf,
}

fn r16(n: usize) -> usize {
    n.next_multiple_of(16)
}

/// The table's words for these blocks (the `StackLayer` order).
fn table_words(blocks: &[Mamba1Block<'_, CudaBackend>]) -> Vec<u64> {
    let vec = |v: Option<&CudaVec>| v.map_or(0, |v| v.buf.ptr);
    blocks
        .iter()
        .flat_map(|b| {
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
        .collect()
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
fn plan(s: &Mamba1StackShape, layers: usize, dtype: DType, sms: usize, max_shared: usize, tune: (usize, usize, usize, usize)) -> Option<Plan> {
    let (warps, depth, stage_kib, spin_ns) = tune;
    let (d, e, n, r, k) = (s.d_model, s.d_inner, s.d_state, s.dt_rank, s.d_conv);
    let ds = dtype.size();
    let threads = 32 * warps;
    let max_ch = (e / 8).div_ceil(sms) * 8;
    let rows_b = (r + 2 * n).div_ceil(sms);
    let rows_d = d.div_ceil(sms);
    // Epilogues give a thread each output row (phase A: x and z rows).
    if 2 * max_ch > threads || rows_b > threads || rows_d > threads {
        return None;
    }
    let stage_bytes = r16((stage_kib << 10).max(d * ds).max(e * ds));
    // Norm weights, conv taps, conv bias and the conv window.
    let side_a = (r16(d * 4) + r16(max_ch * k * 4) + max_ch * 4 + max_ch * (k - 1) * 4).next_multiple_of(128);
    // dt_proj rows, A, D, dt bias and the SSM state, as stack.cu reads them.
    let side_c = (r16(max_ch * r * ds) + 2 * max_ch * n * 4 + 2 * max_ch * 4).next_multiple_of(128);
    let mut at = 0;
    let mut take = |bytes: usize| {
        let o = at;
        at += bytes.next_multiple_of(128);
        o
    };
    let off_side_a = take(2 * side_a);
    let off_side_c = take(2 * side_c);
    let off_x = take(d.max(e) * 4);
    let off_acc = take((2 * max_ch).max(rows_b).max(rows_d) * 4);
    let off_xc = take(max_ch * 4);
    let off_z = take(max_ch * 4);
    let off_dbl = take((r + 2 * n) * 4);
    let off_red = take(32 * 4);
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
        max_ch,
        off_side_a,
        side_a,
        off_side_c,
        side_c,
        off_x,
        off_acc,
        off_xc,
        off_z,
        off_dbl,
        off_red,
        off_layers,
        off_bars,
        off_ring,
        shared: off_ring + stages * stage_bytes,
        spin_ns,
    })
}

/// `MAMBA_SERVE_STACK_TUNE=warps,depth,stage_kib,spin_ns`, for
/// measurements.
fn tune() -> (usize, usize, usize, usize) {
    let default = (WARPS, DEPTH, STAGE_BYTES >> 10, SPIN_NS);
    let Ok(v) = std::env::var("MAMBA_SERVE_STACK_TUNE") else { return default };
    let f: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match f[..] {
        [w, d, s, n] if (1..=31).contains(&w) && d >= 1 && s >= 1 => (w, d, s, n),
        _ => {
            tracing::warn!(value = %v, "MAMBA_SERVE_STACK_TUNE is warps,depth,stage_kib,spin_ns; using the defaults");
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
    let max_shared = be
        .ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(dev("device attribute"))? as usize;
    let dtype = blocks[0].in_proj.dtype;
    let Some(plan) = plan(shape, blocks.len(), dtype, be.sms as usize, max_shared, tune()) else {
        tracing::debug!("decode steps run block by block: the stack's buffers do not fit shared memory");
        return Ok(false);
    };
    be.kernels.allow_shared(plan.kernel, plan.shared)?;
    let key = table_words(blocks);
    let table = DevBuf::alloc(&be.ctx, key.len() * 8, "stack table")?;
    be.upload_bytes(table.ptr, bytemuck_words(&key))?;
    let barrier = DevBuf::alloc(&be.ctx, 4, "stack barrier")?;
    be.upload_bytes(barrier.ptr, &[0; 4])?;
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
    *be.stack.borrow_mut() = Some(Prepared { plan, shape: *shape, key, table, barrier });
    Ok(true)
}

fn bytemuck_words(w: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any byte view of it is valid; the
    // slice covers exactly the words' bytes.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, std::mem::size_of_val(w)) }
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
        && a.conv_layout.per_layer == e * (k - 1)
        && a.ssm_layout.per_layer == e * n
        && a.conv_layout.n_layers == a.blocks.len()
        && a.ssm_layout.n_layers == a.blocks.len()
        && a.conv_state.len() >= a.conv_layout.len()
        && a.ssm_state.len() >= a.ssm_layout.len()
        && a.residual.len() >= d
        && a.xc.len() >= e
        && a.xdbl.len() >= r + 2 * n
        && a.y.len() >= e
        && batch.slots.len() >= 1;
    if !fits || table_words(a.blocks) != st.key {
        return Ok(false);
    }
    let p = &st.plan;
    let mut args = Args::new()
        .ptr(st.table.ptr)
        .ptr(a.residual.buf.ptr)
        .ptr(a.xc.buf.ptr)
        .ptr(a.xdbl.buf.ptr)
        .ptr(a.y.buf.ptr)
        .ptr(a.conv_state.buf.ptr)
        .ptr(a.ssm_state.buf.ptr)
        .ptr(batch.slots.buf.ptr)
        .ptr(st.barrier.ptr)
        .u64(a.conv_layout.per_slot() as u64)
        .u64(a.conv_layout.per_layer as u64)
        .u64(a.ssm_layout.per_slot() as u64)
        .u64(a.ssm_layout.per_layer as u64);
    let falcon = s.mixer_norm_eps.is_some() as u32;
    let ints: [u32; 28] = [
        a.blocks.len() as u32,
        d as u32,
        e as u32,
        n as u32,
        r as u32,
        k as u32,
        s.activation.code(),
        falcon,
        s.norm_eps.to_bits(),
        s.mixer_norm_eps.unwrap_or(0.0).to_bits(),
        p.stage_bytes as u32,
        p.stages as u32,
        p.depth as u32,
        p.max_ch as u32,
        p.off_ring as u32,
        p.off_side_a as u32,
        p.side_a as u32,
        p.off_side_c as u32,
        p.side_c as u32,
        p.off_x as u32,
        p.off_acc as u32,
        p.off_xc as u32,
        p.off_z as u32,
        p.off_dbl as u32,
        p.off_red as u32,
        p.off_layers as u32,
        p.off_bars as u32,
        p.spin_ns as u32,
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
        Mamba1StackShape { d_model: d, d_inner: e, d_state: n, dt_rank: r, d_conv: k, activation: Activation::Silu, norm_eps: 1e-5, mixer_norm_eps: None }
    }

    #[test]
    fn real_shapes_fit_an_h200_block_and_regions_do_not_overlap() {
        // mamba-130m .. mamba-2.8b and falcon-mamba-7b on 132 multiprocessors, 227 KiB a block.
        // Falcon-Mamba-7b's side buffers (64 channels of 256-wide dt_proj
        // rows a block, twice) leave a ring of 4 stages.
        for (d, e, r, layers, stages) in [(768, 1536, 48, 24, 8), (2048, 4096, 128, 48, 8), (2560, 5120, 160, 64, 8), (4096, 8192, 256, 64, 4)] {
            let p = plan(&shape(d, e, 16, r, 4), layers, DType::BF16, 132, 232_448, (WARPS, DEPTH, 8, 0)).expect("fits");
            assert!(p.shared <= 232_448 && p.stages >= stages, "{d}: {p:?}");
            assert!(p.stage_bytes >= e * 2, "{d}: a stage holds a whole out_proj row");
            let mut parts = [
                (p.off_side_a, 2 * p.side_a),
                (p.off_side_c, 2 * p.side_c),
                (p.off_x, e.max(d) * 4),
                (p.off_acc, 2 * p.max_ch * 4),
                (p.off_xc, p.max_ch * 4),
                (p.off_z, p.max_ch * 4),
                (p.off_dbl, (r + 32) * 4),
                (p.off_red, 128),
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
    fn too_many_channels_a_block_fall_back() {
        // 2 * max_ch rows of phase A must not exceed the consumer threads.
        assert!(plan(&shape(4096, 8192, 16, 256, 4), 64, DType::BF16, 8, 232_448, (WARPS, DEPTH, 8, 0)).is_none());
    }
}
