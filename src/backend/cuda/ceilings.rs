//! The two machine ceilings every benchmark figure is set against, measured
//! on the GPU in the same run: device-to-device copy bandwidth (bytes read
//! plus bytes written) and the cuBLAS bf16 matrix-product rate, each the
//! median of timed runs (CUDA events) after warm-up, on random data.

use serde::Serialize;

use super::blas::Gemm;
use super::{CudaBackend, DevBuf, dev};
use crate::backend::{DType, Result};
use cudarc::driver::result;

#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    pub device: String,
    /// Copy of `copy_bytes` bytes: (read + write) bytes per second / 1e9.
    pub copy_gb_per_s: f64,
    pub copy_bytes: usize,
    /// bf16 `n × n × n` product through cuBLAS, fp32 accumulation.
    pub bf16_tflop_per_s: f64,
    pub gemm_n: usize,
}

/// Random bf16 bits in [-1, 1) (no zeros: zeros run faster than real data).
fn random_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = crate::backend::rng::SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        let v = rng.next_f32() * 2.0 - 1.0;
        out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
    out
}

/// Measures both ceilings on GPU `ordinal`.
pub fn measure(ordinal: usize) -> Result<Ceilings> {
    let be = CudaBackend::new(ordinal)?;
    be.bind()?;
    let copy_bytes = 2usize << 30;
    let src = DevBuf::alloc(&be.ctx, copy_bytes, "copy test")?;
    let dst = DevBuf::alloc(&be.ctx, copy_bytes, "copy test")?;
    let fill = (copy_bytes / 4) as u32;
    be.launch(
        super::kernels::Kernel::Fill,
        super::kernels::Args::new().ptr(src.ptr).u64((copy_bytes / 4) as u64).f32(1.2345),
        (fill.div_ceil(256).min(65535), 1, 1),
        256,
    )?;
    let copy = || {
        // SAFETY: both buffers hold copy_bytes.
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, copy_bytes, be.cu_stream()) }.map_err(dev("copy"))
    };
    let copy_ms = be.time_ms(3, 20, &copy)?;
    drop((src, dst));

    let n = 8192usize;
    let a = DevBuf::alloc(&be.ctx, n * n * 2, "gemm test")?;
    let b = DevBuf::alloc(&be.ctx, n * n * 2, "gemm test")?;
    let c = DevBuf::alloc(&be.ctx, n * n * 4, "gemm test")?;
    be.upload_bytes(a.ptr, &random_bf16(n * n, 1))?;
    be.upload_bytes(b.ptr, &random_bf16(n * n, 2))?;
    let g = Gemm { m: n, n, k: n, x: a.ptr, x_stride: n, w: b.ptr, dtype: DType::BF16, out: c.ptr, out_stride: n, beta: 0.0 };
    let gemm = || be.blas.gemm(&g);
    let gemm_ms = be.time_ms(3, 20, &gemm)?;
    be.sync()?;
    Ok(Ceilings {
        device: be.name.clone(),
        copy_gb_per_s: 2.0 * copy_bytes as f64 / (copy_ms * 1e-3) / 1e9,
        copy_bytes,
        bf16_tflop_per_s: 2.0 * (n * n * n) as f64 / (gemm_ms * 1e-3) / 1e12,
        gemm_n: n,
    })
}

/// Times cuBLAS bf16 products of the shapes a Mamba forward issues (rows
/// m of activations, n outputs, k inputs), with f32 and with bf16 outputs:
/// one line each, TFLOP/s and the weight bandwidth they reach. Each is
/// timed as 20 runs replayed from one graph, as a decode step runs them:
/// timed one launch at a time, the host's launch cost would dominate the
/// small ones.
pub fn gemm_survey(ordinal: usize, shapes: &[(usize, usize, usize)]) -> Result<Vec<String>> {
    let be = CudaBackend::new(ordinal)?;
    be.bind()?;
    let mut lines = vec![];
    for &(m, n, k) in shapes {
        let x = DevBuf::alloc(&be.ctx, m * k * 2, "gemm survey")?;
        let w = DevBuf::alloc(&be.ctx, n * k * 2, "gemm survey")?;
        let c = DevBuf::alloc(&be.ctx, m * n * 4, "gemm survey")?;
        be.upload_bytes(x.ptr, &random_bf16(m * k, 3))?;
        be.upload_bytes(w.ptr, &random_bf16(n * k, 4))?;
        let g = Gemm { m, n, k, x: x.ptr, x_stride: k, w: w.ptr, dtype: DType::BF16, out: c.ptr, out_stride: n, beta: 0.0 };
        let f32_ms = be.time_graph_ms(20, 7, &|| be.blas.gemm(&g))?;
        let h = g.half_output();
        let bf16_ms = be.time_graph_ms(20, 7, &|| be.blas.gemm_half_out(&h))?;
        let flop = 2.0 * (m * n * k) as f64;
        let wbytes = (n * k * 2) as f64;
        lines.push(format!(
            "gemm m{m} n{n} k{k}: f32 out {:.1} us ({:.0} TFLOP/s, weights {:.0} GB/s); bf16 out {:.1} us ({:.0} TFLOP/s)",
            f32_ms * 1e3,
            flop / (f32_ms * 1e-3) / 1e12,
            wbytes / (f32_ms * 1e-3) / 1e9,
            bf16_ms * 1e3,
            flop / (bf16_ms * 1e-3) / 1e12
        ));
        be.sync()?;
    }
    Ok(lines)
}
