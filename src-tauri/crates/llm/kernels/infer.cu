// The decode step on CUDA (see src/gpu.rs): one token through Phi-2's blocks
// over quantized weights where candle uploaded them, about nine launches a
// layer. Activations feeding a product are quantized to 8 bits in blocks of
// 32 (q: the values, d: the block's scale, s: d · Σq), so every weight type's
// dot product is integer dp4a over four bytes at a time, as in llama.cpp's
// MMVQ. Weights are GGUF blocks: Q4_K (144 bytes per 256 values), Q5_K
// (176), Q6_K (210) and Q8_0 (34 per 32). The KV cache is f16,
// [heads, capacity, head_dim] per layer (the tensor path's layout).
#include <cuda_fp16.h>
#include <stdint.h>

#include "tensor_core.cuh"

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ int warp_isum(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum or max over a block of a multiple of 32 threads (at most 1024); every
// thread gets the result. Safe to call again right after.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = MAX ? warp_max(v) : warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x >> 5) ? part[lane] : (MAX ? -INFINITY : 0.f);
        w = MAX ? warp_max(w) : warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

// The warp's 32 values (one per lane) as 8-bit block k: scale amax / 127,
// values rounded to nearest.
__device__ __forceinline__ void quant_block(float v, int k, int8_t* q, float* qd, float* qs) {
    int lane = threadIdx.x & 31;
    float amax = warp_max(fabsf(v));
    float d = amax / 127.f;
    int qi = amax > 0.f ? __float2int_rn(v / d) : 0;
    q[k * 32 + lane] = (int8_t)qi;
    int sum = warp_isum(qi);
    if (lane == 0) {
        qd[k] = d;
        qs[k] = d * (float)sum;
    }
}

// Layer norm of x [n] (n a multiple of 32), quantized, and in f32 to hf
// unless it is null (the input of adapters and dense weights). One block.
extern "C" __global__ void ln_q8(const float* x, const float* w, const float* b, int n, float eps,
                                 int8_t* q, float* qd, float* qs, float* hf) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    float mean = block_reduce<false>(acc) / n;
    acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float c = x[i] - mean;
        acc += c * c;
    }
    float rstd = rsqrtf(block_reduce<false>(acc) / n + eps);
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    for (int k = threadIdx.x >> 5; k < n / 32; k += warps) {
        int i = k * 32 + lane;
        float v = (x[i] - mean) * rstd * w[i] + b[i];
        if (hf) hf[i] = v;
        quant_block(v, k, q, qd, qs);
    }
}

__device__ __forceinline__ float gelu(float x) {
    const float c = 0.7978845608028654f;  // √(2/π)
    return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// x [n] quantized, one warp per block of 32; with `act`, x goes through GELU
// first (and keeps the result).
extern "C" __global__ void quant_q8(float* x, int n, int act, int8_t* q, float* qd, float* qs) {
    int k = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (k >= n / 32) return;
    int i = k * 32 + (threadIdx.x & 31);
    float v = x[i];
    if (act) {
        v = gelu(v);
        x[i] = v;
    }
    quant_block(v, k, q, qd, qs);
}

// An adapter's down projection: t [r] = A [r, n] · x [n], a warp per row.
extern "C" __global__ void lora_down(const float* a, const float* x, int r, int n, float* t) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= r) return;
    float acc = 0.f;
    for (int i = threadIdx.x & 31; i < n; i += 32) acc += a[(size_t)row * n + i] * x[i];
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) t[row] = acc;
}

// Its up projection, added: out [m] += scale · B [m, r] · t [r], a thread per row.
extern "C" __global__ void lora_up(const float* b, const float* t, int m, int r, float scale,
                                   float* out) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= m) return;
    float acc = 0.f;
    for (int j = 0; j < r; ++j) acc += b[(size_t)row * r + j] * t[j];
    out[row] += scale * acc;
}

// ---- one unit of a row's dot product per type --------------------------

// Four bytes at a 2-byte aligned address (Q6_K and Q8_0 blocks are).
__device__ __forceinline__ int load_a2(const uint8_t* p) {
    const uint16_t* h = (const uint16_t*)p;
    return (int)((uint32_t)h[0] | ((uint32_t)h[1] << 16));
}

__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* sc, int& s, int& m) {
    if (j < 4) {
        s = sc[j] & 63;
        m = sc[j + 4] & 63;
    } else {
        s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
        m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

struct Act {
    const int8_t* q;
    const float* d;
    const float* s;
};

// Q4_K and Q5_K: a unit is 8 values of sub-block 2j (low nibbles) and the
// same 8 of sub-block 2j + 1 (high nibbles); 16 units per block. The
// minimum's term is added once per sub-block, by its first unit.
template <bool FIVE>
__device__ __forceinline__ float unit_k45(const uint8_t* row, int u, Act a) {
    const int bytes = FIVE ? 176 : 144;
    int blk = u >> 4, r = u & 15, j = r >> 2, o = (r & 3) * 8;
    const uint8_t* b = row + (size_t)blk * bytes;
    const uint32_t* qs = (const uint32_t*)(b + (FIVE ? 48 : 16) + 32 * j + o);
    uint32_t q0 = qs[0], q1 = qs[1];
    uint32_t l0 = q0 & 0x0F0F0F0F, l1 = q1 & 0x0F0F0F0F;
    uint32_t h0 = (q0 >> 4) & 0x0F0F0F0F, h1 = (q1 >> 4) & 0x0F0F0F0F;
    if (FIVE) {
        const uint32_t* qh = (const uint32_t*)(b + 16 + o);
        uint32_t e0 = qh[0] >> (2 * j), e1 = qh[1] >> (2 * j);
        l0 |= (e0 & 0x01010101) << 4;
        l1 |= (e1 & 0x01010101) << 4;
        h0 |= ((e0 >> 1) & 0x01010101) << 4;
        h1 |= ((e1 >> 1) & 0x01010101) << 4;
    }
    int at = blk * 256 + 64 * j + o;
    const int* x0 = (const int*)(a.q + at);
    const int* x1 = (const int*)(a.q + at + 32);
    int lo = __dp4a((int)l0, x0[0], __dp4a((int)l1, x0[1], 0));
    int hi = __dp4a((int)h0, x1[0], __dp4a((int)h1, x1[1], 0));
    int s0, m0, s1, m1;
    scale_min_k4(2 * j, b + 4, s0, m0);
    scale_min_k4(2 * j + 1, b + 4, s1, m1);
    float2 dm = __half22float2(*(const half2*)b);
    int k = blk * 8 + 2 * j;
    float v = dm.x * ((float)(s0 * lo) * a.d[k] + (float)(s1 * hi) * a.d[k + 1]);
    if (o == 0) v -= dm.y * ((float)m0 * a.s[k] + (float)m1 * a.s[k + 1]);
    return v;
}

// Q6_K: a unit is values l..l+4 of each of the four 32-value groups of one
// 128-value half; 16 units per block.
__device__ __forceinline__ float unit_q6k(const uint8_t* row, int u, Act a) {
    int blk = u >> 4, r = u & 15, n = r >> 3, l = (r & 7) * 4;
    const uint8_t* b = row + (size_t)blk * 210;
    uint32_t qa = load_a2(b + 64 * n + l), qb = load_a2(b + 64 * n + 32 + l);
    uint32_t h = load_a2(b + 128 + 32 * n + l);
    const int8_t* sc = (const int8_t*)(b + 192) + 8 * n + (l >> 4);
    float d = __half2float(*(const half*)(b + 208));
    int g0 = __vsubss4((qa & 0x0F0F0F0F) | ((h & 0x03030303) << 4), 0x20202020);
    int g1 = __vsubss4((qb & 0x0F0F0F0F) | (((h >> 2) & 0x03030303) << 4), 0x20202020);
    int g2 = __vsubss4(((qa >> 4) & 0x0F0F0F0F) | (((h >> 4) & 0x03030303) << 4), 0x20202020);
    int g3 = __vsubss4(((qb >> 4) & 0x0F0F0F0F) | (((h >> 6) & 0x03030303) << 4), 0x20202020);
    int at = blk * 256 + 128 * n + l, k = blk * 8 + 4 * n;
    float v = (float)(sc[0] * __dp4a(g0, *(const int*)(a.q + at), 0)) * a.d[k];
    v += (float)(sc[2] * __dp4a(g1, *(const int*)(a.q + at + 32), 0)) * a.d[k + 1];
    v += (float)(sc[4] * __dp4a(g2, *(const int*)(a.q + at + 64), 0)) * a.d[k + 2];
    v += (float)(sc[6] * __dp4a(g3, *(const int*)(a.q + at + 96), 0)) * a.d[k + 3];
    return d * v;
}

// Q8_0: a unit is 8 values; 4 units per block.
__device__ __forceinline__ float unit_q80(const uint8_t* row, int u, Act a) {
    int blk = u >> 2, i = u & 3;
    const uint8_t* b = row + (size_t)blk * 34;
    int q0 = load_a2(b + 2 + 8 * i), q1 = load_a2(b + 6 + 8 * i);
    const int* x = (const int*)(a.q + blk * 32 + 8 * i);
    int dot = __dp4a(q0, x[0], __dp4a(q1, x[1], 0));
    return __half2float(*(const half*)b) * a.d[blk] * (float)dot;
}

#define Q4K 0
#define Q5K 1
#define Q6K 2
#define Q80 3

template <int T>
__device__ __forceinline__ float unit_dot(const uint8_t* row, int u, Act a) {
    if (T == Q4K) return unit_k45<false>(row, u, a);
    if (T == Q5K) return unit_k45<true>(row, u, a);
    if (T == Q6K) return unit_q6k(row, u, a);
    return unit_q80(row, u, a);
}

#define STORE 0
#define GELU 1
#define ADD 2

// Row `row` of a product's output, from its dot product: + bias, then
// stored, stored through GELU, or added to out (the residual).
template <int MODE>
__device__ __forceinline__ void epilogue(float acc, const float* bias, float* out, int row) {
    float y = acc + (bias ? bias[row] : 0.f);
    if (MODE == GELU) y = gelu(y);
    if (MODE == ADD) out[row] += y;
    else out[row] = y;
}

// y = W x + bias for W [rows, cols] of type T, one warp per row, then per
// MODE: stored, stored through GELU, or added to out (the residual).
template <int T, int MODE>
__device__ void mmvq(const uint8_t* w, uint64_t row_bytes, int rows, int units, const int8_t* xq,
                     const float* xd, const float* xs, const float* bias, float* out) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const uint8_t* r = w + row * row_bytes;
    Act a = {xq, xd, xs};
    float acc = 0.f;
#pragma unroll 4
    for (int u = lane; u < units; u += 32) acc += unit_dot<T>(r, u, a);
    acc = warp_sum(acc);
    if (lane == 0) epilogue<MODE>(acc, bias, out, row);
}

#define MMVQ(NAME, T, MODE)                                                                      \
    extern "C" __global__ void NAME(const uint8_t* w, uint64_t row_bytes, int rows, int units,   \
                                    const int8_t* xq, const float* xd, const float* xs,          \
                                    const float* bias, float* out) {                             \
        mmvq<T, MODE>(w, row_bytes, rows, units, xq, xd, xs, bias, out);                         \
    }
#define MMVQ_MODES(TY, T)                 \
    MMVQ(mmvq_##TY##_store, T, STORE)     \
    MMVQ(mmvq_##TY##_gelu, T, GELU)       \
    MMVQ(mmvq_##TY##_add, T, ADD)
MMVQ_MODES(q4k, Q4K)
MMVQ_MODES(q5k, Q5K)
MMVQ_MODES(q6k, Q6K)
MMVQ_MODES(q80, Q80)

// The same for dense f16 or f32 weights [rows, cols] (row_bytes apart)
// against the input in f32: a warp per row.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(half v) { return __half2float(v); }
template <typename W, int MODE>
__device__ void mmv_dense(const uint8_t* w, uint64_t row_bytes, int rows, int cols, const float* x,
                          const float* bias, float* out) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const W* r = (const W*)(w + row * row_bytes);
    float acc = 0.f;
    for (int i = lane; i < cols; i += 32) acc += to_f(r[i]) * x[i];
    acc = warp_sum(acc);
    if (lane == 0) epilogue<MODE>(acc, bias, out, row);
}
#define MMV(NAME, W, MODE)                                                                      \
    extern "C" __global__ void NAME(const uint8_t* w, uint64_t row_bytes, int rows, int cols,   \
                                    const float* x, const float* bias, float* out) {            \
        mmv_dense<W, MODE>(w, row_bytes, rows, cols, x, bias, out);                             \
    }
MMV(mmv_f16_store, half, STORE)
MMV(mmv_f16_gelu, half, GELU)
MMV(mmv_f16_add, half, ADD)
MMV(mmv_f32_store, float, STORE)
MMV(mmv_f32_gelu, float, GELU)
MMV(mmv_f32_add, float, ADD)

// Dimension d of head h of one row of qkv ([3·hidden]) at position pos: q
// and k rotated, v as it is.
__device__ __forceinline__ void rope_dim(const float* qkv, const float* cos, const float* sin,
                                         int hidden, int hd, int rd, int pos, int h, int d,
                                         float* q, float* k, float* v) {
    int half_rd = rd / 2;
    const float* qh = qkv + h * hd;
    const float* kh = qkv + hidden + h * hd;
    *q = qh[d];
    *k = kh[d];
    *v = qkv[2 * hidden + h * hd + d];
    if (d < rd) {
        int i = d < half_rd ? d : d - half_rd;
        float c = cos[pos * half_rd + i], s = sin[pos * half_rd + i];
        if (d < half_rd) {
            *q = *q * c - qh[d + half_rd] * s;
            *k = *k * c - kh[d + half_rd] * s;
        } else {
            *q = *q * c + qh[d - half_rd] * s;
            *k = *k * c + kh[d - half_rd] * s;
        }
    }
}

// qkv [3·hidden] → q rotated (q_out), k rotated and v appended to the cache
// at `pos`. One block per head, a thread per dimension. Rotation as the
// tensor path's rope: pair i is (i, i + rotary_dim / 2).
// The position and the layer's cache are `pos`, `kc`, `vc`, `cap`, or where
// `step` is not null step[0] and the layer's row of the cache table `lay`
// ({k, v, capacity}): a captured graph replays one launch for every
// position and every cache.
extern "C" __global__ void rope_append(const float* qkv, const float* cos, const float* sin,
                                       int hidden, int hd, int rd, int pos, const int* step,
                                       const uint64_t* lay, int cap, half* kc, half* vc,
                                       float* q_out) {
    int h = blockIdx.x, d = threadIdx.x;
    if (step) {
        pos = step[0];
        kc = (half*)lay[0];
        vc = (half*)lay[1];
        cap = (int)lay[2];
    }
    if (d >= hd) return;
    float q, k, v;
    rope_dim(qkv, cos, sin, hidden, hd, rd, pos, h, d, &q, &k, &v);
    q_out[h * hd + d] = q;
    size_t at = ((size_t)h * cap + pos) * hd + d;
    kc[at] = __float2half(k);
    vc[at] = __float2half(v);
}

// A prompt's rows: qkv [n, 3·hidden] → q rotated and times `scale`, f16
// [heads, n, hd] for prompt_attn, and k rotated and v into the cache at
// positions pos..pos + n. Grid (heads, n), a thread per dimension.
extern "C" __global__ void rope_append_prompt(const float* qkv, const float* cos,
                                              const float* sin, int hidden, int hd, int rd,
                                              int pos, int n, int cap, half* kc, half* vc,
                                              float scale, half* q_out) {
    int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    if (d >= hd) return;
    float q, k, v;
    rope_dim(qkv + (size_t)t * 3 * hidden, cos, sin, hidden, hd, rd, pos + t, h, d, &q, &k, &v);
    q_out[((size_t)h * n + t) * hd + d] = __float2half(q * scale);
    size_t at = ((size_t)h * cap + pos + t) * hd + d;
    kc[at] = __float2half(k);
    vc[at] = __float2half(v);
}

// Decode attention, split along the cache: block (head, split) takes keys
// split·CHUNK .. +CHUNK (a thread per key) of the n held, and writes its
// maximum score, the sum of exp(score − max) and the unnormalized weighted
// values; attn_merge_q8 combines the splits. head_dim a multiple of 8, at
// most 256.
#define CHUNK 128
//
// n, the cache and its capacity are as given, or where `step` is not null
// step[0] + 1 and the layer's row of the cache table (as rope_append); the
// grid may have more splits than n needs (a graph's grid covers the
// window): those write a partial that weighs nothing.
extern "C" __global__ void attn_part(const float* q, const half* kc, const half* vc, int hd,
                                     int cap, int n, const int* step, const uint64_t* lay,
                                     float scale, float* pm, float* pl, float* po) {
    __shared__ float sq[256];
    __shared__ float sp[CHUNK];
    int h = blockIdx.x, s = blockIdx.y, splits = gridDim.y, t = threadIdx.x;
    if (step) {
        n = step[0] + 1;
        kc = (const half*)lay[0];
        vc = (const half*)lay[1];
        cap = (int)lay[2];
    }
    if (s * CHUNK >= n) {
        for (int d = t; d < hd; d += blockDim.x) po[((size_t)h * splits + s) * hd + d] = 0.f;
        if (t == 0) {
            pm[h * splits + s] = -INFINITY;
            pl[h * splits + s] = 0.f;
        }
        return;
    }
    for (int d = t; d < hd; d += blockDim.x) sq[d] = q[h * hd + d] * scale;
    __syncthreads();
    int j = s * CHUNK + t;
    float score = -INFINITY;
    if (j < n) {
        const uint4* kr = (const uint4*)(kc + ((size_t)h * cap + j) * hd);
        float acc = 0.f;
        for (int c = 0; c < hd / 8; ++c) {
            uint4 raw = kr[c];
            const half2* p = (const half2*)&raw;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 f = __half22float2(p[e]);
                acc += f.x * sq[8 * c + 2 * e] + f.y * sq[8 * c + 2 * e + 1];
            }
        }
        score = acc;
    }
    float m = block_reduce<true>(score);
    float p = j < n ? expf(score - m) : 0.f;
    float l = block_reduce<false>(p);
    sp[t] = p;
    __syncthreads();
    int end = min(CHUNK, n - s * CHUNK);
    const half* vr = vc + ((size_t)h * cap + (size_t)s * CHUNK) * hd;
    for (int d = t; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int jj = 0; jj < end; ++jj) o += sp[jj] * __half2float(vr[(size_t)jj * hd + d]);
        po[((size_t)h * splits + s) * hd + d] = o;
    }
    if (t == 0) {
        pm[h * splits + s] = m;
        pl[h * splits + s] = l;
    }
}

// The splits of every head combined into the attention output [hidden],
// quantized for the dense product, and in f32 to yf unless it is null. One
// block.
// `splits` is attn_part's grid (the partials' stride); the splits read are
// those the n keys fill (n as attn_part takes it).
extern "C" __global__ void attn_merge_q8(const float* pm, const float* pl, const float* po,
                                         int hd, int hidden, int splits, int n, const int* step,
                                         int8_t* q, float* qd, float* qs, float* yf) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    if (step) n = step[0] + 1;
    int used = min(splits, (n + CHUNK - 1) / CHUNK);
    for (int k = threadIdx.x >> 5; k < hidden / 32; k += warps) {
        int i = k * 32 + lane, h = i / hd, d = i % hd;
        const float* m = pm + h * splits;
        const float* l = pl + h * splits;
        float mx = -INFINITY;
        for (int s = 0; s < used; ++s) mx = fmaxf(mx, m[s]);
        float num = 0.f, den = 0.f;
        for (int s = 0; s < used; ++s) {
            float e = expf(m[s] - mx);
            num += e * po[((size_t)h * splits + s) * hd + d];
            den += e * l[s];
        }
        float y = num / den;
        if (yf) yf[i] = y;
        quant_block(y, k, q, qd, qs);
    }
}

// ------------------------------------------------------- prompt attention
// A prompt's causal attention over the f16 cache without the score matrix
// (the scheme of kernels/flash.cu's training forward pass, in f16 with f32
// accumulators, and with the cache's held prefix): query i of the n new
// rows sits at position pos + i and sees keys 0..pos + i.
//   q      [heads, n, HD] f16, rotated and scaled by 1/sqrt(HD)
//   kc, vc [heads, cap, HD] f16, positions 0..pos + n written
//   o      [n, heads·HD] f32 (the dense projection's input)
// Grid (ceil(n/64), heads), 128 threads: each warp 16 queries, keys 64 at
// a time up to the block's last query.
// Fragment layouts: kernels/tensor_core.cuh.

template <int HD>
__device__ void prompt_attn(const half* q, const half* kc, const half* vc, float* o, int heads,
                            int n, int pos, int cap) {
    constexpr int BM = 64, BN = 64, KS = HD / 16, DT = HD / 8;
    constexpr int KST = HD + 8, VST = BN + 8;
    __shared__ __align__(16) half ks[BN * KST];
    __shared__ __align__(16) half vt[HD * VST];

    const int h = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The last query blocks see the most keys: launched first.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const int total = pos + n;
    const half* qh = q + (size_t)h * n * HD;
    const half* kh = kc + (size_t)h * cap * HD;
    const half* vh = vc + (size_t)h * cap * HD;

    // This warp's 16 queries as A fragments (rows past n as zeros).
    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) load_a(qf[kk], qh, HD, row0, n, kk * 16 + 2 * t);
    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    // Positions of this warp's rows (past n: never written).
    const int p0 = pos + row0, p1 = pos + row1;

    // Keys up to the block's last query.
    const int last = min(total, pos + q0 + BM) - 1;
    const int tiles = last / BN + 1;
    for (int tile = 0; tile < tiles; tile++) {
        const int kv0 = tile * BN;
        __syncthreads();
        // Keys row by row, values transposed (column c holds dimension c of every key).
        for (int i = threadIdx.x; i < BN * HD / 2; i += blockDim.x) {
            const int r = i / (HD / 2), c = 2 * (i % (HD / 2));
            uint32_t kv = 0, vv = 0;
            if (kv0 + r < total) {
                kv = pair(kh + (size_t)(kv0 + r) * HD + c);
                vv = pair(vh + (size_t)(kv0 + r) * HD + c);
            }
            *reinterpret_cast<uint32_t*>(ks + r * KST + c) = kv;
            unsigned short* vs = reinterpret_cast<unsigned short*>(vt);
            vs[c * VST + r] = (unsigned short)(vv & 0xffff);
            vs[(c + 1) * VST + r] = (unsigned short)(vv >> 16);
        }
        __syncthreads();

        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const half* kr = ks + (j * 8 + g) * KST + kk * 16 + 2 * t;
                mma_f16(s[j], qf[kk], pair(kr), pair(kr + 8));
            }
        }
        // Scores in log2 units, the future (and keys past the held ones) masked.
        softmax_tile<BN, DT>(s, acc, m0, m1, l0, l1, kv0, t, p0, p1, total);
        // Probabilities (C tiles 2j, 2j + 1) as the A fragment of k-step j.
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            uint32_t pa[4];
            c_to_a<half>(pa, s[2 * j], s[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                const half* vr = vt + (d * 8 + g) * VST + j * 16 + 2 * t;
                mma_f16(acc[d], pa, pair(vr), pair(vr + 8));
            }
        }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const size_t ost = (size_t)heads * HD;
    float* ob = o + (size_t)h * HD;
#pragma unroll
    for (int d = 0; d < DT; d++) {
        const int c = d * 8 + 2 * t;
        if (row0 < n)
            *reinterpret_cast<float2*>(ob + (size_t)row0 * ost + c) = make_float2(acc[d][0] * i0, acc[d][1] * i0);
        if (row1 < n)
            *reinterpret_cast<float2*>(ob + (size_t)row1 * ost + c) = make_float2(acc[d][2] * i1, acc[d][3] * i1);
    }
}

#define PROMPT_ATTN(HD)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) prompt_attn_hd##HD(                          \
        const half* q, const half* kc, const half* vc, float* o, int heads, int n, int pos,         \
        int cap) {                                                                                  \
        prompt_attn<HD>(q, kc, vc, o, heads, n, pos, cap);                                          \
    }

PROMPT_ATTN(32)
PROMPT_ATTN(64)
PROMPT_ATTN(80)
PROMPT_ATTN(128)
