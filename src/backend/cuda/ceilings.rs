//! The two machine ceilings every benchmark figure is set against, measured
//! on the GPU in the same run: device-to-device copy bandwidth (bytes read
//! plus bytes written) and the cuBLAS bf16 matrix-product rate, each the
//! median of timed runs (CUDA events) after warm-up, on random data.

use serde::Serialize;

use super::blas::Gemm;
use super::{CudaBackend, DevBuf, dev};
use crate::backend::{BackendError, DType, Result};
use cudarc::driver::{result, sys};

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` with CUDA events: `warm` untimed runs, then the median of `reps`.
fn time_ms(be: &CudaBackend, warm: usize, reps: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (be.ctx.new_event(flags).map_err(dev("event"))?, be.ctx.new_event(flags).map_err(dev("event"))?);
    for _ in 0..warm {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(&be.stream).map_err(dev("event record"))?;
        f()?;
        end.record(&be.stream).map_err(dev("event record"))?;
        end.synchronize().map_err(dev("event sync"))?;
        times.push(start.elapsed_ms(&end).map_err(dev("event time"))? as f64);
    }
    Ok(median(times))
}

/// GPU time of one run of `f` (a short op, such as one product), in ms:
/// `runs` runs recorded as one graph, so the host's launch cost and the
/// idle GPU between timed launches stay out of it, then the median of
/// `reps` replays (after one untimed), divided by `runs`.
fn time_graph_ms(be: &CudaBackend, runs: usize, reps: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    be.stream.begin_capture(mode).map_err(dev("begin graph capture"))?;
    let recorded = (0..runs).try_for_each(|_| f());
    // End the recording whatever happened, so the stream is usable.
    let graph = be.stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(dev("end graph capture"));
    recorded?;
    let graph = graph?.ok_or_else(|| BackendError::Device { op: "end graph capture", detail: "nothing was recorded".into() })?;
    let ms = time_ms(be, 1, reps, &|| graph.launch().map_err(dev("graph launch")))?;
    Ok(ms / runs as f64)
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
    let src = DevBuf::alloc(&be.stream, copy_bytes, "copy test")?;
    let dst = DevBuf::alloc(&be.stream, copy_bytes, "copy test")?;
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
    let copy_ms = time_ms(&be, 3, 20, &copy)?;
    drop((src, dst));

    let n = 8192usize;
    let a = DevBuf::alloc(&be.stream, n * n * 2, "gemm test")?;
    let b = DevBuf::alloc(&be.stream, n * n * 2, "gemm test")?;
    let c = DevBuf::alloc(&be.stream, n * n * 4, "gemm test")?;
    be.upload_bytes(a.ptr, &random_bf16(n * n, 1))?;
    be.upload_bytes(b.ptr, &random_bf16(n * n, 2))?;
    let g = Gemm { m: n, n, k: n, x: a.ptr, x_stride: n, w: b.ptr, dtype: DType::BF16, out: c.ptr, out_stride: n, beta: 0.0 };
    let gemm = || be.blas.gemm(&g);
    let gemm_ms = time_ms(&be, 3, 20, &gemm)?;
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
        let x = DevBuf::alloc(&be.stream, m * k * 2, "gemm survey")?;
        let w = DevBuf::alloc(&be.stream, n * k * 2, "gemm survey")?;
        let c = DevBuf::alloc(&be.stream, m * n * 4, "gemm survey")?;
        be.upload_bytes(x.ptr, &random_bf16(m * k, 3))?;
        be.upload_bytes(w.ptr, &random_bf16(n * k, 4))?;
        let g = Gemm { m, n, k, x: x.ptr, x_stride: k, w: w.ptr, dtype: DType::BF16, out: c.ptr, out_stride: n, beta: 0.0 };
        let f32_ms = time_graph_ms(&be, 20, 7, &|| be.blas.gemm(&g))?;
        let h = g.half_output();
        let bf16_ms = time_graph_ms(&be, 20, 7, &|| be.blas.gemm_half_out(&h))?;
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
