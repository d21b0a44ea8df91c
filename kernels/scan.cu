// Selective state-space scans over packed batches, reading and writing each
// sequence's SSM state in the pool in place.
//
// State of (slot, layer): `[channels, d_state]` f32 at
// state + slot * slot_stride + layer_off, where a "channel" is a Mamba-1
// inner channel or a Mamba-2 (head, head_dim row) pair. A slot equal to
// PAD_SLOT marks a padding row: zeros are read and nothing is written.
//
// Layout of the packed scan: a group of LANES consecutive threads owns one
// channel of one sequence; lane l holds states l, l + LANES, ... (at most 4
// per lane). Per-token scalars (x, dt) are loaded LANES tokens at a time, one
// per lane, and passed round with shuffles, so each lane computes the
// softplus of one token instead of every lane computing all of them.

template <int LANES, bool M2>
__device__ void ssm_scan_impl(const float* __restrict__ x, int xs, const float* __restrict__ dt, int dts,
                              const float* __restrict__ dt_bias, const float* __restrict__ a,
                              const float* __restrict__ B, int bs, const float* __restrict__ C, int cs,
                              const float* __restrict__ skip, const float* __restrict__ z, int zs,
                              float* __restrict__ state, u64 slot_stride, u64 layer_off, const u32* __restrict__ cu,
                              const u32* __restrict__ slots, const u32* __restrict__ prompt, int channels,
                              int d_state, int head_dim, int heads_per_group, float dt_lo, float dt_hi,
                              float* __restrict__ out, int os) {
    const int lane = threadIdx.x % LANES;
    const int cpb = blockDim.x / LANES;
    const int c = blockIdx.x * cpb + threadIdx.x / LANES;
    const bool active = c < channels;
    const int cc = active ? c : channels - 1;
    const int s = blockIdx.y;
    const u32 start = cu[s], end = cu[s + 1];
    const u32 slot = slots[s];
    const bool clamp = M2 && prompt[s] != 0;
    const int head = M2 ? cc / head_dim : cc;
    const int goff = M2 ? (head / heads_per_group) * d_state : 0;
    const float bias = dt_bias[head];
    const float dskip = skip[head];
    float* st = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state;

    float h[4], av[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = lane + j * LANES;
        const bool valid = n < d_state;
        h[j] = (valid && st) ? st[n] : 0.0f;
        av[j] = M2 ? a[head] : (valid ? a[(u64)cc * d_state + n] : 0.0f);
    }
    for (u32 t0 = start; t0 < end; t0 += LANES) {
        const u32 tl = t0 + lane;
        const bool have = tl < end;
        const float xr = have ? x[(u64)tl * xs + cc] : 0.0f;
        float sp = softplus_f((have ? dt[(u64)tl * dts + head] : 0.0f) + bias);
        if (clamp) sp = fminf(fmaxf(sp, dt_lo), dt_hi);
        float ymine = 0.0f;
        const int nt = (int)min((u32)LANES, end - t0);
        for (int i = 0; i < nt; ++i) {
            const float xv = __shfl_sync(FULL_MASK, xr, i, LANES);
            const float dv = __shfl_sync(FULL_MASK, sp, i, LANES);
            const u64 row = t0 + i;
            const float da_head = M2 ? expf(dv * av[0]) : 0.0f;
            float yp = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int n = lane + j * LANES;
                if (n < d_state) {
                    const float bv = B[row * bs + goff + n];
                    const float cv = C[row * cs + goff + n];
                    const float da = M2 ? da_head : expf(dv * av[j]);
                    h[j] = da * h[j] + (dv * bv) * xv;
                    yp += h[j] * cv;
                }
            }
#pragma unroll
            for (int o = LANES / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o, LANES);
            if (lane == i) ymine = yp;
        }
        if (have && active) {
            const float y = M2 ? ymine + dskip * xr : (ymine + xr * dskip) * silu_f(z[(u64)tl * zs + cc]);
            out[(u64)tl * os + cc] = y;
        }
    }
    if (st && active) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = lane + j * LANES;
            if (n < d_state) st[n] = h[j];
        }
    }
}

#define SCAN_ARGS                                                                                                   \
    const float *x, int xs, const float *dt, int dts, const float *dt_bias, const float *a, const float *B, int bs, \
        const float *C, int cs, const float *skip, const float *z, int zs, float *state, u64 slot_stride,          \
        u64 layer_off, const u32 *cu, const u32 *slots, const u32 *prompt, int channels, int d_state, int head_dim, \
        int heads_per_group, float dt_lo, float dt_hi, float *out, int os
#define SCAN_PASS                                                                                                   \
    x, xs, dt, dts, dt_bias, a, B, bs, C, cs, skip, z, zs, state, slot_stride, layer_off, cu, slots, prompt,       \
        channels, d_state, head_dim, heads_per_group, dt_lo, dt_hi, out, os

extern "C" __global__ void mamba1_scan_l4(SCAN_ARGS) { ssm_scan_impl<4, false>(SCAN_PASS); }
extern "C" __global__ void mamba1_scan_l8(SCAN_ARGS) { ssm_scan_impl<8, false>(SCAN_PASS); }
extern "C" __global__ void mamba1_scan_l16(SCAN_ARGS) { ssm_scan_impl<16, false>(SCAN_PASS); }
extern "C" __global__ void mamba1_scan_l32(SCAN_ARGS) { ssm_scan_impl<32, false>(SCAN_PASS); }
extern "C" __global__ void mamba2_scan_l4(SCAN_ARGS) { ssm_scan_impl<4, true>(SCAN_PASS); }
extern "C" __global__ void mamba2_scan_l8(SCAN_ARGS) { ssm_scan_impl<8, true>(SCAN_PASS); }
extern "C" __global__ void mamba2_scan_l16(SCAN_ARGS) { ssm_scan_impl<16, true>(SCAN_PASS); }
extern "C" __global__ void mamba2_scan_l32(SCAN_ARGS) { ssm_scan_impl<32, true>(SCAN_PASS); }

__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#define LOG2E 1.4426950408889634f

// Mamba-1 prefill for d_state <= L: one state per lane. Each chunk of L
// tokens first loads everything it needs into registers (lane i: token
// t0 + i's x, dt and z; lane n: state n's B and C for all L tokens), so the
// recurrence itself touches no memory; the L per-token sums over the states
// are then reduced with a butterfly that leaves token i's sum in lane i
// (L - 1 shuffles per chunk instead of log2(L) per token). exp(dt * a) is
// one ex2.approx of dt * (a * log2 e).
//
// Long segments are split in time (blockIdx.z = part of `part_len` tokens)
// so that one sequence fills the GPU: a `summary` pass runs each part but
// the last from a zero state and stores its end state and the sum of its
// time steps (the part's decay is exp(a * sum dt)); the output pass then
// starts part p from the slot's state carried through parts 0..p-1, and the
// last part writes the state back. With part_len 0 there is one part.
template <int L>
__device__ void mamba1_scan_fast_impl(const float* __restrict__ x, int xs, const float* __restrict__ dt, int dts,
                                      const float* __restrict__ dt_bias, const float* __restrict__ a,
                                      const float* __restrict__ B, int bs, const float* __restrict__ C, int cs,
                                      const float* __restrict__ skip, const float* __restrict__ z, int zs,
                                      float* __restrict__ state, u64 slot_stride, u64 layer_off,
                                      const u32* __restrict__ cu, const u32* __restrict__ slots, int channels,
                                      int d_state, float* __restrict__ out, int os, int part_len,
                                      float* __restrict__ parts, int summary) {
    const int lane = threadIdx.x % L;
    const int cpb = blockDim.x / L;
    const int c = blockIdx.x * cpb + threadIdx.x / L;
    const bool active = c < channels;
    const int cc = active ? c : channels - 1;
    const int s = blockIdx.y;
    const int p = blockIdx.z;
    const u32 start = cu[s], end = cu[s + 1];
    const u32 lo = part_len ? start + (u32)p * part_len : start;
    const u32 hi = part_len ? min(lo + (u32)part_len, end) : end;
    if (lo >= hi) return;
    const bool last = hi == end;
    const u32 slot = slots[s];
    const bool valid = lane < d_state;
    float* st = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state;
    const float av2 = valid ? a[(u64)cc * d_state + lane] * LOG2E : 0.0f;
    // Summaries of (sequence s, part q, channel c): d_state end-state values
    // then the sum of the part's time steps; after the gridDim.z parts, a
    // copy of the slot's starting state (the last part overwrites the slot
    // while other parts may still start, so they read the copy).
    const int stride_c = d_state + 1;
    const u64 part_step = (u64)channels * stride_c;
    float* part_base = parts ? parts + (u64)s * (gridDim.z + 1) * part_step + (u64)cc * stride_c : 0;
    float* stash = parts ? part_base + gridDim.z * part_step : 0;
    float h = 0.0f;
    if (summary) {
        if (p == 0 && valid && active) stash[lane] = st ? st[lane] : 0.0f;
        if (last) return;
    } else {
        if (stash) h = valid ? stash[lane] : 0.0f;
        else h = (valid && st) ? st[lane] : 0.0f;
        for (int q = 0; q < p; ++q) {
            const float* sq = part_base + q * part_step;
            const float sq_h = valid ? sq[lane] : 0.0f;
            h = ex2_approx(av2 * sq[d_state]) * h + sq_h;
        }
    }
    const float bias = dt_bias[cc];
    const float dskip = skip[cc];
    float dt_sum = 0.0f;
    for (u32 t0 = lo; t0 < hi; t0 += L) {
        const u32 tl = t0 + lane;
        const bool have = tl < hi;
        const float xr = have ? x[(u64)tl * xs + cc] : 0.0f;
        const float sp = softplus_f((have ? dt[(u64)tl * dts + cc] : 0.0f) + bias);
        if (have) dt_sum += sp;
        float bv[L], cv[L];
#pragma unroll
        for (int i = 0; i < L; ++i) {
            const bool ok = valid && t0 + i < hi;
            const u64 row = t0 + i;
            bv[i] = ok ? B[row * bs + lane] : 0.0f;
            cv[i] = (ok && !summary) ? C[row * cs + lane] : 0.0f;
        }
        float yp[L];
#pragma unroll
        for (int i = 0; i < L; ++i) {
            const float xv = __shfl_sync(FULL_MASK, xr, i, L);
            const float dv = __shfl_sync(FULL_MASK, sp, i, L);
            const float hn = ex2_approx(dv * av2) * h + (dv * bv[i]) * xv;
            h = t0 + i < hi ? hn : h;
            yp[i] = h * cv[i];
        }
        if (summary) continue;
        const float zr = have ? z[(u64)tl * zs + cc] : 0.0f;
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) {
            const bool up = (lane & o) != 0;
#pragma unroll
            for (int j = 0; j < o; ++j) {
                const float send = up ? yp[j] : yp[j + o];
                const float keep = up ? yp[j + o] : yp[j];
                yp[j] = keep + __shfl_xor_sync(FULL_MASK, send, o, L);
            }
        }
        if (have && active) out[(u64)tl * os + cc] = (yp[0] + xr * dskip) * silu_f(zr);
    }
    if (summary) {
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) dt_sum += __shfl_xor_sync(FULL_MASK, dt_sum, o, L);
        if (active) {
            float* sp_out = part_base + p * part_step;
            if (valid) sp_out[lane] = h;
            if (lane == 0) sp_out[d_state] = dt_sum;
        }
        return;
    }
    if (last && st && valid && active) st[lane] = h;
}

#define FAST_ARGS                                                                                                  \
    const float *x, int xs, const float *dt, int dts, const float *dt_bias, const float *a, const float *B, int bs, \
        const float *C, int cs, const float *skip, const float *z, int zs, float *state, u64 slot_stride,          \
        u64 layer_off, const u32 *cu, const u32 *slots, int channels, int d_state, float *out, int os,             \
        int part_len, float *parts, int summary
#define FAST_PASS                                                                                                  \
    x, xs, dt, dts, dt_bias, a, B, bs, C, cs, skip, z, zs, state, slot_stride, layer_off, cu, slots, channels,     \
        d_state, out, os, part_len, parts, summary

extern "C" __global__ void mamba1_scan_fast_l4(FAST_ARGS) { mamba1_scan_fast_impl<4>(FAST_PASS); }
extern "C" __global__ void mamba1_scan_fast_l8(FAST_ARGS) { mamba1_scan_fast_impl<8>(FAST_PASS); }
extern "C" __global__ void mamba1_scan_fast_l16(FAST_ARGS) { mamba1_scan_fast_impl<16>(FAST_PASS); }

// Mamba-1 decode: one token per sequence (row s), with the dt projection,
// softplus, D skip and SiLU(z) gate fused in, and Falcon-Mamba's weightless
// norms of dt, B and C when `norm` is set.
//
// xdbl row s is [dt_low (rank) | B (d_state) | C (d_state)]; dt_proj is
// [channels, rank] in dtype DT. When `dtpre` is given it already holds
// dt_low · dt_projᵀ (un-normalised: Falcon's norm of dt_low is one scalar
// per row, applied here), computed by a matrix product for large batches;
// otherwise each channel's dot product runs here, `vec_dot` selecting
// 16-byte loads (rank % 8 == 0, aligned rows). A group of `lanes` threads
// owns a channel and NPL consecutive states per lane (NPL = 4: 16-byte
// state accesses).
template <int DT, int NPL>
__device__ void mamba1_step_impl(const float* __restrict__ x, int xs, const float* __restrict__ xdbl, int xds,
                                 const void* __restrict__ dtw, const float* __restrict__ dtpre, int dps,
                                 const float* __restrict__ dt_bias, const float* __restrict__ a,
                                 const float* __restrict__ skip, const float* __restrict__ z, int zs,
                                 float* __restrict__ state, u64 slot_stride, u64 layer_off,
                                 const u32* __restrict__ slots, int n_seqs, int channels, int d_state, int rank,
                                 int norm, float eps, int lanes, int vec_dot, float* __restrict__ out, int os) {
    const int lane = threadIdx.x & (lanes - 1);
    const int cpb = blockDim.x / lanes;
    const int c = blockIdx.x * cpb + threadIdx.x / lanes;
    const bool active = c < channels;
    const int cc = active ? c : channels - 1;
    const int n0 = lane * NPL;
    const bool valid = n0 < d_state;
    const int s = blockIdx.y;
    if (s >= n_seqs) return;
    const u32 slot = slots[s];
    float* st = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state + n0;
    // Issue the state load first: it is the one that must come from memory.
    float hv[NPL];
    if (NPL == 4) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (st && valid) v = *(const float4*)st;
        hv[0] = v.x;
        hv[NPL > 1 ? 1 : 0] = v.y;
        hv[NPL > 2 ? 2 : 0] = v.z;
        hv[NPL > 3 ? 3 : 0] = v.w;
    } else {
        hv[0] = (st && valid) ? st[0] : 0.0f;
    }
    float av[NPL];
#pragma unroll
    for (int q = 0; q < NPL; ++q) av[q] = valid ? a[(u64)cc * d_state + n0 + q] : 0.0f;
    const float xv = x[(u64)s * xs + cc];
    const float zv = z[(u64)s * zs + cc];
    const float* row = xdbl + (u64)s * xds;

    float inv_dt = 1.0f, inv_b = 1.0f, inv_c = 1.0f;
    if (norm) {
        float sd = 0.0f, sb = 0.0f, sc = 0.0f;
        for (int r = lane; r < rank; r += lanes) sd += row[r] * row[r];
        for (int n = lane; n < d_state; n += lanes) {
            const float bv = row[rank + n], cv = row[rank + d_state + n];
            sb += bv * bv;
            sc += cv * cv;
        }
        for (int o = lanes / 2; o > 0; o >>= 1) {
            sd += __shfl_xor_sync(FULL_MASK, sd, o);
            sb += __shfl_xor_sync(FULL_MASK, sb, o);
            sc += __shfl_xor_sync(FULL_MASK, sc, o);
        }
        inv_dt = (float)(1.0 / sqrt((double)sd / rank + (double)eps));
        inv_b = (float)(1.0 / sqrt((double)sb / d_state + (double)eps));
        inv_c = (float)(1.0 / sqrt((double)sc / d_state + (double)eps));
    }
    float raw;
    if (dtpre) {
        raw = dtpre[(u64)s * dps + cc] * inv_dt;
    } else {
        const u64 wrow = (u64)cc * rank;
        float acc = 0.0f;
        if (vec_dot) {
            for (int r0 = lane * 8; r0 < rank; r0 += lanes * 8) {
                float wv[8];
                if (DT == 0) {
                    const float4* p = (const float4*)((const float*)dtw + wrow + r0);
                    const float4 w0 = p[0], w1 = p[1];
                    wv[0] = w0.x; wv[1] = w0.y; wv[2] = w0.z; wv[3] = w0.w;
                    wv[4] = w1.x; wv[5] = w1.y; wv[6] = w1.z; wv[7] = w1.w;
                } else {
                    const uint4 q = *(const uint4*)((const u16*)dtw + wrow + r0);
                    const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
                        wv[2 * j] = DT == 1 ? bf16_to_f32(lo) : f16_to_f32(lo);
                        wv[2 * j + 1] = DT == 1 ? bf16_to_f32(hi) : f16_to_f32(hi);
                    }
                }
                const float4* xp = (const float4*)(row + r0);
                const float4 p = xp[0], q = xp[1];
                acc += wv[0] * (p.x * inv_dt) + wv[1] * (p.y * inv_dt) + wv[2] * (p.z * inv_dt) +
                       wv[3] * (p.w * inv_dt) + wv[4] * (q.x * inv_dt) + wv[5] * (q.y * inv_dt) +
                       wv[6] * (q.z * inv_dt) + wv[7] * (q.w * inv_dt);
            }
        } else {
            for (int r = lane; r < rank; r += lanes) acc += load_weight<DT>(dtw, wrow + r) * (row[r] * inv_dt);
        }
        for (int o = lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, o);
        raw = acc;
    }
    const float dtv = softplus_f(raw + dt_bias[cc]);

    float yp = 0.0f;
    if (valid) {
#pragma unroll
        for (int q = 0; q < NPL; ++q) {
            const int n = n0 + q;
            const float bv = row[rank + n] * inv_b;
            const float cv = row[rank + d_state + n] * inv_c;
            const float da = expf(dtv * av[q]);
            hv[q] = da * hv[q] + (dtv * bv) * xv;
            yp += hv[q] * cv;
        }
    }
    if (st && valid && active) {
        if (NPL == 4) *(float4*)st = make_float4(hv[0], hv[NPL > 1 ? 1 : 0], hv[NPL > 2 ? 2 : 0], hv[NPL > 3 ? 3 : 0]);
        else st[0] = hv[0];
    }
    for (int o = lanes / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
    if (lane == 0 && active) out[(u64)s * os + cc] = (yp + xv * skip[cc]) * silu_f(zv);
}

#define STEP_ARGS                                                                                                  \
    const float *x, int xs, const float *xdbl, int xds, const void *dtw, const float *dtpre, int dps,              \
        const float *dt_bias, const float *a, const float *skip, const float *z, int zs, float *state,             \
        u64 slot_stride, u64 layer_off, const u32 *slots, int n_seqs, int channels, int d_state, int rank,         \
        int norm, float eps, int lanes, int vec_dot, float *out, int os
#define STEP_PASS                                                                                                  \
    x, xs, xdbl, xds, dtw, dtpre, dps, dt_bias, a, skip, z, zs, state, slot_stride, layer_off, slots, n_seqs,      \
        channels, d_state, rank, norm, eps, lanes, vec_dot, out, os

extern "C" __global__ void mamba1_step_f32_v4(STEP_ARGS) { mamba1_step_impl<0, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_bf16_v4(STEP_ARGS) { mamba1_step_impl<1, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f16_v4(STEP_ARGS) { mamba1_step_impl<2, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f32_v1(STEP_ARGS) { mamba1_step_impl<0, 1>(STEP_PASS); }
extern "C" __global__ void mamba1_step_bf16_v1(STEP_ARGS) { mamba1_step_impl<1, 1>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f16_v1(STEP_ARGS) { mamba1_step_impl<2, 1>(STEP_PASS); }
