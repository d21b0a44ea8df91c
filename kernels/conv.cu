// Causal depthwise conv1d over a packed batch, reading and writing each
// sequence's conv window in the state pool.
//
// State of (slot, layer): `hist = k - 1` previous inputs per channel,
// `[channels, hist]`, oldest first, at state + slot * slot_stride + layer_off.
// Output row t of a segment: act(bias + sum_j w[c, j] * x_{t - k + 1 + j}),
// where inputs before the segment come from the state.

__device__ __forceinline__ float* conv_state_ptr(float* state, u32 slot, u64 slot_stride, u64 layer_off, int c,
                                                 int hist) {
    return state + (u64)slot * slot_stride + layer_off + (u64)c * hist;
}

// Outputs of every packed row; grid (tokens, channel blocks). Reads the old
// state only: `conv1d_state` runs after it to advance the windows. Used for
// kernels of more than 8 taps only (conv1d_runs_k4/k8 below otherwise).
extern "C" __global__ void conv1d_packed(const float* x, int x_stride, const float* weight, const float* bias, int k,
                                         int act, const float* state, u64 slot_stride, u64 layer_off, const u32* cu,
                                         const u32* slots, int n_seqs, int channels, float* out, int out_stride) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const u32 t = blockIdx.x;
    const int s = segment_of(cu, n_seqs, t);
    const u32 start = cu[s];
    const u32 slot = slots[s];
    const int hist = k - 1;
    const int i = (int)(t - start);
    const float* st = slot == PAD_SLOT ? 0 : conv_state_ptr((float*)state, slot, slot_stride, layer_off, c, hist);
    const float* w = weight + (u64)c * k;
    float acc = bias ? bias[c] : 0.0f;
    for (int j = 0; j < k; ++j) {
        const int u = i - hist + j;
        float v;
        if (u >= 0) v = x[(u64)(start + u) * x_stride + c];
        else v = st ? st[hist + u] : 0.0f;
        acc += w[j] * v;
    }
    out[(u64)t * out_stride + c] = activate(act, acc);
}

// Outputs of every packed row, one thread per channel over a run of
// CONV_RUN consecutive packed rows: the last k - 1 inputs stay in registers,
// so each input row is loaded once (coalesced across the block's channels)
// besides the k - 1 rows before the run that start it. The segment of the
// run's first row is looked up once and advanced at each segment boundary,
// where the window restarts from that sequence's state (zeros for a padding
// row). Kernels of k <= KMAX taps: the window is right-aligned in KMAX - 1
// registers, and taps before KMAX - k are skipped. ACT >= 0 fixes the
// activation at compile time (so the unrolled rows do not carry every
// activation's code); -1 takes `act`. Reads the old state only, like
// conv1d_packed (`conv1d_state` advances the windows afterwards); grid
// (channel blocks, runs).
#define CONV_RUN 32
#define CONV_BATCH 8

template <int KMAX, int ACT>
__device__ void conv1d_runs_impl(const float* __restrict__ x, int x_stride, const float* __restrict__ weight,
                                 const float* __restrict__ bias, int k, int act, const float* __restrict__ state,
                                 u64 slot_stride, u64 layer_off, const u32* __restrict__ cu,
                                 const u32* __restrict__ slots, int n_seqs, int n_tokens, int channels,
                                 float* __restrict__ out, int out_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const int r0 = blockIdx.y * CONV_RUN;
    const int r1 = min(r0 + CONV_RUN, n_tokens);
    const int hist = k - 1;
    // Tap j of the KMAX-wide window multiplies the input of row t - (KMAX - 1) + j.
    const int off = KMAX - k;
    float wr[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) wr[j] = j >= off ? weight[(u64)c * k + (j - off)] : 0.0f;
    const float b0 = bias ? bias[c] : 0.0f;

    int s = segment_of(cu, n_seqs, (u32)r0);
    int start = (int)cu[s], next = (int)cu[s + 1];
    // win[j]: the input of row t - (KMAX - 1) + j, j < KMAX - 1 (t - 1 last),
    // from the state for rows before the segment's start.
    float win[KMAX > 1 ? KMAX - 1 : 1];
    auto fill = [&](int t) {
        const u32 slot = slots[s];
        const float* st =
            slot == PAD_SLOT ? 0 : conv_state_ptr((float*)state, slot, slot_stride, layer_off, c, hist);
#pragma unroll
        for (int j = 0; j < KMAX - 1; ++j) {
            const int p = t - (KMAX - 1) + j;
            if (j < off) win[j] = 0.0f;
            else if (p >= start) win[j] = x[(u64)p * x_stride + c];
            else win[j] = st ? st[hist + (p - start)] : 0.0f;
        }
    };
    fill(r0);
    for (int t0 = r0; t0 < r1; t0 += CONV_BATCH) {
        float xv[CONV_BATCH];
#pragma unroll
        for (int u = 0; u < CONV_BATCH; ++u) xv[u] = t0 + u < r1 ? x[(u64)(t0 + u) * x_stride + c] : 0.0f;
#pragma unroll
        for (int u = 0; u < CONV_BATCH; ++u) {
            const int t = t0 + u;
            if (t >= r1) break;
            if (t >= next) {
                // A new segment starts at row t (past any empty ones).
                while (t >= next) next = (int)cu[++s + 1];
                start = t;
                fill(t);
            }
            float acc = b0;
#pragma unroll
            for (int j = 0; j < KMAX - 1; ++j)
                if (j >= off) acc += wr[j] * win[j];
            acc += wr[KMAX - 1] * xv[u];
            out[(u64)t * out_stride + c] = activate(ACT >= 0 ? ACT : act, acc);
#pragma unroll
            for (int j = 0; j + 1 < KMAX - 1; ++j) win[j] = win[j + 1];
            if (KMAX > 1) win[KMAX - 2] = xv[u];
        }
    }
}

#define CONV_RUNS_ARGS                                                                                             \
    const float *x, int x_stride, const float *weight, const float *bias, int k, int act, const float *state,     \
        u64 slot_stride, u64 layer_off, const u32 *cu, const u32 *slots, int n_seqs, int n_tokens, int channels,   \
        float *out, int out_stride
#define CONV_RUNS_PASS                                                                                             \
    x, x_stride, weight, bias, k, act, state, slot_stride, layer_off, cu, slots, n_seqs, n_tokens, channels, out, \
        out_stride

// SiLU (Mamba) and identity get their own code; other activations the generic path.
#define CONV_RUNS_KERNEL(name, KMAX)                                                                               \
    extern "C" __global__ void name(CONV_RUNS_ARGS) {                                                              \
        if (act == 1) conv1d_runs_impl<KMAX, 1>(CONV_RUNS_PASS);                                                   \
        else if (act == 0) conv1d_runs_impl<KMAX, 0>(CONV_RUNS_PASS);                                              \
        else conv1d_runs_impl<KMAX, -1>(CONV_RUNS_PASS);                                                           \
    }
CONV_RUNS_KERNEL(conv1d_runs_k4, 4)
CONV_RUNS_KERNEL(conv1d_runs_k8, 8)

// Advances each sequence's window past its segment; grid (channel blocks,
// sequences).
extern "C" __global__ void conv1d_state(const float* x, int x_stride, int k, float* state, u64 slot_stride,
                                        u64 layer_off, const u32* cu, const u32* slots, int channels) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const int s = blockIdx.y;
    const u32 slot = slots[s];
    if (slot == PAD_SLOT) return;
    const u32 start = cu[s];
    const int len = (int)(cu[s + 1] - start);
    if (len == 0) return;
    const int hist = k - 1;
    float* st = conv_state_ptr(state, slot, slot_stride, layer_off, c, hist);
    // Ascending j reads st[len + j] (> j) before anything overwrites it.
    for (int j = 0; j < hist; ++j) {
        const int u = len - hist + j;
        st[j] = u >= 0 ? x[(u64)(start + u) * x_stride + c] : st[len + j];
    }
}

// One token per sequence (row s = sequence s): output and window update in
// one pass. Thread = channel; each block takes CONV_STEP_SEQS sequences and
// loads all their windows before computing any, so several state loads per
// thread are in flight, and loads the channel's weights once for all of
// them. Kernels up to CONV_STEP_MAX_K taps. Grid (channel blocks, sequence
// groups). With `half`, the output is also written there as a dense
// 16-bit copy (`half_dt` 1 bf16, 2 f16) for x_proj's tensor-core product.
#define CONV_STEP_SEQS 4
#define CONV_STEP_MAX_K 8

extern "C" __global__ void conv1d_step(const float* __restrict__ x, int x_stride, const float* __restrict__ weight,
                                       const float* __restrict__ bias, int k, int act, float* __restrict__ state,
                                       u64 slot_stride, u64 layer_off, const u32* __restrict__ slots, int n_seqs,
                                       int channels, float* __restrict__ out, int out_stride, u16* __restrict__ half,
                                       int half_dt) {
    TL_SCOPE(TL_CONV_STEP);
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const int hist = k - 1;
    float w[CONV_STEP_MAX_K - 1];
#pragma unroll
    for (int j = 0; j < CONV_STEP_MAX_K - 1; ++j) w[j] = j < hist ? weight[(u64)c * k + j] : 0.0f;
    const float w_last = weight[(u64)c * k + hist];
    const float b = bias ? bias[c] : 0.0f;
    grid_dep_sync();
    TL_WAITED(TL_CONV_STEP);
    const int s0 = blockIdx.y * CONV_STEP_SEQS;
    float win[CONV_STEP_SEQS][CONV_STEP_MAX_K];
    float* st[CONV_STEP_SEQS];
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        const u32 slot = s < n_seqs ? slots[s] : PAD_SLOT;
        st[i] = slot == PAD_SLOT ? 0 : conv_state_ptr(state, slot, slot_stride, layer_off, c, hist);
#pragma unroll
        for (int j = 0; j < CONV_STEP_MAX_K - 1; ++j) win[i][j] = (st[i] && j < hist) ? st[i][j] : 0.0f;
        win[i][CONV_STEP_MAX_K - 1] = s < n_seqs ? x[(u64)s * x_stride + c] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        if (s >= n_seqs) break;
        const float xv = win[i][CONV_STEP_MAX_K - 1];
        float acc = b;
#pragma unroll
        for (int j = 0; j < CONV_STEP_MAX_K - 1; ++j)
            if (j < hist) acc += w[j] * win[i][j];
        acc += w_last * xv;
        if (st[i]) {
#pragma unroll
            for (int j = 0; j + 1 < CONV_STEP_MAX_K - 1; ++j)
                if (j + 1 < hist) st[i][j] = win[i][j + 1];
            if (hist > 0) st[i][hist - 1] = xv;
        }
        const float v = activate(act, acc);
        out[(u64)s * out_stride + c] = v;
        if (half) half[(u64)s * channels + c] = half_dt == 1 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

// The taps (w[j] = channel c + j's four) and biases of the four channels
// from c, shared by the 4-channel kernels.
__device__ __forceinline__ void conv4_params(const float* weight, const float* bias, int c, float4 (&w)[4], float4& b) {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = ((const float4*)(weight + (u64)c * 4))[j];
    if (bias) b = *(const float4*)(bias + c);
}

// Four adjacent channels' 4-tap step, shared by the 4-channel kernels:
// `win` holds channel q's window at 3q .. 3q + 2 and is advanced in place
// (the oldest value of each channel out, its input in); returns the
// activated outputs.
__device__ __forceinline__ float4 conv4_quad(float4 (&win)[3], float4 xin, const float4 (&w)[4], float4 b, int act) {
    const float h[12] = {win[0].x, win[0].y, win[0].z, win[0].w, win[1].x, win[1].y,
                         win[1].z, win[1].w, win[2].x, win[2].y, win[2].z, win[2].w};
    const float xv[4] = {xin.x, xin.y, xin.z, xin.w};
    const float bv[4] = {b.x, b.y, b.z, b.w};
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float4 t = w[q];
        const float acc = bv[q] + t.x * h[3 * q] + t.y * h[3 * q + 1] + t.z * h[3 * q + 2] + t.w * xv[q];
        v[q] = activate(act, acc);
    }
    win[0] = make_float4(h[1], h[2], xv[0], h[4]);
    win[1] = make_float4(h[5], xv[1], h[7], h[8]);
    win[2] = make_float4(xv[2], h[10], h[11], xv[3]);
    return make_float4(v[0], v[1], v[2], v[3]);
}

// Row s's four outputs at channel c, and their 16-bit copy when asked.
__device__ __forceinline__ void conv4_store(float* out, int out_stride, u16* half, int half_dt, int channels, int s, int c, float4 v) {
    *(float4*)(out + (u64)s * out_stride + c) = v;
    if (half) {
        const float e[4] = {v.x, v.y, v.z, v.w};
        u16 hv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) hv[q] = half_dt == 1 ? f32_to_bf16(e[q]) : f32_to_f16(e[q]);
        *(uint2*)(half + (u64)s * channels + c) = make_uint2((u32)hv[0] | ((u32)hv[1] << 16), (u32)hv[2] | ((u32)hv[3] << 16));
    }
}

// conv1d_step for 4-tap kernels over 16-byte aligned rows: each thread
// takes 4 adjacent channels, so their 12 state values, 16 taps, inputs and
// outputs move as 16-byte pieces (the scalar kernel's warps touch every
// state sector with three 4-byte loads and three 4-byte stores). Same
// arguments as conv1d_step (k is 4); grid (blocks of 128 channel quads,
// sequence groups).
extern "C" __global__ void conv1d_step4(const float* __restrict__ x, int x_stride, const float* __restrict__ weight,
                                        const float* __restrict__ bias, int k, int act, float* __restrict__ state,
                                        u64 slot_stride, u64 layer_off, const u32* __restrict__ slots, int n_seqs,
                                        int channels, float* __restrict__ out, int out_stride, u16* __restrict__ half,
                                        int half_dt) {
    TL_SCOPE(TL_CONV_STEP4);
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (c >= channels) return;
    float4 w[4], b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    conv4_params(weight, bias, c, w, b);
    const int s0 = blockIdx.y * CONV_STEP_SEQS;
    // Per sequence: the 4 channels' 3-value windows (12 floats) and inputs.
    float4 win[CONV_STEP_SEQS][3], xin[CONV_STEP_SEQS];
    float4* st[CONV_STEP_SEQS];
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        const u32 slot = s < n_seqs ? slots[s] : PAD_SLOT;
        st[i] = slot == PAD_SLOT ? 0 : (float4*)conv_state_ptr(state, slot, slot_stride, layer_off, c, 3);
#pragma unroll
        for (int j = 0; j < 3; ++j) win[i][j] = st[i] ? st[i][j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        xin[i] = s < n_seqs ? *(const float4*)(x + (u64)s * x_stride + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        if (s >= n_seqs) break;
        const float4 v = conv4_quad(win[i], xin[i], w, b, act);
        if (st[i]) {
            st[i][0] = win[i][0];
            st[i][1] = win[i][1];
            st[i][2] = win[i][2];
        }
        conv4_store(out, out_stride, half, half_dt, channels, s, c, v);
    }
}

// conv1d_step4 with the state moved through shared memory: a warp's 128
// channels of one sequence are 384 contiguous floats of the slot, which
// the warp loads and stores as three 512-byte rows of 16-byte pieces
// (lane l takes pieces l, l + 32, l + 64) and hands on to the lanes that
// own them through shared memory. Loaded and stored per thread, each
// 16-byte piece sat 48 bytes from its neighbour's, so every instruction
// wrote every 32-byte sector of the row in part. Same arguments and grid
// as conv1d_step4.
#define CONV_STEP4_WARPS 4

extern "C" __global__ void __launch_bounds__(128) conv1d_step4_staged(
    const float* __restrict__ x, int x_stride, const float* __restrict__ weight, const float* __restrict__ bias, int k, int act,
    float* __restrict__ state, u64 slot_stride, u64 layer_off, const u32* __restrict__ slots, int n_seqs, int channels,
    float* __restrict__ out, int out_stride, u16* __restrict__ half, int half_dt) {
    TL_SCOPE(TL_CONV_STEP4_STAGED);
    __shared__ float4 stage[CONV_STEP4_WARPS][CONV_STEP_SEQS][96];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int quads = channels / 4;
    const int q0 = blockIdx.x * blockDim.x + warp * 32;
    if (q0 >= quads) return;
    // The warp's quads (of 4 channels) and its pieces of a sequence's state.
    const int vq = min(32, quads - q0), pieces = 3 * vq;
    const bool active = lane < vq;
    const int c = (q0 + lane) * 4;
    float4 w[4];
    float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (active) conv4_params(weight, bias, c, w, b);
    const int s0 = blockIdx.y * CONV_STEP_SEQS;
    float4 raw[CONV_STEP_SEQS][3], xin[CONV_STEP_SEQS];
    float4* st[CONV_STEP_SEQS];
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        const u32 slot = s < n_seqs ? slots[s] : PAD_SLOT;
        st[i] = slot == PAD_SLOT ? 0 : (float4*)conv_state_ptr(state, slot, slot_stride, layer_off, q0 * 4, 3);
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            const int p = lane + 32 * j;
            raw[i][j] = st[i] && p < pieces ? st[i][p] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        xin[i] = s < n_seqs && active ? *(const float4*)(x + (u64)s * x_stride + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) stage[warp][i][lane + 32 * j] = raw[i][j];
    __syncwarp();
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        const int s = s0 + i;
        if (s >= n_seqs || !active) continue;
        float4* mine = &stage[warp][i][3 * lane];
        float4 win[3] = {mine[0], mine[1], mine[2]};
        const float4 v = conv4_quad(win, xin[i], w, b, act);
        mine[0] = win[0];
        mine[1] = win[1];
        mine[2] = win[2];
        conv4_store(out, out_stride, half, half_dt, channels, s, c, v);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < CONV_STEP_SEQS; ++i) {
        if (!st[i]) continue;
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            const int p = lane + 32 * j;
            if (p < pieces) st_global_v4(st[i] + p, stage[warp][i][p]);
        }
    }
}
