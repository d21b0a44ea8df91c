// Mamba-1 decode step for large batches, where dt_low · dt_projᵀ was
// computed beforehand by one matrix product (`dtpre`, un-normalised as in
// `mamba1_step_impl`). Here the state traffic is everything: each sequence's
// `[channels, d_state]` f32 state is read and written once per layer.
//
// A group of `lanes` = d_state / 4 threads owns one channel, 4 consecutive
// states per thread (16-byte accesses), for STEP_WIDE_SEQS sequences: the
// thread loads a, D and dt_bias once, issues every sequence's state load
// before using any (several 16-byte loads in flight per thread), then
// updates and stores them in turn. Falcon-Mamba's weightless norms of dt,
// B and C are applied when `norm` is set. Grid (channel blocks, sequence
// groups).
#define STEP_WIDE_SEQS 4

extern "C" __global__ void mamba1_step_wide(const float* __restrict__ x, int xs, const float* __restrict__ xdbl,
                                            int xds, const float* __restrict__ dtpre, int dps,
                                            const float* __restrict__ dt_bias, const float* __restrict__ a,
                                            const float* __restrict__ skip, const float* __restrict__ z, int zs,
                                            float* __restrict__ state, u64 slot_stride, u64 layer_off,
                                            const u32* __restrict__ slots, int n_seqs, int channels, int d_state,
                                            int rank, int norm, float eps, int lanes, float* __restrict__ out, int os) {
    const int lane = threadIdx.x & (lanes - 1);
    const int cpb = blockDim.x / lanes;
    const int c = blockIdx.x * cpb + threadIdx.x / lanes;
    const bool active = c < channels;
    const int cc = active ? c : channels - 1;
    const int n0 = lane * 4;
    const bool valid = n0 < d_state;
    const int s0 = blockIdx.y * STEP_WIDE_SEQS;

    float4 h[STEP_WIDE_SEQS];
    float* st[STEP_WIDE_SEQS];
#pragma unroll
    for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
        const int s = s0 + i;
        const u32 slot = s < n_seqs ? slots[s] : PAD_SLOT;
        st[i] = slot == PAD_SLOT ? 0 : state + (u64)slot * slot_stride + layer_off + (u64)cc * d_state + n0;
        h[i] = (st[i] && valid) ? *(const float4*)st[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const float4 av = valid ? *(const float4*)(a + (u64)cc * d_state + n0) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float bias = dt_bias[cc];
    const float dsk = skip[cc];

#pragma unroll
    for (int i = 0; i < STEP_WIDE_SEQS; ++i) {
        const int s = s0 + i;
        if (s >= n_seqs) break;
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
        const float dtv = softplus_f(dtpre[(u64)s * dps + cc] * inv_dt + bias);
        const float xv = x[(u64)s * xs + cc];
        const float zv = z[(u64)s * zs + cc];
        float yp = 0.0f;
        if (valid) {
            const float hv[4] = {h[i].x, h[i].y, h[i].z, h[i].w};
            const float avv[4] = {av.x, av.y, av.z, av.w};
            float hn[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int n = n0 + q;
                const float bv = row[rank + n] * inv_b;
                const float cv = row[rank + d_state + n] * inv_c;
                const float da = expf(dtv * avv[q]);
                hn[q] = da * hv[q] + (dtv * bv) * xv;
                yp += hn[q] * cv;
            }
            if (st[i] && active) *(float4*)st[i] = make_float4(hn[0], hn[1], hn[2], hn[3]);
        }
        for (int o = lanes / 2; o > 0; o >>= 1) yp += __shfl_xor_sync(FULL_MASK, yp, o);
        if (lane == 0 && active) out[(u64)s * os + cc] = (yp + xv * dsk) * silu_f(zv);
    }
}
