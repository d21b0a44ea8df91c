// Skinny products on tensor cores: out[m, n] = x[m, k] · w[n, k]ᵀ with few
// outputs (n ≤ 256) and a long k, at decode batches of more than a few
// rows: x_proj (n = dt_rank + 2 · d_state, k = d_inner). The output is too
// small to fill the GPU with tiles of it, so k is split: block (i, s)
// multiplies rows [64 i, 64 i + 64) by the k-slice s and stores its partial
// sums; `splitk_reduce` adds the slices in order (the result does not
// depend on timing) and writes the output, and, when asked, its 16-bit copy
// for the tensor-core product that reads it next.
//
// x and w are 16-bit (DT 1 bf16, 2 f16), rows 16-byte aligned (k and x's
// stride multiples of 8); products accumulate in f32 (mma.sync m16n8k16).
// A block has 8 warps over its 64 rows and every output column. The
// k-slice streams through shared memory in steps of 32, SPLITK_STAGES
// steps in flight (cp.async).

#define SPLITK_ROWS 64
#define SPLITK_KSTEP 32
// A shared-memory row holds one row's 32 values of a step plus 8 of
// padding (80 bytes): the fragment loads of 8 rows × 4 lanes then fall in
// 32 different banks.
#define SPLITK_PITCH 40
#define SPLITK_STAGES 4

template <int DT>
__device__ __forceinline__ void mma_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (DT == 1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// Partial products of the k-slice blockIdx.y (k_split values long) for the
// row tile blockIdx.x: part[blockIdx.y, r, c] for r < m, c < n. NT 8-column
// tiles cover n (NT · 8 ≥ n). 8 warps: warp w takes rows 16 (w % 4) ..
// + 15 and the k16 half w / 4 of every step, so two warps a scheduler hide
// each other's latency; the halves are added in shared memory at the end
// and the tile leaves as one contiguous, coalesced block (the partials of
// a slice are dense [m, n], so rows row0 .. row0 + 63 are adjacent).
// Dynamic shared memory: SPLITK_STAGES × (64 + n8) × SPLITK_PITCH 16-bit
// values, n8 = n rounded up to 8 (the sums reuse it: 64 × (n8 + 8) floats
// fit).
template <int DT, int NT>
__device__ void splitk_partial(const u16* __restrict__ x, int x_stride, const u16* __restrict__ w, int m, int n, int k, int k_split,
                               float* __restrict__ part) {
    extern __shared__ __align__(16) u16 sk_smem[];
    const int n8 = (n + 7) & ~7;
    const int stage_len = (SPLITK_ROWS + n8) * SPLITK_PITCH;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rows16 = (warp & 3) * 16, kh = (warp >> 2) * 16;
    const int row0 = blockIdx.x * SPLITK_ROWS;
    const int k0 = blockIdx.y * k_split, k1 = min(k, k0 + k_split);
    const int steps = (k1 - k0 + SPLITK_KSTEP - 1) / SPLITK_KSTEP;

    // Step j's rows of x, then of w, into stage buffer j % SPLITK_STAGES:
    // 16-byte chunks, 4 a row; chunks past m, n or the slice's end are zeros.
    auto load = [&](int j) {
        u16* s = sk_smem + (j % SPLITK_STAGES) * stage_len;
        const int kk = k0 + j * SPLITK_KSTEP;
        for (int c = threadIdx.x; c < (SPLITK_ROWS + n8) * 4; c += blockDim.x) {
            const int r = c >> 2, gk = kk + (c & 3) * 8;
            const bool is_x = r < SPLITK_ROWS;
            const int gr = is_x ? row0 + r : r - SPLITK_ROWS;
            const bool ok = gk < k1 && gr < (is_x ? m : n);
            const u16* src = !ok ? x : is_x ? x + (u64)gr * x_stride + gk : w + (u64)gr * k + gk;
            cp_async16((float*)(s + r * SPLITK_PITCH + (c & 3) * 8), (const float*)src, ok);
        }
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    // Prologue: the first SPLITK_STAGES - 1 steps in flight (a group each,
    // empty past the end, so the wait counts below stay exact).
#pragma unroll
    for (int j = 0; j < SPLITK_STAGES - 1; ++j) {
        if (j < steps) load(j);
        cp_async_commit();
    }
    for (int j = 0; j < steps; ++j) {
        cp_async_wait<SPLITK_STAGES - 2>();
        // Step j is here for every thread, and every warp is done with the
        // buffer the next load overwrites (step j - 1's).
        __syncthreads();
        if (j + SPLITK_STAGES - 1 < steps) load(j + SPLITK_STAGES - 1);
        cp_async_commit();
        const u16* s = sk_smem + (j % SPLITK_STAGES) * stage_len;
        const u16* a = s + rows16 * SPLITK_PITCH + kh + 2 * t;
        const u16* b = s + (SPLITK_ROWS + g) * SPLITK_PITCH + kh + 2 * t;
        const u32 a0 = *(const u32*)(a + g * SPLITK_PITCH);
        const u32 a1 = *(const u32*)(a + (g + 8) * SPLITK_PITCH);
        const u32 a2 = *(const u32*)(a + g * SPLITK_PITCH + 8);
        const u32 a3 = *(const u32*)(a + (g + 8) * SPLITK_PITCH + 8);
#pragma unroll
        for (int j8 = 0; j8 < NT; ++j8) {
            if (j8 * 8 < n) {
                const u16* bj = b + j8 * 8 * SPLITK_PITCH;
                mma_16816<DT>(acc[j8], a0, a1, a2, a3, *(const u32*)bj, *(const u32*)(bj + 8));
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Accumulator j holds rows g and g + 8 of the warp's 16, columns
    // 8 j + 2 t and 8 j + 2 t + 1. The second k half stores its sums, the
    // first adds them to its own and stores the tile's, [64, n8] floats.
    // Rows n8 + 8 floats apart: a half-warp's 8-byte stores hit distinct banks.
    float* sum = (float*)sk_smem;
    const int pitch = n8 + 8;
    const int r_lo = rows16 + g;
    for (int half = 1; half >= 0; --half) {
        if ((warp >> 2) == half) {
#pragma unroll
            for (int j8 = 0; j8 < NT; ++j8) {
                if (j8 * 8 >= n) continue;
                float2* lo = (float2*)(sum + r_lo * pitch + j8 * 8 + 2 * t);
                float2* hi = (float2*)(sum + (r_lo + 8) * pitch + j8 * 8 + 2 * t);
                if (half == 0) {
                    const float2 l = *lo, h = *hi;
                    acc[j8][0] += l.x, acc[j8][1] += l.y, acc[j8][2] += h.x, acc[j8][3] += h.y;
                }
                *lo = make_float2(acc[j8][0], acc[j8][1]);
                *hi = make_float2(acc[j8][2], acc[j8][3]);
            }
        }
        __syncthreads();
    }
    const int rows = min(SPLITK_ROWS, m - row0);
    float* p = part + (u64)blockIdx.y * m * n + (u64)row0 * n;
    for (int i = threadIdx.x; i < rows * n; i += blockDim.x) {
        const int r = i / n;
        p[i] = sum[r * pitch + (i - r * n)];
    }
}

#define SPLITK_ARGS \
    const u16 *x, int x_stride, const u16 *w, int m, int n, int k, int k_split, float *part
#define SPLITK_PASS x, x_stride, w, m, n, k, k_split, part
extern "C" __global__ void __launch_bounds__(256) splitk_bf16_n128(SPLITK_ARGS) { splitk_partial<1, 16>(SPLITK_PASS); }
extern "C" __global__ void __launch_bounds__(256) splitk_bf16_n256(SPLITK_ARGS) { splitk_partial<1, 32>(SPLITK_PASS); }
extern "C" __global__ void __launch_bounds__(256) splitk_f16_n128(SPLITK_ARGS) { splitk_partial<2, 16>(SPLITK_PASS); }
extern "C" __global__ void __launch_bounds__(256) splitk_f16_n256(SPLITK_ARGS) { splitk_partial<2, 32>(SPLITK_PASS); }

// out[r, c] = Σ_s part[s, r, c] (+ out[r, c] with `accumulate`), the slices
// added in order; with half_dt (1 bf16, 2 f16) also half[r, c] (dense,
// row length n) in that type. One thread an element, in row-major order.
extern "C" __global__ void splitk_reduce(const float* __restrict__ part, int splits, int m, int n, float* out, int out_stride,
                                         int accumulate, u16* __restrict__ half, int half_dt) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 len = (u64)m * n;
    if (i >= len) return;
    float v = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) v += part[s * len + i];
    const u64 r = i / n, c = i - r * n;
    float* o = out + r * out_stride + c;
    if (accumulate) v += *o;
    *o = v;
    if (half_dt) half[i] = half_dt == 1 ? f32_to_bf16(v) : f32_to_f16(v);
}
