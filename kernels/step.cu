// Mamba-1 decode step for large batches, where dt_low · dt_projᵀ was
// computed beforehand by one matrix product (`dtpre`, un-normalised as in
// `mamba1_step_impl`). Here the state traffic is everything: each sequence's
// `[channels, d_state]` f32 state is read and written once per layer.
//
// A group of `lanes` = d_state / 4 threads owns one channel, 4 consecutive
// states per thread (16-byte accesses), for STEP_WIDE_SEQS sequences: the
// thread loads a, D and dt_bias once, issues every sequence's state load
// before using any (several 16-byte loads in flight per thread), then
// updates and stores them in turn. The block stages its sequences' B and C
// in shared memory once. Falcon-Mamba's weightless norms of dt, B and C are
// applied when `norm` is set. Grid (channel blocks, sequence
// groups).
#define STEP_WIDE_MAX_STATE 128

template <int STEP_WIDE_SEQS>
__device__ void mamba1_step_wide_impl(const float* __restrict__ x, int xs, const float* __restrict__ xdbl, int xds,
                                      const float* __restrict__ dtpre, int dps, const float* __restrict__ dt_bias,
                                      const float* __restrict__ a, const float* __restrict__ skip,
                                      const float* __restrict__ z, int zs, float* __restrict__ state,
                                      u64 slot_stride, u64 layer_off, const u32* __restrict__ slots, int n_seqs,
                                      int channels, int d_state, int rank, int norm, float eps, int lanes,
                                      float* __restrict__ out, int os) {
    const int lane = threadIdx.x & (lanes - 1);
    const int cpb = blockDim.x / lanes;
    const int c = blockIdx.x * cpb + threadIdx.x / lanes;
    const bool active = c < channels;
    const int cc = active ? c : channels - 1;
    const int n0 = lane * 4;
    const bool valid = n0 < d_state;
    const int s0 = blockIdx.y * STEP_WIDE_SEQS;

    const float4 av = valid ? *(const float4*)(a + (u64)cc * d_state + n0) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float avv[4] = {av.x, av.y, av.z, av.w};
    const float bias = dt_bias[cc];
    const float dsk = skip[cc];
    grid_dep_sync();
    // Every load first: the states (from memory) and each sequence's
    // scalars and B, C (from cache), so nothing waits in the loop below.
    float4 h[STEP_WIDE_SEQS];
    float* st[STEP_WIDE_SEQS];
    float dtr[STEP_WIDE_SEQS], xv[STEP_WIDE_SEQS], zv[STEP_WIDE_SEQS];
#pragma unroll
    for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
        const int s = s0 + i;
        const bool live = s < n_seqs;
        const u32 slot = live ? slots[s] : PAD_SLOT;
        st[i] = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state + n0;
        h[i] = (st[i] && valid) ? *(const float4*)st[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const int sr = live ? s : 0;
        dtr[i] = dtpre[(u64)sr * dps + cc];
        xv[i] = x[(u64)sr * xs + cc];
        zv[i] = z[(u64)sr * zs + cc];
    }
    // B and C of the block's sequences, shared by all its channels.
    __shared__ float bc[STEP_WIDE_SEQS][2 * STEP_WIDE_MAX_STATE];
    for (int i = threadIdx.x; i < STEP_WIDE_SEQS * 2 * d_state; i += blockDim.x) {
        const int q = i / (2 * d_state), j = i % (2 * d_state), s = s0 + q;
        bc[q][j] = s < n_seqs ? xdbl[(u64)s * xds + rank + j] : 0.0f;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
        const int s = s0 + i;
        if (s >= n_seqs) break;
        float inv_dt = 1.0f, inv_b = 1.0f, inv_c = 1.0f;
        if (norm) {
            const float* row = xdbl + (u64)s * xds;
            float sd = 0.0f, sb = 0.0f, sc = 0.0f;
            for (int r = lane; r < rank; r += lanes) sd += row[r] * row[r];
            for (int n = lane; n < d_state; n += lanes) {
                const float b = row[rank + n], c = row[rank + d_state + n];
                sb += b * b;
                sc += c * c;
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
        const float dtv = softplus_f(dtr[i] * inv_dt + bias);
        float yp = 0.0f;
        if (valid) {
            const float hv[4] = {h[i].x, h[i].y, h[i].z, h[i].w};
            float hn[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float da = expf(dtv * avv[q]);
                hn[q] = da * hv[q] + (dtv * (bc[i][n0 + q] * inv_b)) * xv[i];
                yp += hn[q] * (bc[i][d_state + n0 + q] * inv_c);
            }
            if (st[i] && active) *(float4*)st[i] = make_float4(hn[0], hn[1], hn[2], hn[3]);
        }
        for (int o = lanes / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
        if (lane == 0 && active) out[(u64)s * os + cc] = (yp + xv[i] * dsk) * silu_f(zv[i]);
    }
}

#define WIDE_ARGS                                                                                                 \
    const float *x, int xs, const float *xdbl, int xds, const float *dtpre, int dps, const float *dt_bias,        \
        const float *a, const float *skip, const float *z, int zs, float *state, u64 slot_stride, u64 layer_off,  \
        const u32 *slots, int n_seqs, int channels, int d_state, int rank, int norm, float eps, int lanes,         \
        float *out, int os
#define WIDE_PASS                                                                                                 \
    x, xs, xdbl, xds, dtpre, dps, dt_bias, a, skip, z, zs, state, slot_stride, layer_off, slots, n_seqs, channels, \
        d_state, rank, norm, eps, lanes, out, os

// Four or eight sequences per thread.
extern "C" __global__ void mamba1_step_wide(WIDE_ARGS) { mamba1_step_wide_impl<4>(WIDE_PASS); }
extern "C" __global__ void mamba1_step_wide8(WIDE_ARGS) { mamba1_step_wide_impl<8>(WIDE_PASS); }
