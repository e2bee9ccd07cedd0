// BitLab cuda_ext: the pieces of the int8 GEMM that runs on cuBLAS (many tokens, int8 activations).
//
// Why: at hundreds or thousands of tokens a linear layer is compute-bound, and the int8 tensor cores
// are fastest through wgmma, which cuBLAS drives and our mma.sync GEMM does not.  So for int8
// activations past a token threshold (rule and numbers: bindings.cpp, int8_gemm_on_cublas) the op
//
//   1. expands a slice of the prepared weight (int8-path lane tiles, bitlab_mma.cuh) into a row-major
//      int8 matrix [slice rows, Kp] (expand_lane_tiles_int8: 2 or 1 bits per weight in, 8 out),
//   2. multiplies it with cuBLAS int8 (at::_int_mm: exact int32 accumulation), and
//   3. applies the epilogue to the int32 result (int32_epilogue: x scale, w scale, bias, ReLU /
//      squared ReLU, output dtype), with the same float32 roundings as every other int8 kernel here,
//      so the result equals the mma.sync kernels' bit for bit.
//
// Slices of a few thousand rows keep the expanded weight and the int32 result in L2 between steps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "bitlab_launch.h"
#include "bitlab_mma.cuh"

namespace bitlab {
namespace {

constexpr int kExpandWarps = 8;  // one (m-tile, chunk) per warp

// Warp w of block b expands unit u = b * kExpandWarps + w, u = (m-tile - tile0) * nchunks + chunk.
// Lane (g, t) holds rows g and g + 8 of the tile, input columns [32 t, 32 t + 32) of the chunk, as the
// int8 mma's A registers: register 4 j + R covers row g + 8 (R & 1), columns 32 t + 8 j + 4 (R >> 1) + 0..3.
template <int FMT>
__global__ void __launch_bounds__(32 * kExpandWarps) expand_lane_tiles_kernel(const uint32_t* __restrict__ wq,
                                                                              int tile0, int units, int nchunks,
                                                                              int8_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int unit = blockIdx.x * kExpandWarps + (threadIdx.x >> 5);
  if (unit >= units) return;
  const int tile = unit / nchunks, chunk = unit % nchunks;
  uint32_t words[LaneTile<FMT>::wpl];
  load_lane_tile<FMT>(words, wq, static_cast<long>(tile0 + tile) * nchunks + chunk, lane);
  uint32_t regs[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) regs[r] = decode_s8<FMT>(words, r);
  const int g = lane >> 2, t = lane & 3;
  const long ld = static_cast<long>(nchunks) * 128;
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // row g, then row g + 8
    uint4* dst = reinterpret_cast<uint4*>(out + (static_cast<long>(tile) * 16 + g + 8 * half) * ld + chunk * 128 + 32 * t);
    dst[0] = make_uint4(regs[half], regs[2 + half], regs[4 + half], regs[6 + half]);
    dst[1] = make_uint4(regs[8 + half], regs[10 + half], regs[12 + half], regs[14 + half]);
  }
}

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// y[token][n0 + c] = epilogue_value(acc[token][c]) (bitlab_mma.cuh) for c < cols, n0 + c < N; V consecutive
// columns per thread.
// V = 8 needs N % 8 == 0 (then cols is too, and every row of y is 16-byte aligned): one or two 16-byte
// stores per thread.  V = 4 stores element by element.
template <typename T, int V>
__global__ void int32_epilogue_kernel(LinearArgs a, const int32_t* __restrict__ acc, int ld_acc, int n0, int cols) {
  const int groups = (cols + V - 1) / V;
  const long total = static_cast<long>(a.M) * groups;
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    const int token = static_cast<int>(i / groups), c0 = static_cast<int>(i % groups) * V;
    int vals[V];
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const int4 v4 = *reinterpret_cast<const int4*>(acc + static_cast<long>(token) * ld_acc + c0 + 4 * q);
      vals[4 * q] = v4.x; vals[4 * q + 1] = v4.y; vals[4 * q + 2] = v4.z; vals[4 * q + 3] = v4.w;
    }
    T* y = reinterpret_cast<T*>(a.y) + static_cast<long>(token) * a.N + n0 + c0;
    if constexpr (V == 8) {
      alignas(16) T out[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = to_out<T>(epilogue_value(a, token, n0 + c0 + e, static_cast<float>(vals[e])));
#pragma unroll
      for (int q = 0; q < 8 * static_cast<int>(sizeof(T)) / 16; ++q)
        reinterpret_cast<uint4*>(y)[q] = reinterpret_cast<const uint4*>(out)[q];
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (c0 + e >= cols || n0 + c0 + e >= a.N) break;
        y[e] = to_out<T>(epilogue_value(a, token, n0 + c0 + e, static_cast<float>(vals[e])));
      }
    }
  }
}

template <typename T>
cudaError_t launch_epilogue_t(const LinearArgs& a, const int32_t* acc, int ld_acc, int n0, int cols,
                              cudaStream_t stream) {
  const bool wide = a.N % 8 == 0;
  const long groups = static_cast<long>(a.M) * ((cols + (wide ? 7 : 3)) / (wide ? 8 : 4));
  const int threads = 256;
  const long cap = 16L * device_sm_count();
  const int blocks = static_cast<int>(groups / threads + 1 < cap ? groups / threads + 1 : cap);
  if (wide) int32_epilogue_kernel<T, 8><<<blocks, threads, 0, stream>>>(a, acc, ld_acc, n0, cols);
  else int32_epilogue_kernel<T, 4><<<blocks, threads, 0, stream>>>(a, acc, ld_acc, n0, cols);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_expand_int8(const uint32_t* wq, int fmt, int tile0, int tiles, int nchunks, int8_t* out,
                               cudaStream_t stream) {
  const int units = tiles * nchunks;
  if (units == 0) return cudaSuccess;
  const dim3 grid((units + kExpandWarps - 1) / kExpandWarps), block(32 * kExpandWarps);
  switch (fmt) {
    case kBinary: expand_lane_tiles_kernel<kBinary><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kTernary: expand_lane_tiles_kernel<kTernary><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt2: expand_lane_tiles_kernel<kInt2><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt4: expand_lane_tiles_kernel<kInt4><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt8: expand_lane_tiles_kernel<kInt8><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_int32_epilogue(const LinearArgs& a, const int32_t* acc, int ld_acc, int n0, int cols,
                                  cudaStream_t stream) {
  if (a.M == 0 || cols <= 0) return cudaSuccess;
  if (a.out_dtype == kDtypeHalf) return launch_epilogue_t<__half>(a, acc, ld_acc, n0, cols, stream);
  if (a.out_dtype == kDtypeBFloat16) return launch_epilogue_t<__nv_bfloat16>(a, acc, ld_acc, n0, cols, stream);
  return launch_epilogue_t<float>(a, acc, ld_acc, n0, cols, stream);
}

}  // namespace bitlab
