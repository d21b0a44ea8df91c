// The whole stack of Mamba-1 blocks for one decode token of one sequence,
// in one launch: every block's entry norm, in_proj, conv step, x_proj, dt
// projection, state update, gate and out_proj with its residual add.
//
// Why one launch. At batch 1 a step reads every weight once and DRAM is the
// limit, but as four kernels a layer it was busy only half the time: each
// kernel boundary costs ~0.85 us of dependent-launch wait plus a drain and
// a ramp, and x_proj and the step read little (docs/perf-notes.md, version
// 11). Here one block per multiprocessor runs all layers. Warp W (the last)
// is a producer: one of its lanes walks the block's share of every weight
// in the order the block will use it, layer after layer, and copies it into
// a ring of shared-memory stages with bulk copies (`cp.async.bulk`, the
// copy engine), at most `depth` stages in flight. The other W warps take
// the stages in turn (stage g goes to warp g % W), each summing its
// stage's rows whole in a fixed order, so results do not depend on timing.
// x is kept in shared memory permuted (`xpos`) so that every 16-byte read
// of a warp is one contiguous 512-byte row: no bank conflicts.
//
// Per layer l, with the block's in_proj rows [r0, r1) (x rows below
// d_inner, z rows above), x_proj rows [p0, p1), channels [c0, c1) and
// out_proj rows [o0, o1), each shared evenly:
//   A: x = rmsnorm(residual) * norm; in_proj rows; the conv step of the x
//      rows' channels (window from the slot's conv state) -> xc, z.
//   B: x_proj rows over all of xc -> xdbl.
//   C: dt = softplus(dt_low . dt_proj[c] + bias) (Falcon: dt_low, B, C
//      RMS-normalised first), the state update of channels c0..c1 in the
//      slot, y = (C . h + D x) * silu(z) -> y.
//   D: out_proj rows over all of y, added to the residual -> residual.
// Per-layer vectors (norm, conv taps and window, dt_proj rows, A, D, dt
// bias, SSM state) come in two side buffers per kind (A and C),
// alternating by layer, from the same producer.
//
// Every value one block hands another (residual, xc, z, xdbl, y) is a
// 64-bit word {f32 value, u32 tag} written and read whole, the tag naming
// the launch, layer and phase that wrote it. A reader polls until the words
// it needs carry the tag it expects (all its pending words at once, one L2
// round trip a round), so a phase waits only for its own inputs. A word is
// never overwritten before every reader has it: its next writer is at
// least one phase behind a value that needed all readers' outputs. The
// tag's launch part is `sync[0]`, which the last block to finish advances
// for the next launch. With `barriers` the blocks also meet at a grid
// barrier before each such read (the first version's handoff, kept for
// comparisons).
//
// Status: correct (tests/integration/cuda.rs, the golden fixtures), but
// slower than the per-layer kernels at batch 1 (mamba-1.4b 1.44-1.48 ms
// against 1.30-1.31), so the backend runs it only when asked
// (MAMBA_SERVE_STACK); docs/perf-notes.md, version 12, has the phase
// timeline and what to try next.
//
// The grid must be resident at once (one block per multiprocessor, the
// shared memory allows no second): the host launches exactly as many blocks
// as multiprocessors, after every earlier kernel has finished.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

#define STACK_MAX_STAGES 48
#define STACK_LAYER_WORDS 12

// One layer's weights (the host's table, STACK_LAYER_WORDS pointers).
struct StackLayer {
    const void* in_proj;    // [2 d_inner, d_model]
    const float* in_bias;   // [2 d_inner] or null
    const float* norm;      // [d_model]
    const float* conv_w;    // [d_inner, d_conv]
    const float* conv_b;    // [d_inner] or null
    const void* x_proj;     // [rank + 2 d_state, d_inner]
    const void* dt_proj;    // [d_inner, rank]
    const float* dt_bias;   // [d_inner]
    const float* a;         // [d_inner, d_state], -exp(A_log)
    const float* skip;      // [d_inner]
    const void* out_proj;   // [d_model, d_inner]
    const float* out_bias;  // [d_model] or null
};

// Launch parameters; the host writes this C layout word by word
// (src/backend/cuda/stack.rs).
struct StackParams {
    const StackLayer* layers;
    float* residual;  // [d_model]: the embedding in, the last block's output out
    u64* tagged;      // residual [d_model] | xc [d_inner] | z [d_inner] | xdbl [rank + 2 d_state] | y [d_inner]
    float* conv_state;
    float* ssm_state;
    const u32* slots;  // slots[0]: the sequence's slot (PAD_SLOT: none)
    u32* sync;         // [0] the launch's tag part, [1] blocks finished, [2] the grid barrier
    u64 conv_slot, conv_layer;  // strides in floats
    u64 ssm_slot, ssm_layer;
    int n_layers, d_model, d_inner, d_state;
    int rank, d_conv, act, falcon;
    float eps, mixer_eps;
    int stage_bytes, stages;
    int depth, unit;
    int max_a, max_c;
    // Byte offsets into dynamic shared memory (off_red: the product sums;
    // off_x: x, permuted, in whole 256-float tiles). With `barriers`, the
    // blocks also meet at a grid barrier before each phase reads another's
    // values (sync[2]; for comparisons with the tags alone).
    int off_ring, off_side_a, side_a_bytes, off_side_c;
    int side_c_bytes, off_x, off_red, barriers;
    int off_xc, off_z, off_dbl, off_layers;
    int off_bars, off_sum;
};

// mbar_wait, adding the time it took to `spent` in timeline builds
// (scripts/stack-phases.py reads the totals).
__device__ __forceinline__ void mbar_wait_timed(u32 bar, u32 parity, u64& spent) {
#ifdef MS_TIMELINE
    const u64 t0 = tl_now();
    mbar_wait(bar, parity);
    spent += tl_now() - t0;
#else
    mbar_wait(bar, parity);
#endif
}

// Phase marks of thread 0 in timeline builds (events 3..15, see
// scripts/stack-phases.py).
#ifdef MS_TIMELINE
#define STACK_MARK(e) tl_mark(TL_STACK, e)
#else
#define STACK_MARK(e)
#endif

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// Where x[j] lives in the permuted x buffer: for 16-bit weights chunk c
// (elements 8c..8c+7) is two float4s, at (c / 32) * 64 + c % 32 and 32
// float4s further, so the lanes of a warp reading chunks c0 + lane read
// two contiguous 512-byte rows; f32 chunks are one float4, in place.
template <int DT>
__device__ __forceinline__ int xpos(int j) {
    if (DT == 0) return j;
    const int c = j >> 3, half = (j >> 2) & 1;
    return (((c >> 5) * 64 + half * 32 + (c & 31)) << 2) + (j & 3);
}

// A tagged word: value in the low half, tag in the high half.
__device__ __forceinline__ void put(u64* w, float v, u32 tag) {
    const u64 x = (u64)tag << 32 | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(w), "l"(x) : "memory");
}
__device__ __forceinline__ u64 peek(const u64* w) {
    u64 x;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(x) : "l"(w) : "memory");
    return x;
}
// dst[pos(j)] = the value of src[j] for j < n once it carries `tag`
// (pos: xpos<DT> when PERM, else j); thread tid of T takes j = tid,
// tid + T, ..., 16 words in flight at a time.
template <int DT, bool PERM>
__device__ __forceinline__ void gather(const u64* src, int n, u32 tag, float* dst, int tid, int T) {
    for (int j0 = tid; j0 < n; j0 += 16 * T) {
        u64 w[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const int j = j0 + u * T;
            w[u] = j < n ? peek(src + j) : (u64)tag << 32;
        }
        // Re-read every word not yet written, all at once: one round trip
        // a round, not one a word.
        for (bool pending = true; pending;) {
            pending = false;
#pragma unroll
            for (int u = 0; u < 16; ++u) {
                if ((u32)(w[u] >> 32) != tag) {
                    w[u] = peek(src + j0 + u * T);
                    pending = true;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const int j = j0 + u * T;
            if (j < n) dst[PERM ? xpos<DT>(j) : j] = __uint_as_float((u32)w[u]);
        }
    }
}

// The consumer warps' barrier (named barrier 1; the producer never joins).
__device__ __forceinline__ void consumers_sync(int threads) {
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}


// Sixteen bytes of weights of dtype DT (chunk c of a row) times x.
template <int DT>
__device__ __forceinline__ float dot16(uint4 w, const float* x, int c) {
    if (DT == 0) {
        const float4 p = *(const float4*)(x + 4 * c);
        return __uint_as_float(w.x) * p.x + __uint_as_float(w.y) * p.y + __uint_as_float(w.z) * p.z +
               __uint_as_float(w.w) * p.w;
    }
    const float4* base = (const float4*)x + (c >> 5) * 64 + (c & 31);
    const float4 p = base[0], q = base[32];
    float v[8];
    widen8_half<DT>(w, v);
    return (v[0] * p.x + v[1] * p.y + v[2] * p.z + v[3] * p.w) + (v[4] * q.x + v[5] * q.y + v[6] * q.z + v[7] * q.w);
}

// Rows a ring stage holds for rows of `row_bytes`.
__device__ __forceinline__ int rows_per_stage(int stage_bytes, int row_bytes) {
    const int r = stage_bytes / row_bytes;
    return r > 0 ? r : 1;
}

// The shared-memory view both roles use.
struct StackSmem {
    unsigned char* base;
    u32 bars;  // shared address of the mbarrier array
    int S;
    __device__ u32 full(int s) const { return bars + 8 * s; }
    __device__ u32 empty(int s) const { return bars + 8 * (S + s); }
    __device__ u32 side_full(int kind, int i) const { return bars + 8 * (2 * S + 4 * kind + i); }
    __device__ u32 side_empty(int kind, int i) const { return bars + 8 * (2 * S + 4 * kind + 2 + i); }
};

// Side buffer offsets (bytes): A holds the norm weights, then for up to
// max_a channels the conv taps, conv bias and conv window; C holds for up
// to max_c channels the dt_proj rows, A, D, the dt bias and the SSM state.
// The host sizes both with the same formulas (stack.rs).
struct SideA {
    int w, b, s;
    __device__ SideA(const StackParams& p) {
        w = (p.d_model * 4 + 15) & ~15;
        b = w + ((p.max_a * p.d_conv * 4 + 15) & ~15);
        s = b + p.max_a * 4;
    }
};
struct SideC {
    int a, d, bias, s;
    __device__ SideC(const StackParams& p, int ds) {
        a = (p.max_c * p.rank * ds + 15) & ~15;
        d = a + p.max_c * p.d_state * 4;
        bias = d + p.max_c * 4;
        s = bias + p.max_c * 4;
    }
};

// The producer lane: issues every stage and side buffer of the launch in
// the order the consumers take them.
template <int DT>
__device__ void stack_produce(const StackParams& p, const StackSmem& sm, const StackLayer* layers, int r0, int r1,
                              int p0, int p1, int c0, int c1, int o0, int o1) {
    constexpr int ds = DT == 0 ? 4 : 2;
    const int S = p.stages, SB = p.stage_bytes, D = p.d_model, E = p.d_inner, N = p.d_state, R = p.rank;
    const int k = p.d_conv;
    const int xa0 = min(r0, E), xa = min(r1, E) - xa0, nc = c1 - c0;
    const u32 slot = p.slots[0];
    const bool pad = slot == PAD_SLOT;
    const u32 ring = smem_addr(sm.base + p.off_ring);
    const SideA oa(p);
    const SideC oc(p, ds);
    int q = 0;
    u64 stall_ring = 0, stall_depth = 0, stall_side = 0;
    // Rows [a, b) of a [*, K] matrix into consecutive ring stages.
    auto rows = [&](const void* w, int a, int b, int K) {
        const int rb = K * ds, rps = rows_per_stage(SB, rb);
        for (int r = a; r < b; r += rps) {
            const int n = min(rps, b - r), s = q % S;
            if (q >= S) mbar_wait_timed(sm.empty(s), ((q / S) - 1) & 1, stall_ring);
            if (q >= p.depth) mbar_wait_timed(sm.full((q - p.depth) % S), ((q - p.depth) / S) & 1, stall_depth);
            mbar_expect(sm.full(s), (u32)(n * rb));
            bulk_copy(ring + s * SB, (const unsigned char*)w + (u64)r * rb, (u32)(n * rb), sm.full(s));
            ++q;
        }
    };
    for (int l = 0; l < p.n_layers; ++l) {
        const StackLayer& L = layers[l];
        const int i = l & 1;
        const u32 use = ((l >> 1) - 1) & 1;
        {
            if (l >= 2) mbar_wait_timed(sm.side_empty(0, i), use, stall_side);
            const u32 dst = smem_addr(sm.base + p.off_side_a + i * p.side_a_bytes), bar = sm.side_full(0, i);
            const u32 nb = D * 4, wb = xa * k * 4, bb = L.conv_b ? xa * 4 : 0, sb = pad ? 0 : xa * (k - 1) * 4;
            mbar_expect(bar, nb + wb + bb + sb);
            bulk_copy(dst, L.norm, nb, bar);
            if (wb) bulk_copy(dst + oa.w, L.conv_w + (u64)xa0 * k, wb, bar);
            if (bb) bulk_copy(dst + oa.b, L.conv_b + xa0, bb, bar);
            if (sb)
                bulk_copy(dst + oa.s, p.conv_state + (u64)slot * p.conv_slot + (u64)l * p.conv_layer + (u64)xa0 * (k - 1),
                          sb, bar);
        }
        rows(L.in_proj, r0, r1, D);
        rows(L.x_proj, p0, p1, E);
        {
            if (l >= 2) mbar_wait_timed(sm.side_empty(1, i), use, stall_side);
            const u32 dst = smem_addr(sm.base + p.off_side_c + i * p.side_c_bytes), bar = sm.side_full(1, i);
            const u32 tb = nc * R * ds, ab = nc * N * 4, vb = nc * 4, sb = pad ? 0 : nc * N * 4;
            mbar_expect(bar, tb + ab + 2 * vb + sb);
            if (nc) {
                bulk_copy(dst, (const unsigned char*)L.dt_proj + (u64)c0 * R * ds, tb, bar);
                bulk_copy(dst + oc.a, L.a + (u64)c0 * N, ab, bar);
                bulk_copy(dst + oc.d, L.skip + c0, vb, bar);
                bulk_copy(dst + oc.bias, L.dt_bias + c0, vb, bar);
                if (sb)
                    bulk_copy(dst + oc.s, p.ssm_state + (u64)slot * p.ssm_slot + (u64)l * p.ssm_layer + (u64)c0 * N, sb,
                              bar);
            }
        }
        rows(L.out_proj, o0, o1, E);
    }
#ifdef MS_TIMELINE
    tl_record(TL_STACK, 16, stall_ring);
    tl_record(TL_STACK, 17, stall_depth);
    tl_record(TL_STACK, 18, stall_side);
#endif
}

// Consumer warps: rows [0, n) of a region whose first stage is global
// stage q, each dotted with x (permuted, K columns) into acc[row]. Stage g
// goes to warp g % W, whose lane 0 waits for it and releases it. Returns
// the next region's first stage.
template <int DT>
__device__ int stack_rows(const StackSmem& sm, const StackParams& p, int q, int n, int K, const float* x, float* acc,
                          int warp, int W, int lane, u64& waited) {
    constexpr int ds = DT == 0 ? 4 : 2, epc = 16 / ds;
    if (n <= 0) return q;
    const int S = p.stages, SB = p.stage_bytes, rb = K * ds, rps = rows_per_stage(SB, rb);
    const int stages = (n + rps - 1) / rps, chunks = K / epc;
    const unsigned char* ring = sm.base + p.off_ring;
    for (int j = ((warp - q) % W + W) % W; j < stages; j += W) {
        const int g = q + j, s = g % S;
        if (lane == 0) mbar_wait_timed(sm.full(s), (g / S) & 1, waited);
        __syncwarp();
        const unsigned char* st = ring + s * SB;
        const int r0 = j * rps, r1 = min(n, r0 + rps);
        for (int r = r0; r < r1; ++r) {
            const uint4* w = (const uint4*)(st + (r - r0) * rb);
            float part = 0.0f;
#pragma unroll 4
            for (int c = lane; c < chunks; c += 32) part += dot16<DT>(w[c], x, c);
            part = warp_sum(part);
            if (lane == 0) acc[r] = part;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(sm.empty(s));
    }
    return q + stages;
}

template <int DT>
__device__ void stack_impl(const StackParams& p) {
    TL_SCOPE(TL_STACK);
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int ds = DT == 0 ? 4 : 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int W = (blockDim.x >> 5) - 1, T = W * 32;
    const int G = gridDim.x, b = blockIdx.x;
    const int D = p.d_model, E = p.d_inner, N = p.d_state, R = p.rank, k = p.d_conv, L = p.n_layers;
    StackSmem sm{smem, smem_addr(smem + p.off_bars), p.stages};
    StackLayer* layers = (StackLayer*)(smem + p.off_layers);
    if (tid == 0) {
        for (int s = 0; s < p.stages; ++s) {
            mbar_init(sm.full(s), 1);
            mbar_init(sm.empty(s), 1);
        }
        for (int i = 0; i < 8; ++i) mbar_init(sm.bars + 8 * (2 * p.stages + i), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    for (int i = tid; i < L * STACK_LAYER_WORDS; i += blockDim.x) ((u64*)layers)[i] = ((const u64*)p.layers)[i];
    __syncthreads();

    int r0, r1, p0, p1, c0, c1, o0, o1;
    share(2 * E / p.unit, p.unit, G, b, r0, r1);
    share(R + 2 * N, 1, G, b, p0, p1);
    share(E / p.unit, p.unit, G, b, c0, c1);
    share(D, 1, G, b, o0, o1);
    if (warp == W) {
        if (lane == 0) stack_produce<DT>(p, sm, layers, r0, r1, p0, p1, c0, c1, o0, o1);
        return;
    }

    float* x = (float*)(smem + p.off_x);
    float* acc = (float*)(smem + p.off_red);
    float* xc_s = (float*)(smem + p.off_xc);
    float* z_s = (float*)(smem + p.off_z);
    float* dbl = (float*)(smem + p.off_dbl);
    float* sums = (float*)(smem + p.off_sum);
    u64* t_res = p.tagged;
    u64* t_xc = t_res + D;
    u64* t_z = t_xc + E;
    u64* t_dbl = t_z + E;
    u64* t_y = t_dbl + R + 2 * N;
    const u32 slot = p.slots[0];
    const bool pad = slot == PAD_SLOT;
    const u32 epoch = *(volatile const u32*)p.sync;
    const SideA oa(p);
    const SideC oc(p, ds);
    const int xa0 = min(r0, E), nc = c1 - c0;
    int q = 0;
    u64 waited = 0, waited_side = 0;
    for (int l = 0; l < L; ++l) {
        const StackLayer& Ly = layers[l];
        const int i = l & 1;
        const u32 use = (l >> 1) & 1;
        const u32 tag = epoch * 4u * (u32)L + 4u * (u32)l;  // + phase
        STACK_MARK(3);

        // A: the entry norm, in_proj, the conv step.
        if (l == 0) {
            for (int j = tid; j < D; j += T) x[xpos<DT>(j)] = ld_cg(p.residual + j);
        } else {
            if (p.barriers) grid_sync(p.sync + 2, T);
            gather<DT, true>(t_res, D, tag - 1, x, tid, T);
        }
        const float* side_a = (const float*)(smem + p.off_side_a + i * p.side_a_bytes);
        mbar_wait_timed(sm.side_full(0, i), use, waited_side);
        float ss = 0.0f;
        for (int j = tid; j < D; j += T) {
            const int at = xpos<DT>(j);
            const float h = x[at];
            ss += h * h;
            x[at] = h * side_a[j];
        }
        ss = warp_sum(ss);
        if (lane == 0) sums[warp] = ss;
        consumers_sync(T);
        float s2 = 0.0f;
        for (int w = 0; w < W; ++w) s2 += sums[w];
        const float inv = (float)(1.0 / sqrt((double)s2 / D + (double)p.eps));
        STACK_MARK(4);
        q = stack_rows<DT>(sm, p, q, r1 - r0, D, x, acc, warp, W, lane, waited);
        consumers_sync(T);
        STACK_MARK(5);
        if (tid < r1 - r0) {
            const int row = r0 + tid;
            float v = acc[tid] * inv;
            if (Ly.in_bias) v += Ly.in_bias[row];
            if (row < E) {
                const int t = row - xa0;
                const float* w = (const float*)((const unsigned char*)side_a + oa.w) + t * k;
                const float* win = (const float*)((const unsigned char*)side_a + oa.s) + t * (k - 1);
                float o = Ly.conv_b ? ((const float*)((const unsigned char*)side_a + oa.b))[t] : 0.0f;
                for (int j = 0; j + 1 < k; ++j) o += w[j] * (pad ? 0.0f : win[j]);
                o += w[k - 1] * v;
                if (!pad) {
                    float* st = p.conv_state + (u64)slot * p.conv_slot + (u64)l * p.conv_layer + (u64)row * (k - 1);
                    for (int j = 0; j + 2 < k; ++j) st[j] = win[j + 1];
                    if (k > 1) st[k - 2] = v;
                }
                put(t_xc + row, activate(p.act, o), tag);
            } else {
                put(t_z + row - E, v, tag);
            }
        }
        consumers_sync(T);
        if (tid == 0) mbar_arrive(sm.side_empty(0, i));
        STACK_MARK(6);

        // B: x_proj over all of xc.
        if (p.barriers) grid_sync(p.sync + 2, T);
        gather<DT, true>(t_xc, E, tag, x, tid, T);
        consumers_sync(T);
        STACK_MARK(7);
        q = stack_rows<DT>(sm, p, q, p1 - p0, E, x, acc, warp, W, lane, waited);
        consumers_sync(T);
        STACK_MARK(8);
        if (tid < p1 - p0) put(t_dbl + p0 + tid, acc[tid], tag + 1);
        STACK_MARK(9);

        // C: dt, the state update, the gate.
        const int nd = R + 2 * N;
        if (p.barriers) grid_sync(p.sync + 2, T);
        gather<DT, false>(t_dbl, nd, tag + 1, dbl, tid, T);
        gather<DT, false>(t_xc + c0, nc, tag, xc_s, tid, T);
        gather<DT, false>(t_z + c0, nc, tag, z_s, tid, T);
        consumers_sync(T);
        float inv_dt = 1.0f, inv_b = 1.0f, inv_c = 1.0f;
        if (p.falcon) {
            float sd = 0.0f, sb = 0.0f, sc = 0.0f;
            for (int j = lane; j < R; j += 32) sd += dbl[j] * dbl[j];
            for (int j = lane; j < N; j += 32) {
                sb += dbl[R + j] * dbl[R + j];
                sc += dbl[R + N + j] * dbl[R + N + j];
            }
            sd = warp_sum(sd);
            sb = warp_sum(sb);
            sc = warp_sum(sc);
            inv_dt = (float)(1.0 / sqrt((double)sd / R + (double)p.mixer_eps));
            inv_b = (float)(1.0 / sqrt((double)sb / N + (double)p.mixer_eps));
            inv_c = (float)(1.0 / sqrt((double)sc / N + (double)p.mixer_eps));
        }
        const unsigned char* side_c = smem + p.off_side_c + i * p.side_c_bytes;
        const float* a_s = (const float*)(side_c + oc.a);
        const float* d_s = (const float*)(side_c + oc.d);
        const float* bias_s = (const float*)(side_c + oc.bias);
        const float* h_s = (const float*)(side_c + oc.s);
        mbar_wait_timed(sm.side_full(1, i), use, waited_side);
        STACK_MARK(10);
        // N consecutive lanes own a channel (N divides 32).
        for (int base = warp * 32; base < nc * N; base += T) {
            const int pr = base + lane, active = pr < nc * N;
            const int t = active ? pr / N : 0, n = pr % N;
            float part = 0.0f;
            for (int r = n; r < R; r += N) part += load_weight<DT>(side_c, (u64)t * R + r) * dbl[r];
            for (int o = N / 2; o > 0; o >>= 1) part += __shfl_xor_sync(FULL_MASK, part, o);
            const float dt = softplus_f(part * inv_dt + bias_s[t]);
            const float xv = xc_s[t];
            float h = pad ? 0.0f : h_s[t * N + n];
            h = expf(dt * a_s[t * N + n]) * h + (dt * (dbl[R + n] * inv_b)) * xv;
            float yp = h * (dbl[R + N + n] * inv_c);
            for (int o = N / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
            if (active) {
                if (!pad) p.ssm_state[(u64)slot * p.ssm_slot + (u64)l * p.ssm_layer + (u64)(c0 + t) * N + n] = h;
                if (n == 0) put(t_y + c0 + t, (yp + xv * d_s[t]) * silu_f(z_s[t]), tag + 2);
            }
        }
        consumers_sync(T);
        if (tid == 0) mbar_arrive(sm.side_empty(1, i));
        STACK_MARK(11);

        // D: out_proj over all of y, added to the residual.
        if (p.barriers) grid_sync(p.sync + 2, T);
        gather<DT, true>(t_y, E, tag + 2, x, tid, T);
        consumers_sync(T);
        STACK_MARK(12);
        q = stack_rows<DT>(sm, p, q, o1 - o0, E, x, acc, warp, W, lane, waited);
        consumers_sync(T);
        STACK_MARK(14);
        if (tid < o1 - o0) {
            const int o = o0 + tid;
            float v = acc[tid];
            if (Ly.out_bias) v += Ly.out_bias[o];
            // The row's previous value: this thread wrote it a layer ago.
            v += l == 0 ? ld_cg(p.residual + o) : __uint_as_float((u32)peek(t_res + o));
            put(t_res + o, v, tag + 3);
            if (l + 1 == L) p.residual[o] = v;
        }
        STACK_MARK(15);
    }
    // The last block to finish advances the tags' launch part.
    consumers_sync(T);
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(p.sync + 1, 1u) == (u32)G - 1) {
            p.sync[1] = 0;
            p.sync[0] = epoch + 1;
        }
    }
#ifdef MS_TIMELINE
    if (tid == 0) {
        tl_record(TL_STACK, 19, waited);
        tl_record(TL_STACK, 20, waited_side);
    }
#endif
}

#define STACK_KERNEL(name, dt) \
    extern "C" __global__ void name(StackParams p) { stack_impl<dt>(p); }
#else
// Before sm_90 (no bulk copies): never launched, the host checks.
struct StackParams {
    u64 words[26];
};
#define STACK_KERNEL(name, dt) \
    extern "C" __global__ void name(StackParams p) {}
#endif

STACK_KERNEL(mamba1_stack_f32, 0)
STACK_KERNEL(mamba1_stack_bf16, 1)
STACK_KERNEL(mamba1_stack_f16, 2)
