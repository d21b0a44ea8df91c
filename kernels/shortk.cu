// Short-k products on tensor cores: out[m, n] = x[m, k] · w[n, k]ᵀ
// (+ bias[n]; added to `out` with `accumulate`) for 16-bit weights with a
// short k (at most SHORTK_MAX_K: dt_proj, whose k is dt_rank) and f32
// activations, at more rows than the GEMV takes. Through cuBLAS such a
// product needed a kernel of its own first to round x to 16 bits, and at
// k = 128 that kernel cost half as much as the product. Here x is rounded
// (to nearest even, as that kernel did) on its way into shared memory.
//
// x rows 16-byte aligned (x's offset and stride multiples of 4 floats),
// k a multiple of 8; products accumulate in f32 (mma.sync m16n8k16).
// Block (i, j) computes rows BM j .. BM j + BM - 1 and columns 64 i ..
// 64 i + 63 (neighbouring blocks share x's rows, which stay in L2); k goes
// through shared memory in chunks of SHORTK_KC, every load of a chunk
// issued before any is stored. The 8 warps split the tile into BM / 16
// rows of 16 × (64 · 16 / BM) pieces, 16 × 8 accumulator tiles each. The
// kernels take BM = 64 (four tiles a warp): with BM = 32 (twice the
// blocks, half the serial work a warp) dt_proj at 256 rows took 6.4 µs
// instead of 5.6.

#define SHORTK_TILE 64
#define SHORTK_KC 128
#define SHORTK_THREADS 256
// A shared-memory row holds a chunk's 128 values plus 8 of padding (272
// bytes): the fragment loads of 8 rows × 4 lanes then fall in 32 different
// banks.
#define SHORTK_PITCH (SHORTK_KC + 8)
// 8-value pieces of w's chunk each thread moves (x's: BM / 16).
#define SHORTK_PIECES (SHORTK_TILE * SHORTK_KC / 8 / SHORTK_THREADS)
// The output tile in shared memory (over the chunk buffers): rows 72
// floats apart, so a half-warp's 8-byte fragment stores fall in distinct
// banks.
#define SHORTK_OUT_PITCH 72

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

// Two f32 values rounded to DT (1 bf16, 2 f16), packed low then high.
template <int DT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    const u16 a = DT == 1 ? f32_to_bf16(lo) : f32_to_f16(lo);
    const u16 b = DT == 1 ? f32_to_bf16(hi) : f32_to_f16(hi);
    return (u32)a | ((u32)b << 16);
}

template <int DT, int BM>
__device__ void shortk_impl(const float* __restrict__ x, int xs, int m, const u16* __restrict__ w, int n, int k,
                            const float* __restrict__ bias, float* __restrict__ out, int os, int accumulate) {
    TL_SCOPE(TL_SHORTK);
    // Warps along the rows, accumulator tiles a warp, x's pieces a thread.
    constexpr int WR = BM / 16, NJ = WR, XP = BM * SHORTK_KC / 8 / SHORTK_THREADS;
    static_assert(NJ * 8 * (8 / WR) == SHORTK_TILE, "the warps cover the tile's columns");
    // x's chunk, then w's; at the end the output tile (BM × 72 floats).
    __shared__ __align__(16) u16 smem[(BM + SHORTK_TILE) * SHORTK_PITCH];
    u16* sa = smem;
    u16* sb = smem + BM * SHORTK_PITCH;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * SHORTK_TILE, row0 = blockIdx.y * BM;
    const int wr = (warp % WR) * 16, wc = (warp / WR) * NJ * 8;
    float acc[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    // x comes from the previous kernel.
    grid_dep_sync();
    TL_WAITED(TL_SHORTK);
    for (int kc = 0; kc < k; kc += SHORTK_KC) {
        const int kl = min(SHORTK_KC, k - kc);
        const int k16 = (kl + 15) & ~15;
        // Piece p of a tile is row p / 16, values 8 (p % 16) .. + 7 of the
        // chunk; pieces past the chunk's end (up to k16) are zeros.
        float4 xv[XP][2];
        uint4 wv[SHORTK_PIECES];
#pragma unroll
        for (int i = 0; i < XP; ++i) {
            const int p = tid + i * SHORTK_THREADS, r = p >> 4, c = (p & 15) * 8;
            xv[i][0] = xv[i][1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < kl && row0 + r < m) {
                const float4* src = (const float4*)(x + (u64)(row0 + r) * xs + kc + c);
                xv[i][0] = src[0];
                xv[i][1] = src[1];
            }
        }
#pragma unroll
        for (int i = 0; i < SHORTK_PIECES; ++i) {
            const int p = tid + i * SHORTK_THREADS, r = p >> 4, c = (p & 15) * 8;
            wv[i] = c < kl && col0 + r < n ? *(const uint4*)(w + (u64)(col0 + r) * k + kc + c) : make_uint4(0, 0, 0, 0);
        }
        // Every warp is done reading the previous chunk.
        if (kc > 0) __syncthreads();
#pragma unroll
        for (int i = 0; i < XP; ++i) {
            const int p = tid + i * SHORTK_THREADS, r = p >> 4, c = (p & 15) * 8;
            if (c >= k16) continue;
            const float4 a = xv[i][0], b = xv[i][1];
            *(uint4*)(sa + r * SHORTK_PITCH + c) =
                make_uint4(pack2<DT>(a.x, a.y), pack2<DT>(a.z, a.w), pack2<DT>(b.x, b.y), pack2<DT>(b.z, b.w));
        }
#pragma unroll
        for (int i = 0; i < SHORTK_PIECES; ++i) {
            const int p = tid + i * SHORTK_THREADS, r = p >> 4, c = (p & 15) * 8;
            if (c < k16) *(uint4*)(sb + r * SHORTK_PITCH + c) = wv[i];
        }
        __syncthreads();
        for (int kk = 0; kk < k16; kk += 16) {
            const u16* a = sa + (wr + g) * SHORTK_PITCH + kk + 2 * t;
            const u32 a0 = *(const u32*)a;
            const u32 a1 = *(const u32*)(a + 8 * SHORTK_PITCH);
            const u32 a2 = *(const u32*)(a + 8);
            const u32 a3 = *(const u32*)(a + 8 * SHORTK_PITCH + 8);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const u16* b = sb + (wc + 8 * j + g) * SHORTK_PITCH + kk + 2 * t;
                mma_16816<DT>(acc[j], a0, a1, a2, a3, *(const u32*)b, *(const u32*)(b + 8));
            }
        }
    }
    // The tile leaves through shared memory, so that it is stored as whole
    // rows of 16-byte pieces (fragment-order stores would write every
    // 32-byte sector in two halves). Tile j holds rows g and g + 8 of the
    // warp's 16, columns 8 j + 2 t and 8 j + 2 t + 1 of its NJ · 8.
    __syncthreads();
    float* so = (float*)smem;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            *(float2*)(so + (wr + g + 8 * h) * SHORTK_OUT_PITCH + wc + 8 * j + 2 * t) = make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
    __syncthreads();
    const bool vec = (os & 3) == 0 && ((u64)out & 15) == 0;
#pragma unroll
    for (int i = 0; i < BM * SHORTK_TILE / 4 / SHORTK_THREADS; ++i) {
        const int p = tid + i * SHORTK_THREADS, r = p >> 4, c = (p & 15) * 4;
        const int row = row0 + r, col = col0 + c;
        if (row >= m || col >= n) continue;
        float4 v = *(const float4*)(so + r * SHORTK_OUT_PITCH + c);
        float* o = out + (u64)row * os + col;
        if (vec && col + 3 < n) {
            if (bias) {
                const float4 b = *(const float4*)(bias + col);
                v.x += b.x, v.y += b.y, v.z += b.z, v.w += b.w;
            }
            if (accumulate) {
                const float4 a = *(const float4*)o;
                v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
            }
            *(float4*)o = v;
        } else {
            const float e[4] = {v.x, v.y, v.z, v.w};
            for (int q = 0; q < 4 && col + q < n; ++q) {
                const float b = bias ? bias[col + q] : 0.0f;
                o[q] = accumulate ? o[q] + e[q] + b : e[q] + b;
            }
        }
    }
}

#define SHORTK_ARGS                                                                                          \
    const float *x, int xs, int m, const u16 *w, int n, int k, const float *bias, float *out, int os, \
        int accumulate
#define SHORTK_PASS x, xs, m, w, n, k, bias, out, os, accumulate
extern "C" __global__ void __launch_bounds__(SHORTK_THREADS) shortk_bf16(SHORTK_ARGS) { shortk_impl<1, 64>(SHORTK_PASS); }
extern "C" __global__ void __launch_bounds__(SHORTK_THREADS) shortk_f16(SHORTK_ARGS) { shortk_impl<2, 64>(SHORTK_PASS); }
