// Causal attention for training without the score matrix: a forward pass
// that keeps each query's log-sum-exp, and a backward pass that recomputes
// the probabilities tile by tile from it (the flash-attention scheme). bf16
// operands on the tensor cores (mma.sync m16n8k16, f32 accumulators), the
// softmax in f32 in registers.
//
// Layouts (all contiguous):
//   q, k, v          [batch, heads, seq, HD]   q already scaled by 1/sqrt(HD)
//   o, dO            [batch, seq, heads, HD]   (the dense projection's [n, hidden])
//   lse, delta       [batch, heads, seq] f32   lse in log2 units: log2 sum_j 2^(s_ij log2 e)
//   dq, dk, dv       [batch, heads, seq, HD]
//
// Fragment layouts: kernels/tensor_core.cuh. The C fragments of two
// adjacent 8-column tiles are, as bf16 pairs, exactly the A fragment of the
// 16-wide k-step they cover; the passes use this to feed probabilities from
// one product into the next without shared memory.

#include <cuda_bf16.h>
#include <stdint.h>

#include "tensor_core.cuh"

typedef __nv_bfloat16 bf16;

// rows × HD of a [seq, row_stride] matrix (q, k, v: row_stride HD; o and
// dO: a head's rows are heads·HD apart) from row r0 into shared rows of
// `stride` (rows past seq as zeros), by all threads of the block.
template <int HD>
__device__ __forceinline__ void load_rows(bf16* dst, int stride, const bf16* src, int r0,
                                          int rows, int seq, size_t row_stride) {
    const int pairs = rows * HD / 2;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int r = i / (HD / 2), c = 2 * (i % (HD / 2));
        uint32_t v = 0;
        if (r0 + r < seq) v = pair(src + (size_t)(r0 + r) * row_stride + c);
        *reinterpret_cast<uint32_t*>(dst + r * stride + c) = v;
    }
}

// The same rows transposed: dst[c][r] (stride per column).
template <int HD>
__device__ __forceinline__ void load_cols(bf16* dst, int stride, const bf16* src, int r0,
                                          int rows, int seq, size_t row_stride) {
    const int pairs = rows * HD / 2;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int r = i / (HD / 2), c = 2 * (i % (HD / 2));
        __nv_bfloat162 v = __floats2bfloat162_rn(0.f, 0.f);
        if (r0 + r < seq) v = *reinterpret_cast<const __nv_bfloat162*>(src + (size_t)(r0 + r) * row_stride + c);
        dst[c * stride + r] = v.x;
        dst[(c + 1) * stride + r] = v.y;
    }
}

// This lane's rows row0 and row1 of DT 8-column C tiles, times s0 and s1,
// as bf16 pairs into a matrix with `stride` (rows from `limit` on not
// written).
template <int DT>
__device__ __forceinline__ void store_rows(bf16* dst, size_t stride, int row0, int row1, int limit,
                                           const float (&acc)[DT][4], float s0, float s1, int t) {
#pragma unroll
    for (int d = 0; d < DT; d++) {
        const int c = d * 8 + 2 * t;
        if (row0 < limit)
            *reinterpret_cast<uint32_t*>(dst + (size_t)row0 * stride + c) =
                pack2<bf16>(acc[d][0] * s0, acc[d][1] * s0);
        if (row1 < limit)
            *reinterpret_cast<uint32_t*>(dst + (size_t)row1 * stride + c) =
                pack2<bf16>(acc[d][2] * s1, acc[d][3] * s1);
    }
}

// The end of a forward pass for this lane's rows: the sums of the row's
// four lanes added, the output rows normalized into o (head h of batch row
// b, bh = b·heads + h; a head's rows heads·HD apart) and each row's
// log-sum-exp (log2 units) into lse.
template <int HD, int DT>
__device__ __forceinline__ void fwd_finish(const float (&acc)[DT][4], float m0, float m1,
                                           float l0, float l1, bf16* o, float* lse, int b, int h,
                                           int bh, int heads, int seq, int row0, int row1, int t) {
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const size_t ost = (size_t)heads * HD;
    store_rows<DT>(o + ((size_t)b * seq) * ost + (size_t)h * HD, ost, row0, row1, seq, acc, i0, i1, t);
    if (t == 0) {
        float* lb = lse + (size_t)bh * seq;
        if (row0 < seq) lb[row0] = m0 + log2f(l0);
        if (row1 < seq) lb[row1] = m1 + log2f(l1);
    }
}

// ---------------------------------------------------------------- forward
// Grid (ceil(seq/64), batch·heads), 128 threads: each warp 16 queries, keys
// 64 at a time up to the diagonal.
template <int HD>
__device__ void flash_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                          int heads, int seq) {
    constexpr int BM = 64, BN = 64, KS = HD / 16, DT = HD / 8;
    constexpr int KST = HD + 8, VST = BN + 8;
    __shared__ __align__(16) bf16 ks[BN * KST];
    __shared__ __align__(16) bf16 vt[HD * VST];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The last query blocks see the most keys: launched first, they leave
    // the light ones for the tail.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const size_t head = (size_t)bh * seq * HD;

    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) load_a(qf[kk], q + head, HD, row0, seq, kk * 16 + 2 * t);
    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    const int tiles = min((seq + BN - 1) / BN, (q0 + BM - 1) / BN + 1);
    for (int tile = 0; tile < tiles; tile++) {
        const int kv0 = tile * BN;
        __syncthreads();
        load_rows<HD>(ks, KST, k + head, kv0, BN, seq, HD);
        load_cols<HD>(vt, VST, v + head, kv0, BN, seq, HD);
        __syncthreads();

        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const bf16* kr = ks + (n * 8 + g) * KST + kk * 16 + 2 * t;
                mma(s[n], qf[kk], pair(kr), pair(kr + 8));
            }
        }
        // Scores in log2 units, the future (and keys past seq) masked.
        softmax_tile<BN, DT>(s, acc, m0, m1, l0, l1, kv0, t, row0, row1, seq);
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            uint32_t pa[4];
            c_to_a<bf16>(pa, s[2 * j], s[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                const bf16* vr = vt + (d * 8 + g) * VST + j * 16 + 2 * t;
                mma(acc[d], pa, pair(vr), pair(vr + 8));
            }
        }
    }
    fwd_finish<HD, DT>(acc, m0, m1, l0, l1, o, lse, b, h, bh, heads, seq, row0, row1, t);
}

// ------------------------------------------------------- forward, pipelined
// The same pass with the next tile's keys and values copied while this one
// is multiplied (cp.async, two buffers), both stored as rows (the values'
// transpose comes from ldmatrix.trans, not from 2-byte stores that collide
// in the banks), and the B operands read with ldmatrix (one instruction for
// two 32-bit reads). Head sizes up to 80 (two buffers of each in 48 KB of
// static shared memory).

// 16 bytes global -> shared, not through registers; `bytes` 0 writes zeros
// (the source is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups of this thread are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Two 8x8 matrices of 16-bit values from shared memory: lanes 0-7 give the
// rows of matrix 0, lanes 8-15 those of matrix 1 (16 bytes each, 16-byte
// aligned); lane 4g + t receives (row g, columns 2t, 2t+1) of each, or with
// `trans` (rows 2t, 2t+1, column g).
template <bool trans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const bf16* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r0), "=r"(r1)
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r0), "=r"(r1)
                     : "r"(a));
#endif
}

// Four 8x8 matrices: an A fragment of mma.m16n8k16 when lane l gives row
// (l & 7) + 8·((l >> 3) & 1), column 8·(l >> 4) of the 16x16 tile.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const bf16* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// rows × HD of a [seq, stride] matrix from row r0 into shared rows of `st`
// elements, 16 bytes a copy (cp.async) by all threads of the block, rows
// past seq as zeros. The caller commits the group.
template <int HD>
__device__ __forceinline__ void copy_rows(bf16* dst, int st, const bf16* src, size_t stride,
                                          int r0, int rows, int seq) {
    constexpr int CH = HD / 8;
    for (int i = threadIdx.x; i < rows * CH; i += blockDim.x) {
        const int r = i / CH, c = (i % CH) * 8;
        const bool in = r0 + r < seq;
        cp_async16(dst + r * st + c, src + (in ? (size_t)(r0 + r) * stride + c : 0), in ? 16 : 0);
    }
}

// From shared rows of `st` elements: the B fragment (k × n = 16 × 8) whose
// n runs over rows n0.. and k over their columns k0.. (keys for Q·Kᵀ)...
__device__ __forceinline__ void load_b_rows(uint32_t& b0, uint32_t& b1, const bf16* m, int st,
                                            int n0, int k0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x2<false>(b0, b1, m + (n0 + (lane & 7)) * st + k0 + ((lane >> 3) & 1) * 8);
}
// ... the B fragment whose k runs over rows k0.. and n over columns n0..
// (values for P·V), transposed on the way ...
__device__ __forceinline__ void load_b_cols(uint32_t& b0, uint32_t& b1, const bf16* m, int st,
                                            int k0, int n0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x2<true>(b0, b1, m + (k0 + (lane & 15)) * st + n0);
}
// ... and the A fragment of rows r0..r0 + 15, columns k0..k0 + 15.
__device__ __forceinline__ void load_a_rows(uint32_t* a, const bf16* m, int st, int r0, int k0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(a, m + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * st + k0 + (lane >> 4) * 8);
}

// Grid and outputs as flash_fwd.
template <int HD>
__device__ void flash_fwd2(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                           int heads, int seq) {
    constexpr int BM = 64, BN = 64, KS = HD / 16, DT = HD / 8, ST = HD + 8;
    static_assert(2 * 2 * BN * ST * 2 <= 48 * 1024, "two buffers of keys and values exceed 48 KB");
    __shared__ __align__(16) bf16 ks[2][BN * ST];
    __shared__ __align__(16) bf16 vs[2][BN * ST];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The last query blocks see the most keys: launched first.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const size_t head = (size_t)bh * seq * HD;

    // Tile `tile`'s keys and values into buffer `buf`.
    auto load = [&](int tile, int buf) {
        copy_rows<HD>(ks[buf], ST, k + head, HD, tile * BN, BN, seq);
        copy_rows<HD>(vs[buf], ST, v + head, HD, tile * BN, BN, seq);
        cp_async_commit();
    };

    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) load_a(qf[kk], q + head, HD, row0, seq, kk * 16 + 2 * t);
    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    const int tiles = min((seq + BN - 1) / BN, (q0 + BM - 1) / BN + 1);
    load(0, 0);
    for (int tile = 0; tile < tiles; tile++) {
        const int buf = tile & 1, kv0 = tile * BN;
        // The other buffer was last read in the previous tile, which every
        // warp has left (the barrier at the loop's end).
        if (tile + 1 < tiles) {
            load(tile + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* kb = ks[buf];
        const bf16* vb = vs[buf];

        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t b0, b1;
                load_b_rows(b0, b1, kb, ST, n * 8, kk * 16);
                mma(s[n], qf[kk], b0, b1);
            }
        }
        softmax_tile<BN, DT>(s, acc, m0, m1, l0, l1, kv0, t, row0, row1, seq);
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            uint32_t pa[4];
            c_to_a<bf16>(pa, s[2 * j], s[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                uint32_t b0, b1;
                load_b_cols(b0, b1, vb, ST, j * 16, d * 8);
                mma(acc[d], pa, b0, b1);
            }
        }
        __syncthreads();
    }
    fwd_finish<HD, DT>(acc, m0, m1, l0, l1, o, lse, b, h, bh, heads, seq, row0, row1, t);
}

// ---------------------------------------------------------------- backward
// delta[b, h, i] = Σ_d dO[b, i, h, d] · O[b, i, h, d]: one warp per (h, i),
// grid (ceil(heads·seq / warps a block), batch).
extern "C" __global__ void flash_delta_bf16(const bf16* o, const bf16* go, float* delta,
                                            int heads, int seq, int hd) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32, b = blockIdx.y;
    if (row >= heads * seq) return;
    const int h = row / seq, i = row % seq;
    const size_t at = (((size_t)b * seq + i) * heads + h) * hd;
    float s = 0.f;
    for (int d = lane; d < hd; d += 32) s += __bfloat162float(o[at + d]) * __bfloat162float(go[at + d]);
#pragma unroll
    for (int w = 16; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffff, s, w);
    if (lane == 0) delta[((size_t)b * heads + h) * seq + i] = s;
}

// The dK/dV passes' step from scores to their gradient, for this lane's
// keys key0 and key1 and BM queries from i0 (C fragments of Sᵀ and dPᵀ):
// Pᵀ from the saved log-sum-exp `ls` into s, dSᵀ = Pᵀ (dPᵀ − delta) into dp
// (queries before a key, or past seq, weigh nothing).
template <int BM>
__device__ __forceinline__ void dkdv_scores(float (&s)[BM / 8][4], float (&dp)[BM / 8][4], int i0,
                                            int t, int key0, int key1, int seq, const float* ls,
                                            const float* dl) {
#pragma unroll
    for (int n = 0; n < BM / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int qi = n * 8 + 2 * t + (e & 1);
            const int key = e < 2 ? key0 : key1;
            const int query = i0 + qi;
            const bool seen = query >= key && query < seq && key < seq;
            const float p = seen ? exp2f(s[n][e] * LOG2E - ls[qi]) : 0.f;
            s[n][e] = p;
            dp[n][e] = p * (dp[n][e] - dl[qi]);
        }
    }
}

// The dQ passes' step, for this lane's rows row0 and row1 and BN keys from
// kv0 (C fragments of S and dP): dS = P (dP − delta) into s, P from each
// row's log-sum-exp ls0/ls1 and delta dl0/dl1.
template <int BN>
__device__ __forceinline__ void dq_scores(float (&s)[BN / 8][4], const float (&dp)[BN / 8][4],
                                          int kv0, int t, int row0, int row1, int seq, float ls0,
                                          float ls1, float dl0, float dl1) {
#pragma unroll
    for (int n = 0; n < BN / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = kv0 + n * 8 + 2 * t + (e & 1);
            const int row = e < 2 ? row0 : row1;
            const bool seen = key <= row && key < seq && row < seq;
            const float p = seen ? exp2f(s[n][e] * LOG2E - (e < 2 ? ls0 : ls1)) : 0.f;
            s[n][e] = p * (dp[n][e] - (e < 2 ? dl0 : dl1));
        }
    }
}

// dK and dV: grid (ceil(seq/64), batch·heads), 128 threads; each warp owns
// 16 keys and walks the queries at or after them, 32 at a time.
template <int HD>
__device__ void flash_bwd_dkdv(const bf16* q, const bf16* k, const bf16* v, const bf16* go,
                               const float* lse, const float* delta, bf16* dk, bf16* dv,
                               int heads, int seq) {
    constexpr int BN = 64, BM = 32, KS = HD / 16, DT = HD / 8;
    constexpr int ST = HD + 8, TT = BM + 8;
    __shared__ __align__(16) bf16 ks[BN * ST];
    __shared__ __align__(16) bf16 vs[BN * ST];
    __shared__ __align__(16) bf16 qs[BM * ST];
    __shared__ __align__(16) bf16 gs[BM * ST];
    __shared__ __align__(16) bf16 qt[HD * TT];
    __shared__ __align__(16) bf16 gt[HD * TT];
    __shared__ float ls[BM], dl[BM];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv0 = blockIdx.x * BN, key0 = kv0 + warp * 16 + g, key1 = key0 + 8;
    const size_t head = (size_t)bh * seq * HD, ost = (size_t)heads * HD;
    const bf16* gob = go + (size_t)b * seq * ost + (size_t)h * HD;

    load_rows<HD>(ks, ST, k + head, kv0, BN, seq, HD);
    load_rows<HD>(vs, ST, v + head, kv0, BN, seq, HD);

    float gk[DT][4], gv[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) gk[d][e] = gv[d][e] = 0.f;

    const int first = kv0 / BM;  // the first query tile that sees a key here
    const int last = (seq + BM - 1) / BM;
    for (int tile = first; tile < last; tile++) {
        const int i0 = tile * BM;
        __syncthreads();
        load_rows<HD>(qs, ST, q + head, i0, BM, seq, HD);
        load_cols<HD>(qt, TT, q + head, i0, BM, seq, HD);
        load_rows<HD>(gs, ST, gob, i0, BM, seq, ost);
        load_cols<HD>(gt, TT, gob, i0, BM, seq, ost);
        for (int i = threadIdx.x; i < BM; i += blockDim.x) {
            const bool in = i0 + i < seq;
            ls[i] = in ? lse[(size_t)bh * seq + i0 + i] : 0.f;
            dl[i] = in ? delta[(size_t)bh * seq + i0 + i] : 0.f;
        }
        __syncthreads();

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 keys × 32 queries.
        float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const int c = kk * 16 + 2 * t;
                uint32_t ka[4], va[4];
                load_a(ka, ks, ST, warp * 16 + g, BN, c);
                load_a(va, vs, ST, warp * 16 + g, BN, c);
                const bf16* qr = qs + (n * 8 + g) * ST + c;
                const bf16* gr = gs + (n * 8 + g) * ST + c;
                mma(s[n], ka, pair(qr), pair(qr + 8));
                mma(dp[n], va, pair(gr), pair(gr + 8));
            }
        }
        // Pᵀ from the saved log-sum-exp; dSᵀ = Pᵀ (dPᵀ − delta).
        dkdv_scores<BM>(s, dp, i0, t, key0, key1, seq, ls, dl);
        // dV += Pᵀ dO, dK += dSᵀ Q.
#pragma unroll
        for (int j = 0; j < BM / 16; j++) {
            uint32_t pa[4];
            c_to_a<bf16>(pa, s[2 * j], s[2 * j + 1]);
            uint32_t da[4];
            c_to_a<bf16>(da, dp[2 * j], dp[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                const bf16* gr = gt + (d * 8 + g) * TT + j * 16 + 2 * t;
                const bf16* qr = qt + (d * 8 + g) * TT + j * 16 + 2 * t;
                mma(gv[d], pa, pair(gr), pair(gr + 8));
                mma(gk[d], da, pair(qr), pair(qr + 8));
            }
        }
    }
    store_rows<DT>(dk + head, HD, key0, key1, seq, gk, 1.f, 1.f, t);
    store_rows<DT>(dv + head, HD, key0, key1, seq, gv, 1.f, 1.f, t);
}

// dK and dV, pipelined as flash_fwd2: the keys and values of the block
// read once into shared memory (their A fragments by ldmatrix), each tile of
// queries and output gradients copied with cp.async while the one before is
// multiplied, kept as rows (the transposes the products need come from
// ldmatrix.trans). Grid and outputs as flash_bwd_dkdv; head sizes up to 80.
template <int HD>
__device__ void flash_bwd_dkdv2(const bf16* q, const bf16* k, const bf16* v, const bf16* go,
                                const float* lse, const float* delta, bf16* dk, bf16* dv,
                                int heads, int seq) {
    constexpr int BN = 64, BM = 32, KS = HD / 16, DT = HD / 8, ST = HD + 8;
    static_assert((2 * BN + 4 * BM) * ST * 2 + 2 * BM * 4 <= 48 * 1024, "shared memory past 48 KB");
    __shared__ __align__(16) bf16 ks[BN * ST];
    __shared__ __align__(16) bf16 vs[BN * ST];
    __shared__ __align__(16) bf16 qs[2][BM * ST];
    __shared__ __align__(16) bf16 gs[2][BM * ST];
    __shared__ float ls[BM], dl[BM];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv0 = blockIdx.x * BN, key0 = kv0 + warp * 16 + g, key1 = key0 + 8;
    const size_t head = (size_t)bh * seq * HD, ost = (size_t)heads * HD;
    const bf16* gob = go + (size_t)b * seq * ost + (size_t)h * HD;
    const bf16* qh = q + head;

    const int first = kv0 / BM;  // the first query tile that sees a key here
    const int last = (seq + BM - 1) / BM;
    copy_rows<HD>(ks, ST, k + head, HD, kv0, BN, seq);
    copy_rows<HD>(vs, ST, v + head, HD, kv0, BN, seq);
    copy_rows<HD>(qs[0], ST, qh, HD, first * BM, BM, seq);
    copy_rows<HD>(gs[0], ST, gob, ost, first * BM, BM, seq);
    cp_async_commit();

    float gk[DT][4], gv[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) gk[d][e] = gv[d][e] = 0.f;

    for (int tile = first; tile < last; tile++) {
        const int i0 = tile * BM, buf = (tile - first) & 1;
        // The other buffers were last read in the previous tile, which every
        // warp has left (the barrier at the loop's end).
        if (tile + 1 < last) {
            copy_rows<HD>(qs[buf ^ 1], ST, qh, HD, i0 + BM, BM, seq);
            copy_rows<HD>(gs[buf ^ 1], ST, gob, ost, i0 + BM, BM, seq);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        for (int i = threadIdx.x; i < BM; i += blockDim.x) {
            const bool in = i0 + i < seq;
            ls[i] = in ? lse[(size_t)bh * seq + i0 + i] : 0.f;
            dl[i] = in ? delta[(size_t)bh * seq + i0 + i] : 0.f;
        }
        __syncthreads();
        const bf16* qb = qs[buf];
        const bf16* gb = gs[buf];

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 keys × 32 queries.
        float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            uint32_t ka[4], va[4];
            load_a_rows(ka, ks, ST, warp * 16, kk * 16);
            load_a_rows(va, vs, ST, warp * 16, kk * 16);
#pragma unroll
            for (int n = 0; n < BM / 8; n++) {
                uint32_t b0, b1, c0, c1;
                load_b_rows(b0, b1, qb, ST, n * 8, kk * 16);
                load_b_rows(c0, c1, gb, ST, n * 8, kk * 16);
                mma(s[n], ka, b0, b1);
                mma(dp[n], va, c0, c1);
            }
        }
        // Pᵀ from the saved log-sum-exp; dSᵀ = Pᵀ (dPᵀ − delta).
        dkdv_scores<BM>(s, dp, i0, t, key0, key1, seq, ls, dl);
        // dV += Pᵀ dO, dK += dSᵀ Q.
#pragma unroll
        for (int j = 0; j < BM / 16; j++) {
            uint32_t pa[4], da[4];
            c_to_a<bf16>(pa, s[2 * j], s[2 * j + 1]);
            c_to_a<bf16>(da, dp[2 * j], dp[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                uint32_t b0, b1, c0, c1;
                load_b_cols(b0, b1, gb, ST, j * 16, d * 8);
                load_b_cols(c0, c1, qb, ST, j * 16, d * 8);
                mma(gv[d], pa, b0, b1);
                mma(gk[d], da, c0, c1);
            }
        }
        __syncthreads();
    }
    store_rows<DT>(dk + head, HD, key0, key1, seq, gk, 1.f, 1.f, t);
    store_rows<DT>(dv + head, HD, key0, key1, seq, gv, 1.f, 1.f, t);
}

// dQ: grid (ceil(seq/64), batch·heads), 128 threads; each warp owns 16
// queries and walks the keys up to them, 32 at a time.
template <int HD>
__device__ void flash_bwd_dq(const bf16* q, const bf16* k, const bf16* v, const bf16* go,
                             const float* lse, const float* delta, bf16* dq, int heads, int seq) {
    constexpr int BM = 64, BN = 32, KS = HD / 16, DT = HD / 8;
    constexpr int ST = HD + 8, TT = BN + 8;
    __shared__ __align__(16) bf16 ks[BN * ST];
    __shared__ __align__(16) bf16 vs[BN * ST];
    __shared__ __align__(16) bf16 kt[HD * TT];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The last query blocks see the most keys: launched first, they leave
    // the light ones for the tail.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const size_t head = (size_t)bh * seq * HD, ost = (size_t)heads * HD;
    const bf16* gob = go + (size_t)b * seq * ost + (size_t)h * HD;

    uint32_t qf[KS][4], gf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        load_a(qf[kk], q + head, HD, row0, seq, kk * 16 + 2 * t);
        load_a(gf[kk], gob, ost, row0, seq, kk * 16 + 2 * t);
    }
    const float ls0 = row0 < seq ? lse[(size_t)bh * seq + row0] : 0.f;
    const float ls1 = row1 < seq ? lse[(size_t)bh * seq + row1] : 0.f;
    const float dl0 = row0 < seq ? delta[(size_t)bh * seq + row0] : 0.f;
    const float dl1 = row1 < seq ? delta[(size_t)bh * seq + row1] : 0.f;

    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;

    const int tiles = min((seq + BN - 1) / BN, (q0 + BM - 1) / BN + 1);
    for (int tile = 0; tile < tiles; tile++) {
        const int kv0 = tile * BN;
        __syncthreads();
        load_rows<HD>(ks, ST, k + head, kv0, BN, seq, HD);
        load_rows<HD>(vs, ST, v + head, kv0, BN, seq, HD);
        load_cols<HD>(kt, TT, k + head, kv0, BN, seq, HD);
        __syncthreads();

        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const bf16* kr = ks + (n * 8 + g) * ST + kk * 16 + 2 * t;
                const bf16* vr = vs + (n * 8 + g) * ST + kk * 16 + 2 * t;
                mma(s[n], qf[kk], pair(kr), pair(kr + 8));
                mma(dp[n], gf[kk], pair(vr), pair(vr + 8));
            }
        }
        dq_scores<BN>(s, dp, kv0, t, row0, row1, seq, ls0, ls1, dl0, dl1);
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            uint32_t da[4];
            c_to_a<bf16>(da, s[2 * j], s[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                const bf16* kr = kt + (d * 8 + g) * TT + j * 16 + 2 * t;
                mma(acc[d], da, pair(kr), pair(kr + 8));
            }
        }
    }
    store_rows<DT>(dq + head, HD, row0, row1, seq, acc, 1.f, 1.f, t);
}

// dQ, pipelined as flash_fwd2: each tile of keys and values copied with
// cp.async while the one before is multiplied, kept as rows (dS·K's
// operand transposed by ldmatrix.trans instead of a transposed copy). Grid
// and outputs as flash_bwd_dq; head sizes up to 80.
template <int HD>
__device__ void flash_bwd_dq2(const bf16* q, const bf16* k, const bf16* v, const bf16* go,
                              const float* lse, const float* delta, bf16* dq, int heads, int seq) {
    constexpr int BM = 64, BN = 32, KS = HD / 16, DT = HD / 8, ST = HD + 8;
    static_assert(2 * 2 * BN * ST * 2 <= 48 * 1024, "shared memory past 48 KB");
    __shared__ __align__(16) bf16 ks[2][BN * ST];
    __shared__ __align__(16) bf16 vs[2][BN * ST];

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // The last query blocks see the most keys: launched first.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const size_t head = (size_t)bh * seq * HD, ost = (size_t)heads * HD;
    const bf16* gob = go + (size_t)b * seq * ost + (size_t)h * HD;

    // Tile `tile`'s keys and values into buffer `buf`.
    auto load = [&](int tile, int buf) {
        copy_rows<HD>(ks[buf], ST, k + head, HD, tile * BN, BN, seq);
        copy_rows<HD>(vs[buf], ST, v + head, HD, tile * BN, BN, seq);
        cp_async_commit();
    };

    uint32_t qf[KS][4], gf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        load_a(qf[kk], q + head, HD, row0, seq, kk * 16 + 2 * t);
        load_a(gf[kk], gob, ost, row0, seq, kk * 16 + 2 * t);
    }
    const float ls0 = row0 < seq ? lse[(size_t)bh * seq + row0] : 0.f;
    const float ls1 = row1 < seq ? lse[(size_t)bh * seq + row1] : 0.f;
    const float dl0 = row0 < seq ? delta[(size_t)bh * seq + row0] : 0.f;
    const float dl1 = row1 < seq ? delta[(size_t)bh * seq + row1] : 0.f;

    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;

    const int tiles = min((seq + BN - 1) / BN, (q0 + BM - 1) / BN + 1);
    load(0, 0);
    for (int tile = 0; tile < tiles; tile++) {
        const int buf = tile & 1, kv0 = tile * BN;
        // The other buffer was last read in the previous tile, which every
        // warp has left (the barrier at the loop's end).
        if (tile + 1 < tiles) {
            load(tile + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* kb = ks[buf];
        const bf16* vb = vs[buf];

        // S = Q Kᵀ and dP = dO Vᵀ.
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t b0, b1, c0, c1;
                load_b_rows(b0, b1, kb, ST, n * 8, kk * 16);
                load_b_rows(c0, c1, vb, ST, n * 8, kk * 16);
                mma(s[n], qf[kk], b0, b1);
                mma(dp[n], gf[kk], c0, c1);
            }
        }
        dq_scores<BN>(s, dp, kv0, t, row0, row1, seq, ls0, ls1, dl0, dl1);
        // dQ += dS K.
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            uint32_t da[4];
            c_to_a<bf16>(da, s[2 * j], s[2 * j + 1]);
#pragma unroll
            for (int d = 0; d < DT; d++) {
                uint32_t b0, b1;
                load_b_cols(b0, b1, kb, ST, j * 16, d * 8);
                mma(acc[d], da, b0, b1);
            }
        }
        __syncthreads();
    }
    store_rows<DT>(dq + head, HD, row0, row1, seq, acc, 1.f, 1.f, t);
}

#define FLASH(HD)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                              \
        flash_fwd_bf16_hd##HD(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,     \
                              int heads, int seq) {                                                \
        flash_fwd<HD>(q, k, v, o, lse, heads, seq);                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                              \
        flash_fwd2_bf16_hd##HD(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,    \
                               int heads, int seq) {                                               \
        flash_fwd2<HD>(q, k, v, o, lse, heads, seq);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dkdv_bf16_hd##HD(                     \
        const bf16* q, const bf16* k, const bf16* v, const bf16* go, const float* lse,              \
        const float* delta, bf16* dk, bf16* dv, int heads, int seq) {                              \
        flash_bwd_dkdv<HD>(q, k, v, go, lse, delta, dk, dv, heads, seq);                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dkdv2_bf16_hd##HD(                    \
        const bf16* q, const bf16* k, const bf16* v, const bf16* go, const float* lse,              \
        const float* delta, bf16* dk, bf16* dv, int heads, int seq) {                              \
        flash_bwd_dkdv2<HD>(q, k, v, go, lse, delta, dk, dv, heads, seq);                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dq_bf16_hd##HD(                       \
        const bf16* q, const bf16* k, const bf16* v, const bf16* go, const float* lse,              \
        const float* delta, bf16* dq, int heads, int seq) {                                        \
        flash_bwd_dq<HD>(q, k, v, go, lse, delta, dq, heads, seq);                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dq2_bf16_hd##HD(                      \
        const bf16* q, const bf16* k, const bf16* v, const bf16* go, const float* lse,              \
        const float* delta, bf16* dq, int heads, int seq) {                                        \
        flash_bwd_dq2<HD>(q, k, v, go, lse, delta, dq, heads, seq);                                \
    }

FLASH(16)
FLASH(32)
FLASH(64)
FLASH(80)
