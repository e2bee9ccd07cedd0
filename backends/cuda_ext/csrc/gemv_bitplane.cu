// BitLab cuda_ext: the bit-plane GEMV for ternary weights and int8 activations (1-8 tokens, sm_80+).
//
// No weight decoding at all.  A ternary weight is two bit masks, P (w = +1) and N (w = -1); an int8
// activation is eight bit planes x_p (two's complement: x = sum_{p<7} 2^p x_p - 128 x_7).  Then
//
//   sum_k w_k x_k = sum_p c_p (popc(P & x_p) - popc(N & x_p)),   c_p = 2^p (p < 7), c_7 = -128,
//
// and mma.m16n8k256 .b1 with AND + popcount computes the popcounts of 16 weight rows against 8
// columns at once: the columns are the eight planes of one token.  Per 16 rows x 256 inputs the
// weights take two mma (P and N) and no other instruction; the result is the int8 path's exact
// int32 dot product, so the epilogue (epilogue_store) gives the same outputs bit for bit.
//
// Weight layout ("plane tiles", backends/cuda_ext/layout.py: bitplane_tiles): rows padded to a
// multiple of 128 and cut into 16-row tiles, inputs padded to Kp (a multiple of 256) and cut into
// 256-input chunks.  Unit (tile, chunk) = 1 KB: [mask v (P, N)][lane 32][4 words]; lane (g, t)
// holds for mask v: word 0 = row g, word 1 = row g + 8 over the chunk's first half, words 2 / 3
// the same rows over its second half; bit i of a half's word is input 4 i + t of that half (the
// order in which a warp's ballots transpose 32 activation words below).
//
// Block: 8 warps own MT tiles; the MT x nchunks units are dealt round-robin to the warps, each
// warp's weights loaded into registers in batches of D units (the first batch before the dependent
// wait).  After the wait the block turns its tokens' int8 rows into bit planes in shared memory
// (one 4-byte load and 32 ballots per 128 inputs per warp), runs the mma, combines the planes
// with c_p, sums the 4 lanes of a row and the warps in shared memory, and stores with the int8
// path's epilogue.
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstdlib>

#include "bitlab_cp_async.cuh"
#include "bitlab_mma.cuh"

namespace bitlab {
namespace {

constexpr int kBitplaneWarps = 8;

__device__ __forceinline__ void mma_b1_and_popc(int* c, const uint4& a, const uint2& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
#endif
}

// Shared memory: planes [NT tokens][nchunks][t 4][g = plane 8][half 2] words, then the warps'
// row sums [warps][MT][NT][16] ints.
inline int bitplane_smem_bytes(int nt, int mt, int nchunks) {
  return nt * nchunks * 64 * 4 + kBitplaneWarps * mt * nt * 16 * 4;
}

template <int MT, int NT>
__global__ void __launch_bounds__(256, 2) gemv_bitplane_kernel(LinearArgs a, int nchunks) {
  constexpr int D = NT >= 4 ? 4 : 6;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * MT;
  const int units = MT * nchunks;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* planes = reinterpret_cast<uint32_t*>(smem_raw);
  int* red = reinterpret_cast<int*>(smem_raw + NT * nchunks * 64 * 4);

  uint4 wp[D], wn[D];
  auto load_batch = [&](int batch) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int u = warp + kBitplaneWarps * (batch * D + d);
      if (u < units) {
        const int m = u / nchunks, c = u - m * nchunks;
        const uint4* p = reinterpret_cast<const uint4*>(a.wq + (static_cast<long>(tile0 + m) * nchunks + c) * 256);
        wp[d] = __ldg(p + lane);
        wn[d] = __ldg(p + 32 + lane);
      }
    }
  };
  load_batch(0);
  pdl_launch_dependents();  // a dependent (the next norm) may launch and wait for this grid
  pdl_wait();               // the first weights are in flight; x is written by the previous kernel

  // int8 rows -> bit planes.  Half-group hh of token n: inputs [128 hh, 128 hh + 128); lane l loads
  // inputs 4 l .. 4 l + 3; ballot (byte b, bit p) gives the plane-p word of inputs 4 i + b, which
  // lane 8 b + p keeps and stores at (t = b, g = p).
  {
    constexpr int XR = 8;
    const int halves = 2 * nchunks, total = a.M * halves;
    const int8_t* x = static_cast<const int8_t*>(a.x);
    for (int base = warp; base < total; base += kBitplaneWarps * XR) {
      uint32_t xw[XR];
#pragma unroll
      for (int r = 0; r < XR; ++r) {
        const int idx = base + kBitplaneWarps * r;
        xw[r] = 0u;
        if (idx < total) {
          const int n = idx / halves, hh = idx - n * halves;
          xw[r] = __ldg(reinterpret_cast<const uint32_t*>(x + static_cast<long>(n) * a.Kp + hh * 128) + lane);
        }
      }
#pragma unroll
      for (int r = 0; r < XR; ++r) {
        const int idx = base + kBitplaneWarps * r;
        if (idx < total) {
          uint32_t mine = 0u;
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int p = 0; p < 8; ++p) {
              const uint32_t v = __ballot_sync(0xffffffffu, (xw[r] >> (8 * b + p)) & 1u);
              if (lane == 8 * b + p) mine = v;
            }
          const int n = idx / halves, hh = idx - n * halves;
          planes[(((n * nchunks + (hh >> 1)) * 4 + (lane >> 3)) * 8 + (lane & 7)) * 2 + (hh & 1)] = mine;
        }
      }
    }
  }
  __syncthreads();

  int accp[MT][NT][4], accn[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) accp[m][n][i] = accn[m][n][i] = 0;

  const uint2* planes2 = reinterpret_cast<const uint2*>(planes);
  for (int batch = 0; warp + kBitplaneWarps * batch * D < units; ++batch) {
    if (batch > 0) load_batch(batch);
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int u = warp + kBitplaneWarps * (batch * D + d);
      if (u < units) {
        const int m = u / nchunks, c = u - m * nchunks;
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) {
          if (mm == m) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              if (n < a.M) {
                const uint2 xb = planes2[((n * nchunks + c) * 4 + t) * 8 + g];
                mma_b1_and_popc(accp[mm][n], wp[d], xb);
                mma_b1_and_popc(accn[mm][n], wn[d], xb);
              }
            }
          }
        }
      }
    }
  }

  // Column 2 t + j of the accumulators is plane 2 t + j; rows g (i = 0, 1) and g + 8 (i = 2, 3).
  const int c0 = 1 << (2 * t), c1 = t == 3 ? -128 : 2 << (2 * t);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int v = c0 * (accp[m][n][2 * h] - accn[m][n][2 * h]) + c1 * (accp[m][n][2 * h + 1] - accn[m][n][2 * h + 1]);
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0) red[((warp * MT + m) * NT + n) * 16 + g + 8 * h] = v;
      }
  __syncthreads();
  for (int e = threadIdx.x; e < MT * NT * 16; e += blockDim.x) {
    const int r = e & 15, n = (e >> 4) % NT, m = (e >> 4) / NT;
    int s = 0;
#pragma unroll
    for (int w = 0; w < kBitplaneWarps; ++w) s += red[((w * MT + m) * NT + n) * 16 + r];
    if (n < a.M) epilogue_store(a, n, (tile0 + m) * 16 + r, s);
  }
}

template <int MT, int NT>
cudaError_t launch_bitplane_mt_nt(const LinearArgs& a, int nchunks, cudaStream_t stream) {
  const int tiles = (a.N + 127) / 128 * 8;
  const int smem = bitplane_smem_bytes(NT, MT, nchunks);
  auto kernel = gemv_bitplane_kernel<MT, NT>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  return launch_maybe_pdl(kernel, dim3(tiles / MT), dim3(32 * kBitplaneWarps), smem, stream, a.pdl != 0, a, nchunks);
}

template <int NT>
cudaError_t launch_bitplane_nt(const LinearArgs& a, int nchunks, int mt, cudaStream_t stream) {
  if constexpr (NT == 1) {
    if (mt == 4) return launch_bitplane_mt_nt<4, NT>(a, nchunks, stream);
  }
  if constexpr (NT <= 2) {
    if (mt >= 2) return launch_bitplane_mt_nt<2, NT>(a, nchunks, stream);
  }
  return launch_bitplane_mt_nt<1, NT>(a, nchunks, stream);
}

}  // namespace

int bitplane_gemv_mt(int N, int M) {
  if (M > 2) return 1;  // the accumulators of 3-8 tokens leave registers for one tile
  const char* env = std::getenv("BITLAB_CUDA_BITPLANE_MT");
  if (env && (env[0] == '1' || env[0] == '2' || env[0] == '4') && env[1] == '\0') return env[0] - '0';
  // The most tiles per block that still gives every multiprocessor a block (two tokens: at most 2).
  const int tiles = (N + 127) / 128 * 8;
  if (M == 1 && tiles / 4 >= device_sm_count()) return 4;
  if (tiles / 2 >= device_sm_count()) return 2;
  return 1;
}

cudaError_t launch_gemv_bitplane(const LinearArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.M > kBitplaneMaxTokens || a.Kp % 256) return cudaErrorInvalidValue;
  const int nchunks = a.Kp / 256, mt = bitplane_gemv_mt(a.N, a.M);
  if (a.M == 1) return launch_bitplane_nt<1>(a, nchunks, mt, stream);
  if (a.M == 2) return launch_bitplane_nt<2>(a, nchunks, mt, stream);
  if (a.M <= 4) return launch_bitplane_nt<4>(a, nchunks, mt, stream);
  return launch_bitplane_nt<8>(a, nchunks, mt, stream);
}

}  // namespace bitlab
