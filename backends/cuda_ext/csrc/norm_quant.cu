// RMSNorm followed by per-token int8 quantization, one kernel: the input of a W*A8 projection.
//
// BitNet runs a norm before each of its projections, and the projection quantizes the norm's
// output per token.  Done as two kernels each pass is latency-bound at decode sizes (one row of
// 2560-6912 values); here one block per row loads the row once into registers, reduces twice
// (sum of squares, then max |y|) and writes the int8 row and its scale.
//
// Math, per row of K values in dtype T (half, bf16 or float), torch's rounding at each step:
//   mode 0: x = a
//   mode 1: h = T(a + b), written to h (the residual stream), x = h
//   mode 2: x = T(T(relu(a)^2) * b)                       (BitNet's squared-ReLU gate)
//   y = T(w * T(x * rsqrt(sum(x^2) / K + eps)))           (transformers' BitNetRMSNorm)
//   amax = max(max|y|, 1e-5); q = clamp(rint(y * (127 / amax)), -127, 127); scale = amax / 127
// with quantize.cu's float32 roundings for the quantization (bitcore.quantize).  The sum of
// squares is reduced in a different order than torch's, so y can differ from torch's in the
// last bit of the mean (tests compare with a tolerance of one quantization step).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"
#include "bitlab_norm_math.cuh"

namespace bitlab {
namespace {

// The block's sum (kMax: maximum) of v: a xor-shuffle tree per warp, each warp's result to slots[warp], one
// barrier, then every warp runs the same xor tree over the warps' results (so every thread gets the same bits
// warp 0 alone would get, without the two barriers of handing its result out).  Two reductions in a row take
// different slots: a warp may still read the first's while another writes the second's.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* slots) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x & 31;
  if (lane == 0) slots[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? slots[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  return v;
}

// x of one element from a and b by mode (file comment).
template <typename T>
__device__ __forceinline__ float norm_input_value(float a, float b, int mode) {
  if (mode == 1) return round_t<T>(a + b);
  if (mode == 2) return relu2_gate<T>(a, b);
  return a;
}

// Eight consecutive values of a row from column k0 (zeros past K): one 16-byte load when vec.
template <typename T>
__device__ __forceinline__ void load8(float (&v)[8], const T* __restrict__ row, int k0, int K, bool vec) {
  if (vec) {
    if (k0 < K) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k0));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f<T>(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k0 + i < K ? to_f<T>(row[k0 + i]) : 0.f;
  }
}

// Each thread owns P pieces of 8 consecutive columns (piece threadIdx.x + j * blockDim.x): with half /
// bf16 rows, K % 8 == 0 and 16-byte alignment (vector_access) every load and store is one vector access per
// piece (one 2-byte access per element made the 6912-column norm of BitNet's MLP the slowest of its four).
// kMode = kVec = -1 (the default) is one kernel for every mode and access width, both decided per launch.  With
// BITLAB_NORM_KERNEL=per_mode they are template arguments (kMode 0-2, kVec 0 / 1): a kernel per mode holds only
// the code its launch runs (8-10 KB instead of 14 for BitNet's norms), but BitNet's step then runs two
// distinct norm kernels, and on the H200 the one shared kernel was faster (batch 1: 867 against 843 tokens/s,
// batch 2: 1641 against 1600, same process): code that stays cached beats less code fetched again.
template <typename T, int P, int kMode, int kVec>
__global__ void __launch_bounds__(P == 1 ? 1024 : 512) rms_norm_quant_kernel(NormQuantArgs p, bool vec_access) {
  __shared__ float shared[2][32];  // the two reductions' per-warp results
  const int K = p.K;
  const int mode = kMode >= 0 ? kMode : p.mode;
  const bool vec = kVec >= 0 ? kVec != 0 : vec_access;
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  // The norm's weight is written by no kernel: it loads before the wait for the kernel before this one.
  float vw[P][8];
#pragma unroll
  for (int j = 0; j < P; ++j) load8<T>(vw[j], w, 8 * (threadIdx.x + j * blockDim.x), K, vec);
  pdl_wait();               // launched as a dependent: every other read and every write comes after this
  pdl_launch_dependents();  // the projection after it may start fetching its weights now
  const T* __restrict__ a = static_cast<const T*>(p.a) + static_cast<long>(blockIdx.x) * p.lda;
  const T* __restrict__ b = static_cast<const T*>(p.b) + static_cast<long>(blockIdx.x) * p.ldb;
  // All loads first (one memory round trip), then the math, then the stores.
  float va[P][8], vb[P][8];
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const int k0 = 8 * (threadIdx.x + j * blockDim.x);
    load8<T>(va[j], a, k0, K, vec);
    if (mode != 0) {
      load8<T>(vb[j], b, k0, K, vec);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) vb[j][i] = 0.f;
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < P; ++j)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      va[j][i] = norm_input_value<T>(va[j][i], vb[j][i], mode);  // x (zero past K)
      ss = __fmaf_rn(va[j][i], va[j][i], ss);
    }
  if (mode == 1) {
    T* __restrict__ h = static_cast<T*>(p.h) + static_cast<long>(blockIdx.x) * K;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int k0 = 8 * (threadIdx.x + j * blockDim.x);
      if (vec) {
        if (k0 < K) {
          uint4 raw;
          T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
          for (int i = 0; i < 8; ++i) e[i] = from_f<T>(va[j][i]);
          *reinterpret_cast<uint4*>(h + k0) = raw;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (k0 + i < K) h[k0 + i] = from_f<T>(va[j][i]);
      }
    }
  }
  ss = block_reduce<false>(ss, shared[0]);
  const float r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), p.eps));
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < P; ++j)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float y = rms_normed<T>(va[j][i], r, vw[j][i]);  // 0 past K
      va[j][i] = y;
      amax = fmaxf(amax, fabsf(y));
    }
  amax = fmaxf(block_reduce<true>(amax, shared[1]), 1e-5f);
  const float inv = quant_inverse(amax);
  int8_t* q = p.q + static_cast<long>(blockIdx.x) * K;
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const int k0 = 8 * (threadIdx.x + j * blockDim.x);
    if (vec) {
      if (k0 < K) {
        uint32_t packed[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 8; ++i)
          packed[i >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(quantize_value(va[j][i], inv))) << (8 * (i & 3));
        *reinterpret_cast<uint2*>(q + k0) = make_uint2(packed[0], packed[1]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k0 + i < K) q[k0 + i] = quantize_value(va[j][i], inv);
    }
  }
  if (threadIdx.x == 0) p.scale[blockIdx.x] = quant_scale(amax);
}

// Whether every row access can be one 16-byte vector per piece of 8 (half / bf16 rows, K % 8 == 0, aligned).
template <typename T>
bool vector_access(const NormQuantArgs& p) {
  return sizeof(T) == 2 && p.K % 8 == 0 && p.lda % 8 == 0 && (p.mode == 0 || p.ldb % 8 == 0) &&
         ((reinterpret_cast<uintptr_t>(p.a) | reinterpret_cast<uintptr_t>(p.b) |
           reinterpret_cast<uintptr_t>(p.weight) | reinterpret_cast<uintptr_t>(p.h)) % 16 == 0) &&
         reinterpret_cast<uintptr_t>(p.q) % 8 == 0;
}

template <typename T, int P, int kMode>
cudaError_t launch_mode(const NormQuantArgs& p, dim3 threads, cudaStream_t stream) {
  const bool vec = vector_access<T>(p);  // (never for float rows: no float kernel with kVec = 1 is built)
  if (vec)
    return launch_maybe_pdl(rms_norm_quant_kernel<T, P, kMode, sizeof(T) == 2>, dim3(p.M), threads, 0, stream, true,
                            p, vec);
  return launch_maybe_pdl(rms_norm_quant_kernel<T, P, kMode, 0>, dim3(p.M), threads, 0, stream, true, p, vec);
}

template <typename T, int P>
cudaError_t launch_pieces(const NormQuantArgs& p, dim3 threads, cudaStream_t stream) {
  if (env_is("BITLAB_NORM_KERNEL", "per_mode")) {  // read per launch (a graph keeps what its capture read)
    if (p.mode == 1) return launch_mode<T, P, 1>(p, threads, stream);
    if (p.mode == 2) return launch_mode<T, P, 2>(p, threads, stream);
    return launch_mode<T, P, 0>(p, threads, stream);
  }
  return launch_maybe_pdl(rms_norm_quant_kernel<T, P, -1, -1>, dim3(p.M), threads, 0, stream, true, p,
                          vector_access<T>(p));
}

template <typename T>
cudaError_t launch_typed(const NormQuantArgs& p, cudaStream_t stream) {
  // One piece of 8 values per thread (K <= 8192 with 1024 threads), else up to four (512 threads).
  const int per = p.K <= 8 * 1024 ? 8 : 32;
  int threads = (p.K + per - 1) / per;
  threads = (threads + 31) / 32 * 32;
  threads = threads < 64 ? 64 : threads;
  if (per == 8) return launch_pieces<T, 1>(p, dim3(threads), stream);
  return launch_pieces<T, 4>(p, dim3(threads), stream);
}

}  // namespace

cudaError_t launch_rms_norm_quant(const NormQuantArgs& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  if (p.K > kNormQuantMaxK || p.K < 1 || p.mode < 0 || p.mode > 2) return cudaErrorInvalidValue;
  if (p.dtype == kDtypeHalf) return launch_typed<__half>(p, stream);
  if (p.dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(p, stream);
  return launch_typed<float>(p, stream);
}

}  // namespace bitlab
