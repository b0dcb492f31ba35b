// Fused kernels for the training passes (see src/kernels.rs): a causal
// softmax and its backward pass, LoRA dropout, bias add, GELU and layer-norm
// backward passes, and the qkv split with the rotary embedding. Each exists
// for f32 and bf16; arithmetic is in f32. Parameters: inputs in the op's
// dtype, then f32 inputs, then the output, then scalars.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Reductions over a block whose size is a multiple of 32 (at most 1024).
struct Sum {
    static __device__ __forceinline__ float identity() { return 0.f; }
    static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
};
struct Max {
    static __device__ __forceinline__ float identity() { return -INFINITY; }
    static __device__ __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
};
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
    for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
template <typename Op>
__device__ float block_reduce(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_reduce<Op>(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (blockDim.x >> 5) ? part[lane] : Op::identity();
        w = warp_reduce<Op>(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}
__device__ float block_sum(float v) { return block_reduce<Sum>(v); }
__device__ float block_max(float v) { return block_reduce<Max>(v); }

// One block per row of scores [rows, seq]; row r is query r % seq, which sees
// keys 0..=r % seq. Masked keys get probability 0 and are never read.
// Rows of up to CACHED · blockDim.x keys are read once into registers.
#define CACHED 16
template <typename T>
__device__ void causal_softmax(const T* s, T* p, int seq) {
    size_t row = blockIdx.x;
    int q = (int)(row % seq);
    const T* x = s + row * seq;
    T* y = p + row * seq;
    float v[CACHED];
    bool cached = seq <= CACHED * (int)blockDim.x;
    float m = -INFINITY;
    if (cached) {
#pragma unroll
        for (int k = 0; k < CACHED; k++) {
            int j = threadIdx.x + k * blockDim.x;
            v[k] = j <= q ? to_f(x[j]) : -INFINITY;
            m = fmaxf(m, v[k]);
        }
    } else {
        for (int j = threadIdx.x; j <= q; j += blockDim.x) m = fmaxf(m, to_f(x[j]));
    }
    m = block_max(m);
    float sum = 0.f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < CACHED; k++) {
            v[k] = __expf(v[k] - m);
            sum += v[k];
        }
    } else {
        for (int j = threadIdx.x; j <= q; j += blockDim.x) sum += __expf(to_f(x[j]) - m);
    }
    float inv = 1.f / block_sum(sum);
    if (cached) {
#pragma unroll
        for (int k = 0; k < CACHED; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < seq) store(y + j, v[k] * inv);
        }
    } else {
        for (int j = threadIdx.x; j < seq; j += blockDim.x)
            store(y + j, j <= q ? __expf(to_f(x[j]) - m) * inv : 0.f);
    }
}

// gs = p * (gp - Σ gp·p), per row of length n.
template <typename T>
__device__ void softmax_backward(const T* p, const T* gp, T* gs, int n) {
    size_t off = (size_t)blockIdx.x * n;
    float dot = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += to_f(p[off + j]) * to_f(gp[off + j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float pj = to_f(p[off + j]);
        store(gs + off + j, pj * (to_f(gp[off + j]) - dot));
    }
}

// y = x · keep / (1 - prob), keep decided by a hash of (element index, seed):
// the same mask for the same shape and seed, so the backward pass applies
// the forward pass's mask to the gradient without storing it.
__device__ __forceinline__ uint32_t mix(uint64_t i, uint64_t seed) {
    uint64_t z = i + seed * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}
template <typename T>
__device__ void dropout(const T* x, T* y, uint64_t n, uint64_t seed, float prob) {
    uint32_t threshold = (uint32_t)(prob * 4294967296.0);
    float scale = 1.f / (1.f - prob);
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        store(y + i, mix(i, seed) >= threshold ? to_f(x[i]) * scale : 0.f);
    }
}

// out[r, c] = y[r, c] + b[c] over a contiguous [rows, cols] y: one block
// column of threads per row range, so no thread divides.
template <typename T>
__device__ void bias_add(const T* y, const T* b, T* out, int rows, int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float bc = to_f(b[c]);
        for (int r = blockIdx.y; r < rows; r += gridDim.y) {
            size_t i = (size_t)r * cols + c;
            store(out + i, to_f(y[i]) + bc);
        }
    }
}

// g · gelu'(u) for the tanh approximation of GELU (Phi-2's gelu_new).
template <typename T>
__device__ void gelu_backward(const T* u, const T* g, T* out, uint64_t n) {
    const float c = 0.7978845608028654f, k = 0.044715f;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float x = to_f(u[i]);
        float t = tanhf(c * (x + k * x * x * x));
        float d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * k * x * x);
        store(out + i, to_f(g[i]) * d);
    }
}

// The input gradient of a layer norm with weight w (f32), one block per row
// of x [rows, h], statistics recomputed in f32:
// gx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)), ĝ = g · w.
template <typename T>
__device__ void layer_norm_backward(const T* x, const T* g, const float* w, T* gx, int h, float eps) {
    size_t off = (size_t)blockIdx.x * h;
    float s = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) s += to_f(x[off + j]);
    float mean = block_sum(s) / h;
    float v = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float d = to_f(x[off + j]) - mean;
        v += d * d;
    }
    float rstd = rsqrtf(block_sum(v) / h + eps);
    float s1 = 0.f, s2 = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float gh = to_f(g[off + j]) * w[j];
        float xh = (to_f(x[off + j]) - mean) * rstd;
        s1 += gh;
        s2 += gh * xh;
    }
    float m1 = block_sum(s1) / h;
    float m2 = block_sum(s2) / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float gh = to_f(g[off + j]) * w[j];
        float xh = (to_f(x[off + j]) - mean) * rstd;
        store(gx + off + j, rstd * (gh - m1 - xh * m2));
    }
}

// Splits a fused projection qkv [b·seq, 3, heads, hd] into q, k, v, each
// [b, heads, seq, hd] (out is [3, b, heads, seq, hd]), rotating the first rd
// dims of q and k (GPT-NeoX halves: cos/sin [seq, rd/2], f32) and scaling q.
// With `inverse`, the backward pass: from the gradients of q, k, v (laid out
// as out) back to the gradient of qkv, rotating the other way.
template <typename T>
__device__ void qkv_rope(const T* src, const float* cos, const float* sin, T* dst, int b, int seq,
                         int heads, int hd, int rd, float scale, int inverse) {
    // One block row per (part, bi, head, t) vector of hd elements (the
    // caller keeps 3 · b · heads · seq below 2³¹); 32-bit index arithmetic.
    int vectors = 3 * b * heads * seq;
    int half = rd / 2;
    for (int r0 = blockIdx.x * blockDim.y + threadIdx.y; r0 < vectors; r0 += gridDim.x * blockDim.y) {
        // r0 indexes the split layout [part, bi, head, t]; d is threadIdx.x.
        int t = r0 % seq;
        int r = r0 / seq;
        int head = r % heads;
        r /= heads;
        int bi = r % b;
        int part = r / b;
        // The same vector in the fused layout [bi, t, part, head, :].
        size_t base = (((size_t)bi * seq + t) * 3 + part) * heads * hd + (size_t)head * hd;
        size_t split = (size_t)r0 * hd;
      for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const T* in = inverse ? src + split : src + base;
        float v;
        if (part < 2 && d < rd) {
            int j = d < half ? d : d - half;
            float c = cos[t * half + j];
            float s = inverse ? -sin[t * half + j] : sin[t * half + j];
            float x1 = to_f(in[j]), x2 = to_f(in[j + half]);
            v = d < half ? x1 * c - x2 * s : x2 * c + x1 * s;
        } else {
            v = to_f(in[d]);
        }
        if (part == 0) v *= scale;
        if (inverse)
            store(dst + base + d, v);
        else
            store(dst + split + d, v);
      }
    }
}

#define INSTANCES(T, SUFFIX)                                                                       \
    extern "C" __global__ void causal_softmax_##SUFFIX(const T* s, T* p, int seq) {               \
        causal_softmax(s, p, seq);                                                                 \
    }                                                                                              \
    extern "C" __global__ void softmax_backward_##SUFFIX(const T* p, const T* gp, T* gs, int n) { \
        softmax_backward(p, gp, gs, n);                                                            \
    }                                                                                              \
    extern "C" __global__ void dropout_##SUFFIX(const T* x, T* y, uint64_t n, uint64_t seed,     \
                                                float prob) {                                      \
        dropout(x, y, n, seed, prob);                                                              \
    }                                                                                              \
    extern "C" __global__ void bias_add_##SUFFIX(const T* y, const T* b, T* out, int rows,       \
                                                 int cols) {                                       \
        bias_add(y, b, out, rows, cols);                                                           \
    }                                                                                              \
    extern "C" __global__ void gelu_backward_##SUFFIX(const T* u, const T* g, T* out, uint64_t n) {\
        gelu_backward(u, g, out, n);                                                               \
    }                                                                                              \
    extern "C" __global__ void layer_norm_backward_##SUFFIX(const T* x, const T* g, const float* w,\
                                                            T* gx, int h, float eps) {             \
        layer_norm_backward(x, g, w, gx, h, eps);                                                  \
    }                                                                                              \
    extern "C" __global__ void qkv_rope_##SUFFIX(const T* src, const float* cos, const float* sin, \
                                                 T* dst, int b, int seq, int heads, int hd,        \
                                                 int rd, float scale, int inverse) {               \
        qkv_rope(src, cos, sin, dst, b, seq, heads, hd, rd, scale, inverse);                       \
    }

INSTANCES(float, f32)
INSTANCES(__nv_bfloat16, bf16)
