// Small-batch matrix product for decode: out[m, n] = sum_k x[m, k] * w[n, k]
// (+ bias[n]), x f32 `[M, K]` (row stride xs), w `[N, K]` in its stored
// dtype, fp32 accumulation. Memory-bound: every weight is read once per
// launch and used for up to 8 rows of x (blockIdx.y tiles M by 8).
//
// One warp per output column n. The vector path (K % 8 == 0, x rows 16-byte
// aligned) has each lane load 8 weights (16 bytes of bf16/f16, 32 of f32) and
// the matching 8 floats of each x row per step.

template <int DT>
__device__ __forceinline__ void load8(const void* w, u64 i, float* v) {
    if (DT == 0) {
        const float4* p = (const float4*)((const float*)w + i);
        const float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        const uint4 q = *(const uint4*)((const u16*)w + i);
        const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
            v[2 * j] = DT == 1 ? bf16_to_f32(lo) : f16_to_f32(lo);
            v[2 * j + 1] = DT == 1 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
    }
}

template <int DT, bool VEC>
__device__ void gemv_impl(const float* __restrict__ x, int xs, int M, const void* __restrict__ w, int N, int K,
                          const float* __restrict__ bias, float* __restrict__ out, int os) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + warp;
    if (n >= N) return;
    const int m0 = blockIdx.y * 8;
    const int mc = min(8, M - m0);
    const float* xb = x + (u64)m0 * xs;
    const u64 wrow = (u64)n * K;
    float acc[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
    if (VEC) {
#pragma unroll 2
        for (int k = lane * 8; k < K; k += 256) {
            float wv[8];
            load8<DT>(w, wrow + k, wv);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                if (m < mc) {
                    const float4* xp = (const float4*)(xb + (u64)m * xs + k);
                    const float4 p = xp[0], q = xp[1];
                    acc[m] += wv[0] * p.x + wv[1] * p.y + wv[2] * p.z + wv[3] * p.w + wv[4] * q.x + wv[5] * q.y +
                              wv[6] * q.z + wv[7] * q.w;
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wv = load_weight<DT>(w, wrow + k);
#pragma unroll
            for (int m = 0; m < 8; ++m)
                if (m < mc) acc[m] += wv * xb[(u64)m * xs + k];
        }
    }
    float mine = 0.0f;
#pragma unroll
    for (int m = 0; m < 8; ++m) {
        if (m < mc) {
            const float v = warp_sum(acc[m]);
            if (lane == m) mine = v;
        }
    }
    if (lane < mc) {
        if (bias) mine += bias[n];
        out[(u64)(m0 + lane) * os + n] = mine;
    }
}

#define GEMV_ARGS const float *x, int xs, int M, const void *w, int N, int K, const float *bias, float *out, int os
#define GEMV_PASS x, xs, M, w, N, K, bias, out, os

extern "C" __global__ void gemv_f32_vec(GEMV_ARGS) { gemv_impl<0, true>(GEMV_PASS); }
extern "C" __global__ void gemv_bf16_vec(GEMV_ARGS) { gemv_impl<1, true>(GEMV_PASS); }
extern "C" __global__ void gemv_f16_vec(GEMV_ARGS) { gemv_impl<2, true>(GEMV_PASS); }
extern "C" __global__ void gemv_f32_scalar(GEMV_ARGS) { gemv_impl<0, false>(GEMV_PASS); }
extern "C" __global__ void gemv_bf16_scalar(GEMV_ARGS) { gemv_impl<1, false>(GEMV_PASS); }
extern "C" __global__ void gemv_f16_scalar(GEMV_ARGS) { gemv_impl<2, false>(GEMV_PASS); }
