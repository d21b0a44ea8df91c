//! cuBLAS for the large matrix products (prefill, large decode batches),
//! with fp32 accumulation. The handle has its own workspace so products can
//! be recorded into CUDA graphs (nothing is allocated while recording).

use std::ffi::c_void;

use cudarc::cublas::sys::{self, cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUstream;

use crate::backend::{BackendError, DType, Result};

/// Bytes of cuBLAS workspace.
pub const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Blas {
    handle: sys::cublasHandle_t,
}

// SAFETY: the handle is used by one thread at a time (the backend is Send,
// not Sync) and cuBLAS handles may move between threads.
unsafe impl Send for Blas {}

fn check(op: &'static str, s: sys::cublasStatus_t) -> Result<()> {
    if s == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(BackendError::Device { op, detail: format!("{s:?}") }) }
}

fn data_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// One product `out[m, n] = x[m, k] · w[n, k]ᵀ + beta · out`, all matrices
/// row-major on the device with the given row strides (in elements).
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `x`, in `dtype`.
    pub x: u64,
    pub x_stride: usize,
    /// `w`, dense `[n, k]`, in `dtype`.
    pub w: u64,
    pub dtype: DType,
    /// Output, f32 (or `out_dtype` when set).
    pub out: u64,
    pub out_stride: usize,
    pub beta: f32,
}

impl Gemm {
    /// The same product with a 16-bit output of the input dtype (for the
    /// GEMM survey).
    pub fn half_output(&self) -> HalfOut<'_> {
        HalfOut(self)
    }
}

/// A product whose output takes the input dtype instead of f32.
pub struct HalfOut<'a>(&'a Gemm);

impl Blas {
    /// A handle bound to `stream`, using `workspace` (WORKSPACE_BYTES).
    pub fn new(stream: CUstream, workspace: u64) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: plain handle creation and configuration calls.
        unsafe {
            check("cublasCreate", sys::cublasCreate_v2(&mut handle))?;
            let blas = Blas { handle };
            check("cublasSetStream", sys::cublasSetStream_v2(handle, stream as _))?;
            check("cublasSetWorkspace", sys::cublasSetWorkspace_v2(handle, workspace as *mut c_void, WORKSPACE_BYTES))?;
            Ok(blas)
        }
    }

    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        self.gemm_typed(g, cudaDataType::CUDA_R_32F)
    }

    /// [`Blas::gemm`] writing the output in the input dtype.
    pub fn gemm_half_out(&self, h: &HalfOut<'_>) -> Result<()> {
        self.gemm_typed(h.0, data_type(h.0.dtype))
    }

    fn gemm_typed(&self, g: &Gemm, out_type: cudaDataType) -> Result<()> {
        let int =
            |v: usize| i32::try_from(v).map_err(|_| BackendError::Shape { op: "linear", detail: format!("{v} exceeds cuBLAS's int") });
        let (alpha, beta) = (1.0f32, g.beta);
        // Row-major out[m, n] is column-major out^T[n, m] = w · x^T, where
        // the row-major w[n, k] is a column-major [k, n] matrix (transposed)
        // and the row-major x[m, k] a column-major [k, m] one.
        // SAFETY: the caller checked that every matrix lies inside its
        // device buffer for these sizes and strides.
        let s = unsafe {
            sys::cublasGemmEx(
                self.handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                int(g.n)?,
                int(g.m)?,
                int(g.k)?,
                &alpha as *const f32 as *const c_void,
                g.w as *const c_void,
                data_type(g.dtype),
                int(g.k)?,
                g.x as *const c_void,
                data_type(g.dtype),
                int(g.x_stride)?,
                &beta as *const f32 as *const c_void,
                g.out as *mut c_void,
                out_type,
                int(g.out_stride)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        check("cublasGemmEx", s)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasCreate and is not used
        // after this.
        unsafe {
            sys::cublasDestroy_v2(self.handle);
        }
    }
}
