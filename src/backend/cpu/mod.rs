//! The CPU backend: the oracle every other backend is checked against, and
//! what serves on a machine without a GPU.
//!
//! Activations and states are `Vec<f32>`. Weights are widened to f32 once at
//! upload (bf16 and f16 widen exactly), so the CPU computes the same function
//! as a float32 reference run of the same checkpoint. GEMMs go through the
//! `gemm` crate (SIMD, multi-threaded on rayon's pool); the scans and the
//! conv are parallel over (sequence, channel block).

mod gemv;
mod math;
mod parallel;
pub mod sample;
mod step;

use super::checks::{self, check};
use super::{
    Backend, ConvArgs, HostMatrix, Mamba1ScanArgs, Mamba1StepArgs, Mamba2ScanArgs, NormedLinear, Packed, Result, SampleRow, SampledToken,
    View, ViewMut, widen,
};

pub use math::{gelu, gelu_tanh, silu, softplus};

/// A weight matrix widened to f32, row-major `[rows, cols]`.
pub struct CpuMat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// The CPU backend. Stateless apart from the thread count it reports and
/// what its new buffers hold.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    poison: bool,
}

impl CpuBackend {
    /// New buffers ([`Backend::alloc`]) hold zeros.
    pub fn new() -> Self {
        CpuBackend { poison: false }
    }

    /// New buffers hold NaN, as device memory holds what a freed buffer
    /// left there: a model run on this backend shows any read of a buffer
    /// before something wrote it.
    pub fn with_poisoned_allocations() -> Self {
        CpuBackend { poison: true }
    }
}

/// The CPU's further checks of a packed batch, whose offsets and slots it
/// can read: offsets ascending from 0 to `n_tokens`, slots in range and
/// distinct.
fn check_packed(op: &'static str, batch: &Packed<'_, CpuBackend>, n_slots: usize) -> Result<()> {
    let cu = &batch.cu_seqlens[..batch.n_seqs + 1];
    check(op, cu[0] == 0 && cu[batch.n_seqs] as usize == batch.n_tokens, || {
        format!("cu_seqlens must run from 0 to {}, got {:?}", batch.n_tokens, cu)
    })?;
    check(op, cu.windows(2).all(|w| w[0] <= w[1]), || format!("cu_seqlens not ascending: {cu:?}"))?;
    let slots = &batch.slots[..batch.n_seqs];
    check(op, slots.iter().all(|&s| (s as usize) < n_slots), || format!("slot out of range 0..{n_slots}: {slots:?}"))?;
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    check(op, sorted.windows(2).all(|w| w[0] != w[1]), || format!("slots not distinct: {slots:?}"))
}

impl checks::Matrix for CpuMat {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

impl Backend for CpuBackend {
    type Vec = Vec<f32>;
    type Ids = Vec<u32>;
    type Mat = CpuMat;
    type Graph = ();
    /// Sampling on the host is done when it starts.
    type Sampling = Vec<SampledToken>;

    fn describe(&self) -> String {
        format!("cpu ({} threads, f32 compute)", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![if self.poison { f32::NAN } else { 0.0 }; len])
    }

    fn alloc_ids(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn upload_matrix(&self, m: &HostMatrix<'_>) -> Result<CpuMat> {
        let expected = m.rows * m.cols * m.dtype.size();
        check("upload_matrix", m.bytes.len() == expected, || {
            format!("{}: {} bytes for [{}, {}] {}", m.name, m.bytes.len(), m.rows, m.cols, m.dtype)
        })?;
        Ok(CpuMat { rows: m.rows, cols: m.cols, data: widen(m.bytes, m.dtype) })
    }

    fn write_ids(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        check("write_ids", src.len() <= dst.len(), || format!("{} ids into a buffer of {}", src.len(), dst.len()))?;
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn write(&self, dst: &mut Vec<f32>, offset: usize, src: &[f32]) -> Result<()> {
        check("write", offset + src.len() <= dst.len(), || format!("{}+{} > {}", offset, src.len(), dst.len()))?;
        dst[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        check("read", offset + len <= src.len(), || format!("{offset}+{len} > {}", src.len()))?;
        Ok(src[offset..offset + len].to_vec())
    }

    fn fill(&self, dst: &mut Vec<f32>, offset: usize, len: usize, value: f32) -> Result<()> {
        check("fill", offset + len <= dst.len(), || format!("{offset}+{len} > {}", dst.len()))?;
        dst[offset..offset + len].fill(value);
        Ok(())
    }

    fn copy_within(&self, buf: &mut Vec<f32>, src: usize, dst: usize, len: usize) -> Result<()> {
        check("copy_within", src + len <= buf.len() && dst + len <= buf.len(), || {
            format!("copy {len} from {src} to {dst} in a buffer of {}", buf.len())
        })?;
        check("copy_within", src + len <= dst || dst + len <= src, || "ranges overlap".to_string())?;
        buf.copy_within(src..src + len, dst);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn embed(&self, table: &CpuMat, ids: &Vec<u32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        checks::embed::<Self>(table, ids, n, out)?;
        let d = table.cols;
        for (t, &id) in ids[..n].iter().enumerate() {
            let id = id as usize;
            check("embed", id < table.rows, || format!("token id {id} outside {} rows", table.rows))?;
            out[t * d..(t + 1) * d].copy_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        Ok(())
    }

    fn linear(&self, x: View<'_, Vec<f32>>, w: &CpuMat, bias: Option<&Vec<f32>>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::linear::<Self>(&x, w, bias, &out)?;
        math::linear(x, w, bias, out, false);
        Ok(())
    }

    fn linear_add(&self, x: View<'_, Vec<f32>>, w: &CpuMat, bias: Option<&Vec<f32>>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::linear::<Self>(&x, w, bias, &out)?;
        math::linear(x, w, bias, out, true);
        Ok(())
    }

    fn rmsnorm_linear(&self, p: NormedLinear<'_, Self>, normed: &mut Vec<f32>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::rmsnorm_linear(&p, normed, &out)?;
        let (n, k) = (p.rows * p.w.cols, p.w.cols);
        math::rmsnorm(&p.x[..n], p.norm, p.eps, k, &mut normed[..n]);
        math::linear(View::dense(normed, p.rows, k), p.w, p.bias, out, false);
        Ok(())
    }

    fn conv1d(&self, args: ConvArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::conv1d(&args, batch, &out)?;
        check_packed("conv1d", batch, args.layout.n_slots)?;
        math::conv1d(args, batch, out);
        Ok(())
    }

    fn rms_norm_columns(&self, x: ViewMut<'_, Vec<f32>>, groups: &[(usize, usize)], eps: f32) -> Result<()> {
        checks::rms_norm_columns(&x, groups)?;
        math::rms_norm_columns(x, groups, eps);
        Ok(())
    }

    fn mamba1_scan(&self, args: Mamba1ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::mamba1_scan(&args, batch, &out)?;
        check_packed("mamba1_scan", batch, args.layout.n_slots)?;
        math::mamba1_scan(args, batch, out);
        Ok(())
    }

    fn mamba1_step(&self, args: Mamba1StepArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::mamba1_step(&args, batch, &out)?;
        check_packed("mamba1_step", batch, args.layout.n_slots)?;
        step::mamba1_step(args, batch, out);
        Ok(())
    }

    fn mamba2_scan(&self, args: Mamba2ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::mamba2_scan(&args, batch, &out)?;
        check_packed("mamba2_scan", batch, args.layout.n_slots)?;
        math::mamba2_scan(args, batch, out);
        Ok(())
    }

    fn gated_rmsnorm(
        &self,
        y: View<'_, Vec<f32>>,
        z: View<'_, Vec<f32>>,
        weight: &Vec<f32>,
        eps: f32,
        group_size: usize,
        out: ViewMut<'_, Vec<f32>>,
    ) -> Result<()> {
        checks::gated_rmsnorm(&y, &z, weight, group_size, &out)?;
        math::gated_rmsnorm(y, z, weight, eps, group_size, out);
        Ok(())
    }

    fn sample_start(&self, logits: View<'_, Vec<f32>>, rows: &[&SampleRow], feed: Option<&mut Vec<u32>>) -> Result<Vec<SampledToken>> {
        checks::sample(&logits, rows, feed.as_deref())?;
        let tokens: Vec<SampledToken> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let start = logits.offset + i * logits.stride;
                let mut l = logits.buf[start..start + logits.cols].to_vec();
                sample::sample_row(&mut l, row)
            })
            .collect();
        if let Some(feed) = feed {
            // Long enough: checked above.
            for (id, t) in feed.iter_mut().zip(&tokens) {
                *id = t.token;
            }
        }
        Ok(tokens)
    }

    fn sample_finish(&self, started: Vec<SampledToken>) -> Result<Vec<SampledToken>> {
        Ok(started)
    }

    fn gather_rows(&self, src: View<'_, Vec<f32>>, rows: &Vec<u32>, n: usize, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        checks::gather_rows::<Self>(&src, rows, n, &out)?;
        check("gather_rows", rows[..n].iter().all(|&r| (r as usize) < src.rows), || format!("row index outside {} rows", src.rows))?;
        for (i, &r) in rows[..n].iter().enumerate() {
            let s = src.offset + r as usize * src.stride;
            let o = out.offset + i * out.stride;
            out.buf[o..o + src.cols].copy_from_slice(&src.buf[s..s + src.cols]);
        }
        Ok(())
    }
}
