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

// Mamba-1 prefill for d_state <= 16, on tiles of SCAN_CH channels by SCAN_T
// tokens. A block of 128 threads covers SCAN_CH = 32 consecutive channels
// of one segment; a group of 4 threads owns a channel, thread g of the group
// states 4g .. 4g + 3 (states past d_state get a = 0 and B = C = 0, so they
// stay zero and add nothing to y).
//
// For each chunk of SCAN_T tokens the block first stages in shared memory,
// with coalesced loads, what the state updates need: the chunk's B and C
// rows (the same for every channel, read back as float4 broadcasts) and,
// per (token, channel), dt = softplus(dt + bias) and dt * x, each computed
// once, by the thread that loaded it. The recurrence then runs out of shared
// memory with h in registers: per state and token a multiply and one
// ex2.approx for exp(dt a) = 2^(dt (a log2 e)), two more operations for h
// and one multiply-add for its share of y. The group's four partial
// sums of y go to shared memory, and the thread that staged (token, channel)
// adds them and writes (y + x D) silu(z), coalesced. Rows past the piece's
// end are staged as dt = dt x = B = 0, which leaves h exactly as it was, so
// the token loop needs no bounds test. The next chunk's x, dt, B and C are
// loaded into registers while the current chunk's outputs are written.
//
// Long segments are split in time so that few sequences still fill the
// GPU: the packed rows are cut into parts of `part_len` rows (blockIdx.z is
// the part) and block (s, q) runs the piece of segment s inside part q. A
// `summary` pass runs every piece but a segment's last from a zero state and
// stores its end state and the sum of its time steps (the piece's decay is
// exp(a sum dt)); such a piece is the only one to end inside its part, so
// summaries are indexed by part alone. It also copies each segment's
// starting state aside (the stash): the output pass overwrites the slot in
// the segment's last piece while its other pieces may still be starting.
// The output pass starts a piece from the stash carried through the
// segment's earlier pieces. With part_len 0 each segment is one piece.
//
// `parts`: records of SCAN_REC floats per channel, [16 states | sum dt |
// unused], part q's at q * channels * SCAN_REC, then segment s's stash at
// (gridDim.z + s) * channels * SCAN_REC. The thread roles below assume
// 128 threads and SCAN_T = SCAN_CH = 32.
#define SCAN_T 32
#define SCAN_CH 32
#define SCAN_REC 20

template <bool SUMMARY>
__device__ void mamba1_scan_tiled_impl(const float* __restrict__ x, int xs, const float* __restrict__ dt, int dts,
                                       const float* __restrict__ dt_bias, const float* __restrict__ a,
                                       const float* __restrict__ B, int bs, const float* __restrict__ C, int cs,
                                       const float* __restrict__ skip, const float* __restrict__ z, int zs,
                                       float* __restrict__ state, u64 slot_stride, u64 layer_off,
                                       const u32* __restrict__ cu, const u32* __restrict__ slots, int channels,
                                       int d_state, float* __restrict__ out, int os, int part_len,
                                       float* __restrict__ parts) {
    __shared__ float4 s_b[SCAN_T][4];
    __shared__ float4 s_c[SCAN_T][4];
    __shared__ float2 s_d[SCAN_T][SCAN_CH];
    __shared__ float4 s_y[SCAN_T][SCAN_CH];

    const int tid = threadIdx.x;
    const int s = blockIdx.y;
    const u32 q = blockIdx.z;
    const u32 start = cu[s], end = cu[s + 1];
    u32 lo = start, hi = end;
    if (part_len) {
        lo = max(start, q * (u32)part_len);
        hi = min(end, (q + 1) * (u32)part_len);
    }
    // Uniform over the block: whole blocks leave, before any barrier.
    if (lo >= hi) return;
    const bool first = lo == start, last = hi == end;
    const u32 slot = slots[s];
    const int c0 = blockIdx.x * SCAN_CH;
    const u64 rec_step = (u64)channels * SCAN_REC;

    // Recurrence role: channel c0 + cl, states 4g .. 4g + 3. Threads past the
    // last channel shadow it and write nothing.
    const int cl = tid >> 2, g = tid & 3;
    const bool active = c0 + cl < channels;
    const int cc = active ? c0 + cl : channels - 1;
    float* st = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state;
    float h[4], a2[4];
    // The slot is read where its starting value is needed: by unsplit pieces
    // and, for the stash, by the summary pass (in a split output pass the
    // segment's last piece overwrites it while other pieces start).
    const bool read_slot = !parts || (SUMMARY && first);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = 4 * g + j;
        a2[j] = n < d_state ? a[(u64)cc * d_state + n] * LOG2E : 0.0f;
        h[j] = (read_slot && n < d_state && st) ? st[n] : 0.0f;
    }
    if (SUMMARY) {
        if (first && active) {
            float* stash = parts + ((u64)gridDim.z + s) * rec_step + (u64)cc * SCAN_REC;
            *(float4*)(stash + 4 * g) = make_float4(h[0], h[1], h[2], h[3]);
        }
        if (last) return;
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = 0.0f;
    } else if (parts) {
        const float4 v = *(const float4*)(parts + ((u64)gridDim.z + s) * rec_step + (u64)cc * SCAN_REC + 4 * g);
        h[0] = v.x;
        h[1] = v.y;
        h[2] = v.z;
        h[3] = v.w;
        for (u32 p = start / (u32)part_len; p < q; ++p) {
            const float* r = parts + (u64)p * rec_step + (u64)cc * SCAN_REC;
            const float4 e = *(const float4*)(r + 4 * g);
            const float sum = r[16];
            h[0] = ex2_approx(a2[0] * sum) * h[0] + e.x;
            h[1] = ex2_approx(a2[1] * sum) * h[1] + e.y;
            h[2] = ex2_approx(a2[2] * sum) * h[2] + e.z;
            h[3] = ex2_approx(a2[3] * sum) * h[3] + e.w;
        }
    }

    // Staging role: channel c0 + ce, rows re + 4j of the chunk; B and C:
    // state bn, rows br + 8j. Row pointers advance by 4 (8) rows per j.
    const int ce = tid & 31, re = tid >> 5;
    const bool active_e = c0 + ce < channels;
    const int cce = active_e ? c0 + ce : channels - 1;
    const int bn = tid & 15, br = tid >> 4;
    const bool bvalid = bn < d_state;
    const float bias = dt_bias[cce];
    const float dskip = SUMMARY ? 0.0f : skip[cce];
    const u64 xs4 = 4 * (u64)xs, dts4 = 4 * (u64)dts, zs4 = 4 * (u64)zs, os4 = 4 * (u64)os;
    const u64 bs8 = 8 * (u64)bs, cs8 = 8 * (u64)cs;

    float px[8], pd[8], pb[4], pc[4];
    auto fetch = [&](u32 t0) {
        const int nt = (int)hi - (int)t0;
        const float* xp = x + (u64)(t0 + re) * xs + cce;
        const float* dp = dt + (u64)(t0 + re) * dts + cce;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const bool ok = re + 4 * j < nt;
            px[j] = ok ? *xp : 0.0f;
            pd[j] = ok ? *dp : 0.0f;
            xp += xs4;
            dp += dts4;
        }
        const float* bp = B + (u64)(t0 + br) * bs + bn;
        const float* cp = C + (u64)(t0 + br) * cs + bn;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const bool ok = bvalid && br + 8 * j < nt;
            pb[j] = ok ? *bp : 0.0f;
            pc[j] = (!SUMMARY && ok) ? *cp : 0.0f;
            bp += bs8;
            cp += cs8;
        }
    };

    float* s_bf = (float*)s_b;
    float* s_cf = (float*)s_c;
    float* s_yf = (float*)s_y;
    float dsum = 0.0f;
    fetch(lo);
    for (u32 t0 = lo; t0 < hi; t0 += SCAN_T) {
        const int nt = (int)min((u32)SCAN_T, hi - t0);
        float xk[8], zk[8];
        // Rows past the piece's end are staged as dt = dt x = 0.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float sp = re + 4 * j < nt ? softplus_f(pd[j] + bias) : 0.0f;
            s_d[re + 4 * j][ce] = make_float2(sp, sp * px[j]);
            xk[j] = px[j];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            s_bf[(br + 8 * j) * 16 + bn] = pb[j];
            if (!SUMMARY) s_cf[(br + 8 * j) * 16 + bn] = pc[j];
        }
        __syncthreads();
        if (!SUMMARY) {
            // This chunk's gate, used after the recurrence (with 72
            // registers ptxas places these loads after the barrier below).
            const float* zp = z + (u64)(t0 + re) * zs + cce;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                zk[j] = re + 4 * j < nt ? *zp : 0.0f;
                zp += zs4;
            }
        }
        for (int i0 = 0; i0 < nt; i0 += 8) {
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = i0 + u;
                const float2 d = s_d[i][cl];
                const float4 bv = s_b[i][g];
                h[0] = ex2_approx(d.x * a2[0]) * h[0] + d.y * bv.x;
                h[1] = ex2_approx(d.x * a2[1]) * h[1] + d.y * bv.y;
                h[2] = ex2_approx(d.x * a2[2]) * h[2] + d.y * bv.z;
                h[3] = ex2_approx(d.x * a2[3]) * h[3] + d.y * bv.w;
                if (SUMMARY) {
                    dsum += d.x;
                } else {
                    const float4 cv = s_c[i][g];
                    s_yf[(i * SCAN_CH + cl) * 4 + g] = h[0] * cv.x + h[1] * cv.y + h[2] * cv.z + h[3] * cv.w;
                }
            }
        }
        // Every thread is done with this chunk's staging (and its y partial
        // sums are visible) before the next chunk overwrites it.
        __syncthreads();
        // The next chunk's loads, in flight while this chunk's outputs are
        // written.
        fetch(t0 + SCAN_T);
        if (!SUMMARY && active_e) {
            float* op = out + (u64)(t0 + re) * os + c0 + ce;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (re + 4 * j < nt) {
                    const float4 p = s_y[re + 4 * j][ce];
                    const float y = (p.x + p.y) + (p.z + p.w);
                    *op = (y + xk[j] * dskip) * silu_f(zk[j]);
                }
                op += os4;
            }
        }
    }
    if (SUMMARY) {
        if (active) {
            float* r = parts + (u64)q * rec_step + (u64)cc * SCAN_REC;
            *(float4*)(r + 4 * g) = make_float4(h[0], h[1], h[2], h[3]);
            if (g == 0) r[16] = dsum;
        }
        return;
    }
    if (last && st && active) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (4 * g + j < d_state) st[4 * g + j] = h[j];
    }
}

#define TILED_ARGS                                                                                                 \
    const float *x, int xs, const float *dt, int dts, const float *dt_bias, const float *a, const float *B, int bs, \
        const float *C, int cs, const float *skip, const float *z, int zs, float *state, u64 slot_stride,          \
        u64 layer_off, const u32 *cu, const u32 *slots, int channels, int d_state, float *out, int os,             \
        int part_len, float *parts
#define TILED_PASS                                                                                                 \
    x, xs, dt, dts, dt_bias, a, B, bs, C, cs, skip, z, zs, state, slot_stride, layer_off, cu, slots, channels,     \
        d_state, out, os, part_len, parts

// 7 blocks of the output pass per multiprocessor (72 registers, a few bytes
// spilled outside the token loop): on an H200 ~3% faster than 5 or 6 for a
// split 2048-token segment and for 256 segments of 8 tokens.
extern "C" __global__ void __launch_bounds__(128, 7) mamba1_scan_tiled(TILED_ARGS) {
    mamba1_scan_tiled_impl<false>(TILED_PASS);
}
extern "C" __global__ void __launch_bounds__(128) mamba1_scan_tiled_summary(TILED_ARGS) {
    mamba1_scan_tiled_impl<true>(TILED_PASS);
}
