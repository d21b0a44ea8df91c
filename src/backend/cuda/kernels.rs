//! The kernel table: `kernels/*.cu` compiled by NVRTC at start-up for the
//! device's own architecture, loaded once, and looked up by [`Kernel`].
//!
//! Each family file is compiled with `prelude.cu` in front of it (the
//! sources include no CUDA headers, so NVRTC needs no toolkit headers). A
//! compile error names the family and carries NVRTC's log.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, result, sys};
use cudarc::nvrtc::{CompileError, CompileOptions, compile_ptx_with_opts};

use crate::backend::{BackendError, Result};

const PRELUDE: &str = include_str!("../../../kernels/prelude.cu");

/// The kernel source files, one per op family.
const FAMILIES: &[(&str, &str)] = &[
    ("embed", include_str!("../../../kernels/embed.cu")),
    ("norm", include_str!("../../../kernels/norm.cu")),
    ("conv", include_str!("../../../kernels/conv.cu")),
    ("scan", include_str!("../../../kernels/scan.cu")),
    ("gemv", include_str!("../../../kernels/gemv.cu")),
    ("sample", include_str!("../../../kernels/sample.cu")),
];

macro_rules! kernels {
    ($($variant:ident = $family:literal / $name:literal,)*) => {
        /// Every kernel the backend launches.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Kernel { $($variant,)* }

        impl Kernel {
            const ALL: &'static [Kernel] = &[$(Kernel::$variant,)*];

            /// The family file and `extern "C"` name.
            fn source(self) -> (&'static str, &'static str) {
                match self { $(Kernel::$variant => ($family, $name),)* }
            }
        }
    };
}

kernels! {
    EmbedF32 = "embed" / "embed_f32",
    EmbedBf16 = "embed" / "embed_bf16",
    EmbedF16 = "embed" / "embed_f16",
    GatherRows = "embed" / "gather_rows",
    Fill = "embed" / "fill_f32",
    ToHalf = "embed" / "to_half",
    BiasRows = "embed" / "bias_rows",
    AddRmsNorm = "norm" / "add_rmsnorm",
    RmsNormColumns = "norm" / "rms_norm_columns",
    GatedRmsNorm = "norm" / "gated_rmsnorm",
    ConvPacked = "conv" / "conv1d_packed",
    ConvState = "conv" / "conv1d_state",
    ConvStep = "conv" / "conv1d_step",
    Mamba1ScanL4 = "scan" / "mamba1_scan_l4",
    Mamba1ScanL8 = "scan" / "mamba1_scan_l8",
    Mamba1ScanL16 = "scan" / "mamba1_scan_l16",
    Mamba1ScanL32 = "scan" / "mamba1_scan_l32",
    Mamba1ScanFastL4 = "scan" / "mamba1_scan_fast_l4",
    Mamba1ScanFastL8 = "scan" / "mamba1_scan_fast_l8",
    Mamba1ScanFastL16 = "scan" / "mamba1_scan_fast_l16",
    Mamba2ScanL4 = "scan" / "mamba2_scan_l4",
    Mamba2ScanL8 = "scan" / "mamba2_scan_l8",
    Mamba2ScanL16 = "scan" / "mamba2_scan_l16",
    Mamba2ScanL32 = "scan" / "mamba2_scan_l32",
    Mamba1StepF32V4 = "scan" / "mamba1_step_f32_v4",
    Mamba1StepBf16V4 = "scan" / "mamba1_step_bf16_v4",
    Mamba1StepF16V4 = "scan" / "mamba1_step_f16_v4",
    Mamba1StepF32V1 = "scan" / "mamba1_step_f32_v1",
    Mamba1StepBf16V1 = "scan" / "mamba1_step_bf16_v1",
    Mamba1StepF16V1 = "scan" / "mamba1_step_f16_v1",
    GemvF32M1R1 = "gemv" / "gemv_f32_vec_m1_r1",
    GemvF32M2R1 = "gemv" / "gemv_f32_vec_m2_r1",
    GemvF32M4R1 = "gemv" / "gemv_f32_vec_m4_r1",
    GemvF32M8R1 = "gemv" / "gemv_f32_vec_m8_r1",
    GemvF32M16R1 = "gemv" / "gemv_f32_vec_m16_r1",
    GemvF32M1R4 = "gemv" / "gemv_f32_vec_m1_r4",
    GemvF32M2R4 = "gemv" / "gemv_f32_vec_m2_r4",
    GemvF32M4R4 = "gemv" / "gemv_f32_vec_m4_r4",
    GemvF32M8R4 = "gemv" / "gemv_f32_vec_m8_r4",
    GemvBf16M1R1 = "gemv" / "gemv_bf16_vec_m1_r1",
    GemvBf16M2R1 = "gemv" / "gemv_bf16_vec_m2_r1",
    GemvBf16M4R1 = "gemv" / "gemv_bf16_vec_m4_r1",
    GemvBf16M8R1 = "gemv" / "gemv_bf16_vec_m8_r1",
    GemvBf16M16R1 = "gemv" / "gemv_bf16_vec_m16_r1",
    GemvBf16M1R4 = "gemv" / "gemv_bf16_vec_m1_r4",
    GemvBf16M2R4 = "gemv" / "gemv_bf16_vec_m2_r4",
    GemvBf16M4R4 = "gemv" / "gemv_bf16_vec_m4_r4",
    GemvBf16M8R4 = "gemv" / "gemv_bf16_vec_m8_r4",
    GemvF16M1R1 = "gemv" / "gemv_f16_vec_m1_r1",
    GemvF16M2R1 = "gemv" / "gemv_f16_vec_m2_r1",
    GemvF16M4R1 = "gemv" / "gemv_f16_vec_m4_r1",
    GemvF16M8R1 = "gemv" / "gemv_f16_vec_m8_r1",
    GemvF16M16R1 = "gemv" / "gemv_f16_vec_m16_r1",
    GemvF16M1R4 = "gemv" / "gemv_f16_vec_m1_r4",
    GemvF16M2R4 = "gemv" / "gemv_f16_vec_m2_r4",
    GemvF16M4R4 = "gemv" / "gemv_f16_vec_m4_r4",
    GemvF16M8R4 = "gemv" / "gemv_f16_vec_m8_r4",
    GemvF32Scalar = "gemv" / "gemv_f32_scalar",
    GemvBf16Scalar = "gemv" / "gemv_bf16_scalar",
    GemvF16Scalar = "gemv" / "gemv_f16_scalar",
    SampleRows = "sample" / "sample_rows",
}

impl Kernel {
    /// The vector GEMV kernel for `dtype`, `mt` rows of x per block (1, 2,
    /// 4, 8 or 16) and `r` output columns per warp (1, or 4 up to 8 rows).
    pub fn gemv(dtype: crate::backend::DType, mt: usize, r: usize) -> Kernel {
        use crate::backend::DType::*;
        use Kernel::*;
        match (dtype, r, mt) {
            (F32, 4, 1) => GemvF32M1R4,
            (F32, 4, 2) => GemvF32M2R4,
            (F32, 4, 4) => GemvF32M4R4,
            (F32, 4, _) => GemvF32M8R4,
            (F32, _, 1) => GemvF32M1R1,
            (F32, _, 2) => GemvF32M2R1,
            (F32, _, 4) => GemvF32M4R1,
            (F32, _, 8) => GemvF32M8R1,
            (F32, _, _) => GemvF32M16R1,
            (BF16, 4, 1) => GemvBf16M1R4,
            (BF16, 4, 2) => GemvBf16M2R4,
            (BF16, 4, 4) => GemvBf16M4R4,
            (BF16, 4, _) => GemvBf16M8R4,
            (BF16, _, 1) => GemvBf16M1R1,
            (BF16, _, 2) => GemvBf16M2R1,
            (BF16, _, 4) => GemvBf16M4R1,
            (BF16, _, 8) => GemvBf16M8R1,
            (BF16, _, _) => GemvBf16M16R1,
            (F16, 4, 1) => GemvF16M1R4,
            (F16, 4, 2) => GemvF16M2R4,
            (F16, 4, 4) => GemvF16M4R4,
            (F16, 4, _) => GemvF16M8R4,
            (F16, _, 1) => GemvF16M1R1,
            (F16, _, 2) => GemvF16M2R1,
            (F16, _, 4) => GemvF16M4R1,
            (F16, _, 8) => GemvF16M8R1,
            (F16, _, _) => GemvF16M16R1,
        }
    }
}

/// The loaded kernels, indexed by [`Kernel`].
pub struct Kernels {
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// Compiles every family for compute capability `major.minor` and loads
    /// its functions into `ctx`.
    pub fn compile(ctx: &Arc<CudaContext>, major: i32, minor: i32) -> Result<Self> {
        let arch = format!("--gpu-architecture=compute_{major}{minor}");
        let mut modules = Vec::with_capacity(FAMILIES.len());
        for &(family, body) in FAMILIES {
            let opts = CompileOptions {
                options: vec![arch.clone(), "--std=c++17".into()],
                name: Some(format!("{family}.cu")),
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(format!("{PRELUDE}\n{body}"), opts).map_err(|e| compile_error(family, e))?;
            let module = ctx.load_module(ptx).map_err(|e| BackendError::KernelCompile {
                kernel: format!("{family}.cu"),
                log: format!("the driver could not load the compiled module: {e}"),
            })?;
            modules.push((family, module));
        }
        let mut functions = Vec::with_capacity(Kernel::ALL.len());
        for k in Kernel::ALL {
            let (family, name) = k.source();
            let (_, module) = modules.iter().find(|(f, _)| *f == family).expect("every kernel names a listed family");
            let f = module.load_function(name).map_err(|e| BackendError::KernelCompile {
                kernel: name.to_string(),
                log: format!("not found in the compiled {family}.cu: {e}"),
            })?;
            functions.push(f);
        }
        Ok(Kernels { functions })
    }

    pub fn get(&self, k: Kernel) -> sys::CUfunction {
        self.functions[k as usize].cu_function()
    }
}

fn compile_error(family: &str, e: CompileError) -> BackendError {
    let log = match e {
        CompileError::CompileError { log, options, .. } => {
            format!("options {options:?}\n{}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    };
    BackendError::KernelCompile { kernel: format!("{family}.cu"), log }
}

/// Kernel arguments, each in an 8-byte slot (the driver copies as many
/// bytes as the kernel's parameter takes, so 4-byte values sit in the low
/// half: the machine is little-endian).
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Args { slots: Vec::with_capacity(32) }
    }
    /// A device pointer (0 for a null pointer).
    pub fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.slots.push(v);
        self
    }
    pub fn i32(mut self, v: usize) -> Self {
        assert!(v <= i32::MAX as usize, "kernel argument {v} does not fit an int");
        self.slots.push(v as u64);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.slots.push(v as u64);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }

    /// Launches `f` on `stream` with these arguments.
    pub fn launch(mut self, f: sys::CUfunction, stream: sys::CUstream, grid: (u32, u32, u32), block: u32) -> Result<()> {
        let mut params: Vec<*mut c_void> = self.slots.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        // SAFETY: each parameter points into `self.slots`, alive until the
        // call returns (the driver copies parameters at launch); the caller
        // matched the argument list to the kernel's signature.
        unsafe { result::launch_kernel(f, grid, (block, 1, 1), 0, stream, &mut params) }
            .map_err(|e| BackendError::Device { op: "kernel launch", detail: e.to_string() })
    }
}
