// Warp-level pieces of the tensor-core kernels (kernels/flash.cu for
// training, the prompt attention in kernels/infer.cu): one mma.sync
// m16n8k16 with f32 accumulators on bf16 or f16 operands, a pair of 16-bit
// values as one 32-bit register, and reductions over the four lanes that
// hold one row of a C fragment; and the online-softmax step of a
// flash-attention forward pass over one tile of keys.
//
// Fragment layouts of mma.m16n8k16 (row.col), lane = 4·g + t:
//   A (16×16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16×8, element (k, n)): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16×8): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The products need sm_80; a build for an older architecture
// (CUDA_COMPUTE_CAP) still compiles, and the Rust side keeps such GPUs off
// these kernels.
__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two consecutive 16-bit values at p (4-byte aligned: even element offsets,
// even row strides).
template <typename T>
__device__ __forceinline__ uint32_t pair(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// lo and hi as two 16-bit values of type T (__nv_bfloat16 or half) in one
// register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
    half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Two adjacent C tiles (keys or queries 16j..16j+15) as the A fragment of
// k-step j, in T.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t* a, const float* lo, const float* hi) {
    a[0] = pack2<T>(lo[0], lo[1]);
    a[1] = pack2<T>(lo[2], lo[3]);
    a[2] = pack2<T>(hi[0], hi[1]);
    a[3] = pack2<T>(hi[2], hi[3]);
}

// The A fragment of columns c.. of rows `row` and `row` + 8 of a matrix in
// global memory with `row_stride` (rows from `rows` on as zeros).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t* a, const T* src, size_t row_stride, int row,
                                       int rows, int c) {
    const T* r = src + (size_t)row * row_stride + c;
    a[0] = row < rows ? pair(r) : 0;
    a[1] = row + 8 < rows ? pair(r + 8 * row_stride) : 0;
    a[2] = row < rows ? pair(r + 8) : 0;
    a[3] = row + 8 < rows ? pair(r + 8 * row_stride + 8) : 0;
}

// The max (or sum) of the four lanes 4g..4g+3 that hold one row.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// One key tile of a flash-attention forward pass, for the two rows a lane
// holds (positions p0 and p1): the scores `s` (C fragments of BN keys from
// kv0) masked after each row's position and from key `limit` on, in log2
// units; the running maxima m, sums l and accumulators acc rescaled to the
// new maxima; `s` left holding the tile's unnormalized probabilities.
template <int BN, int DT>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 8][4], float (&acc)[DT][4],
                                             float& m0, float& m1, float& l0, float& l1,
                                             int kv0, int t, int p0, int p1, int limit) {
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < BN / 8; n++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int key = kv0 + n * 8 + 2 * t + e;
            s[n][e] = (key <= p0 && key < limit) ? s[n][e] * LOG2E : NEG_INF;
            s[n][2 + e] = (key <= p1 && key < limit) ? s[n][2 + e] * LOG2E : NEG_INF;
            mx0 = fmaxf(mx0, s[n][e]);
            mx1 = fmaxf(mx1, s[n][2 + e]);
        }
    }
    const float n0 = fmaxf(m0, quad_max(mx0)), n1 = fmaxf(m1, quad_max(mx1));
    // A row that has seen only masked keys keeps max −∞: exp2 of −∞ − 0 is 0.
    const float b0 = n0 == NEG_INF ? 0.f : n0, b1 = n1 == NEG_INF ? 0.f : n1;
    const float a0 = exp2f(m0 - b0), a1 = exp2f(m1 - b1);
    m0 = n0;
    m1 = n1;
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int n = 0; n < BN / 8; n++) {
        s[n][0] = exp2f(s[n][0] - b0);
        s[n][1] = exp2f(s[n][1] - b0);
        s[n][2] = exp2f(s[n][2] - b1);
        s[n][3] = exp2f(s[n][3] - b1);
        r0 += s[n][0] + s[n][1];
        r1 += s[n][2] + s[n][3];
    }
    l0 = l0 * a0 + r0;
    l1 = l1 * a1 + r1;
#pragma unroll
    for (int d = 0; d < DT; d++) {
        acc[d][0] *= a0;
        acc[d][1] *= a0;
        acc[d][2] *= a1;
        acc[d][3] *= a1;
    }
}
