// Decode steps of Mamba-1 (one token per sequence): the fused step for
// small batches, which also computes dt, and the wide step for large ones,
// which takes dt from a matrix product, in a general kernel and a lean one
// for the common case. All take STEP_ARGS.

// Falcon-Mamba's weightless RMS norms of xdbl row `row` = [dt_low (rank) |
// B (d_state) | C (d_state)], as three inverse scales; the `lanes` threads
// of a channel group share the sums with shuffles.
__device__ __forceinline__ void falcon_inv_norms(const float* row, int rank, int d_state, float eps, int lane, int lanes,
                                                 float& inv_dt, float& inv_b, float& inv_c) {
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

// The NPL states from st (zeros for a null st).
template <int NPL>
__device__ __forceinline__ void step_load_state(float (&hv)[NPL], const float* st) {
    if (NPL == 4) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (st) v = *(const float4*)st;
        hv[0] = v.x;
        hv[NPL > 1 ? 1 : 0] = v.y;
        hv[NPL > 2 ? 2 : 0] = v.z;
        hv[NPL > 3 ? 3 : 0] = v.w;
    } else {
        hv[0] = st ? st[0] : 0.0f;
    }
}

// 8 dt_proj weights dotted with row[0..8) * s.
__device__ __forceinline__ float step_dot8(const float (&wv)[8], const float* row, float s) {
    const float4* xp = (const float4*)row;
    const float4 p = xp[0], q = xp[1];
    return wv[0] * (p.x * s) + wv[1] * (p.y * s) + wv[2] * (p.z * s) + wv[3] * (p.w * s) + wv[4] * (q.x * s) +
           wv[5] * (q.y * s) + wv[6] * (q.z * s) + wv[7] * (q.w * s);
}

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
    TL_SCOPE(TL_STEP);
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
    float av[NPL];
#pragma unroll
    for (int q = 0; q < NPL; ++q) av[q] = valid ? a[(u64)cc * d_state + n0 + q] : 0.0f;
    const u64 wrow = (u64)cc * rank;
    grid_dep_sync();
    TL_WAITED(TL_STEP);
    // The state first (it is the one load that must come from memory), and
    // with it the channel's dt bias and D skip, so that neither is a round
    // trip of its own where it is used, at the end of the step.
    float hv[NPL];
    step_load_state<NPL>(hv, st && valid ? st : 0);
    const float dtb = dt_bias[cc], dsk = skip[cc];
    const float xv = x[(u64)s * xs + cc];
    const float zv = z[(u64)s * zs + cc];
    const float* row = xdbl + (u64)s * xds;

    float inv_dt = 1.0f, inv_b = 1.0f, inv_c = 1.0f;
    if (norm) falcon_inv_norms(row, rank, d_state, eps, lane, lanes, inv_dt, inv_b, inv_c);
    float raw;
    if (dtpre) {
        raw = dtpre[(u64)s * dps + cc] * inv_dt;
    } else {
        float acc = 0.0f;
        if (vec_dot) {
#pragma unroll 4
            for (int r0 = lane * 8; r0 < rank; r0 += lanes * 8) {
                float wv[8];
                if (DT == 0) {
                    const float4* p = (const float4*)((const float*)dtw + wrow + r0);
                    const float4 w0 = p[0], w1 = p[1];
                    wv[0] = w0.x; wv[1] = w0.y; wv[2] = w0.z; wv[3] = w0.w;
                    wv[4] = w1.x; wv[5] = w1.y; wv[6] = w1.z; wv[7] = w1.w;
                    acc += step_dot8(wv, row + r0, inv_dt);
                } else {
                    widen8_half<DT>(*(const uint4*)((const u16*)dtw + wrow + r0), wv);
                    acc += step_dot8(wv, row + r0, inv_dt);
                }
            }
        } else {
            for (int r = lane; r < rank; r += lanes) acc += load_weight<DT>(dtw, wrow + r) * (row[r] * inv_dt);
        }
        for (int o = lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, o);
        raw = acc;
    }
    const float dtv = softplus_f(raw + dtb);

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
    if (lane == 0 && active) out[(u64)s * os + cc] = (yp + xv * dsk) * silu_f(zv);
}

#define STEP_ARGS                                                                                                  \
    const float *x, int xs, const float *xdbl, int xds, const void *dtw, const float *dtpre, int dps,              \
        const float *dt_bias, const float *a, const float *skip, const float *z, int zs, float *state,             \
        u64 slot_stride, u64 layer_off, const u32 *slots, int n_seqs, int channels, int d_state, int rank,         \
        int norm, float eps, int lanes, int vec_dot, float *out, int os, u16 *half, int half_dt
#define STEP_PASS                                                                                                  \
    x, xs, xdbl, xds, dtw, dtpre, dps, dt_bias, a, skip, z, zs, state, slot_stride, layer_off, slots, n_seqs,      \
        channels, d_state, rank, norm, eps, lanes, vec_dot, out, os

extern "C" __global__ void mamba1_step_f32_v4(STEP_ARGS) { mamba1_step_impl<0, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_bf16_v4(STEP_ARGS) { mamba1_step_impl<1, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f16_v4(STEP_ARGS) { mamba1_step_impl<2, 4>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f32_v1(STEP_ARGS) { mamba1_step_impl<0, 1>(STEP_PASS); }
extern "C" __global__ void mamba1_step_bf16_v1(STEP_ARGS) { mamba1_step_impl<1, 1>(STEP_PASS); }
extern "C" __global__ void mamba1_step_f16_v1(STEP_ARGS) { mamba1_step_impl<2, 1>(STEP_PASS); }

// Mamba-1 decode step for large batches, where dt_low · dt_projᵀ was
// computed beforehand by one matrix product (`dtpre`, un-normalised as in
// `mamba1_step_impl`). Here the state traffic is everything: each sequence's
// `[channels, d_state]` f32 state is read and written once per layer.
//
// A group of `lanes` = d_state / 4 threads owns one channel, 4 consecutive
// states per thread (16-byte accesses); a block's cpb channels are fixed
// and it walks the sequence groups (STEP_WIDE_SEQS sequences each)
// blockIdx.y, blockIdx.y + gridDim.y, ... The loads of a group (its
// states, B and C, and the block's dt, x and z) go to shared memory as
// asynchronous copies, STEP_WIDE_STAGES - 1 groups ahead of the one being
// updated, so the memory system always has the next groups' states in
// flight while this one is computed and stored.
//
// The kernel must also issue few instructions: at 256 sequences it is as
// much issue-bound as memory-bound. So the per-(sequence, channel) work,
// softplus(dt) and SiLU(z), runs once per channel group (lane i takes
// sequence i, then shuffles) rather than once per lane, and exp(dt * a)
// is one `ex2.approx` of dt * a * log2(e). Falcon-Mamba's weightless norms
// of dt, B and C (`norm`) and states under 16 (fewer lanes than
// sequences) take the plain per-lane path.
//
// Dynamic shared memory: STEP_WIDE_STAGES stages of STEP_WIDE_SEQS
// sequences of `wide_seq_floats` floats (the host computes the same size).
#define STEP_WIDE_SEQS 4
#define STEP_WIDE_STAGES 3

__device__ __forceinline__ int wide_seq_floats(int threads, int d_state, int cpb) {
    return threads * 4 + 2 * d_state + 3 * cpb;
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The wide steps' copy pipeline: the block walks the sequence groups
// blockIdx.y, blockIdx.y + gridDim.y, ...; `issue(g, b)` starts group g's
// copies into stage buffer b as one commit group, STEP_WIDE_STAGES - 1
// groups ahead of `update(g, b)`, which runs once group g's copies have
// landed for the whole block. Empty commit groups past the end keep the
// wait counts exact.
template <typename Issue, typename Update>
__device__ __forceinline__ void wide_pipeline(int groups, Issue issue, Update update) {
    int g = blockIdx.y;
#pragma unroll
    for (int p = 0; p < STEP_WIDE_STAGES - 1; ++p) {
        const int gp = g + p * gridDim.y;
        if (gp < groups) issue(gp, p);
        else cp_async_commit();
    }
    for (int it = 0; g < groups; ++it, g += gridDim.y) {
        const int ahead = g + (STEP_WIDE_STAGES - 1) * gridDim.y;
        if (ahead < groups) issue(ahead, (it + STEP_WIDE_STAGES - 1) % STEP_WIDE_STAGES);
        else cp_async_commit();
        cp_async_wait<STEP_WIDE_STAGES - 1>();
        __syncthreads();
        update(g, it % STEP_WIDE_STAGES);
        // Every thread is done with this buffer before it is refilled.
        __syncthreads();
    }
}

// A wide step's output of sequence s, channel c, and with `half` its dense
// 16-bit copy (`half_dt` 1 bf16, 2 f16).
__device__ __forceinline__ void wide_store_out(float* out, int os, u16* half, int half_dt, int channels, int s, int c,
                                               float v) {
    out[(u64)s * os + c] = v;
    if (half) half[(u64)s * channels + c] = half_dt == 1 ? f32_to_bf16(v) : f32_to_f16(v);
}

__device__ void mamba1_step_wide_impl(const float* __restrict__ x, int xs, const float* __restrict__ xdbl, int xds,
                                      const float* __restrict__ dtpre, int dps, const float* __restrict__ dt_bias,
                                      const float* __restrict__ a, const float* __restrict__ skip,
                                      const float* __restrict__ z, int zs, float* __restrict__ state,
                                      u64 slot_stride, u64 layer_off, const u32* __restrict__ slots, int n_seqs,
                                      int channels, int d_state, int rank, int norm, float eps, int lanes,
                                      float* __restrict__ out, int os, u16* __restrict__ half, int half_dt) {
    extern __shared__ float4 wide_smem[];
    float* smem = (float*)wide_smem;
    const int threads = blockDim.x, tid = threadIdx.x;
    const int lane = tid & (lanes - 1);
    const int cpb = threads / lanes;
    const int cl = tid / lanes;
    const int c0 = blockIdx.x * cpb;
    const bool active = c0 + cl < channels;
    const int cc = active ? c0 + cl : channels - 1;
    const int n0 = lane * 4;
    const bool valid = n0 < d_state;
    const int seq_floats = wide_seq_floats(threads, d_state, cpb);
    const int stage_floats = STEP_WIDE_SEQS * seq_floats;
    // Within a sequence's part of a stage: states, then B | C, then dt | x | z.
    const int at_bc = threads * 4, at_dxz = at_bc + 2 * d_state;
    const int groups = (n_seqs + STEP_WIDE_SEQS - 1) / STEP_WIDE_SEQS;
    const u64 chan_off = layer_off + (u64)cc * d_state + n0;
    // Threads below cpb copy dt, x and z of channel c0 + tid; the next
    // 2 * d_state threads (wrapping) copy B and C.
    const int copy_ch = min(c0 + tid, channels - 1);
    const int bc_j = (tid - cpb + threads) % threads;
    // Lane i of a channel group takes sequence i: every sequence has a lane.
    const bool shared_math = !norm && lanes >= STEP_WIDE_SEQS;

    const float4 av = valid ? *(const float4*)(a + (u64)cc * d_state + n0) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float a2[4] = {av.x * 1.4426950408889634f, av.y * 1.4426950408889634f, av.z * 1.4426950408889634f,
                         av.w * 1.4426950408889634f};
    const float bias = dt_bias[cc];
    const float dsk = skip[cc];

    // Starts the copies of group g into stage buffer b (one commit group).
    auto issue = [&](int g, int b) {
        float* base = smem + b * stage_floats;
#pragma unroll
        for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
            const int s = g * STEP_WIDE_SEQS + i;
            const bool live = s < n_seqs;
            const int sr = live ? s : 0;
            float* q = base + i * seq_floats;
            const u32 slot = live ? slots[s] : PAD_SLOT;
            const bool has = slot != PAD_SLOT && valid;
            cp_async16(q + tid * 4, has ? state + (u64)slot * slot_stride + chan_off : state, has);
            if (tid < cpb) {
                cp_async4(q + at_dxz + tid, dtpre + (u64)sr * dps + copy_ch, live);
                cp_async4(q + at_dxz + cpb + tid, x + (u64)sr * xs + copy_ch, live);
                cp_async4(q + at_dxz + 2 * cpb + tid, z + (u64)sr * zs + copy_ch, live);
            }
            for (int j = bc_j; j < 2 * d_state; j += threads) cp_async4(q + at_bc + j, xdbl + (u64)sr * xds + rank + j, live);
        }
        cp_async_commit();
    };

    wide_pipeline(groups, issue, [&](int g, int b) {
        const float* base = smem + b * stage_floats;
        // Lane l's softplus(dt) and SiLU(z) of sequence l mod 4 of the group.
        float dt_mine = 0.0f, gate_mine = 0.0f;
        if (shared_math) {
            const float* q = base + (lane & (STEP_WIDE_SEQS - 1)) * seq_floats;
            dt_mine = softplus_f(q[at_dxz + cl] + bias);
            gate_mine = silu_f(q[at_dxz + 2 * cpb + cl]);
        }
#pragma unroll
        for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
            const int s = g * STEP_WIDE_SEQS + i;
            if (s >= n_seqs) break;
            const float* q = base + i * seq_floats;
            const float xv = q[at_dxz + cpb + cl];
            float dtv, gate, inv_b = 1.0f, inv_c = 1.0f;
            if (shared_math) {
                dtv = __shfl_sync(FULL_MASK, dt_mine, i, lanes);
                gate = __shfl_sync(FULL_MASK, gate_mine, i, lanes);
            } else {
                float inv_dt = 1.0f;
                if (norm) falcon_inv_norms(xdbl + (u64)s * xds, rank, d_state, eps, lane, lanes, inv_dt, inv_b, inv_c);
                dtv = softplus_f(q[at_dxz + cl] * inv_dt + bias);
                gate = silu_f(q[at_dxz + 2 * cpb + cl]);
            }
            float yp = 0.0f;
            if (valid) {
                const float4 h = *(const float4*)(q + tid * 4);
                const float4 bv = *(const float4*)(q + at_bc + n0);
                const float4 cv = *(const float4*)(q + at_bc + d_state + n0);
                const float hv[4] = {h.x, h.y, h.z, h.w};
                const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
                const float cc4[4] = {cv.x, cv.y, cv.z, cv.w};
                const float dx = dtv * xv;
                float hn[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    hn[k] = exp2_approx(dtv * a2[k]) * hv[k] + (dx * inv_b) * bb[k];
                    yp += hn[k] * (cc4[k] * inv_c);
                }
                const u32 slot = slots[s];
                if (slot != PAD_SLOT && active)
                    *(float4*)(state + (u64)slot * slot_stride + chan_off) = make_float4(hn[0], hn[1], hn[2], hn[3]);
            }
            for (int o = lanes / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
            if (lane == 0 && active) wide_store_out(out, os, half, half_dt, channels, s, cc, (yp + xv * dsk) * gate);
        }
    });
}

// The fused step's arguments (STEP_ARGS); `dtw` and `vec_dot` are unused.
// With `half`, the output is also written there as a dense 16-bit copy
// (`half_dt` 1 bf16, 2 f16): the operand out_proj's tensor-core product
// takes, so no conversion kernel runs between (the fused step ignores it).
extern "C" __global__ void mamba1_step_wide(STEP_ARGS) {
    TL_SCOPE(TL_STEP_WIDE);
    mamba1_step_wide_impl(x, xs, xdbl, xds, dtpre, dps, dt_bias, a, skip, z, zs, state, slot_stride, layer_off, slots,
                          n_seqs, channels, d_state, rank, norm, eps, lanes, out, os, half, half_dt);
}

// The wide step for the common case, with far fewer instructions: 16
// states (4 lanes a channel, 32 channels a block), no Falcon norms, x, z,
// dt and xdbl's B | C in 16-byte aligned rows, channels % 4 == 0 (the host
// checks all of it). The general kernel above issued ~810 instructions per
// warp and group of 4 sequences (Nsight Compute), and its time followed
// its instruction count, not the copy rate. Here:
// - each thread copies its 4 states of the group (one 16-byte copy a
//   sequence), and warp w copies sequence w's B | C, dt, x and z of the
//   block's 32 channels in one 16-byte copy per lane (lanes 8k .. 8k + 7
//   take part k), plus the slot index, into shared memory whose address
//   is converted once;
// - lane i of a channel computes softplus(dt) and SiLU(z) of sequence i,
//   and after the 4 updates writes sequence i's output: one store per
//   lane instead of a predicated store per sequence;
// - exp(dt * a) is one `ex2.approx` of dt * a * log2(e), as above.
// Copies run STEP_WIDE_STAGES - 1 groups ahead, as in the general kernel.
//
// A sequence's part of a stage (floats): states [0, 512), B | C [512, 544),
// dt [544, 576), x [576, 608), z [608, 640), the slot at 640; 644 in all
// (the host sizes the shared memory from the same figure).
#define STEP_LEAN_SEQ 644
#define STEP_LEAN_STAGE (STEP_WIDE_SEQS * STEP_LEAN_SEQ)

extern "C" __global__ void __launch_bounds__(128) mamba1_step_lean(STEP_ARGS) {
    TL_SCOPE(TL_STEP_LEAN);
    extern __shared__ float4 lean_smem[];
    const float* smem = (const float*)lean_smem;
    const int tid = threadIdx.x, lane = tid & 3, cl = tid >> 2, warp = tid >> 5, wl = tid & 31;
    const int c0 = blockIdx.x * 32;
    const bool active = c0 + cl < channels;
    const int cc = active ? c0 + cl : channels - 1;
    const int n0 = lane * 4;
    const int groups = (n_seqs + STEP_WIDE_SEQS - 1) / STEP_WIDE_SEQS;
    const float* st_src = state + layer_off + (u64)cc * 16 + n0;
    float* st_dst = state + layer_off + (u64)cc * 16 + n0;
    const u32 sbase = smem_addr(lean_smem);

    // This lane's piece of its warp's sequence: part 0 B | C, 1 dt, 2 x, 3 z.
    const int part = wl >> 3, piece = wl & 7;
    const float* src = part == 0 ? xdbl + rank + 4 * piece
                       : part == 1 ? dtpre + c0 + 4 * piece
                       : part == 2 ? x + c0 + 4 * piece
                                   : z + c0 + 4 * piece;
    const int src_stride = part == 0 ? xds : part == 1 ? dps : part == 2 ? xs : zs;
    const bool piece_ok = part == 0 || c0 + 4 * piece < channels;
    const u32 piece_at = (u32)(warp * STEP_LEAN_SEQ + 512 + 4 * wl) * 4;

    const float4 av = *(const float4*)(a + (u64)cc * 16 + n0);
    const float a2[4] = {av.x * 1.4426950408889634f, av.y * 1.4426950408889634f, av.z * 1.4426950408889634f,
                         av.w * 1.4426950408889634f};
    const float bias = dt_bias[cc];
    const float dsk = skip[cc];

    // Starts the copies of group g into stage buffer b (one commit group).
    auto issue = [&](int g, int b) {
        const u32 stage = sbase + (u32)(b * STEP_LEAN_STAGE) * 4;
#pragma unroll
        for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
            const int s = g * STEP_WIDE_SEQS + i;
            const u32 slot = s < n_seqs ? slots[s] : PAD_SLOT;
            const bool has = slot != PAD_SLOT;
            cp_async16_at(stage + (u32)(i * STEP_LEAN_SEQ + tid * 4) * 4, st_src + (has ? (u64)slot * slot_stride : 0), has);
        }
        const int s = g * STEP_WIDE_SEQS + warp;
        const bool live = s < n_seqs;
        cp_async16_at(stage + piece_at, src + (u64)(live ? s : 0) * src_stride, live && piece_ok);
        if (wl == 0) cp_async4_at(stage + (u32)(warp * STEP_LEAN_SEQ + 640) * 4, slots + (live ? s : 0), live);
        cp_async_commit();
    };

    wide_pipeline(groups, issue, [&](int g, int b) {
        const float* base = smem + b * STEP_LEAN_STAGE;
        // Lane i's softplus(dt) and SiLU(z) of sequence i of the group.
        const float* mine = base + lane * STEP_LEAN_SEQ;
        const float dt_mine = softplus_f(mine[544 + cl] + bias);
        const float gate_mine = silu_f(mine[608 + cl]);
        float y_mine = 0.0f;
#pragma unroll
        for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
            const float* q = base + i * STEP_LEAN_SEQ;
            const float dtv = __shfl_sync(FULL_MASK, dt_mine, i, 4);
            const float xv = q[576 + cl];
            const float4 h = *(const float4*)(q + tid * 4);
            const float4 bv = *(const float4*)(q + 512 + n0);
            const float4 cv = *(const float4*)(q + 528 + n0);
            const float dx = dtv * xv;
            const float h0 = exp2_approx(dtv * a2[0]) * h.x + dx * bv.x;
            const float h1 = exp2_approx(dtv * a2[1]) * h.y + dx * bv.y;
            const float h2 = exp2_approx(dtv * a2[2]) * h.z + dx * bv.z;
            const float h3 = exp2_approx(dtv * a2[3]) * h.w + dx * bv.w;
            float yp = h0 * cv.x + h1 * cv.y + h2 * cv.z + h3 * cv.w;
            const u32 slot = ((const u32*)q)[640];
            if (g * STEP_WIDE_SEQS + i < n_seqs && slot != PAD_SLOT && active) {
                // (A plain float4 assignment here compiled to four 4-byte stores.)
                st_global_v4(st_dst + (u64)slot * slot_stride, make_float4(h0, h1, h2, h3));
            }
            yp += __shfl_xor_sync(FULL_MASK, yp, 1);
            yp += __shfl_xor_sync(FULL_MASK, yp, 2);
            if (lane == i) y_mine = yp + xv * dsk;
        }
        const int s = g * STEP_WIDE_SEQS + lane;
        if (active && s < n_seqs) wide_store_out(out, os, half, half_dt, channels, s, cc, y_mine * gate_mine);
    });
}

// The rest of a Mamba-1 block after its conv, for one sequence's decode
// token, in one launch (the "tail"): x_proj, Falcon-Mamba's norms, dt, the
// state update and gate, and out_proj added onto the residual. At batch 1
// these are three latency-bound kernels (x_proj 1.3 MB, the step 1.8 MB)
// and a 16.8 MB product that ran at half the copy rate (mamba-1.4b). Here
// thread 0 of every block starts bulk copies (the copy engine) of all the
// weights its block will use into shared memory as the block starts,
// before the dependent-launch wait, so out_proj's weights stream in while
// x_proj and the step run, and the products then read shared memory.
//
// G blocks, all resident at once (one a multiprocessor; the host checks),
// of T threads. Block b owns:
//   x_proj rows b, b + G, ... (at most TAIL_XR): xdbl = x_proj · xc;
//   channels [E b / G, E (b + 1) / G) of the step (a group of `lanes`
//   threads a channel, one state a lane), which read all of xdbl;
//   out_proj rows [D b / G, D (b + 1) / G), which read all of y.
// Two grid barriers hand xdbl and y over (through global memory, read at
// L2). A thread takes 8-element chunks j = tid, tid + T, ... of a row, and
// each product's partial sums are reduced across the block in a fixed
// order, so results do not depend on timing.
//
// What no earlier kernel of the step writes (the state, which only this
// layer's tail writes, a token earlier; the residual, which the previous
// block's tail wrote before the kernel we wait on started; the per-channel
// weights) is loaded before the wait too; only xc and z wait for it.
//
// Shared memory (offsets from the host, in bytes): x_proj rows at 0, the
// channels' dt_proj rows at off_dt (when `dt_vec`: the rank is a multiple
// of 8; otherwise they are read from global memory), the first `preload`
// out_proj rows at off_o (the rest are read from global memory), xdbl at
// off_dbl, the reduction at off_red (8 sums a warp for each 8 out_proj
// rows) and three mbarriers (one a copy group)
// at off_bar. `flags` bit 0 lets the next kernel launch as soon as the
// copies are issued (its blocks then load their first weights while this
// kernel's handoffs run), else after the dependent-launch wait.
#define TAIL_XR 4
// Phase marks of thread 0 in timeline builds: 3 x_proj summed, 4 xdbl
// handed over, 5 the step done, 6 y handed over, 7 out_proj's weights in.
#ifdef MS_TIMELINE
#define TAIL_MARK(e) tl_mark(TL_TAIL, e)
#else
#define TAIL_MARK(e)
#endif

// Each of a warp's lanes holds 8 partial sums, of rows 0..7; afterwards
// lane l holds the warp's whole sum of row ((l >> 2) & 7) (bit 4 of the
// lane picks half of the rows, bit 3 a quarter, bit 2 one): 9 shuffles.
__device__ __forceinline__ float warp_sum8(const float (&v)[8], int lane) {
    const bool h4 = lane & 16, h3 = lane & 8, h2 = lane & 4;
    float w[4], u[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float send = h4 ? v[i] : v[i + 4], keep = h4 ? v[i + 4] : v[i];
        w[i] = keep + __shfl_xor_sync(FULL_MASK, send, 16);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float send = h3 ? w[i] : w[i + 2], keep = h3 ? w[i + 2] : w[i];
        u[i] = keep + __shfl_xor_sync(FULL_MASK, send, 8);
    }
    float r = (h2 ? u[1] : u[0]) + __shfl_xor_sync(FULL_MASK, h2 ? u[0] : u[1], 4);
    r += __shfl_xor_sync(FULL_MASK, r, 2);
    r += __shfl_xor_sync(FULL_MASK, r, 1);
    return r;
}

// The block's sums of 8 rows of partial sums (every thread's acc): thread
// first + i (i < 8) returns row i's total, summed over the warps in order.
// Ends with the block synchronised.
__device__ __forceinline__ float block_sum8(const float (&acc)[8], float* red, int tid, int nwarps, int first) {
    const int lane = tid & 31, warp = tid >> 5;
    const float r = warp_sum8(acc, lane);
    if ((lane & 3) == 0) red[warp * 8 + ((lane >> 2) & 7)] = r;
    __syncthreads();
    float v = 0.0f;
    const int i = tid - first;
    if (i >= 0 && i < 8)
        for (int w = 0; w < nwarps; ++w) v += red[w * 8 + i];
    __syncthreads();
    return v;
}

// acc[i] += w_i · x over one 8-element chunk, for the rows i < rows of a
// row-major matrix starting at `w` (row stride `ld` elements), chunk at
// element k; x holds the chunk's 8 inputs.
template <int DT>
__device__ __forceinline__ void dot8_rows(const void* w, u64 ld, int rows, int k, const float (&x)[8], float (&acc)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (i < rows) {
            float wv[8];
            widen8<DT>(load_chunk<DT>(w, (u64)i * ld + k), wv);
#pragma unroll
            for (int q = 0; q < 8; ++q) acc[i] += wv[q] * x[q];
        }
    }
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = __ldcg((const float4*)p), b = __ldcg((const float4*)p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <int DT>
__device__ void mamba1_tail_impl(const float* __restrict__ xc, const float* __restrict__ z, const void* __restrict__ xw,
                                 const void* __restrict__ dtw, const float* __restrict__ dt_bias,
                                 const float* __restrict__ a, const float* __restrict__ skip,
                                 const void* __restrict__ ow, const float* __restrict__ obias, float* xdbl, float* y,
                                 float* __restrict__ residual, float* __restrict__ state, u64 slot_stride,
                                 u64 layer_off, const u32* __restrict__ slots, u32* bar, int D, int E, int N, int R,
                                 int norm, float eps, int lanes, int preload, int off_dt, int off_o, int off_dbl,
                                 int off_red, int off_bar, int dt_vec, int flags) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    TL_SCOPE(TL_TAIL);
    extern __shared__ __align__(16) unsigned char tail_smem[];
    const int T = blockDim.x, tid = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    const int es = DT == 0 ? 4 : 2;
    const int W = R + 2 * N, KC = E / 8;
    const u64 row_bytes = (u64)E * es;
    const int xr = b < W ? (W - b + G - 1) / G : 0;
    int c0, c1, o0, o1;
    share(E, 1, G, b, c0, c1);
    share(D, 1, G, b, o0, o1);
    const int nch = c1 - c0, orows = o1 - o0, pre = min(orows, preload);
    const unsigned char* s_x = tail_smem;
    const unsigned char* s_dt = tail_smem + off_dt;
    const unsigned char* s_o = tail_smem + off_o;
    float* s_dbl = (float*)(tail_smem + off_dbl);
    float* red = (float*)(tail_smem + off_red);

    // The block's weights, in the order of use: x_proj rows (mbarrier 0),
    // dt_proj rows (1), out_proj rows (2).
    const u32 base = smem_addr(tail_smem), bars = base + off_bar;
    if (tid == 0) {
        for (int i = 0; i < 3; ++i) mbar_init(bars + 8 * i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        mbar_expect(bars, (u32)(xr * row_bytes));
        for (int i = 0; i < xr; ++i)
            bulk_copy(base + (u32)(i * row_bytes), (const char*)xw + (u64)(b + i * G) * row_bytes, (u32)row_bytes, bars);
        const u32 dt_bytes = dt_vec ? (u32)((u64)nch * R * es) : 0u;
        mbar_expect(bars + 8, dt_bytes);
        if (dt_bytes) bulk_copy(base + off_dt, (const char*)dtw + (u64)c0 * R * es, dt_bytes, bars + 8);
        mbar_expect(bars + 16, (u32)(pre * row_bytes));
    }
    const bool early = flags & 1;
    if (early) grid_dep_launch();

    // What no kernel we may overlap writes: this thread's residual row (of
    // the block's out_proj rows) and the step's inputs of its first round.
    const int per_round = T / lanes, cs = tid / lanes, sl = tid & (lanes - 1);
    const u32 slot = slots[0];
    float* st = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off;
    const float res = tid < orows ? residual[o0 + tid] : 0.0f;
    float hv = 0.0f, av = 0.0f, dv = 0.0f, bv = 0.0f;
    auto load_round = [&](int cl) {
        const int c = c0 + min(cl, nch - 1);
        hv = (st && sl < N) ? st[(u64)c * N + sl] : 0.0f;
        av = sl < N ? a[(u64)c * N + sl] : 0.0f;
        dv = skip[c];
        bv = dt_bias[c];
    };
    if (nch > 0) load_round(cs);
    __syncthreads();  // the mbarriers are initialised
    grid_dep_wait();
    if (!early) grid_dep_launch();
    TL_WAITED(TL_TAIL);
    // out_proj's weights: started after the wait, so that they stream while
    // x_proj and the step run, not beside the product waited on.
    if (tid == 0 && pre)
        bulk_copy(base + off_o, (const char*)ow + (u64)o0 * row_bytes, (u32)(pre * row_bytes), bars + 16);
    const int cx = c0 + min(cs, max(nch - 1, 0));
    float xv = nch > 0 ? xc[cx] : 0.0f, zv = nch > 0 ? z[cx] : 0.0f;

    // x_proj: this block's rows of xdbl.
    {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = tid; j < KC; j += T) {
            float x8[8];
            load8(xc + 8 * j, x8);
            if (j == tid) mbar_wait(bars, 0);
            dot8_rows<DT>(s_x, E, min(xr, TAIL_XR), 8 * j, x8, acc);
        }
        const float v = block_sum8(acc, red, tid, T >> 5, 0);
        if (tid < xr) xdbl[b + tid * G] = v;
    }
    TAIL_MARK(3);
    grid_sync_parity(bar, T, 1);
    TAIL_MARK(4);

    // The step: this block's channels, all of xdbl.
    for (int i = tid; i < W; i += T) s_dbl[i] = __ldcg(xdbl + i);
    __syncthreads();
    float inv_dt = 1.0f, inv_b = 1.0f, inv_c = 1.0f;
    if (norm) falcon_inv_norms(s_dbl, R, N, eps, sl, lanes, inv_dt, inv_b, inv_c);
    if (dt_vec) mbar_wait(bars + 8, 0);
    const int rounds = (nch + per_round - 1) / per_round;
    for (int r = 0; r < rounds; ++r) {
        const int cl = cs + r * per_round;
        if (r > 0) {
            load_round(cl);
            const int c = c0 + min(cl, nch - 1);
            xv = xc[c];
            zv = z[c];
        }
        const bool active = cl < nch;
        const int cw = min(cl, nch - 1);
        float acc = 0.0f;
        if (dt_vec) {
            const unsigned char* drow = s_dt + (u64)cw * R * es;
            for (int r0 = sl * 8; r0 < R; r0 += lanes * 8) {
                float wv[8];
                widen8<DT>(load_chunk<DT>(drow, r0), wv);
#pragma unroll
                for (int q = 0; q < 8; ++q) acc += wv[q] * (s_dbl[r0 + q] * inv_dt);
            }
        } else {
            for (int k = sl; k < R; k += lanes) acc += load_weight<DT>(dtw, (u64)(c0 + cw) * R + k) * (s_dbl[k] * inv_dt);
        }
        for (int o = lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, o);
        const float dtv = softplus_f(acc + bv);
        float yp = 0.0f;
        if (sl < N) {
            const float bn = s_dbl[R + sl] * inv_b, cn = s_dbl[R + N + sl] * inv_c;
            hv = expf(dtv * av) * hv + (dtv * bn) * xv;
            yp = hv * cn;
            if (st && active) st[(u64)(c0 + cl) * N + sl] = hv;
        }
        for (int o = lanes / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
        if (sl == 0 && active) y[c0 + cl] = (yp + xv * dv) * silu_f(zv);
    }
    TAIL_MARK(5);
    grid_sync_parity(bar, T, 0);
    TAIL_MARK(6);

    // out_proj (+ bias) onto the residual: this block's rows, all of y.
    float y8[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (tid < KC) load8(y + 8 * tid, y8);
    mbar_wait(bars + 16, 0);
    TAIL_MARK(7);
    for (int g0 = 0; g0 < orows; g0 += 8) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        const int rows = min(8, orows - g0);
        for (int j = tid; j < KC; j += T) {
            float x8[8];
            if (j == tid) {
#pragma unroll
                for (int q = 0; q < 8; ++q) x8[q] = y8[q];
            } else {
                load8(y + 8 * j, x8);
            }
            // Rows g0 .. g0 + rows: the preloaded ones from shared memory,
            // the rest (when they did not all fit) from global memory.
            if (g0 + rows <= pre) {
                dot8_rows<DT>(s_o + (u64)g0 * row_bytes, E, rows, 8 * j, x8, acc);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (i < rows) {
                        const int row = g0 + i;
                        const void* w = row < pre ? (const void*)(s_o + (u64)row * row_bytes)
                                                  : (const void*)((const char*)ow + (u64)(o0 + row) * row_bytes);
                        float wv[8];
                        widen8<DT>(load_chunk<DT>(w, 8 * j), wv);
#pragma unroll
                        for (int q = 0; q < 8; ++q) acc[i] += wv[q] * x8[q];
                    }
                }
            }
        }
        // The warp's sums of this group's rows into the reduction area
        // (its own 8 rows a warp and group); added up below, once.
        const int lane = tid & 31;
        const float r = warp_sum8(acc, lane);
        if ((lane & 3) == 0) red[((g0 >> 3) * (T >> 5) + (tid >> 5)) * 8 + ((lane >> 2) & 7)] = r;
    }
    __syncthreads();
    if (tid < orows) {
        float v = 0.0f;
        for (int w = 0; w < (T >> 5); ++w) v += red[((tid >> 3) * (T >> 5) + w) * 8 + (tid & 7)];
        residual[o0 + tid] = res + (obias ? v + obias[o0 + tid] : v);
    }
#endif
}

#define TAIL_ARGS                                                                                                  \
    const float *xc, const float *z, const void *xw, const void *dtw, const float *dt_bias, const float *a,         \
        const float *skip, const void *ow, const float *obias, float *xdbl, float *y, float *residual, float *state, \
        u64 slot_stride, u64 layer_off, const u32 *slots, u32 *bar, int D, int E, int N, int R, int norm, float eps, \
        int lanes, int preload, int off_dt, int off_o, int off_dbl, int off_red, int off_bar, int dt_vec, int flags
#define TAIL_PASS                                                                                                  \
    xc, z, xw, dtw, dt_bias, a, skip, ow, obias, xdbl, y, residual, state, slot_stride, layer_off, slots, bar, D, E, \
        N, R, norm, eps, lanes, preload, off_dt, off_o, off_dbl, off_red, off_bar, dt_vec, flags
extern "C" __global__ void __launch_bounds__(512) mamba1_tail_f32(TAIL_ARGS) { mamba1_tail_impl<0>(TAIL_PASS); }
extern "C" __global__ void __launch_bounds__(512) mamba1_tail_bf16(TAIL_ARGS) { mamba1_tail_impl<1>(TAIL_PASS); }
extern "C" __global__ void __launch_bounds__(512) mamba1_tail_f16(TAIL_ARGS) { mamba1_tail_impl<2>(TAIL_PASS); }
