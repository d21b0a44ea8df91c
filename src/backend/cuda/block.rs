//! A Mamba-1 block at decode for one sequence with x_proj folded into
//! in_proj's conv epilogue (`XProjEpilogue` in `kernels/gemv.cu`): three
//! kernels a block (in_proj with the conv and x_proj, the step, out_proj)
//! where the ops would launch four.
//!
//! x_proj's sums arrive by atomic adds, so they need an accumulator that
//! holds zeros when in_proj starts. The backend keeps one row a layer
//! (zeroed when allocated): layer l's in_proj adds into row l and its step
//! reads it; layer l + 1's in_proj zeroes row l after its dependent-launch
//! wait, when the step that read it has finished. Between steps every row
//! is zero but the last layer's, which the next step's layer 0 zeroes. The
//! rows belong to these kernels alone: nothing else writes them.

use super::{CudaBackend, CudaVec, XPROJ_MAX};
use crate::backend::{Backend, Mamba1DecodeBlock, Mamba1StackShape, Mamba1StepArgs, Packed, Result, View, ViewMut, mamba1_block_ops};

/// The per-layer x_proj accumulators of one stack shape.
pub struct Accumulators {
    buf: CudaVec,
    layers: usize,
    width: usize,
}

/// Allocates the accumulators for `layers` blocks of `shape`, when the
/// fold can run for them.
pub fn prepare(be: &CudaBackend, layers: usize, shape: &Mamba1StackShape) -> Result<()> {
    *be.xproj_acc.borrow_mut() = None;
    let width = shape.dt_rank + 2 * shape.d_state;
    // One layer would zero the row it adds into.
    if !be.fused_x_proj || layers < 2 || width > XPROJ_MAX {
        return Ok(());
    }
    let mut buf = be.alloc(layers * width)?;
    be.fill(&mut buf, 0, layers * width, 0.0)?;
    *be.xproj_acc.borrow_mut() = Some(Accumulators { buf, layers, width });
    Ok(())
}

/// Whether this block runs with x_proj folded in.
fn folds(be: &CudaBackend, a: &Mamba1DecodeBlock<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>, acc: &Accumulators) -> bool {
    let (blk, s) = (&a.block, &a.shape);
    let width = s.dt_rank + 2 * s.d_state;
    // The fused tail (an opt-in variant) keeps its own x_proj.
    !be.fused_tail
        && batch.single_token
        && batch.n_seqs == 1
        && batch.n_tokens == 1
        && (a.layers, width) == (acc.layers, acc.width)
        && a.layer < a.layers
        && blk.x_proj.dtype == blk.in_proj.dtype
        && (blk.x_proj.rows, blk.x_proj.cols) == (width, s.d_inner)
        && blk.in_proj.rows == 2 * s.d_inner
        && CudaBackend::gemv_stream_cols(blk.in_proj, 1).is_some()
}

/// [`Backend::mamba1_decode_block`] on the GPU: folded when it can be,
/// else as the two ops.
pub fn run(be: &CudaBackend, mut a: Mamba1DecodeBlock<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>) -> Result<()> {
    let acc = be.xproj_acc.borrow();
    let Some(acc) = acc.as_ref().filter(|acc| folds(be, &a, batch, acc)) else {
        return mamba1_block_ops(be, a, batch);
    };
    let fuses = |a: &mut Mamba1DecodeBlock<'_, CudaBackend>| {
        let e = a.entry(1);
        CudaBackend::entry_fuses(&e.product, &e.conv, batch)
    };
    if !fuses(&mut a) {
        return mamba1_block_ops(be, a, batch);
    }
    let w = acc.width;
    let (row, prev) = (a.layer * w, (a.layer + a.layers - 1) % a.layers * w);
    let xproj = [a.block.x_proj.buf.ptr, acc.buf.at(row), acc.buf.at(prev), w as u64];
    let e = a.entry(1);
    be.fused_entry(e.product, e.normed, e.proj, e.conv, batch, e.conv_out, Some(xproj))?;
    let (blk, s) = (&a.block, &a.shape);
    let di = s.d_inner;
    let step = Mamba1StepArgs {
        x: View::dense(&*a.conv_out, 1, di),
        xdbl: View { buf: &acc.buf, offset: row, rows: 1, cols: w, stride: w },
        ssm: blk.ssm(s),
        z: View::dense(&*a.proj, 1, 2 * di).columns(di, di),
        state: a.ssm_state,
        layout: a.ssm_layout,
        layer: a.layer,
    };
    be.mamba1_step(step, batch, ViewMut::dense(&mut *a.y, 1, di))?;
    be.linear_add(View::dense(&*a.y, 1, di), blk.out_proj, blk.out_proj_bias, ViewMut::dense(a.residual, 1, s.d_model))?;
    be.xproj_launches.set(be.xproj_launches.get() + 1);
    Ok(())
}
