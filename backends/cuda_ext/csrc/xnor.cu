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

// y[token][row] from the exact +-1 dot product: act(dot * mean|x| * w_scale + bias) with the reference's
// float32 roundings in its order (bit-exact against torch_ref).
__device__ __forceinline__ void store_w1a1(const XnorArgs& a, int token, int row, int dot) {
  if (token >= a.M || row >= a.N) return;
  float v = static_cast<float>(dot);
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
    for (int b = 0; b < kTokens; ++b)
      if (lane == r * kTokens + b) store_w1a1(a, tok0 + b, row0 + r, a.K - 2 * cnt[r][b]);
}

// ------------------------------------------------------------------ W1A1 on the tensor cores (sm_80+)
// mma.m16n8k256 .b1 with AND + popcount: for +-1 values w = 2a - 1, x = 2b - 1 (bits a, b),
// sum w x = K - 2 pa - 2 pb + 4 popc(a & b), pa / pb the popcounts of the row's / token's bits (padding
// bits are 0 on both sides and K counts real positions only, so the result is the XOR kernel's exactly).
// Block: 128 rows x 128 tokens, 8 warps as 4 (rows: 2 m-tiles of 16) x 2 (tokens: 8 n-tiles of 8).
// Per 512 bits (16 words) of a row, lane (g, t) owns words 4t .. 4t + 3 (one 16-byte load): k-step s
// uses words 4t + 2s (register 0 / 1 of A, register 0 of B) and 4t + 2s + 1 (A registers 2 / 3, B
// register 1); the mma sums over k, so this consistent assignment of k to registers gives the product.
constexpr int kXmmaRows = 128, kXmmaTokens = 128, kXmmaMT = 2, kXmmaNT = 8;

__device__ __forceinline__ void mma_b1_and(int* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ uint4 load_bits16(const uint32_t* row, int word, int nwords, bool valid) {
  if (!valid || word >= nwords) return make_uint4(0u, 0u, 0u, 0u);
  return __ldg(reinterpret_cast<const uint4*>(row + word));
}

__device__ __forceinline__ int popc4(const uint4& v) { return __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w); }

__global__ void __launch_bounds__(256) xnor_mma_kernel(XnorArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kXmmaRows + (warp & 3) * (16 * kXmmaMT);
  const int tok0 = blockIdx.y * kXmmaTokens + (warp >> 2) * (8 * kXmmaNT);
  const int nwords = a.Kp / 32;  // a multiple of 4
  int acc[kXmmaMT][kXmmaNT][4];
  int pa[kXmmaMT][2], pb[kXmmaNT];
#pragma unroll
  for (int m = 0; m < kXmmaMT; ++m) {
    pa[m][0] = pa[m][1] = 0;
#pragma unroll
    for (int n = 0; n < kXmmaNT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = 0;
  }
#pragma unroll
  for (int n = 0; n < kXmmaNT; ++n) pb[n] = 0;

  for (int w0 = 0; w0 < nwords; w0 += 16) {
    const int word = w0 + 4 * t;
    uint4 wa[kXmmaMT][2], xb[kXmmaNT];
#pragma unroll
    for (int m = 0; m < kXmmaMT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + m * 16 + g + 8 * h;  // rows are padded: always inside wb
        wa[m][h] = load_bits16(a.wb + static_cast<long>(row) * nwords, word, nwords, true);
        pa[m][h] += popc4(wa[m][h]);
      }
#pragma unroll
    for (int n = 0; n < kXmmaNT; ++n) {
      const int token = tok0 + n * 8 + g;
      xb[n] = load_bits16(a.xb + static_cast<long>(token < a.M ? token : 0) * nwords, word, nwords, token < a.M);
      pb[n] += popc4(xb[n]);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int m = 0; m < kXmmaMT; ++m) {
        const uint32_t ar[4] = {s ? wa[m][0].z : wa[m][0].x, s ? wa[m][1].z : wa[m][1].x,
                                s ? wa[m][0].w : wa[m][0].y, s ? wa[m][1].w : wa[m][1].y};
#pragma unroll
        for (int n = 0; n < kXmmaNT; ++n) {
          const uint32_t br[2] = {s ? xb[n].z : xb[n].x, s ? xb[n].w : xb[n].y};
          mma_b1_and(acc[m][n], ar, br);
        }
      }
  }
  // Full popcounts: a row's over the 4 lanes of its group, a token's likewise.
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
#pragma unroll
    for (int m = 0; m < kXmmaMT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) pa[m][h] += __shfl_xor_sync(0xffffffffu, pa[m][h], o);
#pragma unroll
    for (int n = 0; n < kXmmaNT; ++n) pb[n] += __shfl_xor_sync(0xffffffffu, pb[n], o);
  }
#pragma unroll
  for (int n = 0; n < kXmmaNT; ++n)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int pbj = __shfl_sync(0xffffffffu, pb[n], (2 * t + j) * 4);  // token n * 8 + 2t + j
#pragma unroll
      for (int m = 0; m < kXmmaMT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int dot = a.K - 2 * pa[m][h] - 2 * pbj + 4 * acc[m][n][2 * h + j];
          store_w1a1(a, tok0 + n * 8 + 2 * t + j, row0 + m * 16 + g + 8 * h, dot);
        }
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

// The tensor-core kernel from kXnorMmaMinTokens tokens on sm_80+ (BITLAB_CUDA_XNOR=popcount / mma forces
// one side on any such device).  Mirrored in kernels.CudaExtXnorKernel.route.
bool xnor_on_tensor_cores(int M) {
  if (device_major() < 8) return false;
  if (env_is("BITLAB_CUDA_XNOR", "mma")) return true;
  if (env_is("BITLAB_CUDA_XNOR", "popcount")) return false;
  return M >= kXnorMmaMinTokens;
}

cudaError_t launch_xnor(const XnorArgs& args, cudaStream_t stream) {
  if (args.M == 0 || args.N == 0) return cudaSuccess;
  XnorArgs a = args;
  if (!a.per_token) {
    // The caller allocates M + 1 floats: the mean of the row means goes to rowmean[M].
    mean_of_rows_kernel<<<1, 256, 0, stream>>>(a.rowmean, a.M, const_cast<float*>(a.rowmean) + a.M);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (xnor_on_tensor_cores(a.M)) {
    const dim3 grid((a.N + kXmmaRows - 1) / kXmmaRows, (a.M + kXmmaTokens - 1) / kXmmaTokens);
    xnor_mma_kernel<<<grid, 256, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const int rows_per_block = kWarps * kRowsPerWarp;
  const dim3 grid((a.N + rows_per_block - 1) / rows_per_block, (a.M + kTokens - 1) / kTokens);
  xnor_kernel<<<grid, kWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace bitlab
