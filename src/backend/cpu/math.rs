//! The arithmetic of the CPU ops, on plain slices. Shapes were checked by the
//! caller (`cpu/mod.rs`); these functions only compute.
//!
//! Reductions (norms) accumulate in f64 so the oracle is at least as exact as
//! the float32 reference it is compared with.

use gemm::Parallelism;
use rayon::prelude::*;

use super::CpuMat;
use super::parallel::SharedMut;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, ConvArgs, Mamba1ScanArgs, Mamba2ScanArgs, Packed, View, ViewMut};

/// `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// PyTorch's softplus with threshold 20: `x` above it, `ln(1 + e^x)` below.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf(x: f64) -> f64 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

#[inline]
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x);
    (0.5 * x * (1.0 + inner.tanh())) as f32
}

#[inline]
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => silu(x),
        Activation::Relu => x.max(0.0),
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => gelu_tanh(x),
        Activation::Identity => x,
    }
}

/// `1 / sqrt(mean(x²) + eps)`, accumulated in f64.
#[inline]
fn inv_rms(x: impl Iterator<Item = f32>, n: usize, eps: f32) -> f32 {
    let ss: f64 = x.map(|v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / n as f64 + eps as f64).sqrt()) as f32
}

/// `out = x / sqrt(mean(x^2) + eps) * w` per row of width `dim`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(|(row, o)| {
        let s = inv_rms(row.iter().copied(), dim, eps);
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = w * (v * s);
        }
    });
}

/// `out = x · wᵀ (+ bias)`, or with `accumulate` `out += x · wᵀ (+ bias)`.
pub fn linear(x: View<'_, Vec<f32>>, w: &CpuMat, bias: Option<&Vec<f32>>, out: ViewMut<'_, Vec<f32>>, accumulate: bool) {
    let (m, n, k) = (x.rows, w.rows, w.cols);
    if m == 0 {
        return;
    }
    if m <= super::gemv::MAX_ROWS {
        let b = bias.map(|b| b.as_slice());
        super::gemv::skinny(x.buf, x.offset, x.stride, m, &w.data, n, k, b, out.buf, out.offset, out.stride, accumulate);
        return;
    }
    // The product accumulates onto what `out` holds: the bias, the old
    // values, or both.
    for r in 0..m {
        let o = &mut out.buf[out.offset + r * out.stride..][..n];
        match (bias, accumulate) {
            (Some(b), true) => o.iter_mut().zip(b).for_each(|(o, b)| *o += b),
            (Some(b), false) => o.copy_from_slice(b),
            (None, _) => {}
        }
    }
    let read_dst = bias.is_some() || accumulate;
    let parallelism = if m * n * k >= 1 << 18 { Parallelism::Rayon(0) } else { Parallelism::None };
    let dst = &mut out.buf[out.offset..];
    let lhs = &x.buf[x.offset..];
    // SAFETY: the caller checked that x ([m, k], row stride x.stride), w
    // ([n, k] dense) and out ([m, n], row stride out.stride) lie inside their
    // buffers. The rhs is wᵀ: element (kk, nn) at nn * k + kk.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            out.stride as isize,
            read_dst,
            lhs.as_ptr(),
            1,
            x.stride as isize,
            w.data.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Channels per parallel task in the conv and the Mamba-1 scan.
const CHANNEL_BLOCK: usize = 32;

/// The (row start, row end, slot) of each segment.
fn segments(batch: &Packed<'_, CpuBackend>) -> Vec<(usize, usize, usize)> {
    (0..batch.n_seqs).map(|s| (batch.cu_seqlens[s] as usize, batch.cu_seqlens[s + 1] as usize, batch.slots[s] as usize)).collect()
}

pub fn conv1d(args: ConvArgs<'_, CpuBackend>, batch: &Packed<'_, CpuBackend>, out: ViewMut<'_, Vec<f32>>) {
    let ch = args.x.cols;
    let k = args.kernel;
    let hist = k - 1;
    let segs = segments(batch);
    let blocks = ch.div_ceil(CHANNEL_BLOCK);
    let state = SharedMut::new(args.state.as_mut_slice());
    let (o_off, o_stride) = (out.offset, out.stride);
    let outp = SharedMut::new(out.buf.as_mut_slice());
    let x = args.x;
    let layout = args.layout;
    (0..segs.len() * blocks).into_par_iter().for_each(|task| {
        let (start, end, slot) = segs[task / blocks];
        let c0 = (task % blocks) * CHANNEL_BLOCK;
        let c1 = (c0 + CHANNEL_BLOCK).min(ch);
        let base = layout.offset(slot, args.layer);
        // SAFETY: this task alone owns channels c0..c1 of this slot's
        // conv state (slots are distinct across segments).
        let st = unsafe { state.slice(base + c0 * hist, (c1 - c0) * hist) };
        let len = end - start;
        let mut window = vec![0.0f32; k];
        for c in c0..c1 {
            let w = &args.weight[c * k..(c + 1) * k];
            let bias = args.bias.map_or(0.0, |b| b[c]);
            let s = &mut st[(c - c0) * hist..(c - c0 + 1) * hist];
            // `window` holds inputs at relative positions i-k+1 ..= i.
            window[..hist].copy_from_slice(s);
            for i in 0..len {
                window[hist] = x.buf[x.offset + (start + i) * x.stride + c];
                let mut acc = bias;
                for j in 0..k {
                    acc += w[j] * window[j];
                }
                // SAFETY: row start+i belongs to this segment, column c to
                // this task.
                unsafe { outp.write(o_off + (start + i) * o_stride + c, activate(args.activation, acc)) };
                window.copy_within(1..k, 0);
            }
            s.copy_from_slice(&window[..hist]);
        }
    });
}

pub fn rms_norm_columns(x: ViewMut<'_, Vec<f32>>, groups: &[(usize, usize)], eps: f32) {
    let (off, stride, rows) = (x.offset, x.stride, x.rows);
    let buf = SharedMut::new(x.buf.as_mut_slice());
    (0..rows).into_par_iter().for_each(|r| {
        for &(start, len) in groups {
            // SAFETY: each task owns one row.
            let v = unsafe { buf.slice(off + r * stride + start, len) };
            let s = inv_rms(v.iter().copied(), len, eps);
            v.iter_mut().for_each(|e| *e *= s);
        }
    });
}

pub fn mamba1_scan(args: Mamba1ScanArgs<'_, CpuBackend>, batch: &Packed<'_, CpuBackend>, out: ViewMut<'_, Vec<f32>>) {
    let d = args.x.cols;
    let n = args.d_state;
    let segs = segments(batch);
    let blocks = d.div_ceil(CHANNEL_BLOCK);
    let layout = args.layout;
    let state = SharedMut::new(args.state.as_mut_slice());
    let (o_off, o_stride) = (out.offset, out.stride);
    let outp = SharedMut::new(out.buf.as_mut_slice());
    let (x, dt, b, c, z) = (args.x, args.dt, args.b, args.c, args.z);
    (0..segs.len() * blocks).into_par_iter().for_each(|task| {
        let (start, end, slot) = segs[task / blocks];
        let c0 = (task % blocks) * CHANNEL_BLOCK;
        let c1 = (c0 + CHANNEL_BLOCK).min(d);
        let base = layout.offset(slot, args.layer);
        // SAFETY: this task alone owns channels c0..c1 of this slot's state.
        let st = unsafe { state.slice(base + c0 * n, (c1 - c0) * n) };
        let mut da = vec![0.0f32; n];
        for ch in c0..c1 {
            let h = &mut st[(ch - c0) * n..(ch - c0 + 1) * n];
            let a = &args.a[ch * n..(ch + 1) * n];
            for t in start..end {
                let xv = x.buf[x.offset + t * x.stride + ch];
                let step = softplus(dt.buf[dt.offset + t * dt.stride + ch] + args.dt_bias[ch]);
                let brow = &b.buf[b.offset + t * b.stride..][..n];
                let crow = &c.buf[c.offset + t * c.stride..][..n];
                for (e, &av) in da.iter_mut().zip(a) {
                    *e = (step * av).exp();
                }
                let mut y = 0.0f32;
                for i in 0..n {
                    h[i] = da[i] * h[i] + (step * brow[i]) * xv;
                    y += h[i] * crow[i];
                }
                let zv = z.buf[z.offset + t * z.stride + ch];
                // SAFETY: row t belongs to this segment, column ch to this task.
                unsafe { outp.write(o_off + t * o_stride + ch, (y + xv * args.skip[ch]) * silu(zv)) };
            }
        }
    });
}

pub fn mamba2_scan(args: Mamba2ScanArgs<'_, CpuBackend>, batch: &Packed<'_, CpuBackend>, out: ViewMut<'_, Vec<f32>>) {
    let (nh, p, g, n) = (args.n_heads, args.head_dim, args.n_groups, args.d_state);
    let heads_per_group = nh / g;
    let segs = segments(batch);
    let layout = args.layout;
    let state = SharedMut::new(args.state.as_mut_slice());
    let (o_off, o_stride) = (out.offset, out.stride);
    let outp = SharedMut::new(out.buf.as_mut_slice());
    let (x, dt, b, c) = (args.x, args.dt, args.b, args.c);
    let (lo, hi) = args.dt_limit;
    (0..segs.len() * nh).into_par_iter().for_each(|task| {
        let seg = task / nh;
        let (start, end, slot) = segs[seg];
        let clamp = batch.prompt[seg] != 0;
        let head = task % nh;
        let grp = head / heads_per_group;
        let base = layout.offset(slot, args.layer) + head * p * n;
        // SAFETY: this task alone owns this head of this slot's state.
        let st = unsafe { state.slice(base, p * n) };
        for t in start..end {
            let mut step = softplus(dt.buf[dt.offset + t * dt.stride + head] + args.dt_bias[head]);
            if clamp {
                step = step.max(lo).min(hi);
            }
            let da = (step * args.a[head]).exp();
            let brow = &b.buf[b.offset + t * b.stride + grp * n..][..n];
            let crow = &c.buf[c.offset + t * c.stride + grp * n..][..n];
            for pi in 0..p {
                let xv = x.buf[x.offset + t * x.stride + head * p + pi];
                let h = &mut st[pi * n..(pi + 1) * n];
                let mut y = 0.0f32;
                for i in 0..n {
                    h[i] = da * h[i] + (step * brow[i]) * xv;
                    y += h[i] * crow[i];
                }
                // SAFETY: row t belongs to this segment, the head's columns to
                // this task.
                unsafe { outp.write(o_off + t * o_stride + head * p + pi, y + args.skip[head] * xv) };
            }
        }
    });
}

pub fn gated_rmsnorm(y: View<'_, Vec<f32>>, z: View<'_, Vec<f32>>, w: &[f32], eps: f32, group: usize, out: ViewMut<'_, Vec<f32>>) {
    let d = y.cols;
    let (o_off, o_stride) = (out.offset, out.stride);
    let outp = SharedMut::new(out.buf.as_mut_slice());
    (0..y.rows).into_par_iter().for_each(|r| {
        let yr = &y.buf[y.offset + r * y.stride..][..d];
        let zr = &z.buf[z.offset + r * z.stride..][..d];
        // SAFETY: each task owns one output row.
        let o = unsafe { outp.slice(o_off + r * o_stride, d) };
        for ((o, &yv), &zv) in o.iter_mut().zip(yr).zip(zr) {
            *o = yv * silu(zv);
        }
        for (gi, chunk) in o.chunks_mut(group).enumerate() {
            let s = inv_rms(chunk.iter().copied(), group, eps);
            for (e, &wv) in chunk.iter_mut().zip(&w[gi * group..(gi + 1) * group]) {
                *e = wv * (*e * s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulating_product_adds_what_the_plain_one_computes() {
        let mut rng = crate::backend::rng::SplitMix64::new(9);
        let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() - 0.5).collect() };
        // Up to MAX_ROWS rows take the skinny kernel, more the GEMM.
        for m in [1, 5, super::super::gemv::MAX_ROWS + 3] {
            let (n, k, os) = (24, 40, 27);
            let w = CpuMat { rows: n, cols: k, data: vals(n * k) };
            let x = vals(m * k);
            let bias = vals(n);
            let init = vals(m * os);
            for b in [None, Some(&bias)] {
                let mut product = vec![0.0; m * n];
                linear(View::dense(&x, m, k), &w, b, ViewMut::dense(&mut product, m, n), false);
                let mut acc = init.clone();
                linear(View::dense(&x, m, k), &w, b, ViewMut { buf: &mut acc, offset: 0, rows: m, cols: n, stride: os }, true);
                for r in 0..m {
                    for c in 0..os {
                        let want = if c < n { init[r * os + c] + product[r * n + c] } else { init[r * os + c] };
                        let got = acc[r * os + c];
                        assert!((got - want).abs() <= 1e-5, "m {m} bias {} ({r}, {c}): {got} vs {want}", b.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn softplus_matches_definition_and_threshold() {
        for x in [-30.0f32, -2.0, 0.0, 1.5, 19.0] {
            let want = ((x as f64).exp().ln_1p()) as f32;
            assert!((softplus(x) - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
        assert_eq!(softplus(25.0), 25.0);
    }

    #[test]
    fn erf_is_accurate() {
        // Reference values of erf.
        for (x, want) in [(0.0, 0.0), (0.5, 0.520_499_877_8), (1.0, 0.842_700_792_9), (-2.0, -0.995_322_265)] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x})");
        }
    }

    #[test]
    fn silu_of_zero_and_large() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(30.0) - 30.0).abs() < 1e-5);
        assert!(silu(-100.0).abs() < 1e-30);
    }
}
