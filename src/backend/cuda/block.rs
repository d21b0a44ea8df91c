//! A Mamba-1 block at decode for one sequence with x_proj folded into
//! in_proj's conv epilogue (`XProjEpilogue` in `kernels/gemv.cu`): three
//! kernels a block (in_proj with the conv and x_proj, the step, out_proj)
//! where the ops would launch four.
//!
//! The fold reads x_proj's weights grouped the way in_proj's warps take
//! the conv's channels (`XProjEpilogue`), so the backend keeps such a copy
//! of each layer's x_proj, made on the device at load (~1.3 MB a layer at
//! mamba-1.4b).
//!
//! x_proj's sums arrive by atomic adds, so they need an accumulator that
//! holds zeros when in_proj starts. The backend keeps one row a layer
//! (zeroed when allocated): layer l's in_proj adds into row l and its step
//! reads it; layer l + 1's in_proj zeroes row l after its dependent-launch
//! wait, when the step that read it has finished. Between steps every row
//! is zero but the last layer's, which the next step's layer 0 zeroes. The
//! rows belong to these kernels alone: nothing else writes them.

use super::kernels::{Args, Kernel};
use super::{CudaBackend, CudaVec, DevBuf, ROW_THREADS, XPROJ_MAX};
use crate::backend::{
    Backend, BackendError, Mamba1Block, Mamba1DecodeBlock, Mamba1StackShape, Mamba1StepArgs, Packed, Result, View, ViewMut,
    mamba1_block_ops,
};

/// What the fold keeps for one model's blocks: the per-layer accumulators
/// and each layer's grouped x_proj (channels `group` at a time: the
/// streaming in_proj's columns a warp's group), with the weights it was
/// made from.
pub struct Accumulators {
    buf: CudaVec,
    layers: usize,
    width: usize,
    group: usize,
    grouped: Vec<(u64, DevBuf)>,
}

/// Readies the fold for these blocks of `shape`, when it can run for them.
/// Short of device memory for its copies, the blocks run unfolded.
pub fn prepare(be: &CudaBackend, blocks: &[Mamba1Block<'_, CudaBackend>], shape: &Mamba1StackShape) -> Result<()> {
    *be.xproj_acc.borrow_mut() = None;
    let (layers, width) = (blocks.len(), shape.dt_rank + 2 * shape.d_state);
    // One layer would zero the row it adds into; the atomics add 4 floats;
    // groups never straddle the conv's channels and the rest.
    let Some(group) = blocks.first().and_then(|b| CudaBackend::gemv_stream_cols(b.in_proj, 1)) else { return Ok(()) };
    if !be.fold_x_proj || layers < 2 || width > XPROJ_MAX || width % 4 != 0 || shape.d_inner % group != 0 {
        return Ok(());
    }
    let Some(mut buf) = unless_short(be.alloc(layers * width))? else { return Ok(()) };
    be.fill(&mut buf, 0, layers * width, 0.0)?;
    let mut grouped = Vec::with_capacity(layers);
    for b in blocks {
        let m = b.x_proj;
        let esize = m.dtype.size();
        let Some(copy) = unless_short(DevBuf::alloc(&be.stream, m.rows * m.cols * esize, "grouped x_proj"))? else { return Ok(()) };
        let args = Args::new().ptr(m.buf.ptr).ptr(copy.ptr).i32(m.rows).i32(m.cols).i32(esize).i32(group);
        let grid = (m.rows * m.cols).div_ceil(ROW_THREADS as usize).min(4096) as u32;
        be.launch(Kernel::GroupColumns, args, (grid, 1, 1), ROW_THREADS)?;
        grouped.push((m.buf.ptr, copy));
    }
    *be.xproj_acc.borrow_mut() = Some(Accumulators { buf, layers, width, group, grouped });
    Ok(())
}

/// An allocation for the fold, or `None` (with a warning: the blocks run
/// unfolded) when the device is short of memory.
fn unless_short<T>(allocated: Result<T>) -> Result<Option<T>> {
    match allocated {
        Ok(t) => Ok(Some(t)),
        Err(e @ BackendError::OutOfMemory { .. }) => {
            tracing::warn!("x_proj runs as its own kernel at decode: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
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
        && acc.grouped.get(a.layer).is_some_and(|(of, _)| *of == blk.x_proj.buf.ptr)
        && blk.x_proj.dtype == blk.in_proj.dtype
        && (blk.x_proj.rows, blk.x_proj.cols) == (width, s.d_inner)
        && blk.in_proj.rows == 2 * s.d_inner
        && CudaBackend::gemv_stream_cols(blk.in_proj, 1) == Some(acc.group)
}

/// [`Backend::mamba1_decode_block`] on the GPU: folded when it can be,
/// else as the two ops.
pub fn run(be: &CudaBackend, mut a: Mamba1DecodeBlock<'_, CudaBackend>, batch: &Packed<'_, CudaBackend>) -> Result<()> {
    let acc = be.xproj_acc.borrow();
    let Some(acc) = acc.as_ref().filter(|acc| folds(be, &a, batch, acc)) else {
        return mamba1_block_ops(be, a, batch);
    };
    let fuses = {
        let e = a.entry(1);
        CudaBackend::entry_fuses(&e.product, &e.conv, batch)
    };
    if !fuses {
        return mamba1_block_ops(be, a, batch);
    }
    let w = acc.width;
    let (row, prev) = (a.layer * w, (a.layer + a.layers - 1) % a.layers * w);
    let xproj = [acc.grouped[a.layer].1.ptr, acc.buf.at(row), acc.buf.at(prev), w as u64];
    let e = a.entry(1);
    be.fused_entry(e.product, e.normed, e.proj, e.conv, batch, e.conv_out, Some(xproj))?;
    let (blk, s) = (&a.block, &a.shape);
    let di = s.d_inner;
    let step = Mamba1StepArgs {
        x: View::dense(&*a.conv_out, 1, di),
        xdbl: View { buf: &acc.buf, offset: row, rows: 1, cols: w, stride: w },
        ssm: blk.ssm(s),
        z: View::dense(&*a.proj, 1, 2 * di).columns(di, di),
        state: a.state.ssm_state,
        layout: a.state.ssm_layout,
        layer: a.layer,
    };
    be.mamba1_step(step, batch, ViewMut::dense(&mut *a.y, 1, di))?;
    be.linear_add(View::dense(&*a.y, 1, di), blk.out_proj, blk.out_proj_bias, ViewMut::dense(a.state.residual, 1, s.d_model))?;
    be.xproj_folded.set(be.xproj_folded.get() + 1);
    Ok(())
}
