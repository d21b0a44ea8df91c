// Small-batch matrix product for decode: out[m, n] = sum_k x[m, k] * w[n, k]
// (+ bias[n]), x f32 `[M, K]` (row stride xs), w `[N, K]` in its stored
// dtype, fp32 accumulation. Memory-bound: every weight is read once per
// launch and used for up to MT rows of x (blockIdx.y tiles M by MT; larger
// M re-reads the weights once per tile, from L2 when they fit).
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

// R output columns per warp share each x chunk loaded from L1 (x is re-read
// by every warp, so without that reuse L1 bandwidth, not DRAM, would bound
// the kernel); U chunks per column are in flight before any is used.
template <int DT, int MT, int R, bool VEC>
__device__ void gemv_impl(const float* __restrict__ x, int xs, int M, const void* __restrict__ w, int N, int K,
                          const float* __restrict__ bias, float* __restrict__ out, int os) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
    if (n0 >= N) return;
    const int m0 = blockIdx.y * MT;
    const int mc = min(MT, M - m0);
    const float* xb = x + (u64)m0 * xs;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    if (VEC) {
        constexpr int U = R >= 4 ? 2 : GEMV_U;
        for (int k0 = lane * 8; k0 < K; k0 += 256 * U) {
            Chunk<DT> c[U][R];
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int r = 0; r < R; ++r)
                    if (k0 + u * 256 < K && n0 + r < N) c[u][r] = load_chunk<DT>(w, (u64)(n0 + r) * K + k0 + u * 256);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int k = k0 + u * 256;
                if (k < K) {
                    float wv[R][8];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        if (n0 + r < N) widen8<DT>(c[u][r], wv[r]);
                        else {
#pragma unroll
                            for (int j = 0; j < 8; ++j) wv[r][j] = 0.0f;
                        }
                    }
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        if (m < mc) {
                            const float4* xp = (const float4*)(xb + (u64)m * xs + k);
                            const float4 p = xp[0], q = xp[1];
#pragma unroll
                            for (int r = 0; r < R; ++r)
                                acc[r][m] += wv[r][0] * p.x + wv[r][1] * p.y + wv[r][2] * p.z + wv[r][3] * p.w +
                                             wv[r][4] * q.x + wv[r][5] * q.y + wv[r][6] * q.z + wv[r][7] * q.w;
                        }
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (n0 + r < N) {
                    const float wv = load_weight<DT>(w, (u64)(n0 + r) * K + k);
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                        if (m < mc) acc[r][m] += wv * xb[(u64)m * xs + k];
                }
            }
        }
    }
    // Lane r * MT + m ends with column n0 + r of row m0 + m.
    float mine = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < mc) {
                const float v = warp_sum(acc[r][m]);
                if (lane == r * MT + m) mine = v;
            }
        }
    }
    if (lane < R * MT) {
        const int r = lane / MT, m = lane % MT;
        const int n = n0 + r;
        if (m < mc && n < N) {
            if (bias) mine += bias[n];
            out[(u64)(m0 + m) * os + n] = mine;
        }
    }
}

#define GEMV_ARGS const float *x, int xs, int M, const void *w, int N, int K, const float *bias, float *out, int os
#define GEMV_PASS x, xs, M, w, N, K, bias, out, os
#define GEMV_KERNEL(name, dt, mt, r, vec) \
    extern "C" __global__ void __launch_bounds__(128) name(GEMV_ARGS) { gemv_impl<dt, mt, r, vec>(GEMV_PASS); }
#define GEMV_FAMILY(dtname, dt)                                   \
    GEMV_KERNEL(gemv_##dtname##_vec_m1_r1, dt, 1, 1, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m2_r1, dt, 2, 1, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m4_r1, dt, 4, 1, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m8_r1, dt, 8, 1, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m16_r1, dt, 16, 1, true)      \
    GEMV_KERNEL(gemv_##dtname##_vec_m1_r4, dt, 1, 4, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m2_r4, dt, 2, 4, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m4_r4, dt, 4, 4, true)        \
    GEMV_KERNEL(gemv_##dtname##_vec_m8_r4, dt, 8, 4, true)        \
    GEMV_KERNEL(gemv_##dtname##_scalar, dt, 8, 1, false)

GEMV_FAMILY(f32, 0)
GEMV_FAMILY(bf16, 1)
GEMV_FAMILY(f16, 2)
