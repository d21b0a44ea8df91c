// Small-batch matrix product for decode: out[m, n] = sum_k x[m, k] * w[n, k]
// (+ bias[n]), x f32 `[M, K]` (row stride xs), w `[N, K]` in its stored
// dtype, fp32 accumulation. Memory-bound: every weight is read once per
// launch and used for up to MT rows of x (blockIdx.y tiles M by MT; larger
// M re-reads the weights once per tile, from L2 when they fit).

// Vector path (K % 8 == 0, x rows 16-byte aligned). One block per R output
// columns and MT rows of x; its threads split K between them: thread t
// reads chunks k = 8 t, 8 (t + T), ... of each of the R weight rows, U
// chunks per column in flight before any is used, so every lane has U * R
// independent 16-byte loads outstanding and a launch has many short blocks
// (no long serial loop per warp, no tail of a few slow warps). Partial sums
// are reduced per warp with shuffles, then across warps in shared memory.
//
// With NORM, x is a residual stream and the product is taken with its RMS
// norm: out = s_m * sum_k w[n, k] * (nw[k] * x[m, k]) with
// s_m = 1 / sqrt(mean_k x[m, k]^2 + eps). Every block reads all of K, so
// each one computes the sums of squares it needs itself and no normalised
// copy of x is written.
//
// `accumulate` adds the result to `out` instead of overwriting it (the
// residual add after out_proj).
//
// With `cw` set (decode, one token per row m = sequence m), the output
// columns conv_start .. conv_start + conv_len are the conv's input: the
// thread that finishes such a column runs the conv step for that channel
// (window from the slot's conv state, taps cw `[conv_len, ck]`, bias cb,
// activation act), writes the result to cout and advances the window, in
// place of writing the column to `out`.
struct ConvEpilogue {
    const float* w;
    const float* b;
    int k, act;
    float* state;
    u64 slot_stride, layer_off;
    const u32* slots;
    int start, len;
    float* out;
    int os;
};

#ifndef CONV_PREFETCH
#define CONV_PREFETCH 1
#endif
// Conv operands staged in shared memory (`conv_stage`): the taps at 0, the
// window at CONV_STAGED_K, the bias at 2 * CONV_STAGED_K - 1 (kernels of
// up to CONV_STAGED_K taps).
#define CONV_STAGED_K 4
#define CONV_STAGED_FLOATS (2 * CONV_STAGED_K)

// Channel c's conv window of row `row` in the slot pool (null for a
// padding row).
__device__ __forceinline__ float* conv_window(const ConvEpilogue& cv, int row, int c) {
    const u32 slot = cv.slots[row];
    return slot == PAD_SLOT ? 0 : cv.state + (u64)slot * cv.slot_stride + cv.layer_off + (u64)c * (cv.k - 1);
}

// Starts copying channel c's conv operands for row `row` into `pre`
// (CONV_STAGED_FLOATS floats of shared memory; cv.k <= CONV_STAGED_K) by
// asynchronous copies, one group. Safe before the dependent-launch wait:
// the taps and bias are weights, and the window is written only by this
// layer's conv, a token earlier.
__device__ __forceinline__ void conv_stage(const ConvEpilogue& cv, int row, int c, float* pre) {
    const float* st = conv_window(cv, row, c);
    for (int j = 0; j < cv.k; ++j) cp_async4(pre + j, cv.w + (u64)c * cv.k + j, true);
    for (int j = 0; j + 1 < cv.k; ++j) cp_async4(pre + CONV_STAGED_K + j, st ? st + j : cv.w, st != 0);
    cp_async4(pre + CONV_STAGED_FLOATS - 1, cv.b ? cv.b + c : cv.w, cv.b != 0);
    cp_async_commit();
}

// Runs channel c's conv step on its new input v; returns the output it
// wrote. `pre` holds the operands `conv_stage` copied, or is null (then
// they are read from global memory).
__device__ __forceinline__ float conv_step_one(const ConvEpilogue& cv, int row, int c, float v, const float* pre) {
    const int hist = cv.k - 1;
    float* st = conv_window(cv, row, c);
    const float* w = pre ? pre : cv.w + (u64)c * cv.k;
    const float* win = pre ? pre + CONV_STAGED_K : st;
    if (pre) cp_async_wait<0>();
    float acc = pre ? pre[CONV_STAGED_FLOATS - 1] : cv.b ? cv.b[c] : 0.0f;
    for (int j = 0; j < hist; ++j) acc += w[j] * (win ? win[j] : 0.0f);
    acc += w[hist] * v;
    if (st) {
        for (int j = 0; j + 1 < hist; ++j) st[j] = win[j + 1];
        if (hist > 0) st[hist - 1] = v;
    }
    const float y = activate(cv.act, acc);
    cv.out[(u64)row * cv.os + c] = y;
    return y;
}

// x_proj fused into the conv epilogue of the streaming kernel (decode, one
// sequence: Mamba-1's in_proj, whose conv outputs are x_proj's input): each
// conv output y[c] also adds y[c] * w[j, c] to acc[j] for every j < n.
// `wg` holds x_proj's weights (in the product's dtype) grouped the way the
// kernel's warps take the conv's channels, R at a time: w[j, c] at
// ((c / R) * n + j) * R + c % R, so lane j's R weights of a group are one
// load, and a warp's are contiguous. A warp loads its group's weights into
// registers when it starts the group (they do not depend on the previous
// kernel) and adds its terms into its own row of shared memory when the
// group ends; the block adds its rows' sums to acc with one 16-byte atomic
// per four (n % 4 == 0, acc 16-byte aligned) at its end. So acc must hold
// zeros when the kernel starts: the caller keeps one accumulator a layer,
// and block 0 zeroes `clear` (n floats: the previous layer's, which the
// step that read it is done with) after its dependent-launch wait. The
// conv's columns must start and end on group boundaries (start and len
// multiples of R).
struct XProjEpilogue {
    const void* wg;
    float* acc;
    float* clear;
    int n;
};
// Outputs a lane holds weights for: n <= 32 * XPROJ_J (Falcon-Mamba-7b's
// 288 the widest).
#define XPROJ_J 9
#define XPROJ_MAX (32 * XPROJ_J)
// One 8-column chunk of K for R weight rows: acc[r][m] += w[r] . x[m] over
// the chunk at column k, with the norm prologue (x scaled by nw, its
// squares summed into ss) when NORM. Shared by both vector kernels.
template <int DT, int MT, int R, bool NORM>
__device__ __forceinline__ void gemv_accumulate(const Chunk<DT> (&c)[R], const float* xb, int xs, int mc, int k,
                                                const float* nw, float (&acc)[R][MT], float (&ss)[MT]) {
    float wv[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) widen8<DT>(c[r], wv[r]);
    float4 g0 = make_float4(1.0f, 1.0f, 1.0f, 1.0f), g1 = g0;
    if (NORM) {
        g0 = *(const float4*)(nw + k);
        g1 = *(const float4*)(nw + k + 4);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < mc) {
            const float4* xp = (const float4*)(xb + (u64)m * xs + k);
            float4 p = xp[0], q = xp[1];
            if (NORM) {
                ss[m] += p.x * p.x + p.y * p.y + p.z * p.z + p.w * p.w + q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
                p.x *= g0.x; p.y *= g0.y; p.z *= g0.z; p.w *= g0.w;
                q.x *= g1.x; q.y *= g1.y; q.z *= g1.z; q.w *= g1.w;
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
                acc[r][m] += wv[r][0] * p.x + wv[r][1] * p.y + wv[r][2] * p.z + wv[r][3] * p.w + wv[r][4] * q.x +
                             wv[r][5] * q.y + wv[r][6] * q.z + wv[r][7] * q.w;
        }
    }
}

// Zeroes the product sums and the norm's sums of squares.
template <int MT, int R>
__device__ __forceinline__ void gemv_zero(float (&acc)[R][MT], float (&ss)[MT]) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        ss[m] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = 0.0f;
    }
}

// The finished sum v of output (row, n): plus the bias, then the conv step
// when n is a conv column (its operands staged in `pre`, when not null),
// else stored or added to `out`.
// Returns the conv's output for a conv column, else 0.
__device__ __forceinline__ float gemv_finish(float v, const float* bias, float* out, int os, int accumulate,
                                             const ConvEpilogue& conv, int row, int n, const float* pre) {
    if (bias) v += bias[n];
    if (conv.w && n >= conv.start && n < conv.start + conv.len) return conv_step_one(conv, row, n - conv.start, v, pre);
    float* o = out + (u64)row * os + n;
    *o = accumulate ? *o + v : v;
    return 0.0f;
}

// A lane's x_proj weights for one group: for output j = lane + 32 i, the
// R weights of the group's channels, as raw words.
template <int DT, int R>
struct XProjRegs {
    static constexpr int WORDS = DT == 0 ? R : (R + 1) / 2;
    u32 w[XPROJ_J][WORDS];
};

// Loads the weights of the group whose first column is n0 (nothing when it
// has no conv columns).
template <int DT, int R>
__device__ __forceinline__ void xproj_load(XProjRegs<DT, R>& reg, const XProjEpilogue& xp, const ConvEpilogue& conv,
                                           int n0, int lane) {
    const int c0 = n0 - conv.start;
    if (c0 < 0 || c0 >= conv.len) return;
    const u64 base = (u64)(c0 / R) * xp.n * R;
#pragma unroll
    for (int i = 0; i < XPROJ_J; ++i) {
        const int j = lane + 32 * i;
        if (j >= xp.n) break;
        const u64 e = base + (u64)j * R;
        if (DT == 0) {
            const u32* p = (const u32*)xp.wg + e;
            if (R == 4) {
                const uint4 v = *(const uint4*)p;
                reg.w[i][0] = v.x; reg.w[i][R > 1 ? 1 : 0] = v.y; reg.w[i][R > 2 ? 2 : 0] = v.z; reg.w[i][R > 3 ? 3 : 0] = v.w;
            } else if (R == 2) {
                const uint2 v = *(const uint2*)p;
                reg.w[i][0] = v.x; reg.w[i][R > 1 ? 1 : 0] = v.y;
            } else {
                reg.w[i][0] = *p;
            }
        } else {
            const u16* p = (const u16*)xp.wg + e;
            if (R == 4) {
                const uint2 v = *(const uint2*)p;
                reg.w[i][0] = v.x; reg.w[i][R > 2 ? 1 : 0] = v.y;
            } else if (R == 2) {
                reg.w[i][0] = *(const u32*)p;
            } else {
                reg.w[i][0] = *p;
            }
        }
    }
}

// The group's x_proj terms (XProjEpilogue), added to the warp's row xsum
// of shared memory: lane r < R holds the conv output y of column n0 + r.
// Sets *any when the group has conv columns.
template <int DT, int R>
__device__ __forceinline__ void xproj_terms(const XProjRegs<DT, R>& reg, const XProjEpilogue& xp, const ConvEpilogue& conv,
                                            int n0, int lane, float y, float* xsum, int* any) {
    const int c0 = n0 - conv.start;
    if (c0 < 0 || c0 >= conv.len) return;
    if (lane == 0) *any = 1;
    float yv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) yv[r] = __shfl_sync(FULL_MASK, y, r);
#pragma unroll
    for (int i = 0; i < XPROJ_J; ++i) {
        const int j = lane + 32 * i;
        if (j >= xp.n) break;
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float wv;
            if (DT == 0) {
                wv = __uint_as_float(reg.w[i][r]);
            } else {
                const u16 h = (u16)(reg.w[i][r / 2] >> (16 * (r % 2)));
                wv = DT == 1 ? bf16_to_f32(h) : f16_to_f32(h);
            }
            s += yv[r] * wv;
        }
        xsum[j] += s;
    }
}

// acc[0..4) += v[0..4) as one 16-byte atomic (sm_90+; four before).
__device__ __forceinline__ void red_add_v4(float* acc, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(acc), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
                 : "memory");
#else
    for (int i = 0; i < 4; ++i) atomicAdd(acc + i, v[i]);
#endif
}

#define GEMV_MAX_WARPS 8
// Warps a block of the streaming kernel (its launch bound, 128 threads).
#define GEMV_STREAM_WARPS 4
#define GEMV_U 2

#ifndef EARLY_VEC
#define EARLY_VEC 1
#endif
// One round of the block-split kernel's loads: chunk k0 + u * step of each
// of the R weight rows from n0 (zeros past N or K).
template <int DT, int R>
__device__ __forceinline__ void gemv_vec_load(Chunk<DT> (&c)[GEMV_U][R], const void* __restrict__ w, int N, int K, int n0,
                                              int k0, int step) {
#pragma unroll
    for (int u = 0; u < GEMV_U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int k = k0 + u * step;
            if (k < K && n0 + r < N) c[u][r] = load_chunk<DT>(w, (u64)(n0 + r) * K + k);
            else c[u][r].a = c[u][r].b = make_uint4(0, 0, 0, 0);
        }
}

template <int DT, int MT, int R, bool NORM>
__device__ void gemv_vec_impl(const float* x, int xs, int M, const void* __restrict__ w, int N, int K,
                              const float* __restrict__ bias, float* __restrict__ out, int os, int accumulate,
                              const float* __restrict__ nw, float eps, const ConvEpilogue& conv) {
    TL_SCOPE(NORM ? TL_GEMV_NORM : TL_GEMV);
    constexpr int NV = R * MT + (NORM ? MT : 0);
    __shared__ float red[GEMV_MAX_WARPS][NV];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int n0 = blockIdx.x * R;
    const int m0 = blockIdx.y * MT;
    const int mc = min(MT, M - m0);
    const float* xb = x + (u64)m0 * xs;
    float acc[R][MT], ss[MT];
    gemv_zero<MT, R>(acc, ss);
    const int step = blockDim.x * 8;
    int k0 = tid * 8;
    Chunk<DT> c[GEMV_U][R];
    // The first round's weights (often all of them) are on their way while
    // the previous kernel ends.
    if (EARLY_VEC) gemv_vec_load<DT, R>(c, w, N, K, n0, k0, step);
    grid_dep_sync();
    TL_WAITED(NORM ? TL_GEMV_NORM : TL_GEMV);
    if (!EARLY_VEC) gemv_vec_load<DT, R>(c, w, N, K, n0, k0, step);
    while (k0 < K) {
#pragma unroll
        for (int u = 0; u < GEMV_U; ++u) {
            const int k = k0 + u * step;
            if (k >= K) continue;
            gemv_accumulate<DT, MT, R, NORM>(c[u], xb, xs, mc, k, nw, acc, ss);
        }
        k0 += step * GEMV_U;
        if (k0 < K) gemv_vec_load<DT, R>(c, w, N, K, n0, k0, step);
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (lane == 0) red[warp][r * MT + m] = v;
        }
    if (NORM) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(ss[m]);
            if (lane == 0) red[warp][R * MT + m] = v;
        }
    }
    __syncthreads();
    if (tid < R * MT) {
        const int r = tid / MT, m = tid % MT, n = n0 + r;
        if (m < mc && n < N) {
            float v = 0.0f;
            for (int i = 0; i < nwarps; ++i) v += red[i][tid];
            if (NORM) {
                float s2 = 0.0f;
                for (int i = 0; i < nwarps; ++i) s2 += red[i][R * MT + m];
                v *= (float)(1.0 / sqrt((double)s2 / K + (double)eps));
            }
            gemv_finish(v, bias, out, os, accumulate, conv, m0 + m, n, 0);
        }
    }
}

// Streaming vector path for products with many output columns (in_proj,
// out_proj, the LM head). The block-split kernel above runs each block as
// one round of loads, a wait and a reduction, so the memory system sees
// bursts and gaps. Here each warp owns groups of R columns (groups
// g = warp, warp + all warps, ...) and walks its (group, K batch) items in
// order with a two-deep pipeline: the loads of the next item are issued
// before the current one is used, so every lane always has 2 * U * R
// 16-byte loads in flight, across group boundaries too. A group's sums are
// reduced within the warp when its last batch is done. Same modes as the
// block-split kernel (norm prologue, accumulate, conv epilogue).
template <int DT, int U, int R>
__device__ __forceinline__ void stream_load(Chunk<DT> (&c)[U][R], const void* __restrict__ w, int N, int K, int n0,
                                            int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int k = k0 + u * 256;
            if (k < K && n0 + r < N) c[u][r] = load_chunk<DT>(w, (u64)(n0 + r) * K + k);
            else c[u][r].a = c[u][r].b = make_uint4(0, 0, 0, 0);
        }
}

// One warp's walk over its column groups (gemv_stream_impl).
template <int DT, int MT, int R, bool NORM, bool XP>
__device__ __forceinline__ void gemv_stream_walk(const float* x, int xs, int M, const void* __restrict__ w, int N, int K,
                                                 const float* __restrict__ bias, float* __restrict__ out, int os,
                                                 int accumulate, const float* __restrict__ nw, float eps,
                                                 const ConvEpilogue& conv, const XProjEpilogue& xp, float* xsum,
                                                 int* xany, float* cpre, int g, int warps, int groups) {
    constexpr int U = R >= 4 ? 1 : 4 / R;
    const int lane = threadIdx.x & 31;
    const int m0 = blockIdx.y * MT;
    const int mc = min(MT, M - m0);
    const float* xb = x + (u64)m0 * xs;
    const int batches = (K + 256 * U - 1) / (256 * U);
    Chunk<DT> cur[U][R], nxt[U][R];
    int kb = 0;
    stream_load<DT, U, R>(cur, w, N, K, g * R, lane * 8);
    XProjRegs<DT, R> xw;
    if (XP) xproj_load<DT, R>(xw, xp, conv, g * R, lane);
    // With x_proj folded in (one row), lane r < R stages column g * R + r's
    // conv operands, so that the group's end reads none from memory.
    const bool staged = XP && CONV_PREFETCH && conv.k <= CONV_STAGED_K;
    float* pre = cpre + lane * CONV_STAGED_FLOATS;
    if (staged && lane < R && g * R + lane - conv.start >= 0 && g * R + lane - conv.start < conv.len)
        conv_stage(conv, m0, g * R + lane - conv.start, pre);
    // The first weights are on their way while the previous kernel ends.
    grid_dep_sync();
    TL_WAITED(NORM ? TL_STREAM_NORM : TL_STREAM);
    float acc[R][MT], ss[MT];
    gemv_zero<MT, R>(acc, ss);
    while (true) {
        int g2 = g, kb2 = kb + 1;
        if (kb2 == batches) {
            kb2 = 0;
            g2 = g + warps;
        }
        const bool more = g2 < groups;
        if (more) stream_load<DT, U, R>(nxt, w, N, K, g2 * R, kb2 * 256 * U + lane * 8);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = kb * 256 * U + u * 256 + lane * 8;
            if (k >= K) continue;
            gemv_accumulate<DT, MT, R, NORM>(cur[u], xb, xs, mc, k, nw, acc, ss);
        }
        if (kb == batches - 1) {
            // Lane r * MT + m ends with column g * R + r of row m0 + m.
            float mine = 0.0f, scale = 1.0f;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const float v = warp_sum(acc[r][m]);
                    if (lane == r * MT + m) mine = v;
                    acc[r][m] = 0.0f;
                }
            if (NORM) {
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const float v = warp_sum(ss[m]);
                    if (lane % MT == m) scale = (float)(1.0 / sqrt((double)v / K + (double)eps));
                    ss[m] = 0.0f;
                }
            }
            float y = 0.0f;
            if (lane < R * MT) {
                const int r = lane / MT, m = lane % MT, n = g * R + r;
                if (m < mc && n < N) {
                    float v = NORM ? mine * scale : mine;
                    y = gemv_finish(v, bias, out, os, accumulate, conv, m0 + m, n, staged ? pre : 0);
                }
            }
            if (XP) {
                xproj_terms<DT, R>(xw, xp, conv, g * R, lane, y, xsum, xany);
                if (more) xproj_load<DT, R>(xw, xp, conv, g2 * R, lane);
                // The staged operands were used (y depends on them) before
                // the next group's overwrite them.
                if (staged && more && lane < R && g2 * R + lane - conv.start >= 0 && g2 * R + lane - conv.start < conv.len)
                    conv_stage(conv, m0, g2 * R + lane - conv.start, pre);
            }
        }
        if (!more) break;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) cur[u][r] = nxt[u][r];
        g = g2;
        kb = kb2;
    }
}

template <int DT, int MT, int R, bool NORM, bool XP>
__device__ void gemv_stream_impl(const float* x, int xs, int M, const void* __restrict__ w, int N,
                                 int K, const float* __restrict__ bias, float* __restrict__ out, int os,
                                 int accumulate, const float* __restrict__ nw, float eps, const ConvEpilogue& conv,
                                 const XProjEpilogue& xp) {
    TL_SCOPE(NORM ? TL_STREAM_NORM : TL_STREAM);
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * (blockDim.x >> 5);
    int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int groups = (N + R - 1) / R;
    // The block's x_proj sums, and whether it had conv columns (XP: one
    // sequence, MT = 1).
    __shared__ __align__(16) float xsum[XP ? GEMV_STREAM_WARPS : 1][XP ? XPROJ_MAX : 4];
    __shared__ int xany;
    // Each warp's staged conv operands (XP: R lanes a warp).
    __shared__ float cpre[XP ? GEMV_STREAM_WARPS : 1][XP ? R * CONV_STAGED_FLOATS : 1];
    const int warp = threadIdx.x >> 5;
    if (XP) {
        for (int j = lane; j < xp.n; j += 32) xsum[warp][j] = 0.0f;
        if (threadIdx.x == 0) xany = 0;
        __syncthreads();
    }
    if (g < groups) gemv_stream_walk<DT, MT, R, NORM, XP>(x, xs, M, w, N, K, bias, out, os, accumulate, nw, eps, conv, xp,
                                                          xsum[warp], &xany, cpre[warp], g, warps, groups);
    if (XP) {
        if (g >= groups) grid_dep_sync();
        if (blockIdx.x == 0)
            for (int j = threadIdx.x; j < xp.n; j += blockDim.x) xp.clear[j] = 0.0f;
        __syncthreads();
        if (xany)
            for (int j = threadIdx.x * 4; j < xp.n; j += blockDim.x * 4) {
                float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int i = 0; i < GEMV_STREAM_WARPS; ++i)
#pragma unroll
                    for (int q = 0; q < 4; ++q) v[q] += xsum[i][j + q];
                red_add_v4(xp.acc + j, v);
            }
    }
}

// Scalar path (any K and alignment): one warp per output column, MT rows.
template <int DT, int MT>
__device__ void gemv_scalar_impl(const float* x, int xs, int M, const void* __restrict__ w, int N, int K,
                                 const float* __restrict__ bias, float* __restrict__ out, int os, int accumulate) {
    grid_dep_sync();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + warp;
    if (n >= N) return;
    const int m0 = blockIdx.y * MT;
    const int mc = min(MT, M - m0);
    const float* xb = x + (u64)m0 * xs;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    for (int k = lane; k < K; k += 32) {
        const float wv = load_weight<DT>(w, (u64)n * K + k);
#pragma unroll
        for (int m = 0; m < MT; ++m)
            if (m < mc) acc[m] += wv * xb[(u64)m * xs + k];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < mc) {
            float v = warp_sum(acc[m]);
            if (lane == 0) {
                if (bias) v += bias[n];
                float* o = out + (u64)(m0 + m) * os + n;
                *o = accumulate ? *o + v : v;
            }
        }
    }
}

#define GEMV_ARGS                                                                                                 \
    const float *x, int xs, int M, const void *w, int N, int K, const float *bias, float *out, int os, int accumulate, \
        const float *nw, float eps, ConvEpilogue conv
#define GEMV_PASS x, xs, M, w, N, K, bias, out, os, accumulate
#define GEMV_VEC(name, dt, mt, r)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) gemv_##name##_m##mt##_r##r(GEMV_ARGS) {                    \
        gemv_vec_impl<dt, mt, r, false>(GEMV_PASS, nw, eps, conv);                                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemv_norm_##name##_m##mt##_r##r(GEMV_ARGS) {               \
        gemv_vec_impl<dt, mt, r, true>(GEMV_PASS, nw, eps, conv);                                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) gemv_stream_##name##_m##mt##_r##r(GEMV_ARGS) {             \
        gemv_stream_impl<dt, mt, r, false, false>(GEMV_PASS, nw, eps, conv, XProjEpilogue{});                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) gemv_stream_norm_##name##_m##mt##_r##r(GEMV_ARGS) {        \
        gemv_stream_impl<dt, mt, r, true, false>(GEMV_PASS, nw, eps, conv, XProjEpilogue{});                      \
    }
// in_proj of one sequence with the norm prologue, the conv epilogue and
// x_proj fused in (XProjEpilogue).
#define GEMV_XPROJ(name, dt, r)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) gemv_stream_norm_xproj_##name##_r##r(GEMV_ARGS,            \
                                                                                          XProjEpilogue xp) {    \
        gemv_stream_impl<dt, 1, r, true, true>(GEMV_PASS, nw, eps, conv, xp);                                     \
    }
#define GEMV_FAMILY(name, dt)                                                                                     \
    GEMV_VEC(name, dt, 1, 1) GEMV_VEC(name, dt, 1, 2) GEMV_VEC(name, dt, 1, 4)                                    \
    GEMV_VEC(name, dt, 2, 1) GEMV_VEC(name, dt, 2, 2) GEMV_VEC(name, dt, 2, 4)                                    \
    GEMV_VEC(name, dt, 4, 1) GEMV_VEC(name, dt, 4, 2) GEMV_VEC(name, dt, 4, 4)                                    \
    GEMV_VEC(name, dt, 8, 1) GEMV_VEC(name, dt, 8, 2)                                                             \
    extern "C" __global__ void gemv_##name##_scalar(GEMV_ARGS) { gemv_scalar_impl<dt, 8>(GEMV_PASS); }            \
    GEMV_XPROJ(name, dt, 1) GEMV_XPROJ(name, dt, 2) GEMV_XPROJ(name, dt, 4)

GEMV_FAMILY(f32, 0)
GEMV_FAMILY(bf16, 1)
GEMV_FAMILY(f16, 2)
