// BitLab cuda_ext: the pieces of the GEMMs that run on cuBLAS (many tokens).
//
// Why: at hundreds or thousands of tokens a linear layer is compute-bound, and the tensor cores are
// fastest through wgmma, which cuBLAS drives and our mma.sync GEMM does not.  So past a token threshold
// (rules and numbers: bindings.cpp, gemm_on_cublas) the op
//
//   1. expands a slice of the prepared weight into a row-major matrix [slice rows, Kp] of exact code
//      values: int8 from int8-path lane tiles (expand_lane_tiles_int8), or half / bf16 from float-path
//      lane tiles (expand_lane_tiles_float; every format's values are integers of at most 8 bits, exact
//      in both), 1, 2, 4 or 8 bits per weight in;
//   2. multiplies it with cuBLAS: int8 x int8 -> int32 (at::_int_mm, exact), or half / bf16 -> float32
//      (at::mm with out_dtype float32, accumulated in float32 like the mma.sync kernels); and
//   3. applies the epilogue to that result (cublas_epilogue: x scale, w scale, bias, ReLU / squared
//      ReLU, output dtype) with epilogue_value's float32 roundings, so the int8 result equals the
//      mma.sync kernels' bit for bit.
//
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "bitlab_launch.h"
#include "bitlab_mma.cuh"

namespace bitlab {
namespace {

constexpr int kExpandWarps = 8;  // one (m-tile, chunk) per warp

// A warp's unit (16 rows x 128 columns of ROW_BYTES each) staged in shared memory, so the global stores
// are whole rows: a lane's own registers cover 32 columns of 2 rows, and storing them directly left every
// 32-byte sector half-written per instruction (H200: the float expansion ran at ~1.3 TB/s).  Rows are
// padded by 16 bytes to spread the lanes' staging writes over the banks.
template <int ROW_BYTES>
struct ExpandStage {
  static constexpr int pitch = ROW_BYTES + 16;
  uint8_t bytes[16 * pitch];
  __device__ __forceinline__ void put(int row, int byte, uint4 v) {
    *reinterpret_cast<uint4*>(bytes + row * pitch + byte) = v;
  }
  // Copy the 16 staged rows to out (row r at out + r * ld_bytes): consecutive lanes, consecutive 16 bytes.
  __device__ __forceinline__ void store(uint8_t* __restrict__ out, long ld_bytes, int lane) const {
    constexpr int per_row = ROW_BYTES / 16;
#pragma unroll
    for (int p = lane; p < 16 * per_row; p += 32) {
      const int row = p / per_row, c = p % per_row;
      *reinterpret_cast<uint4*>(out + row * ld_bytes + c * 16) = *reinterpret_cast<const uint4*>(bytes + row * pitch + c * 16);
    }
  }
};

// One unit per warp (warp w of block b: u = b * kExpandWarps + w = (m-tile - tile0) * nchunks + chunk), written
// as rows of ROW_BYTES (128 per chunk row of int8, 256 of half / bf16) into out (row stride nchunks * ROW_BYTES).
// Lane (g, t) holds rows g and g + 8 of the tile and input columns [32 t, 32 t + 32) of the chunk, i.e. P =
// ROW_BYTES / 64 pieces of 16 bytes per row; piece(words, half, q) returns piece q of row g + 8 half.
template <int FMT, int ROW_BYTES, typename Piece>
__device__ __forceinline__ void expand_unit(const uint32_t* __restrict__ wq, int tile0, int units, int nchunks,
                                            uint8_t* __restrict__ out, Piece piece) {
  __shared__ __align__(16) ExpandStage<ROW_BYTES> stage[kExpandWarps];
  constexpr int P = ROW_BYTES / 64;
  const int unit = blockIdx.x * kExpandWarps + (threadIdx.x >> 5);
  if (unit >= units) return;
  const int tile = unit / nchunks, chunk = unit % nchunks;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t words[LaneTile<FMT>::wpl];
  load_lane_tile<FMT>(words, wq, static_cast<long>(tile0 + tile) * nchunks + chunk, lane);
  ExpandStage<ROW_BYTES>& st = stage[threadIdx.x >> 5];
#pragma unroll
  for (int half = 0; half < 2; ++half)  // row g, then row g + 8
#pragma unroll
    for (int q = 0; q < P; ++q) st.put(g + 8 * half, (t * P + q) * 16, piece(words, half, q));
  __syncwarp();
  const long ld = static_cast<long>(nchunks) * ROW_BYTES;
  st.store(out + static_cast<long>(tile) * 16 * ld + static_cast<long>(chunk) * ROW_BYTES, ld, lane);
}

// Registers 8 q + half, 8 q + 2 + half, 8 q + 4 + half, 8 q + 6 + half of a lane's chunk are piece q of row
// g + 8 half in both mma layouts (bitlab_mma.cuh): int8 path, register 4 j + R covers row g + 8 (R & 1),
// columns 32 t + 8 j + 4 (R >> 1) + 0..3; float path, columns 32 t + 4 j + 2 (R >> 1) + 0..1.
template <typename Decode>
__device__ __forceinline__ uint4 piece_of_registers(Decode decode, int half, int q) {
  return make_uint4(decode(8 * q + half), decode(8 * q + 2 + half), decode(8 * q + 4 + half), decode(8 * q + 6 + half));
}

// int8-path lane tiles into int8 code values.
template <int FMT>
__global__ void __launch_bounds__(32 * kExpandWarps) expand_lane_tiles_int8(const uint32_t* __restrict__ wq,
                                                                            int tile0, int units, int nchunks,
                                                                            int8_t* __restrict__ out) {
  expand_unit<FMT, 128>(wq, tile0, units, nchunks, reinterpret_cast<uint8_t*>(out),
                        [](const uint32_t* words, int half, int q) {
                          return piece_of_registers([&](int r) { return decode_s8<FMT>(words, r); }, half, q);
                        });
}

// float-path lane tiles into half / bf16 (T) code values.
template <int FMT, typename T>
__global__ void __launch_bounds__(32 * kExpandWarps) expand_lane_tiles_float(const uint32_t* __restrict__ wq,
                                                                             int tile0, int units, int nchunks,
                                                                             T* __restrict__ out) {
  expand_unit<FMT, 256>(wq, tile0, units, nchunks, reinterpret_cast<uint8_t*>(out),
                        [](const uint32_t* words, int half, int q) {
                          return piece_of_registers([&](int r) { return decode_f<FMT, T>(words, r); }, half, q);
                        });
}

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// y[token][n0 + c] = epilogue_value(acc[token][c]) (bitlab_mma.cuh) for c < cols, n0 + c < N; V consecutive
// columns per thread.  Acc: int32_t (int8 GEMM) or float (half / bf16 GEMM).
// V = 8 needs N % 8 == 0 (then cols is too, and every row of y is 16-byte aligned): one or two 16-byte
// stores per thread.  V = 4 stores element by element.
template <typename T, int V, typename Acc>
__global__ void cublas_epilogue_kernel(LinearArgs a, const Acc* __restrict__ acc, int ld_acc, int n0, int cols) {
  static_assert(sizeof(Acc) == 4, "16-byte loads of four accumulators");
  const int groups = (cols + V - 1) / V;
  const long total = static_cast<long>(a.M) * groups;
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    const int token = static_cast<int>(i / groups), c0 = static_cast<int>(i % groups) * V;
    Acc vals[V];
#pragma unroll
    for (int q = 0; q < V / 4; ++q)
      *reinterpret_cast<uint4*>(vals + 4 * q) = *reinterpret_cast<const uint4*>(acc + static_cast<long>(token) * ld_acc + c0 + 4 * q);
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

template <typename T, typename Acc>
cudaError_t launch_epilogue_t(const LinearArgs& a, const Acc* acc, int ld_acc, int n0, int cols, cudaStream_t stream) {
  const bool wide = a.N % 8 == 0;
  const long groups = static_cast<long>(a.M) * ((cols + (wide ? 7 : 3)) / (wide ? 8 : 4));
  const int threads = 256;
  const long cap = 16L * device_sm_count();
  const int blocks = static_cast<int>(groups / threads + 1 < cap ? groups / threads + 1 : cap);
  if (wide) cublas_epilogue_kernel<T, 8, Acc><<<blocks, threads, 0, stream>>>(a, acc, ld_acc, n0, cols);
  else cublas_epilogue_kernel<T, 4, Acc><<<blocks, threads, 0, stream>>>(a, acc, ld_acc, n0, cols);
  return cudaGetLastError();
}

template <typename Acc>
cudaError_t launch_epilogue(const LinearArgs& a, const Acc* acc, int ld_acc, int n0, int cols, cudaStream_t stream) {
  if (a.M == 0 || cols <= 0) return cudaSuccess;
  if (a.out_dtype == kDtypeHalf) return launch_epilogue_t<__half>(a, acc, ld_acc, n0, cols, stream);
  if (a.out_dtype == kDtypeBFloat16) return launch_epilogue_t<__nv_bfloat16>(a, acc, ld_acc, n0, cols, stream);
  return launch_epilogue_t<float>(a, acc, ld_acc, n0, cols, stream);
}

template <typename T>
cudaError_t launch_expand_float_t(const uint32_t* wq, int fmt, int tile0, int units, int nchunks, T* out,
                                  cudaStream_t stream) {
  const dim3 grid((units + kExpandWarps - 1) / kExpandWarps), block(32 * kExpandWarps);
  switch (fmt) {
    case kBinary: expand_lane_tiles_float<kBinary, T><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kTernary: expand_lane_tiles_float<kTernary, T><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt2: expand_lane_tiles_float<kInt2, T><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt4: expand_lane_tiles_float<kInt4, T><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt8: expand_lane_tiles_float<kInt8, T><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_expand_int8(const uint32_t* wq, int fmt, int tile0, int tiles, int nchunks, int8_t* out,
                               cudaStream_t stream) {
  const int units = tiles * nchunks;
  if (units == 0) return cudaSuccess;
  const dim3 grid((units + kExpandWarps - 1) / kExpandWarps), block(32 * kExpandWarps);
  switch (fmt) {
    case kBinary: expand_lane_tiles_int8<kBinary><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kTernary: expand_lane_tiles_int8<kTernary><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt2: expand_lane_tiles_int8<kInt2><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt4: expand_lane_tiles_int8<kInt4><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    case kInt8: expand_lane_tiles_int8<kInt8><<<grid, block, 0, stream>>>(wq, tile0, units, nchunks, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_expand_float(const uint32_t* wq, int fmt, int x_dtype, int tile0, int tiles, int nchunks,
                                void* out, cudaStream_t stream) {
  const int units = tiles * nchunks;
  if (units == 0) return cudaSuccess;
  if (x_dtype == kDtypeHalf)
    return launch_expand_float_t(wq, fmt, tile0, units, nchunks, static_cast<__half*>(out), stream);
  if (x_dtype == kDtypeBFloat16)
    return launch_expand_float_t(wq, fmt, tile0, units, nchunks, static_cast<__nv_bfloat16*>(out), stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_int32_epilogue(const LinearArgs& a, const int32_t* acc, int ld_acc, int n0, int cols,
                                  cudaStream_t stream) {
  return launch_epilogue(a, acc, ld_acc, n0, cols, stream);
}

cudaError_t launch_float_epilogue(const LinearArgs& a, const float* acc, int ld_acc, int n0, int cols,
                                  cudaStream_t stream) {
  return launch_epilogue(a, acc, ld_acc, n0, cols, stream);
}

}  // namespace bitlab
