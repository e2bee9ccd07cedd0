// W1A1: binary weights x binary activations with XOR + popcount.
//
// Layout: weight bits wb [Npad, Kp / 32] uint32, row-major; bit k % 32 of word k / 32 is the
// canonical binary code of W[n][k] (1 -> +1, 0 -> -1): the canonical packed bytes read as
// little-endian words, rows zero-padded to Kp = ceil(K / 128) * 128 bits. Activation bits xb
// [M, Kp / 32] come from quantize.cu (binarize). Padded bits are 0 on both sides, so each
// padded position counts as a match: acc = K - 2 * popc(xb ^ wb) over the padded row.
//
// A warp owns kRowsPerWarp weight rows and up to 8 tokens; each lane reads 16-byte vectors
// of every row (coalesced along K) and of the tokens' bits (L1 resident), and the warp
// reduces the 32 partial counts with shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_launch.h"

namespace bitlab {
namespace {

constexpr int kRowsPerWarp = 4, kTokens = 8, kWarps = 8;

__device__ __forceinline__ int popc_xor(const uint4& a, const uint4& b) {
  return __popc(a.x ^ b.x) + __popc(a.y ^ b.y) + __popc(a.z ^ b.z) + __popc(a.w ^ b.w);
}

__global__ void __launch_bounds__(kWarps * 32) xnor_kernel(XnorArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  const int tok0 = blockIdx.y * kTokens;
  const int vecs = a.Kp / 128;  // uint4 per row
  const uint4* w = reinterpret_cast<const uint4*>(a.wb);
  const uint4* x = reinterpret_cast<const uint4*>(a.xb);
  int cnt[kRowsPerWarp][kTokens];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < kTokens; ++b) cnt[r][b] = 0;
  const int ntok = min(kTokens, a.M - tok0);
  for (int v = lane; v < vecs; v += 32) {
    uint4 wv[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) wv[r] = __ldg(w + static_cast<long>(row0 + r) * vecs + v);
#pragma unroll
    for (int b = 0; b < kTokens; ++b) {
      if (b < ntok) {
        const uint4 xv = __ldg(x + static_cast<long>(tok0 + b) * vecs + v);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) cnt[r][b] += popc_xor(wv[r], xv);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < kTokens; ++b)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cnt[r][b] += __shfl_xor_sync(0xffffffffu, cnt[r][b], o);
  // Lane (r * 8 + b) writes output (token tok0 + b, row row0 + r).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < kTokens; ++b) {
      if (lane != r * kTokens + b) continue;
      const int token = tok0 + b, row = row0 + r;
      if (token >= a.M || row >= a.N) continue;
      float v = static_cast<float>(a.K - 2 * cnt[r][b]);
      v = __fmul_rn(v, a.rowmean[a.per_token ? token : a.M]);  // per_tensor: the mean stored after the rows
      v = __fmul_rn(v, a.w_scale[a.w_scale_per_row ? row : 0]);
      if (a.bias) v = __fadd_rn(v, a.bias[row]);
      if (a.epilogue == kEpilogueRelu) v = fmaxf(v, 0.f);
      if (a.epilogue == kEpilogueRelu2) { v = fmaxf(v, 0.f); v = __fmul_rn(v, v); }
      const long idx = static_cast<long>(token) * a.N + row;
      if (a.out_dtype == kDtypeHalf) static_cast<__half*>(a.y)[idx] = __float2half_rn(v);
      else if (a.out_dtype == kDtypeBFloat16) static_cast<__nv_bfloat16*>(a.y)[idx] = __float2bfloat16_rn(v);
      else static_cast<float*>(a.y)[idx] = v;
    }
}

// per_tensor: the mean of |x| over the whole input = mean of the row means (rows have equal length).
__global__ void mean_of_rows_kernel(const float* rowmean, int M, float* out) {
  __shared__ float shared[32];
  float s = 0.f;
  for (int r = threadIdx.x; r < M; r += blockDim.x) s += rowmean[r];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) t += shared[w];
    out[0] = t / static_cast<float>(M);
  }
}

}  // namespace

cudaError_t launch_xnor(const XnorArgs& args, cudaStream_t stream) {
  if (args.M == 0 || args.N == 0) return cudaSuccess;
  XnorArgs a = args;
  if (!a.per_token) {
    // The caller allocates M + 1 floats: the mean of the row means goes to rowmean[M].
    mean_of_rows_kernel<<<1, 256, 0, stream>>>(a.rowmean, a.M, const_cast<float*>(a.rowmean) + a.M);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int rows_per_block = kWarps * kRowsPerWarp;
  const dim3 grid((a.N + rows_per_block - 1) / rows_per_block, (a.M + kTokens - 1) / kTokens);
  xnor_kernel<<<grid, kWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace bitlab
