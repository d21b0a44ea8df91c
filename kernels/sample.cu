// Logits -> tokens for a whole batch on the device: one block per row. Only
// the chosen ids and the requested logprobs leave the device.
//
// It computes exactly what the CPU sampler (backend/cpu/sample.rs) does:
// logit bias -> repetition / presence / frequency penalties -> ids at or
// above valid_vocab masked -> log-softmax (logprobs) -> greedy, or
// temperature -> top-k -> top-p -> min-p -> inverse-CDF draw with the
// counter-based uniform of backend/rng.rs, walking the candidates in the
// CPU's order (scaled logit descending, id ascending). Instead of sorting,
// each cut is found by radix selection over the order-preserving bits of the
// scaled logits, with f64 sums as on the CPU.

#define P_TEMP 0
#define P_TOPK 1
#define P_TOPP 2
#define P_MINP 3
#define P_REP 4
#define P_PRES 5
#define P_FREQ 6
#define P_SEED_LO 7
#define P_SEED_HI 8
#define P_STEP_LO 9
#define P_STEP_HI 10
#define P_NTOP 11
#define P_VALID 12
#define P_SEEN_OFF 13
#define P_SEEN_LEN 14
#define P_BIAS_OFF 15
#define P_BIAS_LEN 16
#define P_OUT_OFF 17
#define P_MATERIALIZE 18
#define P_WORDS 20

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// rng::uniform(seed, step): 53 random bits in [0, 1).
__device__ __forceinline__ double uniform01(u64 seed, u64 step) {
    const u64 z = mix64(seed ^ mix64(step + 0x9e3779b97f4a7c15ull));
    return (double)(z >> 11) / 9007199254740992.0;
}

// Order-preserving key of a float: larger value, larger key.
__device__ __forceinline__ u32 order_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A cut in the candidates' order: everything up to and including the
// element (key, id). The order is key descending, then id ascending.
struct Cut {
    u32 key;
    u32 id;
};

__device__ __forceinline__ bool within(u32 key, u32 id, Cut b) { return key > b.key || (key == b.key && id <= b.id); }

__device__ __forceinline__ bool earlier(Cut a, Cut b) { return a.key > b.key || (a.key == b.key && a.id < b.id); }

struct Shared {
    double hw[256];
    u32 hc[256];
    double dsh[33];
    float fsh[33];
    u32 ush[33];
    u32 bcast[4];
    double dbcast[2];
};

// Block-wide (value desc, id asc) maximum: returns the winning id; every
// thread gets it. Threads pass (-inf, 0xffffffff) for nothing.
__device__ u32 block_argmax(float v, u32 id, Shared* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(FULL_MASK, v, o);
        const u32 i2 = __shfl_xor_sync(FULL_MASK, id, o);
        if (v2 > v || (v2 == v && i2 < id)) { v = v2; id = i2; }
    }
    __syncthreads();
    if (lane == 0) { sh->fsh[w] = v; sh->ush[w] = id; }
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh->fsh[lane] : NEG_INF;
        id = lane < nw ? sh->ush[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float v2 = __shfl_xor_sync(FULL_MASK, v, o);
            const u32 i2 = __shfl_xor_sync(FULL_MASK, id, o);
            if (v2 > v || (v2 == v && i2 < id)) { v = v2; id = i2; }
        }
        if (lane == 0) sh->bcast[0] = id;
    }
    __syncthreads();
    return sh->bcast[0];
}

__device__ u32 block_min_u32(u32 v, Shared* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) sh->ush[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh->ush[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
        if (lane == 0) sh->bcast[1] = v;
    }
    __syncthreads();
    return sh->bcast[1];
}

__device__ u32 block_max_u32(u32 v, Shared* sh) {
    return ~block_min_u32(~v, sh);
}

// The processed logit of id i: bias and penalties applied (materialised in
// `proc`) or the raw logit, and -inf at or above `valid`.
__device__ __forceinline__ float logit_at(const float* src, u32 i, u32 valid) {
    return i < valid ? src[i] : NEG_INF;
}

// The candidate order walked with weights: finds the element at which the
// running sum of weights over elements within `bound` first satisfies
// sum >= T (strict = 0) or sum > T (strict = 1). Weight is 1 (mode 0) or
// e[i] (mode 1). Returns false when the whole range never satisfies it.
__device__ bool select_cut(const u32* keys, const double* e, u32 vocab, int mode, double T, int strict, Cut bound,
                           Cut* result, Shared* sh) {
    u32 prefix = 0, pmask = 0;
    double base = 0.0;
    u32 tie_count = 0;
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        for (int b = threadIdx.x; b < 256; b += blockDim.x) { sh->hw[b] = 0.0; sh->hc[b] = 0; }
        __syncthreads();
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const u32 k = keys[i];
            if (k == 0 || !within(k, i, bound) || (k & pmask) != prefix) continue;
            const u32 bin = (k >> shift) & 255u;
            atomicAdd(&sh->hw[bin], mode == 0 ? 1.0 : e[i]);
            atomicAdd(&sh->hc[bin], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int chosen = -1;
            double cum = base;
            for (int b = 255; b >= 0; --b) {
                if (sh->hc[b] == 0) continue;
                const double next = cum + sh->hw[b];
                if (strict ? next > T : next >= T) { chosen = b; break; }
                cum = next;
            }
            sh->bcast[2] = (u32)chosen;
            sh->bcast[3] = chosen >= 0 ? sh->hc[chosen] : 0;
            sh->dbcast[0] = cum;
        }
        __syncthreads();
        const int chosen = (int)sh->bcast[2];
        if (chosen < 0) return false;
        base = sh->dbcast[0];
        tie_count = sh->bcast[3];
        prefix |= (u32)chosen << shift;
        pmask |= 255u << shift;
        __syncthreads();
    }
    // All elements with key == prefix weigh the same: find how many of them,
    // in id order, the sum needs, then that element's id.
    const u32 first = block_min_u32([&]() {
        u32 best = 0xffffffffu;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
            if (keys[i] == prefix && within(prefix, i, bound)) best = min(best, i);
        return best;
    }(), sh);
    u32 need = 1;
    if (tie_count > 1) {
        const double w = mode == 0 ? 1.0 : e[first];
        if (threadIdx.x == 0) {
            u32 c = 1;
            double cum = base + w;
            while (c < tie_count && !(strict ? cum > T : cum >= T)) { ++c; cum += w; }
            sh->bcast[2] = c;
        }
        __syncthreads();
        need = sh->bcast[2];
        __syncthreads();
    }
    u32 id = first;
    if (need > 1) {
        // The need-th smallest id among the ties: radix over the id bits.
        u32 ip = 0, im = 0, before = 0;
        for (int pass = 0; pass < 4; ++pass) {
            const int shift = 24 - 8 * pass;
            for (int b = threadIdx.x; b < 256; b += blockDim.x) sh->hc[b] = 0;
            __syncthreads();
            for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
                if (keys[i] == prefix && within(prefix, i, bound) && (i & im) == ip) atomicAdd(&sh->hc[(i >> shift) & 255u], 1u);
            __syncthreads();
            if (threadIdx.x == 0) {
                u32 cum = before;
                int chosen = 255;
                for (int b = 0; b < 256; ++b) {
                    if (cum + sh->hc[b] >= need) { chosen = b; break; }
                    cum += sh->hc[b];
                }
                sh->bcast[2] = (u32)chosen;
                sh->bcast[3] = cum;
            }
            __syncthreads();
            ip |= sh->bcast[2] << shift;
            im |= 255u << shift;
            before = sh->bcast[3];
            __syncthreads();
        }
        id = ip;
    }
    result->key = prefix;
    result->id = id;
    return true;
}

// Sum of e over the candidates within `bound`.
__device__ double mass_within(const u32* keys, const double* e, u32 vocab, Cut bound, Shared* sh) {
    double acc = 0.0;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u32 k = keys[i];
        if (k != 0 && within(k, i, bound)) acc += e[i];
    }
    return block_sum(acc, sh->dsh);
}

// The last candidate within `bound`: the smallest key, then the largest id.
__device__ Cut last_within(const u32* keys, u32 vocab, Cut bound, Shared* sh) {
    u32 kmin = 0xffffffffu;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u32 k = keys[i];
        if (k != 0 && within(k, i, bound)) kmin = min(kmin, k);
    }
    kmin = block_min_u32(kmin, sh);
    u32 id = 0;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
        if (keys[i] == kmin && within(kmin, i, bound)) id = max(id, i);
    Cut c = {kmin, block_max_u32(id, sh)};
    return c;
}

// params: P_WORDS u32 per row (layout above), then the seen and bias lists
// (pairs of u32 words) they point into. out: at P_OUT_OFF of each row,
// [token, logprob bits, n_top, (id, logprob bits) * n_top]. proc: `vocab`
// floats per row for rows with P_MATERIALIZE set; keys/e: `vocab` per row
// for rows with temperature > 0 (may be null when no row samples).
// next_ids (may be null): row r's token is also written to next_ids[r],
// where the next step's embedding reads it.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* logits, int lstride, u32 vocab,
                                                                 const u32* params, float* proc_all, u32* keys_all,
                                                                 double* e_all, u32* outw, u32* next_ids) {
    TL_SCOPE(TL_SAMPLE);
    __shared__ Shared sh;
    const u32 r = blockIdx.x;
    const u32* P = params + (u64)r * P_WORDS;
    const u32 valid = min(P[P_VALID], vocab);
    const float* raw = logits + (u64)r * lstride;
    const float* src = raw;

    if (P[P_MATERIALIZE]) {
        float* proc = proc_all + (u64)r * vocab;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) proc[i] = raw[i];
        __syncthreads();
        const u32* bl = params + P[P_BIAS_OFF];
        for (u32 j = threadIdx.x; j < P[P_BIAS_LEN]; j += blockDim.x) {
            const u32 id = bl[2 * j];
            if (id < vocab) proc[id] += __uint_as_float(bl[2 * j + 1]);
        }
        __syncthreads();
        const float rep = __uint_as_float(P[P_REP]);
        const float pres = __uint_as_float(P[P_PRES]);
        const float freq = __uint_as_float(P[P_FREQ]);
        const u32* seen = params + P[P_SEEN_OFF];
        for (u32 j = threadIdx.x; j < P[P_SEEN_LEN]; j += blockDim.x) {
            const u32 id = seen[2 * j], count = seen[2 * j + 1];
            if (id >= vocab) continue;
            float l = proc[id];
            if (rep != 1.0f) l = l > 0.0f ? l / rep : l * rep;
            if (count > 0) l -= freq * (float)count + pres;
            proc[id] = l;
        }
        __syncthreads();
        src = proc;
    }

    // Max (with the lowest id among equals) and log-sum-exp in f64.
    float best = NEG_INF;
    u32 best_id = 0xffffffffu;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float l = logit_at(src, i, valid);
        if (l > best || (l == best && i < best_id)) { best = l; best_id = i; }
    }
    const u32 amax = block_argmax(best, best_id, &sh);
    const float mx = logit_at(src, amax, valid);
    double se = 0.0;
    // f32 exponentials summed in f64: the logprobs stay within 1e-7 of the
    // CPU's f64 ones at a fraction of the cost.
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) se += (double)expf(logit_at(src, i, valid) - mx);
    se = block_sum(se, sh.dsh);
    const double lse = (double)mx + log(se);

    u32 token = amax;
    const float temp = __uint_as_float(P[P_TEMP]);
    if (temp != 0.0f) {
        u32* keys = keys_all + (u64)r * vocab;
        double* e = e_all + (u64)r * vocab;
        // Candidates: finite processed logits, scaled by 1/temperature. Key 0
        // marks a non-candidate (no finite float has key 0).
        float smax = NEG_INF;
        u32 ncand = 0;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float l = logit_at(src, i, valid);
            if (isfinite(l)) {
                const float s = l / temp;
                smax = fmaxf(smax, s);
                ++ncand;
            }
        }
        smax = block_max(smax, sh.fsh, NEG_INF);
        ncand = block_sum(ncand, sh.ush);
        if (ncand > 0) {
            for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
                const float l = logit_at(src, i, valid);
                if (isfinite(l)) {
                    const float s = l / temp;
                    keys[i] = order_key(s);
                    e[i] = exp((double)(s - smax));
                } else {
                    keys[i] = 0;
                    e[i] = 0.0;
                }
            }
            __syncthreads();
            Cut all = {0u, 0xffffffffu};
            Cut cut = all;
            const u32 top_k = P[P_TOPK];
            if (top_k > 0 && top_k < ncand) {
                Cut k_cut;
                if (select_cut(keys, e, vocab, 0, (double)top_k, 0, all, &k_cut, &sh)) cut = k_cut;
            }
            const double total_k = mass_within(keys, e, vocab, cut, &sh);
            Cut keep = cut;
            const float top_p = __uint_as_float(P[P_TOPP]);
            if (top_p < 1.0f) {
                Cut p_cut;
                if (select_cut(keys, e, vocab, 1, (double)top_p * total_k, 0, cut, &p_cut, &sh) && earlier(p_cut, keep))
                    keep = p_cut;
            }
            const float min_p = __uint_as_float(P[P_MINP]);
            if (min_p > 0.0f) {
                // Probabilities are normalised over the top-k set, as on the CPU:
                // keep those at or above min_p times the largest (at least one).
                const double floor = (double)min_p * (1.0 / total_k);
                u32 kmin = 0xffffffffu;
                for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
                    const u32 k = keys[i];
                    if (k != 0 && within(k, i, cut) && e[i] / total_k >= floor) kmin = min(kmin, k);
                }
                kmin = block_min_u32(kmin, &sh);
                Cut m_cut;
                if (kmin == 0xffffffffu) {
                    // Nothing passes: keep the first candidate alone.
                    u32 kmax = 0;
                    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) kmax = max(kmax, keys[i]);
                    kmax = block_max_u32(kmax, &sh);
                    u32 id = 0xffffffffu;
                    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
                        if (keys[i] == kmax) id = min(id, i);
                    m_cut.key = kmax;
                    m_cut.id = block_min_u32(id, &sh);
                } else {
                    u32 id = 0;
                    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
                        if (keys[i] == kmin && within(kmin, i, cut)) id = max(id, i);
                    m_cut.key = kmin;
                    m_cut.id = block_max_u32(id, &sh);
                }
                if (earlier(m_cut, keep)) keep = m_cut;
            }
            const double total = mass_within(keys, e, vocab, keep, &sh);
            const u64 seed = ((u64)P[P_SEED_HI] << 32) | P[P_SEED_LO];
            const u64 step = ((u64)P[P_STEP_HI] << 32) | P[P_STEP_LO];
            const double target = uniform01(seed, step) * total;
            Cut pick;
            // Rounding can leave the target past the last kept element: the
            // CPU then takes that last element too.
            if (!select_cut(keys, e, vocab, 1, target, 1, keep, &pick, &sh)) pick = last_within(keys, vocab, keep, &sh);
            token = pick.id;
        }
    }

    u32* out = outw + P[P_OUT_OFF];
    if (threadIdx.x == 0) {
        out[0] = token;
        out[1] = __float_as_uint((float)((double)logit_at(src, token, valid) - lse));
        if (next_ids) next_ids[r] = token < vocab ? token : 0;
    }
    // The n most likely ids by processed logit (finite only), best first.
    const u32 ntop = P[P_NTOP];
    float pv = __int_as_float(0x7f800000);
    u32 pid = 0;
    u32 written = 0;
    for (u32 j = 0; j < ntop; ++j) {
        float b = NEG_INF;
        u32 bi = 0xffffffffu;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float l = logit_at(src, i, valid);
            const bool after = l < pv || (l == pv && i > pid);
            if (isfinite(l) && after && (l > b || (l == b && i < bi))) { b = l; bi = i; }
        }
        const u32 id = block_argmax(b, bi, &sh);
        if (id == 0xffffffffu) break;
        pv = logit_at(src, id, valid);
        pid = id;
        if (threadIdx.x == 0) {
            out[3 + 2 * j] = id;
            out[4 + 2 * j] = __float_as_uint((float)((double)pv - lse));
        }
        ++written;
    }
    if (threadIdx.x == 0) out[2] = written;
}

// Greedy rows with no logit processing and no alternatives asked for (a
// plain decode step), when every row of the batch is one: each row's ids
// are split over gridDim.y blocks of GREEDY_THREADS threads, each thread
// reading at most GREEDY_UNROLL logits at once (the host sizes the parts),
// so a row costs one round trip to L2 instead of one block's long walk.
// Each block keeps its part's maximum (lowest id among equals) and the sum
// of exp(l - that maximum) in f64; the row's last block to finish (a
// per-row counter, which it resets) combines them: the maximum M over the
// parts, sum_p se_p * exp(m_p - M), the token and its logprob, as
// sample_rows writes them.
#define GREEDY_THREADS 256
#define GREEDY_UNROLL 8
extern "C" __global__ void __launch_bounds__(GREEDY_THREADS)
    sample_greedy(const float* logits, int lstride, u32 vocab, const u32* params, float* part_max, u32* part_id,
                  double* part_se, u32* counts, u32* outw, u32* next_ids) {
    TL_SCOPE(TL_SAMPLE);
    __shared__ Shared sh;
    __shared__ u32 last;
    const u32 r = blockIdx.x, part = blockIdx.y, parts = gridDim.y, tid = threadIdx.x;
    const u32* P = params + (u64)r * P_WORDS;
    const u32 valid = min(P[P_VALID], vocab);
    const float* src = logits + (u64)r * lstride;
    const u32 lo = (u32)((u64)vocab * part / parts), hi = (u32)((u64)vocab * (part + 1) / parts);
    float v[GREEDY_UNROLL];
#pragma unroll
    for (int u = 0; u < GREEDY_UNROLL; ++u) {
        const u32 i = lo + tid + u * GREEDY_THREADS;
        v[u] = i < hi ? logit_at(src, i, valid) : NEG_INF;
    }
    float best = NEG_INF;
    u32 best_id = 0xffffffffu;
#pragma unroll
    for (int u = 0; u < GREEDY_UNROLL; ++u) {
        const u32 i = lo + tid + u * GREEDY_THREADS;
        if (i < hi && (v[u] > best || (v[u] == best && i < best_id))) { best = v[u]; best_id = i; }
    }
    const u32 amax = block_argmax(best, best_id, &sh);
    const float mx = logit_at(src, amax, valid);
    double se = 0.0;
    if (mx != NEG_INF) {
#pragma unroll
        for (int u = 0; u < GREEDY_UNROLL; ++u)
            if (lo + tid + u * GREEDY_THREADS < hi) se += (double)expf(v[u] - mx);
    }
    se = block_sum(se, sh.dsh);
    const u64 at = (u64)r * parts + part;
    if (tid == 0) {
        part_max[at] = mx;
        part_id[at] = amax;
        part_se[at] = se;
        __threadfence();
        last = atomicAdd(counts + r, 1u) == parts - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The row's last block: the parts, one a thread (parts <= threads).
    const u64 row0 = (u64)r * parts;
    const float m = tid < parts ? __ldcg(part_max + row0 + tid) : NEG_INF;
    const u32 id = tid < parts ? __ldcg(part_id + row0 + tid) : 0xffffffffu;
    const u32 token = block_argmax(m, id, &sh);
    const float big = block_max(m, sh.fsh, NEG_INF);
    double s = 0.0;
    if (tid < parts && m != NEG_INF) s = __ldcg(part_se + row0 + tid) * exp((double)m - (double)big);
    s = block_sum(s, sh.dsh);
    if (tid == 0) {
        const double lse = (double)big + log(s);
        u32* out = outw + P[P_OUT_OFF];
        out[0] = token;
        out[1] = __float_as_uint((float)((double)big - lse));
        out[2] = 0;
        if (next_ids) next_ids[r] = token < vocab ? token : 0;
        counts[r] = 0;
    }
}
