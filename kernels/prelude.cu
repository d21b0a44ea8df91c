// Helpers shared by every kernel family. The backend puts this text in front
// of each family's source before compiling it with NVRTC; no CUDA header is
// included anywhere, so NVRTC needs no toolkit headers at run time.
//
// Dtype codes used across the families: 0 = f32, 1 = bf16, 2 = f16. Half
// types travel as raw 16-bit patterns and are converted with PTX `cvt`.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
// A slot index that marks a padding row of a CUDA-graph bucket: its state
// is neither read (zeros are used) nor written.
#define PAD_SLOT 0xffffffffu

// Programmatic dependent launch (sm_90+): a kernel launched with it may
// start while the previous kernel in the stream is still running. Such a
// kernel reads before `grid_dep_wait` only constant data (weights) and
// data no kernel since the one before the previous has written (the
// fused in_proj's conv window: only that layer's conv writes it, a token
// earlier); the wait returns once the previous kernel has finished and
// its writes are visible. Every kernel lets the next one start
// (`grid_dep_launch`) only after its own wait, so when a kernel starts,
// all but the previous kernel have finished, and at most one kernel runs
// ahead. (The opt-in fused tail lets the next kernel start before its
// wait; what follows it reads only weights early: the conv-window read
// belongs to the x_proj fold, which the fused tail replaces.) Both are
// no-ops for a plain launch.
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_sync() {
    grid_dep_wait();
    grid_dep_launch();
}

// Timeline instrumentation, compiled in only with MS_TIMELINE (the backend
// defines it when MAMBA_SERVE_TIMELINE names a file; scripts/timeline.py
// reads that file): thread 0 of each block of an instrumented kernel
// records three words into a ring the host points `ms_timeline` at, whose
// word 0 counts the records: the global time in ns; the kernel's tag (bits
// 56-63), the event (48-55: 0 the block starts, 1 its dependent-launch wait
// returned, 2 it ends), the multiprocessor (32-47) and the block (0-31);
// and the grid's blocks (32-63) and the block's threads (0-31). Without
// MS_TIMELINE the marks compile to nothing. The backend defines TL_CAP,
// the ring's records, with MS_TIMELINE. The tags (scripts/timeline.py
// names them the same way):
#define TL_GEMV 1
#define TL_STREAM 2
#define TL_STEP 4
#define TL_GEMV_NORM 5
#define TL_STREAM_NORM 6
#define TL_CONV_STEP 8
#define TL_CONV_STEP4 9
#define TL_CONV_STEP4_STAGED 10
#define TL_STEP_WIDE 11
#define TL_STEP_LEAN 12
#define TL_SHORTK 13
#define TL_SAMPLE 14
#define TL_EMBED 15
#define TL_TO_HALF 16
#define TL_NORM_ROWS 17
#define TL_STACK 18
#define TL_TAIL 19
#ifdef MS_TIMELINE
__device__ u64* ms_timeline;
__device__ __forceinline__ u64 tl_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// A record from any thread; `extra` takes the third word's place.
__device__ __forceinline__ void tl_record(u32 tag, u32 event, u64 extra) {
    if (!ms_timeline) return;
    const u64 t = tl_now();
    u32 sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const u64 i = atomicAdd(ms_timeline, 1ull) % TL_CAP;
    u64* r = ms_timeline + 1 + 3 * i;
    r[0] = t;
    r[1] = (u64)tag << 56 | (u64)event << 48 | (u64)sm << 32 | (u64)(blockIdx.x + blockIdx.y * gridDim.x);
    r[2] = extra;
}
__device__ __forceinline__ void tl_mark(u32 tag, u32 event) {
    if (threadIdx.x == 0) tl_record(tag, event, (u64)(gridDim.x * gridDim.y) << 32 | blockDim.x);
}
// Records the block's start now and its end when the scope closes.
struct TlScope {
    u32 tag;
    __device__ TlScope(u32 t) : tag(t) { tl_mark(t, 0); }
    __device__ ~TlScope() { tl_mark(tag, 2); }
};
#define TL_SCOPE(tag) TlScope tl_scope_(tag)
#define TL_WAITED(tag) tl_mark(tag, 1)
#else
#define TL_SCOPE(tag)
#define TL_WAITED(tag)
#endif

// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// One 16-byte global store (a float4 assignment can compile to four 4-byte
// stores: four times the store sectors).
__device__ __forceinline__ void st_global_v4(void* p, float4 v) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}

// Asynchronous copies into shared memory (sm_80+; a plain copy before) of
// 16 or 4 bytes, to a shared-memory address (`smem_addr`; the `_at` forms
// take it converted, which saves the conversion per copy): `ok` false
// writes zeros and reads nothing (`src` must still be a valid address).
// `cp_async_commit` closes a group of copies, and `cp_async_wait<N>` waits
// until at most N of this thread's groups are still in flight.
__device__ __forceinline__ void cp_async16_at(u32 dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
#else
    const float4 v = ok ? *(const float4*)src : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
#endif
}

__device__ __forceinline__ void cp_async4_at(u32 dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(ok ? 4 : 0) : "memory");
#else
    const u32 v = ok ? *(const u32*)src : 0u;
    asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst), "r"(v) : "memory");
#endif
}

__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool ok) { cp_async16_at(smem_addr(dst), src, ok); }

__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) { cp_async4_at(smem_addr(dst), src, ok); }

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// mbarrier and bulk-copy helpers (sm_90; kernels that use them are
// launched only there). Addresses are shared-memory addresses
// (`smem_addr`).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from
// global memory into shared memory; completion is counted on `bar`.
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#endif
// Grid-wide handoffs, for kernels whose blocks are all resident at once
// (one a multiprocessor at most, checked by the host).
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// What a block adds to the barrier word (see grid_sync).
__device__ __forceinline__ u32 grid_arrival() { return blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u; }
// Spins until the top bit of `bar` is `want`; traps after 2 s.
__device__ __forceinline__ void wait_top_bit(const u32* bar, u32 want) {
    u64 t0 = 0;
    for (u32 spins = 1; (ld_acquire(bar) >> 31) != want; ++spins) {
        if ((spins & 1023u) == 0) {
            u64 t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (t0 == 0) t0 = t;
            else if (t - t0 > 2000000000ull) asm volatile("trap;");
        }
    }
}
// The grid-wide barrier of the `threads` first threads of every block
// (named barrier 1): the count in `bar` returns to its old low bits each
// time and its top bit flips once every block has arrived (block 0 adds
// 2^31 - (G - 1), every other block 1), so the word needs no reset between
// barriers or launches. A barrier still open after 2 s traps (the launch
// fails with an error the host reports) instead of hanging the GPU.
__device__ __forceinline__ void grid_sync(u32* bar, int threads) {
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
    if (threadIdx.x == 0) {
        __threadfence();
        const u32 old = atomicAdd(bar, grid_arrival());
        wait_top_bit(bar, (old >> 31) ^ 1u);
        __threadfence();
    }
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}
// grid_sync for kernels that meet at an even number of barriers a launch:
// the top bit of `bar` is then 0 when a launch starts, and the k-th barrier
// of a launch (from 0) waits for it to become (k + 1) & 1. The arrival is
// a release reduction the block does not wait for, so a barrier costs one
// round trip to L2 fewer than grid_sync's.
__device__ __forceinline__ void grid_sync_parity(u32* bar, int threads, u32 want) {
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
    if (threadIdx.x == 0) {
        __threadfence();
        asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(bar), "r"(grid_arrival()) : "memory");
        wait_top_bit(bar, want);
    }
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}
// [lo, hi) of `units` units of `unit` items, shared evenly by G blocks.
__device__ __forceinline__ void share(int units, int unit, int G, int b, int& lo, int& hi) {
    lo = (int)((long long)units * b / G) * unit;
    hi = (int)((long long)units * (b + 1) / G) * unit;
}
__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Element i of a weight array of dtype DT, widened to f32.
template <int DT>
__device__ __forceinline__ float load_weight(const void* p, u64 i) {
    if (DT == 0) return ((const float*)p)[i];
    if (DT == 1) return bf16_to_f32(((const u16*)p)[i]);
    return f16_to_f32(((const u16*)p)[i]);
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }

// PyTorch's softplus with threshold 20.
__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Activation codes: 0 identity, 1 silu, 2 relu, 3 gelu (erf), 4 gelu (tanh).
__device__ __forceinline__ float activate(int act, float x) {
    switch (act) {
        case 1: return silu_f(x);
        case 2: return x > 0.0f ? x : 0.0f;
        case 3: return (float)(0.5 * (double)x * (1.0 + erf((double)x * 0.70710678118654752440)));
        case 4: {
            double d = (double)x;
            double inner = 0.79788456080286535588 * (d + 0.044715 * d * d * d);
            return (float)(0.5 * d * (1.0 + tanh(inner)));
        }
        default: return x;
    }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Sum over the whole block; `sh` holds at least 33 elements. Every thread
// gets the result. Safe to call repeatedly with the same `sh`.
template <typename T>
__device__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T x = lane < nw ? sh[lane] : (T)0;
        x = warp_sum(x);
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    return sh[32];
}

template <typename T>
__device__ T block_max(T v, T* sh, T lowest) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T x = lane < nw ? sh[lane] : lowest;
        x = warp_max(x);
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    return sh[32];
}

// Index of the segment that packed row `t` belongs to: the largest s with
// cu[s] <= t (cu holds n_seqs + 1 ascending offsets).
__device__ __forceinline__ int segment_of(const u32* cu, int n_seqs, u32 t) {
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}
// Eight weights starting at element i (16-byte aligned), as raw words.
template <int DT>
struct Chunk {
    uint4 a, b;  // b is used by f32 only
};

template <int DT>
__device__ __forceinline__ Chunk<DT> load_chunk(const void* w, u64 i) {
    Chunk<DT> c;
    if (DT == 0) {
        const uint4* p = (const uint4*)((const float*)w + i);
        c.a = p[0];
        c.b = p[1];
    } else {
        c.a = *(const uint4*)((const u16*)w + i);
        c.b = make_uint4(0, 0, 0, 0);
    }
    return c;
}

// The 8 16-bit values (DT 1 bf16, 2 f16) of one 16-byte word, widened.
template <int DT>
__device__ __forceinline__ void widen8_half(uint4 q, float* v) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
        v[2 * j] = DT == 1 ? bf16_to_f32(lo) : f16_to_f32(lo);
        v[2 * j + 1] = DT == 1 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
}

template <int DT>
__device__ __forceinline__ void widen8(const Chunk<DT>& c, float* v) {
    if (DT == 0) {
        v[0] = __uint_as_float(c.a.x); v[1] = __uint_as_float(c.a.y);
        v[2] = __uint_as_float(c.a.z); v[3] = __uint_as_float(c.a.w);
        v[4] = __uint_as_float(c.b.x); v[5] = __uint_as_float(c.b.y);
        v[6] = __uint_as_float(c.b.z); v[7] = __uint_as_float(c.b.w);
    } else {
        widen8_half<DT>(c.a, v);
    }
}
