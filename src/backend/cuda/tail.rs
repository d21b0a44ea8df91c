//! Host side of the fused decode tail (`mamba1_tail_*` in
//! `kernels/step.cu`): everything of a Mamba-1 block after its conv, for one
//! sequence's decode token, in one launch of one block a multiprocessor.
//! Each block starts bulk copies of the weights it will use into shared
//! memory as it starts, so out_proj's stream in while x_proj and the step
//! run; two grid barriers hand x_proj's outputs and y between the blocks.
//! Hopper and later (bulk copies, programmatic dependent launch).
//!
//! [`launch`] declines (`Ok(false)`) whatever the kernel does not take, and
//! the backend then runs the three ops one after the other.

use super::kernels::{Args, Kernel};
use super::{CudaBackend, CudaVec, r16};
use crate::backend::{DType, Mamba1TailArgs, Packed, Result};

/// Threads a block (`__launch_bounds__` of the kernels).
const THREADS: u32 = 512;
/// x_proj rows a block holds at most (`TAIL_XR`).
const MAX_X_ROWS: usize = 4;
/// Warps whose partial sums the reduction area holds (THREADS / 32).
const MAX_WARPS: usize = THREADS as usize / 32;

/// The shared-memory layout of one shape, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    off_dt: usize,
    off_dbl: usize,
    off_red: usize,
    off_bar: usize,
    off_o: usize,
    /// out_proj rows of a block kept in shared memory (the rest are read
    /// from global memory when out_proj runs).
    preload: usize,
    shared: usize,
}

/// A shape the plan is made for: d_model, channels, states, rank, weight
/// bytes.
pub(super) type Shape = (usize, usize, usize, usize, usize);
/// The last shape planned and its plan (`None`: the kernel does not fit it).
pub(super) type LastPlan = Option<(Shape, Option<Plan>)>;

/// The layout for `blocks` blocks over d_model `d`, `e` channels, `n`
/// states, rank `r` and `es`-byte weights: x_proj's rows, the channels'
/// dt_proj rows, xdbl, the reduction, then as many of the block's out_proj
/// rows as fit in `max_shared`. `None` when the rest does not fit.
pub(super) fn plan(d: usize, e: usize, n: usize, r: usize, es: usize, blocks: usize, max_shared: usize) -> Option<Plan> {
    let w = r + 2 * n;
    let x_rows = w.div_ceil(blocks);
    if x_rows > MAX_X_ROWS {
        return None;
    }
    let row = e * es;
    let off_dt = x_rows * row;
    let off_dbl = r16(off_dt + e.div_ceil(blocks) * r * es);
    let off_red = r16(off_dbl + w * 4);
    // 8 sums a warp for each 8 of a block's out_proj rows (and x_proj's).
    let off_bar = r16(off_red + d.div_ceil(blocks).div_ceil(8).max(1) * MAX_WARPS * 8 * 4);
    let off_o = r16(off_bar + 3 * 8);
    if off_o > max_shared {
        return None;
    }
    let preload = ((max_shared - off_o) / row).min(d.div_ceil(blocks));
    Some(Plan { off_dt, off_dbl, off_red, off_bar, off_o, preload, shared: off_o + preload * row })
}

/// Why the fused tail does not take these arguments, or `None`.
fn unsupported(a: &Mamba1TailArgs<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>) -> Option<&'static str> {
    let (e, n, r) = (a.x.cols, a.ssm.d_state, a.ssm.dt_rank);
    let w = r + 2 * n;
    let d = a.residual.cols;
    let dtype = a.out_proj.dtype;
    if batch.n_seqs != 1 || batch.n_tokens != 1 {
        return Some("more than one token");
    }
    if a.x_proj.dtype != dtype || a.ssm.dt_proj.dtype != dtype {
        return Some("mixed weight types");
    }
    if e % 8 != 0 || n == 0 || n > 32 {
        return Some("channels not a multiple of 8, or more than 32 states");
    }
    if (a.x_proj.rows, a.x_proj.cols) != (w, e)
        || (a.ssm.dt_proj.rows, a.ssm.dt_proj.cols) != (e, r)
        || (a.out_proj.rows, a.out_proj.cols) != (d, e)
    {
        return Some("weight shapes");
    }
    if a.x.offset % 4 != 0 || a.z.cols != e || a.x.rows < 1 || a.z.rows < 1 || a.residual.rows < 1 {
        return Some("activation layout");
    }
    let lengths = a.xdbl.len >= w
        && a.y.len >= e
        && a.ssm.dt_bias.len >= e
        && a.ssm.skip.len >= e
        && a.ssm.a.len >= e * n
        && a.out_proj_bias.is_none_or(|b| b.len >= d)
        && a.layout.per_layer == e * n
        && a.layer < a.layout.n_layers
        && a.state.len >= a.layout.len()
        && a.x.buf.len >= a.x.offset + e
        && a.z.buf.len >= a.z.offset + e
        && a.residual.buf.len >= a.residual.offset + d
        && batch.slots.len >= 1;
    (!lengths).then_some("buffer lengths")
}

/// [`crate::backend::Backend::mamba1_decode_tail`] as one launch, when the
/// backend has it on and the kernel takes these arguments; `Ok(false)`
/// (nothing done) otherwise.
pub fn launch(be: &CudaBackend, a: &Mamba1TailArgs<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>) -> Result<bool> {
    if !be.fused_tail || be.sm.0 < 9 {
        return Ok(false);
    }
    if let Some(why) = unsupported(a, batch) {
        tracing::trace!("decode tail as three ops: {why}");
        return Ok(false);
    }
    let (d, e, n, r) = (a.residual.cols, a.x.cols, a.ssm.d_state, a.ssm.dt_rank);
    let dtype = a.out_proj.dtype;
    let kernel = match dtype {
        DType::F32 => Kernel::Mamba1TailF32,
        DType::BF16 => Kernel::Mamba1TailBf16,
        DType::F16 => Kernel::Mamba1TailF16,
    };
    let Some(p) = be.tail_plan(kernel, (d, e, n, r, dtype.size()))? else { return Ok(false) };
    let (state, slot_stride, layer_off) = CudaBackend::ssm_layout_args(a.state, a.layout, a.layer);
    let ptr = |v: &CudaVec| v.buf.ptr;
    let args = Args::new()
        .ptr(a.x.buf.at(a.x.offset))
        .ptr(a.z.buf.at(a.z.offset))
        .ptr(a.x_proj.buf.ptr)
        .ptr(a.ssm.dt_proj.buf.ptr)
        .ptr(ptr(a.ssm.dt_bias))
        .ptr(ptr(a.ssm.a))
        .ptr(ptr(a.ssm.skip))
        .ptr(a.out_proj.buf.ptr)
        .ptr(a.out_proj_bias.map_or(0, ptr))
        .ptr(ptr(a.xdbl))
        .ptr(ptr(a.y))
        .ptr(a.residual.buf.at(a.residual.offset))
        .ptr(state)
        .u64(slot_stride)
        .u64(layer_off)
        .ptr(batch.slots.buf.ptr)
        .ptr(be.tail_barrier.ptr)
        .i32(d)
        .i32(e)
        .i32(n)
        .i32(r)
        .u32(a.ssm.norm_eps.is_some() as u32)
        .f32(a.ssm.norm_eps.unwrap_or(0.0))
        .i32(n.next_power_of_two())
        .i32(p.preload)
        .i32(p.off_dt)
        .i32(p.off_o)
        .i32(p.off_dbl)
        .i32(p.off_red)
        .i32(p.off_bar)
        .u32((r % 8 == 0) as u32)
        .u32(be.tail_flags)
        .shared_bytes(p.shared as u32);
    be.launch_dependent(kernel, args, (be.sms, 1, 1), THREADS)?;
    be.tail_launches.set(be.tail_launches.get() + 1);
    Ok(true)
}

impl CudaBackend {
    /// The plan for a shape (d, e, n, r, weight bytes), made once: the
    /// kernel is allowed its shared memory and must fit one block a
    /// multiprocessor, so that every block of the grid is resident at once
    /// (the grid barriers wait for all of them). `None` when it does not.
    fn tail_plan(&self, kernel: Kernel, shape: Shape) -> Result<Option<Plan>> {
        if let Some((at, plan)) = *self.tail_plans.borrow() {
            if at == shape {
                return Ok(plan);
            }
        }
        let max_shared = self.max_shared_optin()?;
        let (d, e, n, r, es) = shape;
        let mut plan = plan(d, e, n, r, es, self.sms as usize, max_shared);
        if let Some(p) = plan {
            self.kernels.allow_shared(kernel, p.shared)?;
            if self.kernels.resident_blocks_exact(kernel, THREADS, p.shared)? == 0 {
                plan = None;
            }
        }
        match plan {
            Some(p) => tracing::debug!(preload = p.preload, shared = p.shared, "one-sequence decode tails run as one kernel"),
            None => tracing::debug!("decode tail as three ops: its shared memory does not fit"),
        }
        *self.tail_plans.borrow_mut() = Some((shape, plan));
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200_SHARED: usize = 232_448;

    #[test]
    fn real_shapes_fit_and_the_regions_do_not_overlap() {
        // (d_model, d_inner, d_state, rank): mamba-130m, 1.4b, 2.8b, Falcon-Mamba-7b.
        for (d, e, n, r) in [(768, 1536, 16, 48), (2048, 4096, 16, 128), (2560, 5120, 16, 160), (4096, 8192, 16, 256)] {
            let p = plan(d, e, n, r, 2, 132, H200_SHARED).expect("fits");
            let w = r + 2 * n;
            assert!(w.div_ceil(132) * e * 2 <= p.off_dt);
            assert!(p.off_dt + e.div_ceil(132) * r * 2 <= p.off_dbl);
            assert!(p.off_dbl + w * 4 <= p.off_red);
            assert!(p.off_red + MAX_WARPS * 32 <= p.off_bar);
            assert!(p.off_bar + 24 <= p.off_o);
            assert_eq!(p.shared, p.off_o + p.preload * e * 2);
            assert!(p.shared <= H200_SHARED);
            for off in [p.off_dt, p.off_dbl, p.off_red, p.off_bar, p.off_o] {
                assert_eq!(off % 16, 0);
            }
        }
        // mamba-1.4b keeps all of its out_proj rows in shared memory,
        // Falcon-Mamba-7b only some.
        assert_eq!(plan(2048, 4096, 16, 128, 2, 132, H200_SHARED).unwrap().preload, 16);
        let p = plan(4096, 8192, 16, 256, 2, 132, H200_SHARED).unwrap();
        assert!(p.preload > 0 && p.preload < 32, "{p:?}");
    }

    #[test]
    fn too_many_x_proj_rows_or_too_little_memory_decline() {
        assert_eq!(plan(2048, 4096, 16, 1024, 2, 132, H200_SHARED), None);
        assert_eq!(plan(2048, 4096, 16, 128, 2, 132, 8 << 10), None);
    }
}
