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
// state only: `conv1d_state` runs after it to advance the windows.
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
// one pass; grid (channel blocks, sequences).
extern "C" __global__ void conv1d_step(const float* x, int x_stride, const float* weight, const float* bias, int k,
                                       int act, float* state, u64 slot_stride, u64 layer_off, const u32* slots,
                                       int channels, float* out, int out_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const int s = blockIdx.y;
    const u32 slot = slots[s];
    const int hist = k - 1;
    const float xv = x[(u64)s * x_stride + c];
    const float* w = weight + (u64)c * k;
    float acc = bias ? bias[c] : 0.0f;
    if (slot == PAD_SLOT) {
        acc += w[hist] * xv;
    } else {
        float* st = conv_state_ptr(state, slot, slot_stride, layer_off, c, hist);
        for (int j = 0; j < hist; ++j) acc += w[j] * st[j];
        acc += w[hist] * xv;
        for (int j = 0; j + 1 < hist; ++j) st[j] = st[j + 1];
        if (hist > 0) st[hist - 1] = xv;
    }
    out[(u64)s * out_stride + c] = activate(act, acc);
}
