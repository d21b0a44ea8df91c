// Row movement: embedding gather, row gather, fill, f32 -> 16-bit
// conversion of activations (for tensor-core GEMMs), bias broadcast and
// a weight re-layout.

// out[t, :] = f32(table[ids[t], :]) for t < gridDim.x; `d` columns.
// An id outside the table writes NaN, so a bad id cannot pass unnoticed.
template <int DT>
__device__ void embed_impl(const void* table, const u32* ids, float* out, int d, u32 rows) {
    TL_SCOPE(TL_EMBED);
    const u32 t = blockIdx.x;
    const u32 id = ids[t];
    float* o = out + (u64)t * d;
    if (id >= rows) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = __int_as_float(0x7fc00000);
        return;
    }
    const u64 base = (u64)id * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = load_weight<DT>(table, base + c);
}

extern "C" __global__ void embed_f32(const void* table, const u32* ids, float* out, int d, u32 rows) {
    embed_impl<0>(table, ids, out, d, rows);
}
extern "C" __global__ void embed_bf16(const void* table, const u32* ids, float* out, int d, u32 rows) {
    embed_impl<1>(table, ids, out, d, rows);
}
extern "C" __global__ void embed_f16(const void* table, const u32* ids, float* out, int d, u32 rows) {
    embed_impl<2>(table, ids, out, d, rows);
}

// out[i, :] = src[rows[i], :] for i < gridDim.x.
extern "C" __global__ void gather_rows(const float* src, int src_stride, const u32* rows, float* out, int out_stride,
                                       int cols) {
    const u32 i = blockIdx.x;
    const float* s = src + (u64)rows[i] * src_stride;
    float* o = out + (u64)i * out_stride;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
}

// dst[i] = value for i < n.
extern "C" __global__ void fill_f32(float* dst, u64 n, float value) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = value;
}

// Dense 16-bit copy of a strided f32 view: out[r, c] = half(x[r * stride + c]).
// `dt` is 1 for bf16, 2 for f16. Grid (column blocks, row blocks).
extern "C" __global__ void to_half(const float* x, int rows, int cols, int stride, u16* out, int dt) {
    TL_SCOPE(TL_TO_HALF);
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float v = x[(u64)r * stride + c];
        out[(u64)r * cols + c] = dt == 1 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

// to_half for cols % 8 == 0 and 16-byte aligned rows: eight columns per
// thread (two 16-byte loads, one 16-byte store). Grid (column blocks of
// 8 * blockDim.x, row blocks).
extern "C" __global__ void to_half8(const float* x, int rows, int cols, int stride, u16* out, int dt) {
    TL_SCOPE(TL_TO_HALF);
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float4* p = (const float4*)(x + (u64)r * stride + c);
        const float4 a = p[0], b = p[1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        u32 words[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u16 lo = dt == 1 ? f32_to_bf16(v[2 * j]) : f32_to_f16(v[2 * j]);
            const u16 hi = dt == 1 ? f32_to_bf16(v[2 * j + 1]) : f32_to_f16(v[2 * j + 1]);
            words[j] = (u32)lo | ((u32)hi << 16);
        }
        *(uint4*)(out + (u64)r * cols + c) = make_uint4(words[0], words[1], words[2], words[3]);
    }
}

// out[r, :] = bias (or += bias with `add`) for r < rows; the GEMM then
// accumulates onto it. Grid (column blocks, row blocks).
extern "C" __global__ void bias_rows(const float* bias, float* out, int rows, int cols, int stride, int add) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float* o = out + (u64)r * stride + c;
        *o = add ? *o + bias[c] : bias[c];
    }
}

// x_proj's weights `[rows, cols]` (`esize`-byte elements, 2 or 4) grouped
// for in_proj's fold (`XProjEpilogue` in gemv.cu): element (r, c) goes to
// ((c / group) * rows + r) * group + c % group. Run once at load.
extern "C" __global__ void group_columns(const void* in, void* out, int rows, int cols, int esize, int group) {
    const u64 n = (u64)rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols, c = i % cols, o = ((c / group) * rows + r) * group + c % group;
        if (esize == 4) ((u32*)out)[o] = ((const u32*)in)[i];
        else ((u16*)out)[o] = ((const u16*)in)[i];
    }
}
