//! The op contract's shape checks, written once for every backend.
//!
//! Each function checks what `Backend` documents for its op: matching
//! dimensions, buffers large enough for their views, state buffers matching
//! their pool layout. A backend calls it first, then adds what only it
//! knows (the CPU reads packed offsets and slots on the host and checks
//! their values; CUDA checks its kernels' limits).

use super::{
    Backend, BackendError, ConvArgs, Mamba1ScanArgs, Mamba1StepArgs, Mamba2ScanArgs, NormedLinear, Packed, PoolLayout, Result, SampleRow,
    View, ViewMut,
};

/// What the checks need to know of a device buffer: its element count.
pub trait Buffer {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the checks need to know of a weight matrix: its shape.
pub trait Matrix {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
}

impl<T> Buffer for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

pub fn check(op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(BackendError::Shape { op, detail: detail() }) }
}

/// A `[rows, cols]` view with its stride stays inside its buffer.
fn span(op: &'static str, what: &str, len: usize, (offset, rows, cols, stride): (usize, usize, usize, usize)) -> Result<()> {
    let end = if rows == 0 { offset } else { offset + (rows - 1) * stride + cols };
    check(op, cols <= stride || rows <= 1, || format!("{what}: {cols} columns exceed stride {stride}"))?;
    check(op, end <= len, || format!("{what}: view ends at {end} but the buffer holds {len}"))
}

pub fn view<T: Buffer>(op: &'static str, what: &str, v: &View<'_, T>) -> Result<()> {
    span(op, what, v.buf.len(), (v.offset, v.rows, v.cols, v.stride))
}

pub fn view_mut<T: Buffer>(op: &'static str, what: &str, v: &ViewMut<'_, T>) -> Result<()> {
    span(op, what, v.buf.len(), (v.offset, v.rows, v.cols, v.stride))
}

/// A view of exactly `[rows, cols]` inside its buffer.
fn sized<T: Buffer>(op: &'static str, what: &str, v: &View<'_, T>, rows: usize, cols: usize) -> Result<()> {
    check(op, v.rows == rows && v.cols == cols, || format!("{what} is [{}, {}], want [{rows}, {cols}]", v.rows, v.cols))?;
    view(op, what, v)
}

fn sized_out<T: Buffer>(op: &'static str, out: &ViewMut<'_, T>, rows: usize, cols: usize) -> Result<()> {
    check(op, out.rows == rows && out.cols == cols, || format!("out is [{}, {}], want [{rows}, {cols}]", out.rows, out.cols))?;
    view_mut(op, "out", out)
}

/// The id buffers of a packed batch are large enough, and a single-token
/// batch has one token per sequence. (Their values live on the device; the
/// model layer built and checked them.)
pub fn packed<B: Backend + ?Sized>(op: &'static str, batch: &Packed<'_, B>) -> Result<()> {
    let (cu, slots, prompt) = (batch.cu_seqlens.len(), batch.slots.len(), batch.prompt.len());
    check(op, cu > batch.n_seqs && slots >= batch.n_seqs && prompt >= batch.n_seqs, || {
        format!("{} sequences but offsets {cu} slots {slots} prompt flags {prompt}", batch.n_seqs)
    })?;
    check(op, !batch.single_token || batch.n_tokens == batch.n_seqs, || {
        format!("single-token batch of {} tokens in {} sequences", batch.n_tokens, batch.n_seqs)
    })
}

pub fn embed<B: Backend + ?Sized>(table: &B::Mat, ids: &B::Ids, n: usize, out: &B::Vec) -> Result<()> {
    let d = table.cols();
    check("embed", n <= ids.len() && n * d <= out.len(), || format!("{n} ids of width {d}, out holds {}", out.len()))
}

pub fn linear<B: Backend + ?Sized>(x: &View<'_, B::Vec>, w: &B::Mat, bias: Option<&B::Vec>, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    check("linear", x.cols == w.cols() && out.cols == w.rows() && out.rows == x.rows, || {
        format!("x [{}, {}] · w[{}, {}]ᵀ into out [{}, {}]", x.rows, x.cols, w.rows(), w.cols(), out.rows, out.cols)
    })?;
    view("linear", "x", x)?;
    view_mut("linear", "out", out)?;
    match bias {
        Some(b) => check("linear", b.len() == w.rows(), || format!("bias of {} for {} outputs", b.len(), w.rows())),
        None => Ok(()),
    }
}

pub fn rmsnorm_linear<B: Backend + ?Sized>(p: &NormedLinear<'_, B>, normed: &B::Vec, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    let (rows, k, n) = (p.rows, p.w.cols(), p.w.rows());
    check("rmsnorm_linear", p.x.len() >= rows * k && normed.len() >= rows * k && p.norm.len() == k, || {
        format!("{rows} rows of width {k}: x {} normed {} norm {}", p.x.len(), normed.len(), p.norm.len())
    })?;
    check("rmsnorm_linear", out.rows == rows && out.cols == n, || format!("out [{}, {}] for [{rows}, {n}]", out.rows, out.cols))?;
    view_mut("rmsnorm_linear", "out", out)?;
    match p.bias {
        Some(b) => check("rmsnorm_linear", b.len() == n, || format!("bias of {} for {n} outputs", b.len())),
        None => Ok(()),
    }
}

pub fn conv1d<B: Backend + ?Sized>(args: &ConvArgs<'_, B>, batch: &Packed<'_, B>, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    let (ch, k) = (args.x.cols, args.kernel);
    check("conv1d", k >= 1 && args.weight.len() == ch * k, || format!("weight {} for {ch} channels × {k}", args.weight.len()))?;
    check("conv1d", args.layout.per_layer == ch * (k - 1), || {
        format!("conv state per layer {} for {ch} channels × {}", args.layout.per_layer, k - 1)
    })?;
    check("conv1d", args.state.len() == args.layout.len() && args.layer < args.layout.n_layers, || {
        "state buffer does not match its layout".to_string()
    })?;
    if let Some(b) = args.bias {
        check("conv1d", b.len() == ch, || format!("bias of {} for {ch} channels", b.len()))?;
    }
    sized("conv1d", "x", &args.x, batch.n_tokens, ch)?;
    sized_out("conv1d", out, batch.n_tokens, ch)?;
    packed("conv1d", batch)
}

pub fn rms_norm_columns<T: Buffer>(x: &ViewMut<'_, T>, groups: &[(usize, usize)]) -> Result<()> {
    check("rms_norm_columns", groups.iter().all(|&(s, l)| s + l <= x.cols && l > 0), || {
        format!("groups {groups:?} outside {} columns", x.cols)
    })?;
    view_mut("rms_norm_columns", "x", x)
}

/// A Mamba-1 mixer's state pool (`state_len` floats in `layout`) and its
/// per-channel parameters (lengths of a, dt_bias and D) for d channels × n
/// states.
fn mamba1_params(
    op: &'static str,
    layout: PoolLayout,
    state_len: usize,
    [a, dt_bias, skip]: [usize; 3],
    (d, n): (usize, usize),
) -> Result<()> {
    check(op, layout.per_layer == d * n && state_len == layout.len(), || {
        format!("state per layer {} for {d} channels × {n}", layout.per_layer)
    })?;
    check(op, a == d * n && dt_bias == d && skip == d, || format!("a {a} dt_bias {dt_bias} D {skip} for {d} channels × {n}"))
}

pub fn mamba1_scan<B: Backend + ?Sized>(args: &Mamba1ScanArgs<'_, B>, batch: &Packed<'_, B>, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    let (d, n, t) = (args.x.cols, args.d_state, batch.n_tokens);
    mamba1_params("mamba1_scan", args.layout, args.state.len(), [args.a.len(), args.dt_bias.len(), args.skip.len()], (d, n))?;
    for (what, v) in [("x", &args.x), ("dt", &args.dt), ("z", &args.z)] {
        sized("mamba1_scan", what, v, t, d)?;
    }
    for (what, v) in [("B", &args.b), ("C", &args.c)] {
        sized("mamba1_scan", what, v, t, n)?;
    }
    sized_out("mamba1_scan", out, t, d)?;
    packed("mamba1_scan", batch)
}

pub fn mamba1_step<B: Backend + ?Sized>(args: &Mamba1StepArgs<'_, B>, batch: &Packed<'_, B>, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    let (d, n, r, s) = (args.x.cols, args.ssm.d_state, args.ssm.dt_rank, batch.n_seqs);
    check("mamba1_step", batch.single_token && batch.n_tokens == s, || "every segment must hold one token".into())?;
    mamba1_params("mamba1_step", args.layout, args.state.len(), [args.ssm.a.len(), args.ssm.dt_bias.len(), args.ssm.skip.len()], (d, n))?;
    check("mamba1_step", args.ssm.dt_proj.rows() == d && args.ssm.dt_proj.cols() == r, || {
        format!("dt_proj [{}, {}] for {d} channels, rank {r}", args.ssm.dt_proj.rows(), args.ssm.dt_proj.cols())
    })?;
    sized("mamba1_step", "xdbl", &args.xdbl, s, r + 2 * n)?;
    sized("mamba1_step", "x", &args.x, s, d)?;
    sized("mamba1_step", "z", &args.z, s, d)?;
    sized_out("mamba1_step", out, s, d)?;
    packed("mamba1_step", batch)
}

pub fn mamba2_scan<B: Backend + ?Sized>(args: &Mamba2ScanArgs<'_, B>, batch: &Packed<'_, B>, out: &ViewMut<'_, B::Vec>) -> Result<()> {
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
        sized("mamba2_scan", what, v, t, cols)?;
    }
    sized_out("mamba2_scan", out, t, h * p)?;
    packed("mamba2_scan", batch)
}

pub fn gated_rmsnorm<T: Buffer>(y: &View<'_, T>, z: &View<'_, T>, weight: &T, group_size: usize, out: &ViewMut<'_, T>) -> Result<()> {
    let d = y.cols;
    check("gated_rmsnorm", weight.len() == d, || format!("weight of {} for {d} channels", weight.len()))?;
    check("gated_rmsnorm", group_size > 0 && d % group_size == 0, || format!("group size {group_size} does not divide {d}"))?;
    view("gated_rmsnorm", "y", y)?;
    sized("gated_rmsnorm", "z", z, y.rows, d)?;
    sized_out("gated_rmsnorm", out, y.rows, d)
}

/// `feed`, where given, takes a token a row.
pub fn sample<T: Buffer, I: Buffer>(logits: &View<'_, T>, rows: &[&SampleRow], feed: Option<&I>) -> Result<()> {
    check("sample", logits.rows == rows.len(), || format!("{} logit rows for {} samples", logits.rows, rows.len()))?;
    if let Some(f) = feed {
        check("sample", f.len() >= rows.len(), || format!("{} tokens fed into a buffer of {}", rows.len(), f.len()))?;
    }
    view("sample", "logits", logits)?;
    check("sample", rows.iter().all(|r| r.valid_vocab as usize <= logits.cols && r.valid_vocab > 0), || {
        format!("valid_vocab outside 1..={}", logits.cols)
    })
}

pub fn gather_rows<B: Backend + ?Sized>(src: &View<'_, B::Vec>, rows: &B::Ids, n: usize, out: &ViewMut<'_, B::Vec>) -> Result<()> {
    check("gather_rows", n <= rows.len() && out.rows >= n && out.cols == src.cols, || {
        format!("{n} rows of width {} into [{}, {}]", src.cols, out.rows, out.cols)
    })?;
    view("gather_rows", "src", src)?;
    view_mut("gather_rows", "out", out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuMat};

    #[test]
    fn mismatched_shapes_and_overrunning_views_are_refused() {
        let w = CpuMat { rows: 3, cols: 4, data: vec![0.0; 12] };
        let x = vec![0.0f32; 8];
        let mut out = vec![0.0f32; 6];
        let ok = linear::<CpuBackend>(&View::dense(&x, 2, 4), &w, None, &ViewMut::dense(&mut out, 2, 3));
        assert!(ok.is_ok());
        let e = linear::<CpuBackend>(&View::dense(&x, 2, 4), &w, None, &ViewMut::dense(&mut out, 2, 2)).unwrap_err();
        assert!(e.to_string().starts_with("linear:"), "{e}");
        // Three rows of four do not fit in eight values.
        let e = view("op", "x", &View::dense(&x, 3, 4)).unwrap_err().to_string();
        assert!(e.contains("view ends at 12 but the buffer holds 8"), "{e}");
        let strided = View { buf: &x, offset: 0, rows: 2, cols: 4, stride: 3 };
        assert!(view("op", "x", &strided).unwrap_err().to_string().contains("exceed stride"));
        let bias = vec![0.0f32; 2];
        assert!(linear::<CpuBackend>(&View::dense(&x, 2, 4), &w, Some(&bias), &ViewMut::dense(&mut out, 2, 3)).is_err());
    }
}
