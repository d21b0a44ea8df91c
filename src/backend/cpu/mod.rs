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

use half::{bf16, f16};

use super::{
    Backend, BackendError, ConvArgs, DType, HostMatrix, Mamba1ScanArgs, Mamba1StepArgs, Mamba2ScanArgs, Packed, Result, SampleRow,
    SampledToken, View, ViewMut,
};

pub use math::{gelu, gelu_tanh, silu, softplus};

/// A weight matrix widened to f32, row-major `[rows, cols]`.
pub struct CpuMat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// The CPU backend. Stateless apart from the thread count it reports.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Widens little-endian bytes of `dtype` to f32.
pub fn widen(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
    }
}

fn check(op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(BackendError::Shape { op, detail: detail() }) }
}

fn check_view(op: &'static str, what: &str, len: usize, v: (usize, usize, usize, usize)) -> Result<()> {
    let (offset, rows, cols, stride) = v;
    let end = if rows == 0 { offset } else { offset + (rows - 1) * stride + cols };
    check(op, cols <= stride || rows <= 1, || format!("{what}: {cols} columns exceed stride {stride}"))?;
    check(op, end <= len, || format!("{what}: view ends at {end} but the buffer holds {len}"))
}

fn view_dims<T>(v: &View<'_, T>) -> (usize, usize, usize, usize) {
    (v.offset, v.rows, v.cols, v.stride)
}

fn view_mut_dims<T>(v: &ViewMut<'_, T>) -> (usize, usize, usize, usize) {
    (v.offset, v.rows, v.cols, v.stride)
}

/// Checks a packed batch: offsets ascending from 0 to `n_tokens`, slots in
/// range and distinct.
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

impl Backend for CpuBackend {
    type Vec = Vec<f32>;
    type Ids = Vec<u32>;
    type Mat = CpuMat;
    type Graph = ();

    fn describe(&self) -> String {
        format!("cpu ({} threads, f32 compute)", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
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
        let d = table.cols;
        check("embed", n <= ids.len() && n * d <= out.len(), || format!("{n} ids, out holds {}", out.len()))?;
        for (t, &id) in ids[..n].iter().enumerate() {
            let id = id as usize;
            check("embed", id < table.rows, || format!("token id {id} outside {} rows", table.rows))?;
            out[t * d..(t + 1) * d].copy_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        Ok(())
    }

    fn add_rmsnorm(
        &self,
        residual: &mut Vec<f32>,
        delta: Option<&Vec<f32>>,
        weight: &Vec<f32>,
        eps: f32,
        rows: usize,
        dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let n = rows * dim;
        check("add_rmsnorm", residual.len() >= n && out.len() >= n && weight.len() == dim, || {
            format!("rows {rows} dim {dim}: residual {} out {} weight {}", residual.len(), out.len(), weight.len())
        })?;
        if let Some(delta) = delta {
            check("add_rmsnorm", delta.len() >= n, || format!("delta holds {} < {n}", delta.len()))?;
        }
        math::add_rmsnorm(&mut residual[..n], delta.map(|d| &d[..n]), weight, eps, dim, &mut out[..n]);
        Ok(())
    }

    fn linear(&self, x: View<'_, Vec<f32>>, w: &CpuMat, bias: Option<&Vec<f32>>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        check("linear", x.cols == w.cols && out.cols == w.rows && out.rows == x.rows, || {
            format!("x [{}, {}] · w[{}, {}]ᵀ into out [{}, {}]", x.rows, x.cols, w.rows, w.cols, out.rows, out.cols)
        })?;
        check_view("linear", "x", x.buf.len(), view_dims(&x))?;
        check_view("linear", "out", out.buf.len(), view_mut_dims(&out))?;
        if let Some(b) = bias {
            check("linear", b.len() == w.rows, || format!("bias of {} for {} outputs", b.len(), w.rows))?;
        }
        math::linear(x, w, bias, out);
        Ok(())
    }

    fn conv1d(&self, args: ConvArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        let ch = args.x.cols;
        let k = args.kernel;
        check("conv1d", k >= 1 && args.weight.len() == ch * k, || format!("weight {} for {ch} channels × {k}", args.weight.len()))?;
        check("conv1d", args.layout.per_layer == ch * (k - 1), || {
            format!("conv state per layer {} for {ch} channels × {}", args.layout.per_layer, k - 1)
        })?;
        check("conv1d", out.cols == ch && out.rows == batch.n_tokens && args.x.rows == batch.n_tokens, || {
            format!("x [{}, {ch}] out [{}, {}] for {} tokens", args.x.rows, out.rows, out.cols, batch.n_tokens)
        })?;
        check("conv1d", args.state.len() == args.layout.len() && args.layer < args.layout.n_layers, || {
            "state buffer does not match its layout".to_string()
        })?;
        if let Some(b) = args.bias {
            check("conv1d", b.len() == ch, || format!("bias of {} for {ch} channels", b.len()))?;
        }
        check_view("conv1d", "x", args.x.buf.len(), view_dims(&args.x))?;
        check_view("conv1d", "out", out.buf.len(), view_mut_dims(&out))?;
        check_packed("conv1d", batch, args.layout.n_slots)?;
        math::conv1d(args, batch, out);
        Ok(())
    }

    fn rms_norm_columns(&self, x: ViewMut<'_, Vec<f32>>, groups: &[(usize, usize)], eps: f32) -> Result<()> {
        check("rms_norm_columns", groups.iter().all(|&(s, l)| s + l <= x.cols && l > 0), || {
            format!("groups {groups:?} outside {} columns", x.cols)
        })?;
        check_view("rms_norm_columns", "x", x.buf.len(), view_mut_dims(&x))?;
        math::rms_norm_columns(x, groups, eps);
        Ok(())
    }

    fn mamba1_scan(&self, args: Mamba1ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        let d = args.x.cols;
        let n = args.d_state;
        let t = batch.n_tokens;
        check("mamba1_scan", args.layout.per_layer == d * n && args.state.len() == args.layout.len(), || {
            format!("state per layer {} for {d} channels × {n}", args.layout.per_layer)
        })?;
        check("mamba1_scan", args.a.len() == d * n && args.dt_bias.len() == d && args.skip.len() == d, || {
            format!("a {} dt_bias {} D {} for {d} channels × {n}", args.a.len(), args.dt_bias.len(), args.skip.len())
        })?;
        for (what, v) in [("x", &args.x), ("dt", &args.dt), ("z", &args.z)] {
            check("mamba1_scan", v.rows == t && v.cols == d, || format!("{what} is [{}, {}], want [{t}, {d}]", v.rows, v.cols))?;
            check_view("mamba1_scan", what, v.buf.len(), view_dims(v))?;
        }
        for (what, v) in [("B", &args.b), ("C", &args.c)] {
            check("mamba1_scan", v.rows == t && v.cols == n, || format!("{what} is [{}, {}], want [{t}, {n}]", v.rows, v.cols))?;
            check_view("mamba1_scan", what, v.buf.len(), view_dims(v))?;
        }
        check("mamba1_scan", out.rows == t && out.cols == d, || format!("out is [{}, {}]", out.rows, out.cols))?;
        check_view("mamba1_scan", "out", out.buf.len(), view_mut_dims(&out))?;
        check_packed("mamba1_scan", batch, args.layout.n_slots)?;
        math::mamba1_scan(args, batch, out);
        Ok(())
    }

    fn mamba1_step(&self, args: Mamba1StepArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        let (d, n, r) = (args.x.cols, args.d_state, args.dt_rank);
        let s = batch.n_seqs;
        check("mamba1_step", batch.single_token && batch.n_tokens == s, || "every segment must hold one token".into())?;
        check("mamba1_step", args.layout.per_layer == d * n && args.state.len() == args.layout.len(), || {
            format!("state per layer {} for {d} channels × {n}", args.layout.per_layer)
        })?;
        check("mamba1_step", args.a.len() == d * n && args.dt_bias.len() == d && args.skip.len() == d, || {
            format!("a {} dt_bias {} D {} for {d} channels × {n}", args.a.len(), args.dt_bias.len(), args.skip.len())
        })?;
        check("mamba1_step", args.dt_proj.rows == d && args.dt_proj.cols == r, || {
            format!("dt_proj [{}, {}] for {d} channels, rank {r}", args.dt_proj.rows, args.dt_proj.cols)
        })?;
        check("mamba1_step", args.xdbl.rows == s && args.xdbl.cols == r + 2 * n, || {
            format!("xdbl is [{}, {}], want [{s}, {}]", args.xdbl.rows, args.xdbl.cols, r + 2 * n)
        })?;
        for (what, v) in [("x", &args.x), ("z", &args.z)] {
            check("mamba1_step", v.rows == s && v.cols == d, || format!("{what} is [{}, {}], want [{s}, {d}]", v.rows, v.cols))?;
            check_view("mamba1_step", what, v.buf.len(), view_dims(v))?;
        }
        check_view("mamba1_step", "xdbl", args.xdbl.buf.len(), view_dims(&args.xdbl))?;
        check("mamba1_step", out.rows == s && out.cols == d, || format!("out is [{}, {}]", out.rows, out.cols))?;
        check_view("mamba1_step", "out", out.buf.len(), view_mut_dims(&out))?;
        check_packed("mamba1_step", batch, args.layout.n_slots)?;
        step::mamba1_step(args, batch, out);
        Ok(())
    }

    fn mamba2_scan(&self, args: Mamba2ScanArgs<'_, Self>, batch: &Packed<'_, Self>, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        let (h, p, g, n) = (args.n_heads, args.head_dim, args.n_groups, args.d_state);
        let t = batch.n_tokens;
        check("mamba2_scan", g >= 1 && h % g == 0, || format!("{h} heads not divisible into {g} groups"))?;
        check("mamba2_scan", args.layout.per_layer == h * p * n && args.state.len() == args.layout.len(), || {
            format!("state per layer {} for {h} heads × {p} × {n}", args.layout.per_layer)
        })?;
        check("mamba2_scan", args.a.len() == h && args.dt_bias.len() == h && args.skip.len() == h, || {
            format!("a {} dt_bias {} D {} for {h} heads", args.a.len(), args.dt_bias.len(), args.skip.len())
        })?;
        for (what, v, cols) in [("x", &args.x, h * p), ("dt", &args.dt, h), ("B", &args.b, g * n), ("C", &args.c, g * n)] {
            check("mamba2_scan", v.rows == t && v.cols == cols, || format!("{what} is [{}, {}], want [{t}, {cols}]", v.rows, v.cols))?;
            check_view("mamba2_scan", what, v.buf.len(), view_dims(v))?;
        }
        check("mamba2_scan", out.rows == t && out.cols == h * p, || format!("out is [{}, {}]", out.rows, out.cols))?;
        check_view("mamba2_scan", "out", out.buf.len(), view_mut_dims(&out))?;
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
        let d = y.cols;
        check("gated_rmsnorm", z.cols == d && out.cols == d && weight.len() == d && z.rows == y.rows && out.rows == y.rows, || {
            format!("y [{}, {d}] z [{}, {}] out [{}, {}] weight {}", y.rows, z.rows, z.cols, out.rows, out.cols, weight.len())
        })?;
        check("gated_rmsnorm", group_size > 0 && d % group_size == 0, || format!("group size {group_size} does not divide {d}"))?;
        check_view("gated_rmsnorm", "y", y.buf.len(), view_dims(&y))?;
        check_view("gated_rmsnorm", "z", z.buf.len(), view_dims(&z))?;
        check_view("gated_rmsnorm", "out", out.buf.len(), view_mut_dims(&out))?;
        math::gated_rmsnorm(y, z, weight, eps, group_size, out);
        Ok(())
    }

    fn sample(&self, logits: View<'_, Vec<f32>>, rows: &[SampleRow]) -> Result<Vec<SampledToken>> {
        check("sample", logits.rows == rows.len(), || format!("{} logit rows for {} samples", logits.rows, rows.len()))?;
        check_view("sample", "logits", logits.buf.len(), view_dims(&logits))?;
        check("sample", rows.iter().all(|r| r.valid_vocab as usize <= logits.cols && r.valid_vocab > 0), || {
            format!("valid_vocab outside 1..={}", logits.cols)
        })?;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let start = logits.offset + i * logits.stride;
                let mut l = logits.buf[start..start + logits.cols].to_vec();
                sample::sample_row(&mut l, row)
            })
            .collect())
    }

    fn gather_rows(&self, src: View<'_, Vec<f32>>, rows: &Vec<u32>, n: usize, out: ViewMut<'_, Vec<f32>>) -> Result<()> {
        check("gather_rows", n <= rows.len() && out.rows >= n && out.cols == src.cols, || {
            format!("{n} rows of width {} into [{}, {}]", src.cols, out.rows, out.cols)
        })?;
        check("gather_rows", rows[..n].iter().all(|&r| (r as usize) < src.rows), || format!("row index outside {} rows", src.rows))?;
        check_view("gather_rows", "src", src.buf.len(), view_dims(&src))?;
        check_view("gather_rows", "out", out.buf.len(), view_mut_dims(&out))?;
        for (i, &r) in rows[..n].iter().enumerate() {
            let s = src.offset + r as usize * src.stride;
            let o = out.offset + i * out.stride;
            out.buf[o..o + src.cols].copy_from_slice(&src.buf[s..s + src.cols]);
        }
        Ok(())
    }
}
