//! The CUDA backend against the CPU oracle, op by op on fresh random inputs,
//! and the golden fixtures run on the GPU. Built only with the `gpu-tests`
//! feature; on a machine without a usable GPU each test prints why and
//! returns without checking anything.
//!
//! Every device output is poisoned with NaN before the op runs, so an
//! element the kernel forgets to write fails the comparison.

use mamba_serve::backend::cpu::CpuBackend;
use mamba_serve::backend::cuda::CudaBackend;
use mamba_serve::backend::rng::SplitMix64;
use mamba_serve::backend::{
    Activation, Backend, BackendError, ConvArgs, DType, HostMatrix, Mamba1ScanArgs, Mamba1Ssm, Mamba1StepArgs, Mamba2ScanArgs,
    NormedLinear, PAD_SLOT, Packed, PoolLayout, ProjConv, SampleRow, SampledToken, View, ViewMut,
};
use mamba_serve::engine::offline;
use mamba_serve::model::{Checkpoint, Model, ModelConfig, SeqChunk};
use mamba_serve::sampling::{SamplingParams, argmax};
use mamba_serve::tokenizer::Tokenizer;

use crate::common::*;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// The GPU backend, or `None` (the test skips, saying why) when this
/// machine has no usable GPU. Any other start-up failure (a kernel that
/// does not compile, a rejected attribute) fails the test, and with
/// `MAMBA_TEST_REQUIRE_GPU` set (the GPU runs set it) so does a missing GPU.
fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e @ BackendError::Unavailable(..)) if std::env::var_os("MAMBA_TEST_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED {test}: no usable GPU: {e}");
            None
        }
        Err(e) => panic!("{test}: the CUDA backend did not start: {e}"),
    }
}

struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }
    /// Uniform in [lo, hi).
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.0.next_f32()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
}

fn check_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:e} (tolerance {tol:e})");
}

/// Bytes of `v` stored as `dtype`, and the values those bytes hold.
fn as_dtype(v: &[f32], dtype: DType) -> (Vec<u8>, Vec<f32>) {
    let bytes: Vec<u8> = match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
    };
    let back = mamba_serve::backend::widen(&bytes, dtype);
    (bytes, back)
}

fn mat<B: Backend>(b: &B, rows: usize, cols: usize, dtype: DType, bytes: &[u8]) -> R<B::Mat> {
    Ok(b.upload_matrix(&HostMatrix { name: "test", dtype, rows, cols, bytes })?)
}

/// An output buffer of `len` NaNs.
fn poisoned<B: Backend>(b: &B, len: usize) -> R<B::Vec> {
    let mut v = b.alloc(len)?;
    b.fill(&mut v, 0, len, f32::NAN)?;
    Ok(v)
}

fn ids<B: Backend>(b: &B, v: &[u32]) -> R<B::Ids> {
    let mut i = b.alloc_ids(v.len().max(1))?;
    b.write_ids(&mut i, v)?;
    Ok(i)
}

/// A packed batch description on the host.
struct Batch {
    lens: Vec<usize>,
    slots: Vec<u32>,
    prompt: Vec<u32>,
}

impl Batch {
    fn n_tokens(&self) -> usize {
        self.lens.iter().sum()
    }
    fn cu(&self) -> Vec<u32> {
        let mut cu = vec![0u32];
        for l in &self.lens {
            cu.push(cu.last().unwrap() + *l as u32);
        }
        cu
    }
    fn on<B: Backend>(&self, b: &B) -> R<(B::Ids, B::Ids, B::Ids)> {
        Ok((ids(b, &self.cu())?, ids(b, &self.slots)?, ids(b, &self.prompt)?))
    }
}

fn batch(rng: &mut Rng, lens: &[usize], n_slots: usize) -> Batch {
    let mut slots: Vec<u32> = (0..n_slots as u32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i + 1));
    }
    slots.truncate(lens.len());
    let prompt = lens.iter().enumerate().map(|(i, _)| (i % 2) as u32).collect();
    Batch { lens: lens.to_vec(), slots, prompt }
}

// ---------------------------------------------------------------- linear

fn linear_on<B: Backend>(
    b: &B,
    x: &[f32],
    (m, k, stride, off): (usize, usize, usize, usize),
    w: &[u8],
    n: usize,
    dtype: DType,
    bias: Option<&[f32]>,
) -> R<Vec<f32>> {
    let xb = b.upload(x)?;
    let wm = mat(b, n, k, dtype, w)?;
    let bb = bias.map(|v| b.upload(v)).transpose()?;
    // Output rows strided too: a column window of a wider buffer.
    let os = n + 3;
    let mut out = poisoned(b, m * os + 2)?;
    let xv = View { buf: &xb, offset: off, rows: m, cols: k, stride };
    b.linear(xv, &wm, bb.as_ref(), ViewMut { buf: &mut out, offset: 2, rows: m, cols: n, stride: os })?;
    read_window(b, &out, (m, n, os))
}

/// The `[m, n]` window at offset 2, rows `os` apart, that the product tests
/// write into a wider buffer, read back dense.
fn read_window<B: Backend>(b: &B, buf: &B::Vec, (m, n, os): (usize, usize, usize)) -> R<Vec<f32>> {
    let all = b.read(buf, 0, m * os + 2)?;
    Ok((0..m).flat_map(|r| all[2 + r * os..2 + r * os + n].to_vec()).collect())
}

#[test]
fn linear_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("linear_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(11);
    // (m, n, k): GEMV tiles (vector and scalar, 1 or 4 columns a warp), the
    // streaming GEMV with a long K (4096: 16 batches a group), the small
    // exact path, and cuBLAS (more than 8 rows and 2^24 products), skinny
    // products (few outputs, long k: x_proj at decode batches) among them
    // (one with an odd k: the scalar conversion; one with a short k but
    // above the short-k kernel's rows), and the short-k tensor-core kernel
    // for 16-bit weights (dt_proj at decode batches; k of two chunks, the
    // last padded; partial tiles). One row of x: out_proj's shapes at batch
    // 1 (mamba-1.4b's and mamba-2.8b's: the block-split GEMV with 4 columns
    // and 128 or 256 threads a block) and a k of 1000
    // (a partial last batch in the block-split GEMV).
    let shapes = [
        (1, 2048, 4096),
        (1, 2560, 5120),
        (1, 600, 1000),
        (256, 160, 4096),
        (256, 4096, 128),
        (33, 2600, 200),
        (700, 300, 100),
        (512, 600, 64),
        (40, 76, 6000),
        (300, 192, 2048),
        (1024, 256, 1024),
        (100, 13, 13000),
        (1, 3001, 4096),
        (1, 33, 17),
        (1, 64, 64),
        (3, 100, 256),
        (8, 257, 96),
        (2, 4100, 64),
        (16, 4096, 32),
        (20, 64, 48),
        (70, 192, 48),
        (300, 512, 384),
        (64, 1024, 512),
        (512, 4096, 1024),
    ];
    for (m, n, k) in shapes {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for with_bias in [false, true] {
                let (stride, off) = if k % 8 == 0 { (k + 4, 4) } else { (k + 1, 1) };
                let x = rng.vec(off + m * stride, -1.0, 1.0);
                let (w, _) = as_dtype(&rng.vec(n * k, -0.5, 0.5), dtype);
                let bias = with_bias.then(|| rng.vec(n, -1.0, 1.0));
                let want = linear_on(&cpu, &x, (m, k, stride, off), &w, n, dtype, bias.as_deref())?;
                let got = linear_on(&g, &x, (m, k, stride, off), &w, n, dtype, bias.as_deref())?;
                // Products rounded to 16-bit activations (cuBLAS, short-k)
                // get the bf16 tolerance; the rest are f32 arithmetic.
                let rounded = dtype != DType::F32 && m > 8 && m * n * k > 1 << 24;
                let tol = if rounded { 1e-2 } else { 1e-5 };
                check_close(&format!("linear m{m} n{n} k{k} {dtype} bias {with_bias}"), &got, &want, tol);
            }
        }
    }
    Ok(())
}

/// `rmsnorm_linear` (x dense `[m, k]`) and `linear_add` onto a strided
/// output holding `init`; both outputs read back dense.
#[allow(clippy::too_many_arguments)]
fn fused_on<B: Backend>(
    b: &B,
    x: &[f32],
    norm: &[f32],
    (m, k, n): (usize, usize, usize),
    w: &[u8],
    dtype: DType,
    bias: Option<&[f32]>,
    init: &[f32],
) -> R<(Vec<f32>, Vec<f32>)> {
    let xb = b.upload(x)?;
    let nb = b.upload(norm)?;
    let wm = mat(b, n, k, dtype, w)?;
    let bb = bias.map(|v| b.upload(v)).transpose()?;
    let mut normed = poisoned(b, m * k)?;
    let os = n + 3;
    let mut out = poisoned(b, m * os + 2)?;
    let p = NormedLinear { x: &xb, rows: m, norm: &nb, eps: 1e-5, w: &wm, bias: bb.as_ref() };
    b.rmsnorm_linear(p, &mut normed, ViewMut { buf: &mut out, offset: 2, rows: m, cols: n, stride: os })?;
    let normed_product = read_window(b, &out, (m, n, os))?;
    let mut acc = b.upload(init)?;
    b.linear_add(View::dense(&xb, m, k), &wm, bb.as_ref(), ViewMut { buf: &mut acc, offset: 2, rows: m, cols: n, stride: os })?;
    let added = read_window(b, &acc, (m, n, os))?;
    Ok((normed_product, added))
}

#[test]
fn fused_norm_and_residual_products_match_the_cpu() -> TestResult {
    let Some(g) = gpu("fused_norm_and_residual_products_match_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(12);
    // (m, n, k): the GEMV with 1, 2 and 4 columns a block and 1 to 8 rows a
    // tile, K split over 32 to 256 threads, several row tiles (13 rows),
    // the streaming GEMV (2048 columns and more: several K batches, a
    // partial last one, and more column groups than warps),
    // the scalar path (k % 8 != 0: the norm runs first), and cuBLAS (the
    // norm writing 16-bit activations; the residual add as beta = 1); one
    // row of 3001 or 2500 columns with a long K (4096, 1032: a partial last
    // batch) streams too. With a short k (136: a second chunk of 8 values,
    // padded) and 16-bit weights, linear_add takes the short-k kernel. One
    // row of 2048 columns at k 4096 is out_proj's shape at batch 1.
    let shapes = [
        (1, 2048, 4096),
        (200, 1000, 136),
        (1, 3001, 4096),
        (1, 2500, 1032),
        (1, 96, 64),
        (2, 300, 256),
        (5, 2100, 128),
        (3, 4500, 64),
        (8, 4100, 64),
        (1, 160, 4096),
        (13, 160, 1024),
        (3, 8200, 264),
        (1, 17000, 64),
        (1, 50, 20),
        (10, 64, 18),
        (40, 512, 384),
        (300, 512, 384),
    ];
    for (m, n, k) in shapes {
        for dtype in [DType::F32, DType::BF16] {
            for with_bias in [false, true] {
                let x = rng.vec(m * k, -2.0, 2.0);
                let norm = rng.vec(k, 0.5, 1.5);
                let (w, _) = as_dtype(&rng.vec(n * k, -0.5, 0.5), dtype);
                let bias = with_bias.then(|| rng.vec(n, -1.0, 1.0));
                let init = rng.vec(m * (n + 3) + 2, -1.0, 1.0);
                let want = fused_on(&cpu, &x, &norm, (m, k, n), &w, dtype, bias.as_deref(), &init)?;
                let got = fused_on(&g, &x, &norm, (m, k, n), &w, dtype, bias.as_deref(), &init)?;
                let rounded = dtype != DType::F32 && m > 8 && m * n * k > 1 << 24;
                let tol = if rounded { 1e-2 } else { 1e-5 };
                let what = format!("m{m} n{n} k{k} {dtype} bias {with_bias}");
                check_close(&format!("rmsnorm_linear {what}"), &got.0, &want.0, tol);
                check_close(&format!("linear_add {what}"), &got.1, &want.1, tol);
            }
        }
    }
    Ok(())
}

/// `rmsnorm_linear_conv` over a batch of one token per sequence: the
/// columns of proj outside the conv, the conv output and the conv state.
#[allow(clippy::too_many_arguments)]
fn entry_on<B: Backend>(
    b: &B,
    bt: &Batch,
    x: &[f32],
    norm: &[f32],
    (k, n, start, ch): (usize, usize, usize, usize),
    w: &[u8],
    dtype: DType,
    (taps, conv_b, kernel): (&[f32], &[f32], usize),
    state: &[f32],
    layout: PoolLayout,
) -> R<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let m = bt.n_tokens();
    let (xb, nb, wm) = (b.upload(x)?, b.upload(norm)?, mat(b, n, k, dtype, w)?);
    let (tb, cb) = (b.upload(taps)?, b.upload(conv_b)?);
    let mut st = b.upload(state)?;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed { n_tokens: m, n_seqs: bt.lens.len(), cu_seqlens: &cu, slots: &slots, prompt: &prompt, single_token: true };
    let mut normed = poisoned(b, m * k)?;
    let mut proj = poisoned(b, m * n)?;
    let mut conv_out = poisoned(b, m * ch)?;
    let conv = ProjConv {
        start,
        channels: ch,
        weight: &tb,
        bias: Some(&cb),
        kernel,
        activation: Activation::Silu,
        state: &mut st,
        layout,
        layer: 1,
    };
    let p = NormedLinear { x: &xb, rows: m, norm: &nb, eps: 1e-5, w: &wm, bias: None };
    b.rmsnorm_linear_conv(p, &mut normed, ViewMut::dense(&mut proj, m, n), conv, &packed, ViewMut::dense(&mut conv_out, m, ch))?;
    let p = b.read(&proj, 0, m * n)?;
    let p = &p;
    let outside = (0..m).flat_map(|r| (0..n).filter(|c| *c < start || *c >= start + ch).map(move |c| p[r * n + c])).collect();
    Ok((outside, b.read(&conv_out, 0, m * ch)?, b.read(&st, 0, state.len())?))
}

#[test]
fn fused_mixer_entry_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("fused_mixer_entry_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(15);
    // (sequences, k, in_proj outputs, conv start, conv channels, taps):
    // Mamba-1's x | z, Mamba-2's z | xBC | dt, a 2-tap conv, 8 rows (the
    // largest fused tile) and 12 (the unfused path); one sequence with
    // 4100 outputs takes the streaming GEMV (conv columns in most warps).
    let cases =
        [(1, 64, 192, 0, 96, 4), (3, 128, 300, 100, 140, 4), (8, 64, 160, 0, 80, 2), (12, 64, 160, 0, 80, 4), (1, 2048, 4100, 0, 2050, 4)];
    for (seqs, k, n, start, ch, kernel) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let n_slots = seqs + 3;
            let layout = PoolLayout { n_slots, n_layers: 2, per_layer: ch * (kernel - 1) };
            let bt = batch(&mut rng, &vec![1; seqs], n_slots);
            let x = rng.vec(seqs * k, -2.0, 2.0);
            let norm = rng.vec(k, 0.5, 1.5);
            let (w, _) = as_dtype(&rng.vec(n * k, -0.5, 0.5), dtype);
            let taps = rng.vec(ch * kernel, -1.0, 1.0);
            let conv_b = rng.vec(ch, -0.5, 0.5);
            let state = rng.vec(layout.len(), -1.0, 1.0);
            let want = entry_on(&cpu, &bt, &x, &norm, (k, n, start, ch), &w, dtype, (&taps, &conv_b, kernel), &state, layout)?;
            let got = entry_on(&g, &bt, &x, &norm, (k, n, start, ch), &w, dtype, (&taps, &conv_b, kernel), &state, layout)?;
            let what = format!("mixer entry seqs {seqs} k {k} n {n} conv {start}+{ch} taps {kernel} {dtype}");
            check_close(&format!("{what} proj"), &got.0, &want.0, 1e-5);
            check_close(&format!("{what} conv out"), &got.1, &want.1, 1e-5);
            check_close(&format!("{what} conv state"), &got.2, &want.2, 1e-5);
        }
    }
    Ok(())
}

// ------------------------------------------------- embed, norms, gather

#[test]
fn embed_norms_and_gather_match_the_cpu() -> TestResult {
    let Some(g) = gpu("embed_norms_and_gather_match_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(12);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (rows, d, n) = (97, 75, 13);
        let (bytes, _) = as_dtype(&rng.vec(rows * d, -2.0, 2.0), dtype);
        let tok: Vec<u32> = (0..n).map(|_| rng.below(rows) as u32).collect();
        let run = |b: &dyn Fn() -> R<Vec<f32>>| b();
        let on_cpu = run(&|| {
            let t = mat(&cpu, rows, d, dtype, &bytes)?;
            let mut out = poisoned(&cpu, n * d)?;
            cpu.embed(&t, &ids(&cpu, &tok)?, n, &mut out)?;
            Ok(cpu.read(&out, 0, n * d)?)
        })?;
        let on_gpu = run(&|| {
            let t = mat(&g, rows, d, dtype, &bytes)?;
            let mut out = poisoned(&g, n * d)?;
            g.embed(&t, &ids(&g, &tok)?, n, &mut out)?;
            Ok(g.read(&out, 0, n * d)?)
        })?;
        check_close(&format!("embed {dtype}"), &on_gpu, &on_cpu, 1e-7);
    }
    // Falcon's column-group norms on a strided view, and the gated norm.
    let (rows, cols, stride) = (7, 35, 40);
    let x = rng.vec(rows * stride, -2.0, 2.0);
    let groups = [(0, 3), (3, 16), (19, 16)];
    let mut outs = vec![];
    for b in [&cpu as &dyn AnyBackend, &g] {
        outs.push(b.rms_columns_case(&x, rows, cols, stride, &groups)?);
    }
    check_close("rms_norm_columns", &outs[1], &outs[0], 1e-5);
    for group in [24, 48, 96] {
        let (rows, d) = (9, 96);
        let y = rng.vec(rows * d, -2.0, 2.0);
        let z = rng.vec(rows * d, -2.0, 2.0);
        let w = rng.vec(d, 0.5, 1.5);
        let mut outs = vec![];
        for b in [&cpu as &dyn AnyBackend, &g] {
            outs.push(b.gated_case(&y, &z, &w, rows, d, group)?);
        }
        check_close(&format!("gated_rmsnorm group {group}"), &outs[1], &outs[0], 1e-5);
    }
    let src = rng.vec(20 * 33, -1.0, 1.0);
    let picks = [3u32, 19, 0, 7, 7];
    let mut outs = vec![];
    for b in [&cpu as &dyn AnyBackend, &g] {
        outs.push(b.gather_case(&src, 20, 33, &picks)?);
    }
    check_close("gather_rows", &outs[1], &outs[0], 1e-7);
    Ok(())
}

/// The small single-op cases, behind a trait object so one loop runs them
/// on both backends.
trait AnyBackend {
    fn rms_columns_case(&self, x: &[f32], rows: usize, cols: usize, stride: usize, groups: &[(usize, usize)]) -> R<Vec<f32>>;
    fn gated_case(&self, y: &[f32], z: &[f32], w: &[f32], rows: usize, d: usize, group: usize) -> R<Vec<f32>>;
    fn gather_case(&self, src: &[f32], rows: usize, cols: usize, picks: &[u32]) -> R<Vec<f32>>;
}

impl<B: Backend> AnyBackend for B {
    fn rms_columns_case(&self, x: &[f32], rows: usize, cols: usize, stride: usize, groups: &[(usize, usize)]) -> R<Vec<f32>> {
        let mut xb = self.upload(x)?;
        self.rms_norm_columns(ViewMut { buf: &mut xb, offset: 0, rows, cols, stride }, groups, 1e-4)?;
        Ok(self.read(&xb, 0, x.len())?)
    }
    fn gated_case(&self, y: &[f32], z: &[f32], w: &[f32], rows: usize, d: usize, group: usize) -> R<Vec<f32>> {
        let (yb, zb, wb) = (self.upload(y)?, self.upload(z)?, self.upload(w)?);
        let mut out = poisoned(self, rows * d)?;
        self.gated_rmsnorm(View::dense(&yb, rows, d), View::dense(&zb, rows, d), &wb, 1e-5, group, ViewMut::dense(&mut out, rows, d))?;
        Ok(self.read(&out, 0, rows * d)?)
    }
    fn gather_case(&self, src: &[f32], rows: usize, cols: usize, picks: &[u32]) -> R<Vec<f32>> {
        let s = self.upload(src)?;
        let p = ids(self, picks)?;
        let mut out = poisoned(self, picks.len() * cols)?;
        self.gather_rows(View::dense(&s, rows, cols), &p, picks.len(), ViewMut::dense(&mut out, picks.len(), cols))?;
        Ok(self.read(&out, 0, picks.len() * cols)?)
    }
}

// ------------------------------------------------------------ conv1d

#[allow(clippy::too_many_arguments)]
fn conv_on<B: Backend>(
    b: &B,
    bt: &Batch,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    act: Activation,
    state: &[f32],
    layout: PoolLayout,
    layer: usize,
    ch: usize,
) -> R<(Vec<f32>, Vec<f32>)> {
    let t = bt.n_tokens();
    let (x_off, xs) = conv_x_layout(ch);
    let xb = b.upload(x)?;
    let wb = b.upload(w)?;
    let bb = bias.map(|v| b.upload(v)).transpose()?;
    let mut st = b.upload(state)?;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed {
        n_tokens: t,
        n_seqs: bt.lens.len(),
        cu_seqlens: &cu,
        slots: &slots,
        prompt: &prompt,
        single_token: bt.lens.iter().all(|&l| l == 1),
    };
    let mut out = poisoned(b, t * ch)?;
    let args = ConvArgs {
        x: View { buf: &xb, offset: x_off, rows: t, cols: ch, stride: xs },
        weight: &wb,
        bias: bb.as_ref(),
        kernel: k,
        activation: act,
        state: &mut st,
        layout,
        layer,
    };
    b.conv1d(args, &packed, ViewMut::dense(&mut out, t, ch))?;
    Ok((b.read(&out, 0, t * ch)?, b.read(&st, 0, state.len())?))
}

/// Where conv inputs start and their row stride: 16-byte aligned rows when
/// the channels allow (the large-batch step's vector kernel takes those),
/// misaligned ones otherwise.
fn conv_x_layout(ch: usize) -> (usize, usize) {
    if ch % 4 == 0 { (4, ch + 4) } else { (5, ch + 5) }
}

#[test]
fn conv1d_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("conv1d_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(13);
    // From the sixth on, several runs of 32 rows per thread: segments that
    // cross runs, start within k - 1 rows before a run (the run's window
    // mixes state and inputs) or end on a run's edge; 130 channels (a
    // partial channel block); k 7 (the 8-tap window) and 10 (the one-row
    // kernel).
    let cases: &[(&[usize], usize, usize)] = &[
        (&[5, 1, 17, 3], 37, 4),
        (&[1, 1, 1, 1, 1], 96, 4),
        (&[2, 9], 40, 3),
        (&[12, 1, 4], 48, 5),
        (&[1, 1, 1], 33, 2),
        (&[30, 3, 40, 1, 70], 37, 4),
        (&[32, 32, 5], 130, 4),
        (&[62, 1, 1, 100], 20, 3),
        (&[100, 2], 40, 7),
        (&[3, 40], 20, 10),
        // Decode steps of more than 16 sequences: aligned rows take the
        // 4-channel kernel (a partial block of channel quads; a partial
        // group of sequences), misaligned ones the scalar one. 600
        // sequences of 1028 channels are 3 × 150 blocks, more than an
        // H200 holds of the plain 4-channel kernel (3 × 132): the staged
        // one (a partial warp of channel quads in every third block).
        (&[1; 40], 132, 4),
        (&[1; 23], 1028, 4),
        (&[1; 20], 129, 4),
        (&[1; 600], 1028, 4),
    ];
    for &(lens, ch, k) in cases {
        for act in [Activation::Silu, Activation::Identity, Activation::Gelu] {
            let n_slots = lens.len().max(6);
            let layout = PoolLayout { n_slots, n_layers: 3, per_layer: ch * (k - 1) };
            let bt = batch(&mut rng, lens, n_slots);
            let (x_off, xs) = conv_x_layout(ch);
            let x = rng.vec(x_off + bt.n_tokens() * xs, -2.0, 2.0);
            let w = rng.vec(ch * k, -1.0, 1.0);
            let bias = rng.vec(ch, -0.5, 0.5);
            let state = rng.vec(layout.len(), -1.0, 1.0);
            let want = conv_on(&cpu, &bt, &x, &w, Some(&bias), k, act, &state, layout, 1, ch)?;
            let got = conv_on(&g, &bt, &x, &w, Some(&bias), k, act, &state, layout, 1, ch)?;
            let what = format!("conv1d lens {lens:?} ch {ch} k {k} {act:?}");
            check_close(&format!("{what} out"), &got.0, &want.0, 1e-5);
            check_close(&format!("{what} state"), &got.1, &want.1, 1e-6);
        }
    }
    Ok(())
}

// ------------------------------------------------------------- scans

struct ScanCase {
    ch: usize,
    n: usize,
    x: Vec<f32>,
    dt: Vec<f32>,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    /// [t, 3 + 2n]: B at column 3, C at 3 + n (a strided view, as in x_proj's output).
    bc: Vec<f32>,
    skip: Vec<f32>,
    z: Vec<f32>,
    state: Vec<f32>,
    layout: PoolLayout,
}

/// Random inputs of `t` tokens, `ch` channels and `n` states a channel,
/// with a state pool of `slots` slots and 2 layers.
fn scan_case(rng: &mut Rng, t: usize, ch: usize, n: usize, slots: usize) -> ScanCase {
    let layout = PoolLayout { n_slots: slots, n_layers: 2, per_layer: ch * n };
    ScanCase {
        ch,
        n,
        x: rng.vec(t * ch, -2.0, 2.0),
        dt: rng.vec(t * ch, -4.0, 1.0),
        dt_bias: rng.vec(ch, -1.0, 0.5),
        a: rng.vec(ch * n, -4.0, -0.2),
        bc: rng.vec(t * (3 + 2 * n), -1.5, 1.5),
        skip: rng.vec(ch, 0.5, 1.5),
        z: rng.vec(t * ch, -3.0, 3.0),
        state: rng.vec(layout.len(), -1.0, 1.0),
        layout,
    }
}

fn mamba1_on<B: Backend>(b: &B, bt: &Batch, c: &ScanCase) -> R<(Vec<f32>, Vec<f32>)> {
    let t = bt.n_tokens();
    let (ch, n) = (c.ch, c.n);
    let (x, dt, bias, a, bc, skip, z) =
        (b.upload(&c.x)?, b.upload(&c.dt)?, b.upload(&c.dt_bias)?, b.upload(&c.a)?, b.upload(&c.bc)?, b.upload(&c.skip)?, b.upload(&c.z)?);
    let mut st = b.upload(&c.state)?;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed {
        n_tokens: t,
        n_seqs: bt.lens.len(),
        cu_seqlens: &cu,
        slots: &slots,
        prompt: &prompt,
        single_token: bt.lens.iter().all(|&l| l == 1),
    };
    let bcv = View::dense(&bc, t, 3 + 2 * n);
    let mut out = poisoned(b, t * ch)?;
    let args = Mamba1ScanArgs {
        x: View::dense(&x, t, ch),
        dt: View::dense(&dt, t, ch),
        dt_bias: &bias,
        a: &a,
        b: bcv.columns(3, n),
        c: bcv.columns(3 + n, n),
        skip: &skip,
        z: View::dense(&z, t, ch),
        state: &mut st,
        layout: c.layout,
        layer: 1,
        d_state: n,
    };
    b.mamba1_scan(args, &packed, ViewMut::dense(&mut out, t, ch))?;
    Ok((b.read(&out, 0, t * ch)?, b.read(&st, 0, c.state.len())?))
}

#[test]
fn mamba1_scan_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("mamba1_scan_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(14);
    // From (&[700, 5], ..) on the batches are long and narrow enough to be
    // split in time (parts of 128 tokens on a GPU of >= 64 multiprocessors;
    // parts of 160 for the 9000-token one, capped at 64 parts). In
    // [3, 1030, 1, 256] parts 0 and 8 each hold the end of one segment and
    // the start of the next. State sizes 5 and 13 leave a thread of the
    // tiled scan part-filled, 3 one thread per channel with states.
    let cases: &[(&[usize], usize, usize)] = &[
        (&[5, 1, 40, 3], 37, 16),
        (&[1, 1, 1, 1], 96, 16),
        (&[70, 2], 40, 8),
        (&[17, 33, 1], 33, 5),
        (&[9], 64, 32),
        (&[50, 7, 31, 32, 33], 45, 3),
        (&[300, 2, 45], 100, 13),
        (&[700, 5], 37, 16),
        (&[600], 24, 8),
        (&[3, 1030, 1, 256], 20, 16),
        (&[2000], 70, 16),
        (&[900], 33, 13),
        (&[9000], 8, 16),
    ];
    for &(lens, ch, n) in cases {
        let bt = batch(&mut rng, lens, 7);
        let c = scan_case(&mut rng, bt.n_tokens(), ch, n, 7);
        let want = mamba1_on(&cpu, &bt, &c)?;
        let got = mamba1_on(&g, &bt, &c)?;
        check_close(&format!("mamba1_scan {lens:?} ch {ch} n {n} out"), &got.0, &want.0, 1e-5);
        check_close(&format!("mamba1_scan {lens:?} ch {ch} n {n} state"), &got.1, &want.1, 1e-5);
    }
    Ok(())
}

#[test]
fn mamba1_scan_of_many_short_segments_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("mamba1_scan_of_many_short_segments_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(15);
    // 40 sequences of 1 to 8 tokens (one grid row each, a part-filled
    // chunk), 70 channels (a partial block of 32).
    for n in [16, 7] {
        let lens: Vec<usize> = (0..40).map(|_| 1 + rng.below(8)).collect();
        let bt = batch(&mut rng, &lens, 48);
        let c = scan_case(&mut rng, bt.n_tokens(), 70, n, 48);
        let want = mamba1_on(&cpu, &bt, &c)?;
        let got = mamba1_on(&g, &bt, &c)?;
        check_close(&format!("mamba1_scan 40 short segments n {n} out"), &got.0, &want.0, 1e-5);
        check_close(&format!("mamba1_scan 40 short segments n {n} state"), &got.1, &want.1, 1e-5);
    }
    Ok(())
}

/// One decode step over `c`, x taken at (offset, row stride) of `c.x`.
#[allow(clippy::too_many_arguments)]
fn step_on<B: Backend>(
    b: &B,
    bt: &Batch,
    c: &ScanCase,
    (x_off, xs): (usize, usize),
    r: usize,
    dtw: &[u8],
    dtype: DType,
    norm: Option<f32>,
) -> R<(Vec<f32>, Vec<f32>)> {
    let s = bt.lens.len();
    let (ch, n) = (c.ch, c.n);
    let (x, bias, a, skip, z) = (b.upload(&c.x)?, b.upload(&c.dt_bias)?, b.upload(&c.a)?, b.upload(&c.skip)?, b.upload(&c.z)?);
    let xdbl = b.upload(&c.bc)?;
    let w = mat(b, ch, r, dtype, dtw)?;
    let mut st = b.upload(&c.state)?;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed { n_tokens: s, n_seqs: s, cu_seqlens: &cu, slots: &slots, prompt: &prompt, single_token: true };
    let mut out = poisoned(b, s * ch)?;
    let args = Mamba1StepArgs {
        x: View { buf: &x, offset: x_off, rows: s, cols: ch, stride: xs },
        xdbl: View::dense(&xdbl, s, r + 2 * n),
        ssm: Mamba1Ssm { dt_proj: &w, dt_bias: &bias, a: &a, skip: &skip, norm_eps: norm, dt_rank: r, d_state: n },
        z: View::dense(&z, s, ch),
        state: &mut st,
        layout: c.layout,
        layer: 1,
    };
    b.mamba1_step(args, &packed, ViewMut::dense(&mut out, s, ch))?;
    Ok((b.read(&out, 0, s * ch)?, b.read(&st, 0, c.state.len())?))
}

#[test]
fn mamba1_step_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("mamba1_step_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(15);
    // (sequences, channels, state, rank): one or four states a thread, the
    // dt dot product with 16-byte loads or scalar, and above 16 sequences
    // the wide kernel (dt from a product; 12 states leave a lane idle; 8
    // states give 2 lanes a channel, fewer than a group's sequences, so
    // each lane computes its own softplus and gate; 2056 channels make 65
    // channel blocks, each walking 4 or 5 groups of sequences through its
    // ring of buffered copies, the last group part-filled). Wide cases run
    // twice: x at a misaligned offset (the general wide kernel), then at an
    // aligned one, where 16 states, no norm, 16-byte rows of B | C and a
    // channel count that is a multiple of 4 take the lean wide kernel (2056
    // channels: the last block has 8; 130 channels: the general kernel
    // again). Two of their rows are padding (a graph's bucket rows) on the
    // GPU, checked against the CPU's run of the batch without them: the
    // other rows' outputs and the whole pool must match, so a padding row
    // neither reads nor writes any slot's state. dt_proj is f32, bf16 and
    // f16.
    let cases = [
        (1, 64, 16, 4),
        (2, 64, 16, 16),
        (4, 64, 16, 16),
        (5, 37, 16, 3),
        (7, 96, 8, 6),
        (3, 40, 5, 5),
        (70, 48, 16, 8),
        (33, 40, 12, 8),
        (37, 72, 8, 8),
        (198, 2056, 16, 8),
        (45, 300, 16, 48),
        (64, 2056, 16, 128),
        (21, 130, 16, 160),
        (24, 64, 16, 176),
    ];
    for (s, ch, n, r) in cases {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for norm in [None, Some(1e-4)] {
                // A dt_proj product large enough for cuBLAS rounds dt_low to
                // the weights' 16-bit type, as the reference does for 16-bit
                // models: held to the 16-bit tolerance. The others are f32.
                let rounds = dtype != DType::F32 && s > 16 && s * ch * r > 1 << 24;
                let tol = if rounds { 1e-2 } else { 1e-5 };
                let x_offsets: &[usize] = if s > 16 { &[1, 4] } else { &[1] };
                for &x_off in x_offsets {
                    let bt = batch(&mut rng, &vec![1; s], 7.max(s));
                    let mut c = scan_case(&mut rng, s, ch, n, 7.max(s));
                    let xs = ch + 4;
                    c.x = rng.vec(x_off + s * xs, -2.0, 2.0);
                    c.bc = rng.vec(s * (r + 2 * n), -1.5, 1.5);
                    let (w, _) = as_dtype(&rng.vec(ch * r, -0.5, 0.5), dtype);
                    let what = format!("mamba1_step s {s} ch {ch} n {n} r {r} {dtype} norm {norm:?} x at {x_off}");
                    if s <= 16 {
                        let want = step_on(&cpu, &bt, &c, (x_off, xs), r, &w, dtype, norm)?;
                        let got = step_on(&g, &bt, &c, (x_off, xs), r, &w, dtype, norm)?;
                        check_close(&format!("{what} out"), &got.0, &want.0, tol);
                        check_close(&format!("{what} state"), &got.1, &want.1, tol);
                        continue;
                    }
                    // Rows 2 and s - 1 are padding on the GPU; the CPU, which
                    // takes no padding rows, runs the batch without them.
                    let pads = [2, s - 1];
                    let mut padded = bt;
                    let mut kept = Batch { lens: vec![1; s - 2], slots: vec![], prompt: vec![0; s - 2] };
                    let mut kc = ScanCase {
                        ch,
                        n,
                        x: c.x[..x_off].to_vec(),
                        dt: vec![],
                        dt_bias: c.dt_bias.clone(),
                        a: c.a.clone(),
                        bc: vec![],
                        skip: c.skip.clone(),
                        z: vec![],
                        state: c.state.clone(),
                        layout: c.layout,
                    };
                    let bw = r + 2 * n;
                    for i in (0..s).filter(|i| !pads.contains(i)) {
                        kept.slots.push(padded.slots[i]);
                        kc.x.extend_from_slice(&c.x[x_off + i * xs..x_off + (i + 1) * xs]);
                        kc.z.extend_from_slice(&c.z[i * ch..(i + 1) * ch]);
                        kc.bc.extend_from_slice(&c.bc[i * bw..(i + 1) * bw]);
                    }
                    for &i in &pads {
                        padded.slots[i] = PAD_SLOT;
                    }
                    let want = step_on(&cpu, &kept, &kc, (x_off, xs), r, &w, dtype, norm)?;
                    let got = step_on(&g, &padded, &c, (x_off, xs), r, &w, dtype, norm)?;
                    let got_kept: Vec<f32> =
                        (0..s).filter(|i| !pads.contains(i)).flat_map(|i| got.0[i * ch..(i + 1) * ch].to_vec()).collect();
                    check_close(&format!("{what} out"), &got_kept, &want.0, tol);
                    check_close(&format!("{what} state"), &got.1, &want.1, tol);
                }
            }
        }
    }
    Ok(())
}

/// A chain test's decode conv: 4 taps, SiLU, no bias, layer 1 of a
/// two-layer conv pool with the case's slots, over `x` into `out`.
fn chain_conv<B: Backend>(
    b: &B,
    packed: &Packed<'_, B>,
    x: &B::Vec,
    taps: &B::Vec,
    state: &mut B::Vec,
    c: &ScanCase,
    out: &mut B::Vec,
) -> R<()> {
    let (s, ch) = (packed.n_seqs, c.ch);
    let conv = ConvArgs {
        x: View::dense(x, s, ch),
        weight: taps,
        bias: None,
        kernel: 4,
        activation: Activation::Silu,
        state,
        layout: PoolLayout { n_slots: c.layout.n_slots, n_layers: 2, per_layer: ch * 3 },
        layer: 1,
    };
    b.conv1d(conv, packed, ViewMut::dense(out, s, ch))?;
    Ok(())
}

/// A chain test's decode step over the conv's output `x` and `xdbl`
/// (dt_rank columns, then B | C) with the case's parameters, on layer 1 of
/// `state`, into `y`: the launches it took. The parameters are uploaded
/// before the step, so a 16-bit copy it writes stays valid after it.
fn chain_step<B: Backend>(
    b: &B,
    packed: &Packed<'_, B>,
    c: &ScanCase,
    (x, xdbl): (&B::Vec, View<'_, B::Vec>),
    dt_proj: &B::Mat,
    state: &mut B::Vec,
    y: &mut B::Vec,
) -> R<u64> {
    let (s, ch, n) = (packed.n_seqs, c.ch, c.n);
    let (bias, a, skip, z) = (b.upload(&c.dt_bias)?, b.upload(&c.a)?, b.upload(&c.skip)?, b.upload(&c.z)?);
    let args = Mamba1StepArgs {
        x: View::dense(x, s, ch),
        ssm: Mamba1Ssm { dt_proj, dt_bias: &bias, a: &a, skip: &skip, norm_eps: None, dt_rank: xdbl.cols - 2 * n, d_state: n },
        xdbl,
        z: View::dense(&z, s, ch),
        state,
        layout: c.layout,
        layer: 1,
    };
    let before = b.launches();
    b.mamba1_step(args, packed, ViewMut::dense(y, s, ch))?;
    Ok(b.launches() - before)
}

/// The large-batch decode conv and step, each followed by a tensor-core
/// product over its output (as x_proj and out_proj follow them in a
/// layer): the two products' outputs, and how many launches each product
/// took.
#[allow(clippy::too_many_arguments)]
fn decode_chain_on<B: Backend>(
    b: &B,
    bt: &Batch,
    c: &ScanCase,
    taps: &[f32],
    conv_state: &[f32],
    r: usize,
    dtw: &[u8],
    (wp, n_out): (&[u8], usize),
) -> R<(Vec<f32>, Vec<f32>, [u64; 2])> {
    let s = bt.lens.len();
    let (ch, n) = (c.ch, c.n);
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed { n_tokens: s, n_seqs: s, cu_seqlens: &cu, slots: &slots, prompt: &prompt, single_token: true };
    let w = mat(b, n_out, ch, DType::BF16, wp)?;
    let x = b.upload(&c.x)?;
    // A first 16-bit product sets the type the copies are written in.
    let mut warm = poisoned(b, s * n_out)?;
    b.linear(View::dense(&x, s, ch), &w, None, ViewMut::dense(&mut warm, s, n_out))?;

    let (tb, mut cst) = (b.upload(taps)?, b.upload(conv_state)?);
    let mut conv_out = poisoned(b, s * ch)?;
    // Every buffer is made first: an upload or fill between an op and the
    // product over its output drops the copy.
    let mut first = poisoned(b, s * n_out)?;
    chain_conv(b, &packed, &x, &tb, &mut cst, c, &mut conv_out)?;
    let before = b.launches();
    b.linear(View::dense(&conv_out, s, ch), &w, None, ViewMut::dense(&mut first, s, n_out))?;
    let first_launches = b.launches() - before;

    let xdbl = b.upload(&c.bc)?;
    let dt_proj = mat(b, ch, r, DType::BF16, dtw)?;
    let mut st = b.upload(&c.state)?;
    let mut y = poisoned(b, s * ch)?;
    let mut second = b.upload(&vec![0.25; s * n_out])?;
    chain_step(b, &packed, c, (&conv_out, View::dense(&xdbl, s, r + 2 * n)), &dt_proj, &mut st, &mut y)?;
    let before = b.launches();
    b.linear_add(View::dense(&y, s, ch), &w, None, ViewMut::dense(&mut second, s, n_out))?;
    let second_launches = b.launches() - before;
    Ok((b.read(&first, 0, s * n_out)?, b.read(&second, 0, s * n_out)?, [first_launches, second_launches]))
}

#[test]
fn large_decode_batches_hand_their_16_bit_copies_to_the_next_product() -> TestResult {
    let Some(g) = gpu("large_decode_batches_hand_their_16_bit_copies_to_the_next_product") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(21);
    // 40 sequences (the wide step), 600 channels, products of 800 outputs
    // (over 2^24 multiply-adds: cuBLAS on 16-bit operands).
    let (s, ch, n, r, n_out) = (40, 600, 16, 8, 800);
    let bt = batch(&mut rng, &vec![1; s], 48);
    let mut c = scan_case(&mut rng, s, ch, n, 48);
    c.bc = rng.vec(s * (r + 2 * n), -1.5, 1.5);
    let taps = rng.vec(ch * 4, -1.0, 1.0);
    let conv_state = rng.vec(48 * 2 * ch * 3, -1.0, 1.0);
    let (dtw, _) = as_dtype(&rng.vec(ch * r, -0.5, 0.5), DType::BF16);
    let (wp, _) = as_dtype(&rng.vec(n_out * ch, -0.1, 0.1), DType::BF16);
    let want = decode_chain_on(&cpu, &bt, &c, &taps, &conv_state, r, &dtw, (&wp, n_out))?;
    let got = decode_chain_on(&g, &bt, &c, &taps, &conv_state, r, &dtw, (&wp, n_out))?;
    check_close("product over the decode conv's output", &got.0, &want.0, 1e-2);
    check_close("product over the decode step's output", &got.1, &want.1, 1e-2);
    // The conv and the step wrote the 16-bit operands: each product is one
    // cuBLAS call, with no conversion kernel before it.
    assert_eq!(got.2, [1, 1], "launches of the two products");
    Ok(())
}

/// A large decode batch's conv, x_proj over its output, and the step whose
/// dt_proj reads x_proj's first dt_rank columns: x_proj's output, the
/// step's output and state, and the launches x_proj and the step took.
#[allow(clippy::too_many_arguments)]
fn x_proj_chain_on<B: Backend>(
    b: &B,
    bt: &Batch,
    c: &ScanCase,
    taps: &[f32],
    conv_state: &[f32],
    r: usize,
    dtw: &[u8],
    xpw: &[u8],
) -> R<ChainOut> {
    let s = bt.lens.len();
    let (ch, n) = (c.ch, c.n);
    let n_out = r + 2 * n;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed { n_tokens: s, n_seqs: s, cu_seqlens: &cu, slots: &slots, prompt: &prompt, single_token: true };
    let x_proj = mat(b, n_out, ch, DType::BF16, xpw)?;
    let dt_proj = mat(b, ch, r, DType::BF16, dtw)?;
    let x = b.upload(&c.x)?;
    // A first 16-bit product sets the type the copies are written in.
    let mut xdbl = poisoned(b, s * n_out)?;
    b.linear(View::dense(&x, s, ch), &x_proj, None, ViewMut::dense(&mut xdbl, s, n_out))?;
    let (tb, mut cst) = (b.upload(taps)?, b.upload(conv_state)?);
    let mut st = b.upload(&c.state)?;
    let mut conv_out = poisoned(b, s * ch)?;
    let mut y = poisoned(b, s * ch)?;
    b.fill(&mut xdbl, 0, s * n_out, f32::NAN)?;
    chain_conv(b, &packed, &x, &tb, &mut cst, c, &mut conv_out)?;
    let before = b.launches();
    b.linear(View::dense(&conv_out, s, ch), &x_proj, None, ViewMut::dense(&mut xdbl, s, n_out))?;
    let x_proj_launches = b.launches() - before;
    let step_launches = chain_step(b, &packed, c, (&conv_out, View::dense(&xdbl, s, n_out)), &dt_proj, &mut st, &mut y)?;
    Ok(ChainOut {
        xdbl: b.read(&xdbl, 0, s * n_out)?,
        y: b.read(&y, 0, s * ch)?,
        state: b.read(&st, 0, c.layout.len())?,
        launches: [x_proj_launches, step_launches],
    })
}

/// What `x_proj_chain_on` reads back.
struct ChainOut {
    xdbl: Vec<f32>,
    y: Vec<f32>,
    state: Vec<f32>,
    launches: [u64; 2],
}

#[test]
fn a_large_decode_batch_conv_x_proj_and_step_match_the_cpu() -> TestResult {
    let Some(g) = gpu("a_large_decode_batch_conv_x_proj_and_step_match_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(22);
    // 64 sequences, 2056 channels, dt_rank 128 (x_proj has 160 outputs, as
    // in mamba-1.4b: the lean wide step) and 130 (162 outputs: B | C
    // misaligned, the general wide step). x_proj is one cuBLAS call on the
    // conv's 16-bit copy, no conversion kernel. The step is dt_proj, then
    // the wide step: at rank 128 dt_proj is the short-k kernel, which
    // rounds its input itself; at 130 its input rows are not 16-byte
    // aligned, so it is cuBLAS after a conversion kernel.
    for r in [128, 130] {
        let (s, ch, n) = (64, 2056, 16);
        let n_out = r + 2 * n;
        let bt = batch(&mut rng, &vec![1; s], 70);
        let c = scan_case(&mut rng, s, ch, n, 70);
        let taps = rng.vec(ch * 4, -1.0, 1.0);
        let conv_state = rng.vec(70 * 2 * ch * 3, -1.0, 1.0);
        let (dtw, _) = as_dtype(&rng.vec(ch * r, -0.2, 0.2), DType::BF16);
        let (xpw, _) = as_dtype(&rng.vec(n_out * ch, -0.05, 0.05), DType::BF16);
        let want = x_proj_chain_on(&cpu, &bt, &c, &taps, &conv_state, r, &dtw, &xpw)?;
        let got = x_proj_chain_on(&g, &bt, &c, &taps, &conv_state, r, &dtw, &xpw)?;
        check_close(&format!("rank {r}: x_proj over the decode conv's output"), &got.xdbl, &want.xdbl, 1e-2);
        check_close(&format!("rank {r}: decode step output"), &got.y, &want.y, 1e-2);
        check_close(&format!("rank {r}: decode step state"), &got.state, &want.state, 1e-2);
        let step_launches = if r == 128 { 2 } else { 3 };
        assert_eq!(got.launches, [1, step_launches], "rank {r}: launches of x_proj and of the step");
    }
    Ok(())
}

fn mamba2_on<B: Backend>(b: &B, bt: &Batch, (h, p, grp, n): (usize, usize, usize, usize), c: &ScanCase) -> R<(Vec<f32>, Vec<f32>)> {
    let t = bt.n_tokens();
    let (x, dt, bias, a, skip, bc) =
        (b.upload(&c.x)?, b.upload(&c.dt)?, b.upload(&c.dt_bias)?, b.upload(&c.a)?, b.upload(&c.skip)?, b.upload(&c.bc)?);
    let mut st = b.upload(&c.state)?;
    let (cu, slots, prompt) = bt.on(b)?;
    let packed = Packed {
        n_tokens: t,
        n_seqs: bt.lens.len(),
        cu_seqlens: &cu,
        slots: &slots,
        prompt: &prompt,
        single_token: bt.lens.iter().all(|&l| l == 1),
    };
    let gn = grp * n;
    let bcv = View::dense(&bc, t, 3 + 2 * gn);
    let mut out = poisoned(b, t * h * p)?;
    let args = Mamba2ScanArgs {
        x: View::dense(&x, t, h * p),
        dt: View::dense(&dt, t, h),
        dt_bias: &bias,
        a: &a,
        b: bcv.columns(3, gn),
        c: bcv.columns(3 + gn, gn),
        skip: &skip,
        dt_limit: (0.004, 0.06),
        n_heads: h,
        head_dim: p,
        n_groups: grp,
        d_state: n,
        state: &mut st,
        layout: c.layout,
        layer: 1,
    };
    b.mamba2_scan(args, &packed, ViewMut::dense(&mut out, t, h * p))?;
    Ok((b.read(&out, 0, t * h * p)?, b.read(&st, 0, c.state.len())?))
}

#[test]
fn mamba2_scan_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("mamba2_scan_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(16);
    // (segment lengths, (heads, head dim, groups, state)).
    type Case<'a> = (&'a [usize], (usize, usize, usize, usize));
    let cases: &[Case<'_>] = &[
        (&[5, 1, 30, 3], (6, 8, 2, 16)),
        (&[1, 1, 1], (6, 8, 3, 16)),
        (&[12, 4], (8, 12, 4, 8)),
        (&[7], (4, 64, 1, 128)),
        (&[2, 3], (3, 5, 1, 5)),
    ];
    for &(lens, dims) in cases {
        let (h, p, grp, n) = dims;
        let bt = batch(&mut rng, lens, 7);
        let t = bt.n_tokens();
        let layout = PoolLayout { n_slots: 7, n_layers: 2, per_layer: h * p * n };
        let c = ScanCase {
            ch: h * p,
            n,
            x: rng.vec(t * h * p, -2.0, 2.0),
            dt: rng.vec(t * h, -5.0, 0.0),
            dt_bias: rng.vec(h, -1.0, 0.5),
            a: rng.vec(h, -4.0, -0.2),
            bc: rng.vec(t * (3 + 2 * grp * n), -1.5, 1.5),
            skip: rng.vec(h, 0.5, 1.5),
            z: vec![],
            state: rng.vec(layout.len(), -1.0, 1.0),
            layout,
        };
        let want = mamba2_on(&cpu, &bt, dims, &c)?;
        let got = mamba2_on(&g, &bt, dims, &c)?;
        check_close(&format!("mamba2_scan {lens:?} {dims:?} out"), &got.0, &want.0, 1e-5);
        check_close(&format!("mamba2_scan {lens:?} {dims:?} state"), &got.1, &want.1, 1e-5);
    }
    Ok(())
}

// ------------------------------------------------------------ sampling

fn row(rng: &mut Rng, vocab: usize, kind: usize) -> SampleRow {
    let mut r = SampleRow { seed: rng.0.next_u64(), step: rng.below(1000) as u64, ..SampleRow::greedy(vocab) };
    match kind % 9 {
        0 => {}
        1 => r.temperature = 0.7,
        2 => (r.temperature, r.top_k) = (1.3, 5),
        3 => (r.temperature, r.top_k) = (1.0, 50),
        4 => (r.temperature, r.top_p) = (0.9, 0.9),
        5 => (r.temperature, r.min_p) = (1.1, 0.05),
        6 => (r.temperature, r.top_k, r.top_p, r.min_p) = (0.8, 40, 0.95, 0.02),
        7 => {
            r.temperature = 1.0;
            r.repetition_penalty = 1.3;
            r.presence_penalty = 0.4;
            r.frequency_penalty = 0.2;
            let mut ids: Vec<u32> = (0..60).map(|_| rng.below(vocab) as u32).collect();
            ids.sort_unstable();
            ids.dedup();
            r.seen = ids.into_iter().map(|id| (id, rng.below(3) as u32)).collect();
            r.logit_bias = vec![(3, 5.0), (17, -100.0), ((vocab - 1) as u32, 2.0)];
            r.valid_vocab = (vocab - 7) as u32;
        }
        _ => {
            r.top_logprobs = 5;
            r.valid_vocab = (vocab - 3) as u32;
            r.logit_bias = vec![(1, 1.5)];
        }
    }
    if kind % 4 == 1 {
        r.top_logprobs = 3;
    }
    r
}

/// Random logits for `rows` (`quantized`: halves only, so many exact ties),
/// the CPU's samples of them and the logits uploaded to the GPU.
fn cpu_samples(
    g: &CudaBackend,
    cpu: &CpuBackend,
    rng: &mut Rng,
    rows: &[SampleRow],
    vocab: usize,
    quantized: bool,
) -> R<(Vec<SampledToken>, <CudaBackend as Backend>::Vec)> {
    let mut logits = rng.vec(rows.len() * vocab, -8.0, 8.0);
    if quantized {
        // Many exact ties: the order (value, then id) must agree exactly.
        logits.iter_mut().for_each(|l| *l = (*l * 2.0).round() / 2.0);
    }
    let refs: Vec<&SampleRow> = rows.iter().collect();
    let want = cpu.sample(View::dense(&logits, rows.len(), vocab), &refs)?;
    Ok((want, g.upload(&logits)?))
}

/// The GPU's samples against the CPU's: tokens and alternatives' ids
/// exactly, logprobs within 1e-5 (relative, or absolute below 1).
fn check_samples(what: &str, rows: &[SampleRow], got: &[SampledToken], want: &[SampledToken]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let what = format!("{what} row {i} {:?}", rows[i]);
        assert_eq!(a.token, b.token, "{what}: token");
        assert!((a.logprob - b.logprob).abs() <= 1e-5 * b.logprob.abs().max(1.0), "{what}: logprob {} vs {}", a.logprob, b.logprob);
        assert_eq!(a.top.len(), b.top.len(), "{what}: top length");
        for (x, y) in a.top.iter().zip(&b.top) {
            assert_eq!(x.0, y.0, "{what}: top ids {:?} vs {:?}", a.top, b.top);
            assert!((x.1 - y.1).abs() <= 1e-5 * y.1.abs().max(1.0), "{what}: top logprobs");
        }
    }
}

#[test]
fn sampling_matches_the_cpu() -> TestResult {
    let Some(g) = gpu("sampling_matches_the_cpu") else { return Ok(()) };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(17);
    for (vocab, quantized) in [(5003, false), (50280, false), (2000, true)] {
        let rows: Vec<SampleRow> = (0..72).map(|i| row(&mut rng, vocab, i)).collect();
        let (want, lb) = cpu_samples(&g, &cpu, &mut rng, &rows, vocab, quantized)?;
        let refs: Vec<&SampleRow> = rows.iter().collect();
        let got = g.sample(View::dense(&lb, rows.len(), vocab), &refs)?;
        check_samples(&format!("vocab {vocab} quantized {quantized}"), &rows, &got, &want);
    }
    // Batches of plain greedy rows (no processing, no alternatives) take the
    // kernel that splits each row over blocks: the same tokens, ties (to the
    // lowest id) and masked ids included, and logprobs, launch after launch.
    for (vocab, quantized, n_rows) in [(50280, false, 1), (50280, true, 64), (5003, true, 3), (65024, false, 2)] {
        let rows: Vec<SampleRow> =
            (0..n_rows).map(|i| SampleRow { valid_vocab: (vocab - (i % 3) * 2047) as u32, ..SampleRow::greedy(vocab) }).collect();
        let (want, lb) = cpu_samples(&g, &cpu, &mut rng, &rows, vocab, quantized)?;
        let refs: Vec<&SampleRow> = rows.iter().collect();
        for launch in 0..2 {
            let got = g.sample(View::dense(&lb, rows.len(), vocab), &refs)?;
            check_samples(&format!("greedy: vocab {vocab} quantized {quantized}, launch {launch}"), &rows, &got, &want);
        }
    }
    Ok(())
}

// ------------------------------------------------------------ golden

fn load_gpu(dir: &std::path::Path, slots: usize, tokens: usize) -> R<Option<Model<CudaBackend>>> {
    let Some(g) = gpu(&format!("golden on {}", name(dir))) else { return Ok(None) };
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    Ok(Some(Model::load(g, cfg, &ckpt, opts(slots, tokens), &mut |_| {})?))
}

/// Logits tolerance against the float32 reference: bf16 checkpoints get
/// the bf16 bound.
fn golden_tol(dir: &std::path::Path) -> f64 {
    if dir.join("model.safetensors.index.json").exists() { 1e-2 } else { 1e-4 }
}

#[test]
fn golden_fixtures_on_the_gpu() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let tol = golden_tol(&dir);
        let Some(mut m) = load_gpu(&dir, 2, 256)? else { return Ok(()) };
        let tok = Tokenizer::from_dir(&dir)?;
        let vocab = tok.vocab_size();
        for p in &r.prompts {
            m.reset_slot(0)?;
            let logits = m.forward(&[SeqChunk { slot: 0, tokens: &p.ids, is_prompt: true }])?;
            check_close(&format!("{}: prompt {:?} logits", name(&dir), p.text), &logits, &p.last_logits, tol);
            let g = offline::generate(&mut m, &p.ids, p.greedy.len(), &SamplingParams::greedy(), vocab, &[], &mut |_| {})?;
            assert_eq!(g.generated, p.greedy, "{}: prompt {:?} greedy", name(&dir), p.text);
            // Decode-step logits (recorded graphs), feeding the reference's tokens.
            m.reset_slot(1)?;
            m.forward(&[SeqChunk { slot: 1, tokens: &p.ids, is_prompt: true }])?;
            for (i, want) in p.step_logits.iter().enumerate() {
                let logits = m.forward(&[SeqChunk { slot: 1, tokens: &p.greedy[i..i + 1], is_prompt: false }])?;
                check_close(&format!("{}: prompt {:?} step {}", name(&dir), p.text, i + 1), &logits, want, tol);
            }
        }
        // Chunked prefill (5 tokens a step) gives the same last logits.
        let Some(mut m) = load_gpu(&dir, 1, 5)? else { return Ok(()) };
        for p in &r.prompts {
            m.reset_slot(0)?;
            let mut logits = vec![];
            for piece in p.ids.chunks(5) {
                logits = m.forward(&[SeqChunk { slot: 0, tokens: piece, is_prompt: true }])?;
            }
            check_close(&format!("{}: chunked prompt {:?}", name(&dir), p.text), &logits, &p.last_logits, tol);
        }
    }
    Ok(())
}

/// Greedy tokens of 64 sequences decoded together (mixed prompt lengths,
/// packed prefill, then graph-recorded steps) equal each one decoded alone,
/// and the GPU's tokens equal the CPU's.
#[test]
fn a_sequence_decodes_the_same_alone_and_in_a_batch_of_64_on_the_gpu() -> TestResult {
    for dir in fixture_models() {
        let r = reference(&dir);
        let n_new = 12;
        let Some(mut m) = load_gpu(&dir, 66, 2048)? else { return Ok(()) };
        let mut cpu = load_cpu(&dir, opts(1, 256))?;
        let v = m.config().vocab_size;
        let valid = Tokenizer::from_dir(&dir)?.vocab_size();
        let greedy_rows = |n: usize| -> Vec<Option<SampleRow>> {
            (0..n).map(|_| Some(mamba_serve::sampling::TokenHistory::new(&[]).row(&SamplingParams::greedy(), 0, valid))).collect()
        };
        let prompts: Vec<Vec<u32>> = (0..64)
            .map(|i| {
                let p = &r.prompts[i % r.prompts.len()].ids;
                // Vary lengths: drop a few leading tokens of the longer prompts.
                p[(i / r.prompts.len()).min(p.len() - 1)..].to_vec()
            })
            .collect();
        // Alone (slot 0), on the GPU and on the CPU.
        let mut alone = vec![];
        for p in &prompts {
            let g = offline::generate(&mut m, p, n_new, &SamplingParams::greedy(), valid, &[], &mut |_| {})?;
            let c = offline::generate(&mut cpu, p, n_new, &SamplingParams::greedy(), valid, &[], &mut |_| {})?;
            assert_eq!(g.generated, c.generated, "{}: GPU vs CPU greedy", name(&dir));
            alone.push(g.generated);
        }
        // Together: slots 1..=64, one packed prefill, then batched steps.
        for s in 1..=64 {
            m.reset_slot(s)?;
        }
        let chunks: Vec<SeqChunk<'_>> =
            prompts.iter().enumerate().map(|(i, p)| SeqChunk { slot: i + 1, tokens: p, is_prompt: true }).collect();
        let mut last: Vec<u32> = m.forward_sample(&chunks, &greedy_rows(64))?.into_iter().map(|t| t.expect("sampled").token).collect();
        let mut outs: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
        for _ in 1..n_new {
            let chunks: Vec<SeqChunk<'_>> =
                last.iter().enumerate().map(|(i, t)| SeqChunk { slot: i + 1, tokens: std::slice::from_ref(t), is_prompt: false }).collect();
            last = m.forward_sample(&chunks, &greedy_rows(64))?.into_iter().map(|t| t.expect("sampled").token).collect();
            for (o, &t) in outs.iter_mut().zip(&last) {
                o.push(t);
            }
        }
        for (i, (o, a)) in outs.iter().zip(&alone).enumerate() {
            assert_eq!(o, a, "{}: sequence {i} alone vs in a batch of 64", name(&dir));
        }
        // A batch that is not a bucket size (padding rows) gives the same too.
        for s in 1..=5 {
            m.reset_slot(s)?;
        }
        let chunks: Vec<SeqChunk<'_>> =
            prompts[..5].iter().enumerate().map(|(i, p)| SeqChunk { slot: i + 1, tokens: p, is_prompt: true }).collect();
        let mut last: Vec<u32> = m.forward_sample(&chunks, &greedy_rows(5))?.into_iter().map(|t| t.expect("sampled").token).collect();
        let mut outs: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
        for _ in 1..n_new {
            let chunks: Vec<SeqChunk<'_>> =
                last.iter().enumerate().map(|(i, t)| SeqChunk { slot: i + 1, tokens: std::slice::from_ref(t), is_prompt: false }).collect();
            last = m.forward_sample(&chunks, &greedy_rows(5))?.into_iter().map(|t| t.expect("sampled").token).collect();
            for (o, &t) in outs.iter_mut().zip(&last) {
                o.push(t);
            }
        }
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(o, &alone[i], "{}: sequence {i} alone vs in a padded batch of 5", name(&dir));
        }
        let _ = v;
    }
    Ok(())
}

/// Seeded sampling through the whole model gives the CPU's tokens.
#[test]
fn seeded_generation_matches_the_cpu() -> TestResult {
    let dir = &fixture_models()[0];
    let r = reference(dir);
    let Some(mut m) = load_gpu(dir, 1, 256)? else { return Ok(()) };
    let mut cpu = load_cpu(dir, opts(1, 256))?;
    let valid = Tokenizer::from_dir(dir)?.vocab_size();
    for (i, p) in r.prompts.iter().enumerate() {
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: 1000 + i as u64,
            ..Default::default()
        };
        let g = offline::generate(&mut m, &p.ids, 24, &params, valid, &[], &mut |_| {})?;
        let c = offline::generate(&mut cpu, &p.ids, 24, &params, valid, &[], &mut |_| {})?;
        assert_eq!(g.generated, c.generated, "prompt {i}: seeded GPU vs CPU");
    }
    Ok(())
}

/// One sequence's decode steps through the fused stack kernel (the whole
/// stack of blocks in one launch) give the CPU's logits, at real widths
/// (mamba-130m's, three blocks, bf16), as Mamba-1 and as Falcon-Mamba
/// (its norms of dt, B and C), with and without recorded graphs; and the
/// reference's step logits on the Mamba-1 fixtures.
#[test]
fn the_fused_decode_stack_matches_the_cpu() -> TestResult {
    use mamba_serve::model::{Arch, shapes};
    for (arch, graphs) in [(Arch::Mamba1, false), (Arch::FalconMamba, false), (Arch::Mamba1, true)] {
        let Some(mut g) = gpu("fused stack") else { return Ok(()) };
        g.set_fused_stack(true);
        let mut cfg = shapes::public_shape("mamba-130m").expect("a known shape");
        cfg.n_layers = 3;
        cfg.vocab_size = 1000;
        cfg.arch = arch;
        let (mut m, mut cpu) = random_pair(g, cfg, DType::BF16, graphs, 7)?;
        let what = format!("{arch:?}, graphs {graphs}");
        let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % 1000).collect();
        let want =
            step_both(&mut m, &mut cpu, &[SeqChunk { slot: 1, tokens: &prompt, is_prompt: true }], &format!("{what}: prompt"), 1e-2)?;
        let before = m.backend().fused_stack_launches();
        let mut token = argmax(&want) as u32;
        for step in 0..8 {
            let one = [SeqChunk { slot: 1, tokens: &[token], is_prompt: false }];
            let want = step_both(&mut m, &mut cpu, &one, &format!("{what}: step {step}"), 1e-2)?;
            token = argmax(&want) as u32;
        }
        // The steps ran the fused kernel (with graphs: once, when recorded).
        let launched = m.backend().fused_stack_launches() - before;
        assert_eq!(launched, if graphs { 1 } else { 8 }, "{what}: fused stack launches");
        // The slot's state after the steps is the CPU's.
        check_close(&format!("{what}: state"), &m.read_slot(1)?, &cpu.read_slot(1)?, 1e-2);
    }
    fused_fixture_steps("fused stack", |g| g.set_fused_stack(true), CudaBackend::fused_stack_launches, |_| 1)
}

/// The Mamba-1 and Falcon-Mamba fixtures (f32 and bf16, biases, conv widths
/// 3 to 5, 8 states, odd ranks) decoded on a backend `setup` readies for a
/// fused kernel: the step logits against transformers', and the kernel's
/// launch counter `launches` going up by `per_step` of the model a step
/// (graphs off).
fn fused_fixture_steps(
    what: &str,
    setup: fn(&mut CudaBackend),
    launches: fn(&CudaBackend) -> u64,
    per_step: fn(&ModelConfig) -> u64,
) -> TestResult {
    use mamba_serve::model::{Arch, DeviceOptions};
    for dir in fixture_models() {
        let cfg = ModelConfig::from_dir(&dir)?;
        if cfg.arch == Arch::Mamba2 {
            continue;
        }
        let Some(mut g) = gpu(what) else { return Ok(()) };
        setup(&mut g);
        let step = per_step(&cfg);
        let dev = DeviceOptions { graphs: false, ..Default::default() };
        let mut m = Model::load_with(g, cfg, &Checkpoint::open(&dir)?, opts(2, 256), dev, &mut |_| {})?;
        let (r, tol) = (reference(&dir), golden_tol(&dir));
        for p in &r.prompts {
            m.reset_slot(1)?;
            m.forward(&[SeqChunk { slot: 1, tokens: &p.ids, is_prompt: true }])?;
            let before = launches(m.backend());
            for (i, want) in p.step_logits.iter().enumerate() {
                let logits = m.forward(&[SeqChunk { slot: 1, tokens: &p.greedy[i..i + 1], is_prompt: false }])?;
                check_close(&format!("{}: prompt {:?} {what} step {}", name(&dir), p.text, i + 1), &logits, want, tol);
            }
            let launched = launches(m.backend()) - before;
            assert_eq!(launched, p.step_logits.len() as u64 * step, "{}: {what} launches", name(&dir));
        }
    }
    Ok(())
}

/// A model of `cfg` with random `dtype` weights (`seed`) on the GPU backend
/// `g` and on the CPU.
fn random_pair(g: CudaBackend, cfg: ModelConfig, dtype: DType, graphs: bool, seed: u64) -> R<(Model<CudaBackend>, Model<CpuBackend>)> {
    use mamba_serve::model::{DeviceOptions, RandomWeights};
    let src = RandomWeights::new(dtype, mamba_serve::model::weights::expected_tensors(&cfg), seed);
    let dev = DeviceOptions { graphs, ..Default::default() };
    let gpu = Model::load_with(g, cfg.clone(), &src, opts(2, 64), dev, &mut |_| {})?;
    let cpu = Model::load(CpuBackend::new(), cfg, &src, opts(2, 64), &mut |_| {})?;
    Ok((gpu, cpu))
}

/// [`random_pair`] (`cfg`'s vocabulary 1000) with a 9-token prompt run in
/// slot 1 on both and checked: the models, the tolerance for `dtype`, and
/// the prompt's greedy next token.
fn prompted_pair(
    g: CudaBackend,
    cfg: ModelConfig,
    dtype: DType,
    graphs: bool,
    seed: u64,
    what: &str,
) -> R<(Model<CudaBackend>, Model<CpuBackend>, f64, u32)> {
    let (mut m, mut cpu) = random_pair(g, cfg, dtype, graphs, seed)?;
    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % 1000).collect();
    let want = step_both(&mut m, &mut cpu, &[SeqChunk { slot: 1, tokens: &prompt, is_prompt: true }], &format!("{what}: prompt"), tol)?;
    Ok((m, cpu, tol, argmax(&want) as u32))
}

/// One step of `chunks` on both models: checks the GPU's logits against
/// the CPU's and returns the CPU's.
fn step_both(m: &mut Model<CudaBackend>, cpu: &mut Model<CpuBackend>, chunks: &[SeqChunk<'_>], what: &str, tol: f64) -> R<Vec<f32>> {
    let got = m.forward(chunks)?;
    let want = cpu.forward(chunks)?;
    check_close(what, &got, &want, tol);
    Ok(want)
}

/// One-sequence decode blocks with x_proj folded into in_proj's conv
/// epilogue (the default for in_proj on the streaming GEMV) give the CPU's
/// logits and state over 8 greedy steps: columns a warp's group of 2
/// (mamba-370m's widths, as Mamba-1 and as Falcon-Mamba), 4 (mamba-1.4b's,
/// bf16 and f32) and 1 (a 640-wide model, f16, with in_proj and out_proj
/// biases), with and without graphs, 2 and 3 blocks (each block's in_proj
/// zeroes the accumulator the block before it read); and a 4352-wide model
/// with x_proj 288 wide (the most the fold takes), whose 4,352 column
/// groups outnumber the warps of a 132-multiprocessor grid, so warps walk
/// two groups and load the second group's x_proj weights mid-walk. Between the steps a
/// second sequence's prompt and a two-sequence step (which do not fold)
/// leave the accumulators as they were.
#[test]
fn decode_blocks_with_x_proj_folded_in_match_the_cpu() -> TestResult {
    use mamba_serve::model::{Arch, shapes};
    // (shape, width and dt rank overrides, blocks, architecture, weights, graphs)
    let cases = [
        ("mamba-370m", None, 2, Arch::Mamba1, DType::BF16, false),
        ("mamba-370m", None, 3, Arch::FalconMamba, DType::BF16, true),
        ("mamba-1.4b", None, 3, Arch::Mamba1, DType::BF16, true),
        ("mamba-1.4b", None, 2, Arch::Mamba1, DType::F32, false),
        ("mamba-130m", Some((640usize, 40usize)), 3, Arch::Mamba1, DType::F16, false),
        ("mamba-130m", Some((4352, 256)), 2, Arch::Mamba1, DType::BF16, false),
    ];
    for (shape, width, layers, arch, dtype, graphs) in cases {
        let Some(g) = gpu("x_proj fold") else { return Ok(()) };
        let mut cfg = shapes::public_shape(shape).expect("a known shape");
        if let Some((d, rank)) = width {
            (cfg.hidden_size, cfg.d_inner, cfg.dt_rank, cfg.use_bias) = (d, 2 * d, rank, true);
        }
        cfg.n_layers = layers;
        cfg.vocab_size = 1000;
        cfg.arch = arch;
        let what = format!("{shape} widths ({width:?}), {layers} blocks, {arch:?}, {dtype:?}, graphs {graphs}");
        let (mut m, mut cpu, tol, mut token) = prompted_pair(g, cfg, dtype, graphs, 13, &what)?;
        let before = m.backend().x_proj_folded_blocks();
        for step in 0..8 {
            if step == 4 {
                // Another sequence's prompt, then a step of both.
                let other = [SeqChunk { slot: 0, tokens: &[3, 1, 4, 1, 5], is_prompt: true }];
                step_both(&mut m, &mut cpu, &other, &format!("{what}: second prompt"), tol)?;
                let both = [SeqChunk { slot: 0, tokens: &[7], is_prompt: false }, SeqChunk { slot: 1, tokens: &[token], is_prompt: false }];
                let want = step_both(&mut m, &mut cpu, &both, &format!("{what}: two sequences"), tol)?;
                token = argmax(&want[1000..]) as u32;
            }
            let one = [SeqChunk { slot: 1, tokens: &[token], is_prompt: false }];
            let want = step_both(&mut m, &mut cpu, &one, &format!("{what}: step {step}"), tol)?;
            token = argmax(&want) as u32;
        }
        // Every block of every one-sequence step folded (with graphs: once
        // a block, when the step was recorded).
        let folded = m.backend().x_proj_folded_blocks() - before;
        assert_eq!(folded, if graphs { layers } else { 8 * layers } as u64, "{what}: folded blocks");
        check_close(&format!("{what}: state"), &m.read_slot(1)?, &cpu.read_slot(1)?, tol);
        check_close(&format!("{what}: second state"), &m.read_slot(0)?, &cpu.read_slot(0)?, tol);
    }
    Ok(())
}

/// The fused decode tail (x_proj, the step and out_proj of a block in one
/// launch) gives the CPU's logits and state over 8 greedy steps: at
/// mamba-130m's widths in bf16 as Mamba-1 and as Falcon-Mamba, with and
/// without graphs, and in f32 and f16; at mamba-1.4b's widths (every
/// out_proj row held in shared memory); and at Falcon-Mamba-7b's, whose
/// out_proj rows do not all fit there. Then the Mamba-1 and Falcon-Mamba
/// fixtures' step logits (odd ranks, so dt_proj read from global memory;
/// 8 states; an out_proj bias; f32 and bf16) against transformers'.
#[test]
fn the_fused_decode_tail_matches_the_cpu() -> TestResult {
    use mamba_serve::model::{Arch, shapes};
    // (shape, blocks, architecture, weights, graphs)
    let cases = [
        ("mamba-130m", 3, Arch::Mamba1, DType::BF16, false),
        ("mamba-130m", 3, Arch::FalconMamba, DType::BF16, false),
        ("mamba-130m", 3, Arch::Mamba1, DType::BF16, true),
        ("mamba-130m", 2, Arch::Mamba1, DType::F32, false),
        ("mamba-130m", 2, Arch::Mamba1, DType::F16, true),
        ("mamba-1.4b", 2, Arch::Mamba1, DType::BF16, true),
        ("falcon-mamba-7b", 1, Arch::FalconMamba, DType::BF16, false),
    ];
    for (shape, layers, arch, dtype, graphs) in cases {
        let Some(mut g) = gpu("fused tail") else { return Ok(()) };
        g.set_fused_tail(true);
        let mut cfg = shapes::public_shape(shape).expect("a known shape");
        cfg.n_layers = layers;
        cfg.vocab_size = 1000;
        cfg.arch = arch;
        let what = format!("{shape} widths, {layers} blocks, {arch:?}, {dtype:?}, graphs {graphs}");
        let (mut m, mut cpu, tol, mut token) = prompted_pair(g, cfg, dtype, graphs, 11, &what)?;
        let before = m.backend().fused_tail_launches();
        for step in 0..8 {
            let one = [SeqChunk { slot: 1, tokens: &[token], is_prompt: false }];
            let want = step_both(&mut m, &mut cpu, &one, &format!("{what}: step {step}"), tol)?;
            token = argmax(&want) as u32;
        }
        // Every block of every step ran the fused kernel (with graphs: once
        // a block, when the step was recorded).
        let launched = m.backend().fused_tail_launches() - before;
        assert_eq!(launched, if graphs { layers } else { 8 * layers } as u64, "{what}: fused tail launches");
        check_close(&format!("{what}: state"), &m.read_slot(1)?, &cpu.read_slot(1)?, tol);
    }
    fused_fixture_steps("fused tail", |g| g.set_fused_tail(true), CudaBackend::fused_tail_launches, |c| c.n_layers as u64)
}

/// Decode steps queued ahead on the GPU, each fed on the device with the
/// tokens the step before sampled (the sampling kernels write them into the
/// ids the next step's graph embeds), give what host-fed steps give: one
/// sequence (the folded decode blocks), three and five (graphs padded to
/// buckets of 4 and 8), with mixed rows (greedy, drawn, with alternatives,
/// with a logit bias: the one-block-a-row kernel) and with all rows greedy
/// (the split greedy kernel), whose tokens and logprobs equal the CPU's.
#[test]
fn follow_up_steps_fed_on_the_device_match_host_fed_steps_on_the_gpu() -> TestResult {
    use crate::ahead::{ahead_and_stepped, assert_same_tokens, mixed_row};
    let greedy = |_: usize, step: u64, vocab: usize| SampleRow { step, ..SampleRow::greedy(vocab) };
    for dir in fixture_models() {
        let r = reference(&dir);
        let Some(mut m) = load_gpu(&dir, 10, 256)? else { return Ok(()) };
        let mut cpu = load_cpu(&dir, opts(10, 256))?;
        for n in [1, 3, 5] {
            let prompts: Vec<Vec<u32>> = (0..n).map(|i| r.prompts[i % r.prompts.len()].ids.clone()).collect();
            let what = format!("{}: {n} sequences", name(&dir));
            let (ahead, stepped) = ahead_and_stepped(&mut m, &prompts, 10, &mixed_row)?;
            assert_same_tokens(&ahead, &stepped, 1e-3, &what);
            let (cpu_ahead, _) = ahead_and_stepped(&mut cpu, &prompts, 10, &mixed_row)?;
            for seq in (0..n).filter(|s| s % 4 == 0 || s % 4 == 2) {
                let ids = |v: &[SampledToken]| v.iter().map(|t| t.token).collect::<Vec<_>>();
                assert_eq!(ids(&ahead[seq]), ids(&cpu_ahead[seq]), "{what}: sequence {seq}, GPU vs CPU");
            }
            let what = format!("{what}, all greedy");
            let (ahead, stepped) = ahead_and_stepped(&mut m, &prompts, 10, &greedy)?;
            assert_same_tokens(&ahead, &stepped, 1e-3, &what);
            let (cpu_ahead, _) = ahead_and_stepped(&mut cpu, &prompts, 10, &greedy)?;
            assert_same_tokens(&ahead, &cpu_ahead, 1e-3, &format!("{what}, GPU vs CPU"));
        }
    }
    Ok(())
}
