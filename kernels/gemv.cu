// Small-batch matrix product for decode: out[m, n] = sum_k x[m, k] * w[n, k]
// (+ bias[n]), x f32 `[M, K]` (row stride xs), w `[N, K]` in its stored
// dtype, fp32 accumulation. Memory-bound: every weight is read once per
// launch and used for up to MT rows of x (blockIdx.y tiles M by MT).
//
// One warp per output column n. The vector path (K % 8 == 0, x rows 16-byte
// aligned) has each lane load U chunks of 8 weights (16 bytes of bf16/f16,
// 32 of f32) before using any, so several loads per lane are in flight, and
// reads the matching 8 floats of each x row (cached: x is small).

#define GEMV_U 4

// Eight weights starting at element i (16-byte aligned), as raw words.
template <int DT>
struct Chunk {
    uint4 a, b;  // b is used by f32 only
};

template <int DT>
__device__ __forceinline__ Chunk<DT> load_chunk(const void* w, u64 i) {
    Chunk<DT> c;
    if (DT == 0) {
        const uint4* p = (const uint4*)((const float*)w + i);
        c.a = p[0];
        c.b = p[1];
    } else {
        c.a = *(const uint4*)((const u16*)w + i);
        c.b = make_uint4(0, 0, 0, 0);
    }
    return c;
}

template <int DT>
__device__ __forceinline__ void widen8(const Chunk<DT>& c, float* v) {
    if (DT == 0) {
        v[0] = __uint_as_float(c.a.x); v[1] = __uint_as_float(c.a.y);
        v[2] = __uint_as_float(c.a.z); v[3] = __uint_as_float(c.a.w);
        v[4] = __uint_as_float(c.b.x); v[5] = __uint_as_float(c.b.y);
        v[6] = __uint_as_float(c.b.z); v[7] = __uint_as_float(c.b.w);
    } else {
        const u32 words[4] = {c.a.x, c.a.y, c.a.z, c.a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
            v[2 * j] = DT == 1 ? bf16_to_f32(lo) : f16_to_f32(lo);
            v[2 * j + 1] = DT == 1 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
    }
}

template <int DT, int MT, bool VEC>
__device__ void gemv_impl(const float* __restrict__ x, int xs, int M, const void* __restrict__ w, int N, int K,
                          const float* __restrict__ bias, float* __restrict__ out, int os) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + warp;
    if (n >= N) return;
    const int m0 = blockIdx.y * MT;
    const int mc = min(MT, M - m0);
    const float* xb = x + (u64)m0 * xs;
    const u64 wrow = (u64)n * K;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (VEC) {
        for (int k0 = lane * 8; k0 < K; k0 += 256 * GEMV_U) {
            Chunk<DT> c[GEMV_U];
#pragma unroll
            for (int u = 0; u < GEMV_U; ++u)
                if (k0 + u * 256 < K) c[u] = load_chunk<DT>(w, wrow + k0 + u * 256);
#pragma unroll
            for (int u = 0; u < GEMV_U; ++u) {
                const int k = k0 + u * 256;
                if (k < K) {
                    float wv[8];
                    widen8<DT>(c[u], wv);
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        if (m < mc) {
                            const float4* xp = (const float4*)(xb + (u64)m * xs + k);
                            const float4 p = xp[0], q = xp[1];
                            acc[m] += wv[0] * p.x + wv[1] * p.y + wv[2] * p.z + wv[3] * p.w + wv[4] * q.x +
                                      wv[5] * q.y + wv[6] * q.z + wv[7] * q.w;
                        }
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wv = load_weight<DT>(w, wrow + k);
#pragma unroll
            for (int m = 0; m < MT; ++m)
                if (m < mc) acc[m] += wv * xb[(u64)m * xs + k];
        }
    }
    float mine = 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
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
#define GEMV_KERNEL(name, dt, mt, vec) \
    extern "C" __global__ void __launch_bounds__(128) name(GEMV_ARGS) { gemv_impl<dt, mt, vec>(GEMV_PASS); }

GEMV_KERNEL(gemv_f32_vec_m1, 0, 1, true)
GEMV_KERNEL(gemv_f32_vec_m2, 0, 2, true)
GEMV_KERNEL(gemv_f32_vec_m4, 0, 4, true)
GEMV_KERNEL(gemv_f32_vec_m8, 0, 8, true)
GEMV_KERNEL(gemv_bf16_vec_m1, 1, 1, true)
GEMV_KERNEL(gemv_bf16_vec_m2, 1, 2, true)
GEMV_KERNEL(gemv_bf16_vec_m4, 1, 4, true)
GEMV_KERNEL(gemv_bf16_vec_m8, 1, 8, true)
GEMV_KERNEL(gemv_f16_vec_m1, 2, 1, true)
GEMV_KERNEL(gemv_f16_vec_m2, 2, 2, true)
GEMV_KERNEL(gemv_f16_vec_m4, 2, 4, true)
GEMV_KERNEL(gemv_f16_vec_m8, 2, 8, true)
GEMV_KERNEL(gemv_f32_scalar, 0, 8, false)
GEMV_KERNEL(gemv_bf16_scalar, 1, 8, false)
GEMV_KERNEL(gemv_f16_scalar, 2, 8, false)
