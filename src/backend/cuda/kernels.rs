//! The kernel table: `kernels/*.cu` compiled by NVRTC at start-up for the
//! device's own architecture, loaded once, and looked up by [`Kernel`].
//!
//! Each family file is compiled with `prelude.cu` in front of it (the
//! sources include no CUDA headers, so NVRTC needs no toolkit headers). A
//! compile error names the family and carries NVRTC's log.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, result, sys};
use cudarc::nvrtc::{CompileError, CompileOptions, compile_ptx_with_opts};

use crate::backend::{BackendError, Result};

const PRELUDE: &str = include_str!("../../../kernels/prelude.cu");

/// The kernel source files, one per op family.
const FAMILIES: &[(&str, &str)] = &[
    ("embed", include_str!("../../../kernels/embed.cu")),
    ("norm", include_str!("../../../kernels/norm.cu")),
    ("conv", include_str!("../../../kernels/conv.cu")),
    ("scan", include_str!("../../../kernels/scan.cu")),
    ("step", include_str!("../../../kernels/step.cu")),
    ("gemv", include_str!("../../../kernels/gemv.cu")),
    ("shortk", include_str!("../../../kernels/shortk.cu")),
    ("sample", include_str!("../../../kernels/sample.cu")),
    ("stack", include_str!("../../../kernels/stack.cu")),
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
    Mamba1StackF32 = "stack" / "mamba1_stack_f32",
    Mamba1StackBf16 = "stack" / "mamba1_stack_bf16",
    Mamba1StackF16 = "stack" / "mamba1_stack_f16",
    EmbedF32 = "embed" / "embed_f32",
    EmbedBf16 = "embed" / "embed_bf16",
    EmbedF16 = "embed" / "embed_f16",
    GatherRows = "embed" / "gather_rows",
    Fill = "embed" / "fill_f32",
    ToHalf = "embed" / "to_half",
    ToHalf8 = "embed" / "to_half8",
    GroupColumns = "embed" / "group_columns",
    BiasRows = "embed" / "bias_rows",
    RmsNormRows = "norm" / "rmsnorm_rows",
    RmsNormRows4 = "norm" / "rmsnorm_rows4",
    RmsNormColumns = "norm" / "rms_norm_columns",
    GatedRmsNorm = "norm" / "gated_rmsnorm",
    ShortKBf16 = "shortk" / "shortk_bf16",
    ShortKF16 = "shortk" / "shortk_f16",
    ConvPacked = "conv" / "conv1d_packed",
    ConvRunsK4 = "conv" / "conv1d_runs_k4",
    ConvRunsK8 = "conv" / "conv1d_runs_k8",
    ConvState = "conv" / "conv1d_state",
    ConvStep = "conv" / "conv1d_step",
    ConvStep4 = "conv" / "conv1d_step4",
    ConvStep4Staged = "conv" / "conv1d_step4_staged",
    Mamba1ScanL4 = "scan" / "mamba1_scan_l4",
    Mamba1ScanL8 = "scan" / "mamba1_scan_l8",
    Mamba1ScanL16 = "scan" / "mamba1_scan_l16",
    Mamba1ScanL32 = "scan" / "mamba1_scan_l32",
    Mamba1ScanTiled = "scan" / "mamba1_scan_tiled",
    Mamba1ScanTiledSummary = "scan" / "mamba1_scan_tiled_summary",
    Mamba2ScanL4 = "scan" / "mamba2_scan_l4",
    Mamba2ScanL8 = "scan" / "mamba2_scan_l8",
    Mamba2ScanL16 = "scan" / "mamba2_scan_l16",
    Mamba2ScanL32 = "scan" / "mamba2_scan_l32",
    Mamba1StepWide = "step" / "mamba1_step_wide",
    Mamba1StepLean = "step" / "mamba1_step_lean",
    Mamba1StepF32V4 = "step" / "mamba1_step_f32_v4",
    Mamba1StepBf16V4 = "step" / "mamba1_step_bf16_v4",
    Mamba1StepF16V4 = "step" / "mamba1_step_f16_v4",
    Mamba1StepF32V1 = "step" / "mamba1_step_f32_v1",
    Mamba1StepBf16V1 = "step" / "mamba1_step_bf16_v1",
    Mamba1StepF16V1 = "step" / "mamba1_step_f16_v1",
    Mamba1TailF32 = "step" / "mamba1_tail_f32",
    Mamba1TailBf16 = "step" / "mamba1_tail_bf16",
    Mamba1TailF16 = "step" / "mamba1_tail_f16",
    GemvF32M1R1 = "gemv" / "gemv_f32_m1_r1",
    GemvF32M1R2 = "gemv" / "gemv_f32_m1_r2",
    GemvF32M1R4 = "gemv" / "gemv_f32_m1_r4",
    GemvF32M2R1 = "gemv" / "gemv_f32_m2_r1",
    GemvF32M2R2 = "gemv" / "gemv_f32_m2_r2",
    GemvF32M2R4 = "gemv" / "gemv_f32_m2_r4",
    GemvF32M4R1 = "gemv" / "gemv_f32_m4_r1",
    GemvF32M4R2 = "gemv" / "gemv_f32_m4_r2",
    GemvF32M4R4 = "gemv" / "gemv_f32_m4_r4",
    GemvF32M8R1 = "gemv" / "gemv_f32_m8_r1",
    GemvF32M8R2 = "gemv" / "gemv_f32_m8_r2",
    GemvNormF32M1R1 = "gemv" / "gemv_norm_f32_m1_r1",
    GemvNormF32M1R2 = "gemv" / "gemv_norm_f32_m1_r2",
    GemvNormF32M1R4 = "gemv" / "gemv_norm_f32_m1_r4",
    GemvNormF32M2R1 = "gemv" / "gemv_norm_f32_m2_r1",
    GemvNormF32M2R2 = "gemv" / "gemv_norm_f32_m2_r2",
    GemvNormF32M2R4 = "gemv" / "gemv_norm_f32_m2_r4",
    GemvNormF32M4R1 = "gemv" / "gemv_norm_f32_m4_r1",
    GemvNormF32M4R2 = "gemv" / "gemv_norm_f32_m4_r2",
    GemvNormF32M4R4 = "gemv" / "gemv_norm_f32_m4_r4",
    GemvNormF32M8R1 = "gemv" / "gemv_norm_f32_m8_r1",
    GemvNormF32M8R2 = "gemv" / "gemv_norm_f32_m8_r2",
    GemvBf16M1R1 = "gemv" / "gemv_bf16_m1_r1",
    GemvBf16M1R2 = "gemv" / "gemv_bf16_m1_r2",
    GemvBf16M1R4 = "gemv" / "gemv_bf16_m1_r4",
    GemvBf16M2R1 = "gemv" / "gemv_bf16_m2_r1",
    GemvBf16M2R2 = "gemv" / "gemv_bf16_m2_r2",
    GemvBf16M2R4 = "gemv" / "gemv_bf16_m2_r4",
    GemvBf16M4R1 = "gemv" / "gemv_bf16_m4_r1",
    GemvBf16M4R2 = "gemv" / "gemv_bf16_m4_r2",
    GemvBf16M4R4 = "gemv" / "gemv_bf16_m4_r4",
    GemvBf16M8R1 = "gemv" / "gemv_bf16_m8_r1",
    GemvBf16M8R2 = "gemv" / "gemv_bf16_m8_r2",
    GemvNormBf16M1R1 = "gemv" / "gemv_norm_bf16_m1_r1",
    GemvNormBf16M1R2 = "gemv" / "gemv_norm_bf16_m1_r2",
    GemvNormBf16M1R4 = "gemv" / "gemv_norm_bf16_m1_r4",
    GemvNormBf16M2R1 = "gemv" / "gemv_norm_bf16_m2_r1",
    GemvNormBf16M2R2 = "gemv" / "gemv_norm_bf16_m2_r2",
    GemvNormBf16M2R4 = "gemv" / "gemv_norm_bf16_m2_r4",
    GemvNormBf16M4R1 = "gemv" / "gemv_norm_bf16_m4_r1",
    GemvNormBf16M4R2 = "gemv" / "gemv_norm_bf16_m4_r2",
    GemvNormBf16M4R4 = "gemv" / "gemv_norm_bf16_m4_r4",
    GemvNormBf16M8R1 = "gemv" / "gemv_norm_bf16_m8_r1",
    GemvNormBf16M8R2 = "gemv" / "gemv_norm_bf16_m8_r2",
    GemvF16M1R1 = "gemv" / "gemv_f16_m1_r1",
    GemvF16M1R2 = "gemv" / "gemv_f16_m1_r2",
    GemvF16M1R4 = "gemv" / "gemv_f16_m1_r4",
    GemvF16M2R1 = "gemv" / "gemv_f16_m2_r1",
    GemvF16M2R2 = "gemv" / "gemv_f16_m2_r2",
    GemvF16M2R4 = "gemv" / "gemv_f16_m2_r4",
    GemvF16M4R1 = "gemv" / "gemv_f16_m4_r1",
    GemvF16M4R2 = "gemv" / "gemv_f16_m4_r2",
    GemvF16M4R4 = "gemv" / "gemv_f16_m4_r4",
    GemvF16M8R1 = "gemv" / "gemv_f16_m8_r1",
    GemvF16M8R2 = "gemv" / "gemv_f16_m8_r2",
    GemvNormF16M1R1 = "gemv" / "gemv_norm_f16_m1_r1",
    GemvNormF16M1R2 = "gemv" / "gemv_norm_f16_m1_r2",
    GemvNormF16M1R4 = "gemv" / "gemv_norm_f16_m1_r4",
    GemvNormF16M2R1 = "gemv" / "gemv_norm_f16_m2_r1",
    GemvNormF16M2R2 = "gemv" / "gemv_norm_f16_m2_r2",
    GemvNormF16M2R4 = "gemv" / "gemv_norm_f16_m2_r4",
    GemvNormF16M4R1 = "gemv" / "gemv_norm_f16_m4_r1",
    GemvNormF16M4R2 = "gemv" / "gemv_norm_f16_m4_r2",
    GemvNormF16M4R4 = "gemv" / "gemv_norm_f16_m4_r4",
    GemvNormF16M8R1 = "gemv" / "gemv_norm_f16_m8_r1",
    GemvNormF16M8R2 = "gemv" / "gemv_norm_f16_m8_r2",
    GemvStreamF32M1R1 = "gemv" / "gemv_stream_f32_m1_r1",
    GemvStreamF32M1R2 = "gemv" / "gemv_stream_f32_m1_r2",
    GemvStreamF32M1R4 = "gemv" / "gemv_stream_f32_m1_r4",
    GemvStreamF32M2R1 = "gemv" / "gemv_stream_f32_m2_r1",
    GemvStreamF32M2R2 = "gemv" / "gemv_stream_f32_m2_r2",
    GemvStreamF32M2R4 = "gemv" / "gemv_stream_f32_m2_r4",
    GemvStreamF32M4R1 = "gemv" / "gemv_stream_f32_m4_r1",
    GemvStreamF32M4R2 = "gemv" / "gemv_stream_f32_m4_r2",
    GemvStreamF32M4R4 = "gemv" / "gemv_stream_f32_m4_r4",
    GemvStreamF32M8R1 = "gemv" / "gemv_stream_f32_m8_r1",
    GemvStreamF32M8R2 = "gemv" / "gemv_stream_f32_m8_r2",
    GemvStreamNormF32M1R1 = "gemv" / "gemv_stream_norm_f32_m1_r1",
    GemvStreamNormF32M1R2 = "gemv" / "gemv_stream_norm_f32_m1_r2",
    GemvStreamNormF32M1R4 = "gemv" / "gemv_stream_norm_f32_m1_r4",
    GemvStreamNormF32M2R1 = "gemv" / "gemv_stream_norm_f32_m2_r1",
    GemvStreamNormF32M2R2 = "gemv" / "gemv_stream_norm_f32_m2_r2",
    GemvStreamNormF32M2R4 = "gemv" / "gemv_stream_norm_f32_m2_r4",
    GemvStreamNormF32M4R1 = "gemv" / "gemv_stream_norm_f32_m4_r1",
    GemvStreamNormF32M4R2 = "gemv" / "gemv_stream_norm_f32_m4_r2",
    GemvStreamNormF32M4R4 = "gemv" / "gemv_stream_norm_f32_m4_r4",
    GemvStreamNormF32M8R1 = "gemv" / "gemv_stream_norm_f32_m8_r1",
    GemvStreamNormF32M8R2 = "gemv" / "gemv_stream_norm_f32_m8_r2",
    GemvStreamBf16M1R1 = "gemv" / "gemv_stream_bf16_m1_r1",
    GemvStreamBf16M1R2 = "gemv" / "gemv_stream_bf16_m1_r2",
    GemvStreamBf16M1R4 = "gemv" / "gemv_stream_bf16_m1_r4",
    GemvStreamBf16M2R1 = "gemv" / "gemv_stream_bf16_m2_r1",
    GemvStreamBf16M2R2 = "gemv" / "gemv_stream_bf16_m2_r2",
    GemvStreamBf16M2R4 = "gemv" / "gemv_stream_bf16_m2_r4",
    GemvStreamBf16M4R1 = "gemv" / "gemv_stream_bf16_m4_r1",
    GemvStreamBf16M4R2 = "gemv" / "gemv_stream_bf16_m4_r2",
    GemvStreamBf16M4R4 = "gemv" / "gemv_stream_bf16_m4_r4",
    GemvStreamBf16M8R1 = "gemv" / "gemv_stream_bf16_m8_r1",
    GemvStreamBf16M8R2 = "gemv" / "gemv_stream_bf16_m8_r2",
    GemvStreamNormBf16M1R1 = "gemv" / "gemv_stream_norm_bf16_m1_r1",
    GemvStreamNormBf16M1R2 = "gemv" / "gemv_stream_norm_bf16_m1_r2",
    GemvStreamNormBf16M1R4 = "gemv" / "gemv_stream_norm_bf16_m1_r4",
    GemvStreamNormBf16M2R1 = "gemv" / "gemv_stream_norm_bf16_m2_r1",
    GemvStreamNormBf16M2R2 = "gemv" / "gemv_stream_norm_bf16_m2_r2",
    GemvStreamNormBf16M2R4 = "gemv" / "gemv_stream_norm_bf16_m2_r4",
    GemvStreamNormBf16M4R1 = "gemv" / "gemv_stream_norm_bf16_m4_r1",
    GemvStreamNormBf16M4R2 = "gemv" / "gemv_stream_norm_bf16_m4_r2",
    GemvStreamNormBf16M4R4 = "gemv" / "gemv_stream_norm_bf16_m4_r4",
    GemvStreamNormBf16M8R1 = "gemv" / "gemv_stream_norm_bf16_m8_r1",
    GemvStreamNormBf16M8R2 = "gemv" / "gemv_stream_norm_bf16_m8_r2",
    GemvStreamF16M1R1 = "gemv" / "gemv_stream_f16_m1_r1",
    GemvStreamF16M1R2 = "gemv" / "gemv_stream_f16_m1_r2",
    GemvStreamF16M1R4 = "gemv" / "gemv_stream_f16_m1_r4",
    GemvStreamF16M2R1 = "gemv" / "gemv_stream_f16_m2_r1",
    GemvStreamF16M2R2 = "gemv" / "gemv_stream_f16_m2_r2",
    GemvStreamF16M2R4 = "gemv" / "gemv_stream_f16_m2_r4",
    GemvStreamF16M4R1 = "gemv" / "gemv_stream_f16_m4_r1",
    GemvStreamF16M4R2 = "gemv" / "gemv_stream_f16_m4_r2",
    GemvStreamF16M4R4 = "gemv" / "gemv_stream_f16_m4_r4",
    GemvStreamF16M8R1 = "gemv" / "gemv_stream_f16_m8_r1",
    GemvStreamF16M8R2 = "gemv" / "gemv_stream_f16_m8_r2",
    GemvStreamNormF16M1R1 = "gemv" / "gemv_stream_norm_f16_m1_r1",
    GemvStreamNormF16M1R2 = "gemv" / "gemv_stream_norm_f16_m1_r2",
    GemvStreamNormF16M1R4 = "gemv" / "gemv_stream_norm_f16_m1_r4",
    GemvStreamNormF16M2R1 = "gemv" / "gemv_stream_norm_f16_m2_r1",
    GemvStreamNormF16M2R2 = "gemv" / "gemv_stream_norm_f16_m2_r2",
    GemvStreamNormF16M2R4 = "gemv" / "gemv_stream_norm_f16_m2_r4",
    GemvStreamNormF16M4R1 = "gemv" / "gemv_stream_norm_f16_m4_r1",
    GemvStreamNormF16M4R2 = "gemv" / "gemv_stream_norm_f16_m4_r2",
    GemvStreamNormF16M4R4 = "gemv" / "gemv_stream_norm_f16_m4_r4",
    GemvStreamNormF16M8R1 = "gemv" / "gemv_stream_norm_f16_m8_r1",
    GemvStreamNormF16M8R2 = "gemv" / "gemv_stream_norm_f16_m8_r2",
    GemvF32Scalar = "gemv" / "gemv_f32_scalar",
    GemvBf16Scalar = "gemv" / "gemv_bf16_scalar",
    GemvF16Scalar = "gemv" / "gemv_f16_scalar",
    GemvStreamNormXprojF32R1 = "gemv" / "gemv_stream_norm_xproj_f32_r1",
    GemvStreamNormXprojF32R2 = "gemv" / "gemv_stream_norm_xproj_f32_r2",
    GemvStreamNormXprojF32R4 = "gemv" / "gemv_stream_norm_xproj_f32_r4",
    GemvStreamNormXprojBf16R1 = "gemv" / "gemv_stream_norm_xproj_bf16_r1",
    GemvStreamNormXprojBf16R2 = "gemv" / "gemv_stream_norm_xproj_bf16_r2",
    GemvStreamNormXprojBf16R4 = "gemv" / "gemv_stream_norm_xproj_bf16_r4",
    GemvStreamNormXprojF16R1 = "gemv" / "gemv_stream_norm_xproj_f16_r1",
    GemvStreamNormXprojF16R2 = "gemv" / "gemv_stream_norm_xproj_f16_r2",
    GemvStreamNormXprojF16R4 = "gemv" / "gemv_stream_norm_xproj_f16_r4",
    SampleRows = "sample" / "sample_rows",
    SampleGreedy = "sample" / "sample_greedy",
}

/// The (rows a tile, columns a block) shapes each GEMV family is built for,
/// in the order of its entries above.
const GEMV_SHAPES: [(usize, usize); 11] = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2)];

impl Kernel {
    /// The block-split GEMV kernel for `dtype`, the RMS-norm prologue
    /// (`norm`), `mt` rows of x a tile and `r` output columns a block (one
    /// of GEMV_SHAPES); `None` for other shapes.
    pub fn gemv(dtype: crate::backend::DType, norm: bool, mt: usize, r: usize) -> Option<Kernel> {
        Self::gemv_of(Kernel::GemvF32M1R1, dtype, norm, mt, r)
    }

    /// The streaming GEMV kernel (`gemv_stream_impl`), same parameters.
    pub fn gemv_stream(dtype: crate::backend::DType, norm: bool, mt: usize, r: usize) -> Option<Kernel> {
        Self::gemv_of(Kernel::GemvStreamF32M1R1, dtype, norm, mt, r)
    }

    /// The streaming GEMV of one sequence with the norm prologue, the conv
    /// epilogue and x_proj fused in (`XProjEpilogue` in `kernels/gemv.cu`),
    /// `r` output columns a warp's group (1, 2 or 4).
    pub fn gemv_stream_xproj(dtype: crate::backend::DType, r: usize) -> Option<Kernel> {
        let shape = [1, 2, 4].iter().position(|&s| s == r)?;
        Some(Kernel::ALL[Kernel::GemvStreamNormXprojF32R1 as usize + dtype_code(dtype) as usize * 3 + shape])
    }

    /// A family's entries run dtype (f32, bf16, f16) by norm (off, on) by
    /// GEMV_SHAPES, from `first`.
    fn gemv_of(first: Kernel, dtype: crate::backend::DType, norm: bool, mt: usize, r: usize) -> Option<Kernel> {
        let shape = GEMV_SHAPES.iter().position(|&s| s == (mt, r))?;
        let dt = dtype_code(dtype) as usize;
        Some(Kernel::ALL[first as usize + (dt * 2 + norm as usize) * GEMV_SHAPES.len() + shape])
    }
}

/// How the kernels name a dtype (their `DT` template codes and their
/// `half` / `half_dt` arguments): 0 f32, 1 bf16, 2 f16.
pub fn dtype_code(dtype: crate::backend::DType) -> u32 {
    use crate::backend::DType::*;
    match dtype {
        F32 => 0,
        BF16 => 1,
        F16 => 2,
    }
}

/// A kernel at a block size and dynamic shared memory (kernel, threads,
/// bytes), and how many of its blocks a multiprocessor holds.
type Residency = ((Kernel, u32, usize), u32);

/// The loaded kernels, indexed by [`Kernel`].
pub struct Kernels {
    functions: Vec<CudaFunction>,
    /// Answers of [`Kernels::resident_blocks`] so far.
    resident: RefCell<Vec<Residency>>,
}

impl Kernels {
    /// Compiles every family for compute capability `major.minor` and loads
    /// its functions into `ctx`; with `timeline` (a device ring and its
    /// records), with the timeline marks compiled in and every module's
    /// `ms_timeline` pointing at the ring (`MS_TIMELINE`, see
    /// `kernels/prelude.cu`), set through `stream`.
    pub fn compile(
        ctx: &Arc<CudaContext>,
        major: i32,
        minor: i32,
        timeline: Option<(u64, usize)>,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        let arch = format!("--gpu-architecture=compute_{major}{minor}");
        let defines = experiment_defines();
        let mut modules = Vec::with_capacity(FAMILIES.len());
        for &(family, body) in FAMILIES {
            let mut options = vec![arch.clone(), "--std=c++17".into()];
            options.extend(defines.iter().cloned());
            if let Some((_, records)) = timeline {
                options.extend(["-DMS_TIMELINE".into(), format!("-DTL_CAP={records}ull")]);
            }
            let opts = CompileOptions { options, name: Some(format!("{family}.cu")), ..Default::default() };
            let ptx = compile_ptx_with_opts(format!("{PRELUDE}\n{body}"), opts).map_err(|e| compile_error(family, e))?;
            let module = ctx.load_module(ptx).map_err(|e| BackendError::KernelCompile {
                kernel: format!("{family}.cu"),
                log: format!("the driver could not load the compiled module: {e}"),
            })?;
            if let Some((ring, _)) = timeline {
                let err = |e: cudarc::driver::DriverError| BackendError::Device { op: "timeline symbol", detail: e.to_string() };
                let mut at = module.get_global("ms_timeline", stream).map_err(err)?;
                stream.memcpy_htod(&ring.to_le_bytes(), &mut at).map_err(err)?;
                stream.synchronize().map_err(err)?;
            }
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
        // The wide step sizes its grid to one wave of resident blocks, each
        // holding ~30 KiB of buffered copies: give it all the shared memory
        // the L1 can spare, or fewer blocks fit than its grid assumes.
        let carveout = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
        let max_shared = sys::CUshared_carveout::CU_SHAREDMEM_CARVEOUT_MAX_SHARED as i32;
        for k in [Kernel::Mamba1StepWide, Kernel::Mamba1StepLean] {
            functions[k as usize]
                .set_attribute(carveout, max_shared)
                .map_err(|e| BackendError::Device { op: "kernel attribute", detail: e.to_string() })?;
        }
        Ok(Kernels { functions, resident: RefCell::new(vec![]) })
    }

    /// Lets kernel `k` take `bytes` of dynamic shared memory a block (more
    /// than the 48 KiB every kernel may take).
    pub fn allow_shared(&self, k: Kernel, bytes: usize) -> Result<()> {
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        self.functions[k as usize]
            .set_attribute(attr, bytes as i32)
            .map_err(|e| BackendError::Device { op: "kernel attribute", detail: e.to_string() })
    }

    pub fn get(&self, k: Kernel) -> sys::CUfunction {
        self.functions[k as usize].cu_function()
    }

    /// How many blocks of `block` threads and `shared` bytes of dynamic
    /// shared memory of kernel `k` one multiprocessor holds at once (at
    /// least 1; asked of the driver once per combination).
    pub fn resident_blocks(&self, k: Kernel, block: u32, shared: usize) -> Result<u32> {
        Ok(self.resident_blocks_exact(k, block, shared)?.max(1))
    }

    /// [`Kernels::resident_blocks`] as the driver says it, 0 included
    /// (the block does not fit a multiprocessor at all).
    pub fn resident_blocks_exact(&self, k: Kernel, block: u32, shared: usize) -> Result<u32> {
        let key = (k, block, shared);
        if let Some(&(_, blocks)) = self.resident.borrow().iter().find(|(at, _)| *at == key) {
            return Ok(blocks);
        }
        let blocks = self.functions[k as usize]
            .occupancy_max_active_blocks_per_multiprocessor(block, shared, None)
            .map_err(|e| BackendError::Device { op: "occupancy query", detail: e.to_string() })?;
        self.resident.borrow_mut().push((key, blocks));
        Ok(blocks)
    }
}

/// Preprocessor definitions for every family from
/// `MAMBA_SERVE_KERNEL_DEFINES`: the kernels' switches for variants kept for
/// comparisons (`EARLY_VEC`, `CONV_PREFETCH`, each 1 by default).
fn experiment_defines() -> Vec<String> {
    defines_from(&std::env::var("MAMBA_SERVE_KERNEL_DEFINES").unwrap_or_default())
}

/// `-DNAME=VALUE` options from whitespace-separated `NAME=VALUE` words (an
/// identifier and an integer); other words are ignored, with a warning.
fn defines_from(words: &str) -> Vec<String> {
    let valid = |w: &str| {
        w.split_once('=').is_some_and(|(n, v)| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && v.parse::<i64>().is_ok()
        })
    };
    let (good, bad): (Vec<&str>, Vec<&str>) = words.split_whitespace().partition(|w| valid(w));
    if !bad.is_empty() {
        tracing::warn!("MAMBA_SERVE_KERNEL_DEFINES: ignoring {bad:?} (want NAME=INTEGER words)");
    }
    good.into_iter().map(|w| format!("-D{w}")).collect()
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
/// half: the machine is little-endian), or a struct passed by value as the
/// 8-byte words of its C layout.
pub struct Args {
    slots: Vec<u64>,
    /// (index in `slots` of a placeholder, the struct's words).
    structs: Vec<(usize, Box<[u64]>)>,
    /// Bytes of dynamic shared memory per block (at most 48 KiB).
    shared: u32,
}

impl Args {
    pub fn new() -> Self {
        Args { slots: Vec::with_capacity(32), structs: vec![], shared: 0 }
    }
    /// Dynamic shared memory per block, for kernels that size it at launch.
    pub fn shared_bytes(mut self, bytes: u32) -> Self {
        self.shared = bytes;
        self
    }
    /// A struct parameter, given as the 8-byte words of its C layout.
    pub fn words(mut self, words: &[u64]) -> Self {
        self.structs.push((self.slots.len(), words.into()));
        self.slots.push(0);
        self
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

    /// Launches `f` on `stream` with these arguments; with `dependent`, as
    /// a programmatic dependent launch (the kernel may start while the
    /// previous one ends: it must call `grid_dep_sync` before reading
    /// anything but constants, see `kernels/prelude.cu`).
    pub fn launch(mut self, f: sys::CUfunction, stream: sys::CUstream, grid: (u32, u32, u32), block: u32, dependent: bool) -> Result<()> {
        let mut params: Vec<*mut c_void> = self.slots.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        for (at, words) in &mut self.structs {
            params[*at] = words.as_mut_ptr() as *mut c_void;
        }
        let err = |e: String| BackendError::Device { op: "kernel launch", detail: e };
        if !dependent {
            // SAFETY: each parameter points into `self.slots` (or a struct's
            // words), alive until the call returns (the driver copies
            // parameters at launch); the caller matched the argument list
            // to the kernel's signature.
            return unsafe { result::launch_kernel(f, grid, (block, 1, 1), self.shared, stream, &mut params) }
                .map_err(|e| err(e.to_string()));
        }
        // SAFETY: a zeroed attribute is valid plain data; the fields set
        // below are the ones the driver reads for this attribute id.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.shared,
            hStream: stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above; `config` and `attr` outlive the call.
        let r = unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) };
        if r == sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(err(format!("{r:?}"))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DType;

    #[test]
    fn kernel_defines_take_name_and_integer_words_only() {
        assert_eq!(defines_from(" EARLY_VEC=0  CONV_PREFETCH=1 "), ["-DEARLY_VEC=0", "-DCONV_PREFETCH=1"]);
        assert_eq!(defines_from("A=-2 _B1=7"), ["-DA=-2", "-D_B1=7"]);
        assert!(defines_from("").is_empty());
        // Nothing that could smuggle another compiler option or code in.
        assert!(defines_from("X -DY=1 =1 1A=2 B=x C=1;D=2 E=1=2").is_empty());
    }

    #[test]
    fn gemv_lookup_names_the_kernel_asked_for() {
        for (dtype, dt) in [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")] {
            for norm in [false, true] {
                for (mt, r) in GEMV_SHAPES {
                    let n = if norm { "norm_" } else { "" };
                    let block = Kernel::gemv(dtype, norm, mt, r).expect("a built shape");
                    assert_eq!(block.source(), ("gemv", format!("gemv_{n}{dt}_m{mt}_r{r}").as_str()));
                    let stream = Kernel::gemv_stream(dtype, norm, mt, r).expect("a built shape");
                    assert_eq!(stream.source(), ("gemv", format!("gemv_stream_{n}{dt}_m{mt}_r{r}").as_str()));
                }
            }
        }
        assert_eq!(Kernel::gemv(DType::BF16, false, 8, 4), None);
        for (dtype, dt) in [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")] {
            for r in [1, 2, 4] {
                let k = Kernel::gemv_stream_xproj(dtype, r).expect("a built shape");
                assert_eq!(k.source(), ("gemv", format!("gemv_stream_norm_xproj_{dt}_r{r}").as_str()));
            }
        }
        assert_eq!(Kernel::gemv_stream_xproj(DType::BF16, 8), None);
    }
}
