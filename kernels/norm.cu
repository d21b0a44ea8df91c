// RMS norms: the block's norm before a product that is not a GEMV (the
// GEMV folds it in), the weightless column-group norms of Falcon-Mamba, and
// Mamba-2's gated norm.

// One block per row of width `dim`:
//   out = x / sqrt(mean(x^2) + eps) * weight,
// written as f32, or as 16-bit values when `half` is 1 (bf16) or 2 (f16):
// the operand of a tensor-core product, `out` then pointing at u16 data.
// `rmsnorm_rows4` below is the same for dims the vector path takes.
extern "C" __global__ void rmsnorm_rows(const float* x, const float* weight, float eps, int dim, void* out, int half) {
    TL_SCOPE(TL_NORM_ROWS);
    __shared__ float sh[33];
    const u64 base = (u64)blockIdx.x * dim;
    const float* r = x + base;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += r[c] * r[c];
    ss = block_sum(ss, sh);
    const float s = (float)(1.0 / sqrt((double)ss / dim + (double)eps));
    if (half) {
        u16* o = (u16*)out + base;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float v = weight[c] * (r[c] * s);
            o[c] = half == 1 ? f32_to_bf16(v) : f32_to_f16(v);
        }
        return;
    }
    float* o = (float*)out + base;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = weight[c] * (r[c] * s);
}

// In-place weightless RMSNorm of up to 4 column groups of each row; block
// (row, group). Groups are (start, len) pairs.
extern "C" __global__ void rms_norm_columns(float* x, int stride, int s0, int l0, int s1, int l1, int s2, int l2, int s3,
                                            int l3, float eps) {
    __shared__ float sh[33];
    const int g = blockIdx.y;
    const int start = g == 0 ? s0 : g == 1 ? s1 : g == 2 ? s2 : s3;
    const int len = g == 0 ? l0 : g == 1 ? l1 : g == 2 ? l2 : l3;
    float* v = x + (u64)blockIdx.x * stride + start;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < len; c += blockDim.x) ss += v[c] * v[c];
    ss = block_sum(ss, sh);
    const float s = (float)(1.0 / sqrt((double)ss / len + (double)eps));
    for (int c = threadIdx.x; c < len; c += blockDim.x) v[c] *= s;
}

// Mamba-2 gated RMSNorm, block (row, group): g = y * silu(z), normalised
// over each group of `group` channels, times weight.
extern "C" __global__ void gated_rmsnorm(const float* y, int y_stride, const float* z, int z_stride,
                                         const float* weight, float eps, int group, float* out, int out_stride) {
    __shared__ float sh[33];
    const u64 row = blockIdx.x;
    const int c0 = blockIdx.y * group;
    const float* yr = y + row * y_stride + c0;
    const float* zr = z + row * z_stride + c0;
    float* o = out + row * out_stride + c0;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < group; c += blockDim.x) {
        const float g = yr[c] * silu_f(zr[c]);
        o[c] = g;
        ss += g * g;
    }
    ss = block_sum(ss, sh);
    const float s = (float)(1.0 / sqrt((double)ss / group + (double)eps));
    for (int c = threadIdx.x; c < group; c += blockDim.x) o[c] = weight[c0 + c] * (o[c] * s);
}

// RMSNorm of rows of width dim (dim % 4 == 0, dim <= 16 * blockDim.x),
// one block per row: each thread keeps its (up to four) 16-byte pieces of
// the row in registers between the sum of squares and the output, so the
// row is read once. Output f32, or 16-bit (`half` 1 = bf16, 2 = f16) for a
// tensor-core product.
extern "C" __global__ void rmsnorm_rows4(const float* __restrict__ x, const float* __restrict__ weight, float eps,
                                         int dim, void* __restrict__ out, int half) {
    TL_SCOPE(TL_NORM_ROWS);
    __shared__ float sh[33];
    const u64 base = (u64)blockIdx.x * dim;
    const float4* r = (const float4*)(x + base);
    const int n4 = dim / 4;
    float4 v[4], wt[4];
    float ss = 0.0f;
    // The weights load with the row, not after the sum: one memory round
    // trip fewer.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        const bool in = i < n4;
        v[j] = in ? r[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        wt[j] = in ? ((const float4*)weight)[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    ss = block_sum(ss, sh);
    const float s = (float)(1.0 / sqrt((double)ss / dim + (double)eps));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i >= n4) continue;
        const float4 g = wt[j];
        const float o0 = g.x * (v[j].x * s), o1 = g.y * (v[j].y * s), o2 = g.z * (v[j].z * s), o3 = g.w * (v[j].w * s);
        if (half) {
            const u16 h0 = half == 1 ? f32_to_bf16(o0) : f32_to_f16(o0);
            const u16 h1 = half == 1 ? f32_to_bf16(o1) : f32_to_f16(o1);
            const u16 h2 = half == 1 ? f32_to_bf16(o2) : f32_to_f16(o2);
            const u16 h3 = half == 1 ? f32_to_bf16(o3) : f32_to_f16(o3);
            ((uint2*)((u16*)out + base))[i] = make_uint2((u32)h0 | ((u32)h1 << 16), (u32)h2 | ((u32)h3 << 16));
        } else {
            ((float4*)((float*)out + base))[i] = make_float4(o0, o1, o2, o3);
        }
    }
}
