// BitLab cuda_ext: weight decoding in registers + tensor-core mma (sm_80 and newer).
//
// Prepared weight layout ("lane tiles")
// -------------------------------------
// The canonical packed weight (bitcore/packing.py: uint8 codes packed along
// in_features, little-endian in each byte) is re-laid out once by
// backends/cuda_ext/layout.py into lane tiles:
//
//   * rows are padded to a multiple of 128 and cut into m-tiles of 16 rows;
//   * in_features are padded to Kp = ceil(K / 128) * 128 and cut into chunks of 128;
//   * one (m-tile, chunk) holds 16 x 128 codes = 64 codes per lane of a warp,
//     i.e. WPL = 2 * BITS 32-bit words per lane (BITS = 1, 2, 4, 8);
//   * word w of lane l of tile (m, c) lives at uint32 offset
//       (((m * nchunks + c) * NU + w / UNIT) * 32 + l) * UNIT + w % UNIT,
//     UNIT = min(4, WPL), NU = WPL / UNIT, so each warp load instruction reads
//     one contiguous 512-byte (256 for BITS = 1) run: 16-byte (8-byte) loads, coalesced.
//
// K permutation. Inside a chunk, lane (g = lane / 4, t = lane % 4) owns input
// columns [32 t, 32 t + 32): for the mma its logical k indices are mapped onto
// those 32 contiguous inputs, so each lane reads its activations as 16-byte
// vectors. The mma sums over k, so any consistent permutation of k gives the
// same result.
//
//   float path (mma m16n8k16, 8 k-steps j per chunk), register r = 4 j + R:
//     R0 = W[g][32t+4j+{0,1}], R1 = W[g+8][32t+4j+{0,1}],
//     R2 = W[g][32t+4j+{2,3}], R3 = W[g+8][32t+4j+{2,3}]
//     B regs: x[32t+4j+{0,1}], x[32t+4j+{2,3}] (one 8-byte run).
//   int8 path (mma m16n8k32, 4 k-steps j per chunk), register r = 4 j + R:
//     R0 = W[g][32t+8j+{0..3}], R1 = W[g+8][...], R2 = W[g][32t+8j+{4..7}], R3 = W[g+8][...]
//     B regs: x[32t+8j+{0..3}], x[32t+8j+{4..7}].
//
// Bits inside a word (element e of register r):
//   float path: P = 16 / BITS registers per word; register r sits in word r / P at
//     pair q = r % P: element 0 at bit q*BITS, element 1 at bit 16 + q*BITS. The code
//     u is OR-ed into the mantissa of a magic half (1024.0) or bf16 (128.0) and one
//     fma maps it to the integer value (exact), see decode_pair below.
//     Codes: ternary stores u = value + 1 (0, 1, 2); the other formats store the
//     canonical code (binary 2u-1, int2 2u-3, int4 u-8, int8 u-128).
//   int8 path: Q = 8 / BITS registers per word; register r sits in word r / Q, slot s = r % Q:
//     BITS 2: element e at bit 4e + 2(s&1) + 16(s>>1)  -> prmt lookup (nibble selectors)
//     BITS 1: element e at bit 4e + (s&3) + 16(s>>2)   -> prmt lookup
//     BITS 4: element e at bit 8e + 4s                 -> byte-wise (c | 0x80) - 8, ^ 0x80
//     BITS 8: element e at bit 8e                      -> c ^ 0x80
//     Codes are the canonical codes, except ternary: +1 -> 0, -1 -> 1, 0 -> 2, so that an odd
//     slot's code needs no shift (see decode_s8: 9 instructions per word instead of 11).
//
// Padding: padded rows / columns hold code 0, except int8-path ternary, whose padding holds
// code 2 (the value 0, as the canonical code 0 was). Activations are zero-padded to Kp by
// the host wrapper, so padded columns (whatever their weights) contribute 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "bitlab_launch.h"

namespace bitlab {

enum WeightFormat { kBinary = 0, kTernary = 1, kInt2 = 2, kInt4 = 3, kInt8 = 4 };

template <int FMT>
struct FormatBits;
template <> struct FormatBits<kBinary> { static constexpr int value = 1; };
template <> struct FormatBits<kTernary> { static constexpr int value = 2; };
template <> struct FormatBits<kInt2> { static constexpr int value = 2; };
template <> struct FormatBits<kInt4> { static constexpr int value = 4; };
template <> struct FormatBits<kInt8> { static constexpr int value = 8; };

// value = ALPHA * u + BETA for the stored code u (float path).
template <int FMT> struct FormatAffine;
template <> struct FormatAffine<kBinary> { static constexpr float alpha = 2.f, beta = -1.f; };
template <> struct FormatAffine<kTernary> { static constexpr float alpha = 1.f, beta = -1.f; };
template <> struct FormatAffine<kInt2> { static constexpr float alpha = 2.f, beta = -3.f; };
template <> struct FormatAffine<kInt4> { static constexpr float alpha = 1.f, beta = -8.f; };
template <> struct FormatAffine<kInt8> { static constexpr float alpha = 1.f, beta = -128.f; };

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// ---------------------------------------------------------------- float path decode
template <typename T> struct Magic;
template <> struct Magic<__half> {
  static constexpr uint32_t bits = 0x64006400u;  // 1024.0 in both halves
  static constexpr float value = 1024.f;
  static constexpr int mantissa = 10;
};
template <> struct Magic<__nv_bfloat16> {
  static constexpr uint32_t bits = 0x43004300u;  // 128.0 in both halves
  static constexpr float value = 128.f;
  static constexpr int mantissa = 7;
};

__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, __half) {
  __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                      *reinterpret_cast<__half2*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, __nv_bfloat16) {
  __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                             *reinterpret_cast<__nv_bfloat162*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  __half2 r = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}

// Decode pair q of a word into a packed pair of T holding the exact integer weight values.
// q is a compile-time constant after unrolling; every branch below folds away.
template <int FMT, typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t w, const int q) {
  constexpr int B = FormatBits<FMT>::value;
  constexpr int WIN = (Magic<T>::mantissa / B) * B;  // code bits usable without a shift
  if constexpr (WIN == 0) {
    // int8 codes do not fit the bf16 mantissa: go through float32 (exact) instead.
    static_assert(B == 8, "only int8 codes lack a magic-number window");
    const uint32_t lo = __byte_perm(w, 0x4B000000u, 0x7650 + q);
    const uint32_t hi = __byte_perm(w, 0x4B000000u, 0x7652 + q);
    return pack2(__uint_as_float(lo) - 8388736.f, __uint_as_float(hi) - 8388736.f, T());
  } else {
    const int p = q * B;
    int sh = (p / WIN) * WIN;
    int pp = p - sh;
    if (FormatAffine<FMT>::alpha != 1.f && pp == 0) {
      // With alpha = 2 and pp = 0 the offset beta - 2M needs one bit more than T holds
      // (-2049 in half, -257 in bf16): read the code one bit higher instead.
      pp = 1;
      sh -= 1;
    }
    const uint32_t m1 = ((1u << B) - 1u) << pp;
    const uint32_t src = sh > 0 ? (w >> sh) : (sh < 0 ? (w << 1) : w);
    const uint32_t t = lop3_and_or(src, m1 | (m1 << 16), Magic<T>::bits);  // M + 2^pp * u
    const float inv = 1.f / float(1 << pp);
    const float a = FormatAffine<FMT>::alpha * inv;
    const float c = FormatAffine<FMT>::beta - Magic<T>::value * FormatAffine<FMT>::alpha * inv;
    return fma2(t, pack2(a, a, T()), pack2(c, c, T()), T());
  }
}

// Binary codes (u = 1 -> +1, 0 -> -1) straight into the sign bits of a packed pair of -1.0: the pair's
// bits q and 16 + q move to bits 15 and 31 (one shift, none for q = 15) and one lop3 computes
// (w & 0x80008000) ^ (-1.0, -1.0): two instructions per register instead of decode_pair's 2-3.
template <typename T>
__device__ __forceinline__ uint32_t decode_binary_pair(uint32_t w, const int q) {
  constexpr uint32_t minus_one = sizeof(T) == 2 && Magic<T>::mantissa == 10 ? 0xBC00BC00u : 0xBF80BF80u;
  const uint32_t src = q == 15 ? w : (w << (15 - q));
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(src), "r"(0x80008000u), "r"(minus_one));  // (a & b) ^ c
  return d;
}

// Register r (0..31) of a chunk for the float path, from the lane's words.
template <int FMT, typename T>
__device__ __forceinline__ uint32_t decode_f(const uint32_t* words, const int r) {
  constexpr int P = 16 / FormatBits<FMT>::value;
  if constexpr (FMT == kBinary) return decode_binary_pair<T>(words[r / P], r % P);
  return decode_pair<FMT, T>(words[r / P], r % P);
}

// ---------------------------------------------------------------- int8 path decode
// int8-path ternary lookup: bytes 0-2 are the values of codes 0-2 (+1, -1, 0); byte 0 of the
// second word is -1 (layout.py's TERNARY_INT8_CODES is the inverse map).
constexpr uint32_t kTernaryS8Lut = 0x0000FF01u;
constexpr uint32_t kTernaryS8High = 0x000000FFu;

// prmt in its generic mode, where a selector nibble's top bit replicates the selected byte's sign
// (PTX ISA, prmt); __byte_perm is documented for the low three bits only, so this is spelled out.
__device__ __forceinline__ uint32_t prmt_sign(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

template <int FMT>
__device__ __forceinline__ uint32_t decode_s8(const uint32_t* words, const int r) {
  constexpr int B = FormatBits<FMT>::value;
  constexpr int Qn = 8 / B;
  const uint32_t w = words[r / Qn];
  const int s = r % Qn;
  if constexpr (FMT == kTernary) {
    // The slot's codes c (0: +1, 1: -1, 2: 0) select bytes in place: an even slot's nibble is c
    // (bytes 0-2 of kTernaryS8Lut), an odd slot's is 4c, which selects byte 0 of kTernaryS8Lut (+1),
    // byte 4 (byte 0 of kTernaryS8High, -1) or, with the nibble's top bit set, the sign of byte 0
    // (0).  No shift but the one per half word: 9 instructions per 4 registers.
    const uint32_t half = s >= 2 ? (w >> 16) : w;
    return prmt_sign(kTernaryS8Lut, kTernaryS8High, half & ((s & 1) ? 0xCCCCu : 0x3333u));
  } else if constexpr (B == 2) {
    const int sh = 2 * (s & 1) + 16 * (s >> 1);
    const uint32_t sel = (sh ? (w >> sh) : w) & 0x3333u;
    return __byte_perm(0x0301FFFDu, 0u, sel);
  } else if constexpr (B == 1) {
    const int sh = (s & 3) + 16 * (s >> 2);
    const uint32_t sel = (sh ? (w >> sh) : w) & 0x1111u;
    return __byte_perm(0x000001FFu, 0u, sel);
  } else if constexpr (B == 4) {
    const uint32_t c = lop3_and_or(s ? (w >> 4) : w, 0x0F0F0F0Fu, 0x80808080u);
    return (c - 0x08080808u) ^ 0x80808080u;
  } else {
    return w ^ 0x80808080u;
  }
}

// ---------------------------------------------------------------- mma
__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma(int* c, const uint32_t* a, const uint32_t* b, int8_t) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Decode register R of the chunk (float or int8 path by the activation type X).
template <int FMT, typename X>
__device__ __forceinline__ uint32_t decode(const uint32_t* words, const int r) {
  if constexpr (sizeof(X) == 1) {
    return decode_s8<FMT>(words, r);
  } else {
    return decode_f<FMT, X>(words, r);
  }
}

// Path constants: X = __half / __nv_bfloat16 (m16n8k16) or int8_t (m16n8k32).
template <typename X>
struct PathTraits {
  static constexpr int ksteps = sizeof(X) == 1 ? 4 : 8;  // mma k-steps per 128-column chunk
  static constexpr int xwords = sizeof(X) == 1 ? 8 : 16;  // 32-bit words of x per lane per chunk
  using Acc = typename std::conditional<sizeof(X) == 1, int, float>::type;
};

template <int FMT>
struct LaneTile {
  static constexpr int bits = FormatBits<FMT>::value;
  static constexpr int wpl = 2 * bits;           // words per lane per (m-tile, chunk)
  static constexpr int unit = wpl < 4 ? wpl : 4;  // words per load instruction
  static constexpr int nu = wpl / unit;
};

// Load the lane's words of one (m-tile, chunk).
template <int FMT>
__device__ __forceinline__ void load_lane_tile(uint32_t* dst, const uint32_t* __restrict__ wq, long tile_chunk,
                                               int lane) {
  using L = LaneTile<FMT>;
  const uint32_t* base = wq + tile_chunk * (32L * L::wpl) + lane * L::unit;
#pragma unroll
  for (int v = 0; v < L::nu; ++v) {
    if constexpr (L::unit == 4) {
      uint4 q = __ldg(reinterpret_cast<const uint4*>(base + v * 32 * 4));
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    } else {
      uint2 q = __ldg(reinterpret_cast<const uint2*>(base));
      dst[0] = q.x; dst[1] = q.y;
    }
  }
}

// Load the lane's activations of one chunk for token row `row` (zeros past M).
template <typename X>
__device__ __forceinline__ void load_x_chunk(uint32_t* dst, const X* __restrict__ x, int row, int M, int Kp,
                                             int chunk, int t) {
  constexpr int NV = PathTraits<X>::xwords / 4;
  if (row < M) {
    const uint4* p = reinterpret_cast<const uint4*>(x + static_cast<long>(row) * Kp + chunk * 128 + 32 * t);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      uint4 q = __ldg(p + v);
      dst[4 * v] = q.x; dst[4 * v + 1] = q.y; dst[4 * v + 2] = q.z; dst[4 * v + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4 * NV; ++v) dst[v] = 0u;
  }
}

// Activations staged in shared memory (GEMM and cluster GEMV): 16-byte piece c of token row r of a
// 128-column chunk sits at position swizzle_chunk(c, r).  A lane (g, t) reads pieces of row g from
// column 32 t on; with this XOR the 8 lanes of a quarter-warp hit 8 different 16-byte bank groups,
// for 256-byte (half / bf16) and 128-byte (int8) chunk rows alike.
__device__ __forceinline__ int swizzle_chunk(int c, int r) { return c ^ (r & 1) ^ (((c >> 3) & 1) << 1); }

// ---------------------------------------------------------------- epilogue
__device__ __forceinline__ float apply_activation(float v, int act) {
  if (act == kEpilogueRelu) return v > 0.f ? v : 0.f;
  if (act == kEpilogueRelu2) { v = v > 0.f ? v : 0.f; return __fmul_rn(v, v); }
  return v;
}

__device__ __forceinline__ void store_out(void* y, long idx, float v, int out_dtype) {
  if (out_dtype == kDtypeHalf) reinterpret_cast<__half*>(y)[idx] = __float2half_rn(v);
  else if (out_dtype == kDtypeBFloat16) reinterpret_cast<__nv_bfloat16*>(y)[idx] = __float2bfloat16_rn(v);
  else reinterpret_cast<float*>(y)[idx] = v;
}

// act((acc [* x_scale[token]]) * w_scale[row] + bias[row]), same order as torch_ref.  Explicit
// roundings: no fma contraction, so the int8 path matches torch_ref bit for bit.
__device__ __forceinline__ float epilogue_value(const LinearArgs& a, int token, int row, float v) {
  if (a.x_scale) v = __fmul_rn(v, a.x_scale[a.x_scale_per_row ? token : 0]);
  v = __fmul_rn(v, a.w_scale[a.w_scale_per_row ? row : 0]);
  if (a.bias) v = __fadd_rn(v, a.bias[row]);
  return apply_activation(v, a.epilogue);
}

// y[token][row] = epilogue_value(...).  Not inlined: called once per output element, it keeps the
// unrolled kernels small.
static __device__ __noinline__ void epilogue_store_f(const LinearArgs& a, int token, int row, float v) {
  if (token >= a.M || row >= a.N) return;
  store_out(a.y, static_cast<long>(token) * a.N + row, epilogue_value(a, token, row, v), a.out_dtype);
}
template <typename Acc>
__device__ __forceinline__ void epilogue_store(const LinearArgs& a, int token, int row, Acc acc) {
  epilogue_store_f(a, token, row, static_cast<float>(acc));
}

// Epilogue of one warp's accumulator fragments (MT m-tiles from tile0, NT n-tiles from token0).
template <int MT, int NT, typename Acc>
__device__ __forceinline__ void store_fragment(const LinearArgs& a, const Acc (&acc)[MT][NT][4], int tile0, int g,
                                               int t, int token0 = 0) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (tile0 + m) * 16 + g + (i >= 2 ? 8 : 0);
        const int token = token0 + n * 8 + 2 * t + (i & 1);
        epilogue_store(a, token, row, acc[m][n][i]);
      }
}

// Independent accumulator sets: consecutive mma k-steps go to different sets, so a warp
// never waits on the previous mma's result (mma.sync latency is ~30 cycles).
template <int MT>
struct GemvAccSets {
  static constexpr int value = MT >= 2 ? 2 : 4;
};

template <int S, int MT, int NT, typename Acc>
__device__ __forceinline__ void zero_acc_sets(Acc (&accs)[S][MT][NT][4]) {
#pragma unroll
  for (int q = 0; q < S; ++q)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) accs[q][m][n][i] = Acc(0);
}

// Sum of the S independent accumulator sets.
template <int S, int MT, int NT, typename Acc>
__device__ __forceinline__ void sum_acc_sets(const Acc (&accs)[S][MT][NT][4], Acc (&acc)[MT][NT][4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        Acc v = accs[0][m][n][i];
#pragma unroll
        for (int q = 1; q < S; ++q) v += accs[q][m][n][i];
        acc[m][n][i] = v;
      }
}

// The block's first kw warps split K: their fragments meet in shared memory (red: kw * MT * NT * 4 * 32
// values), are summed in a fixed order and stored.  Called by exactly threads 0 .. 32 kw - 1; they
// synchronise on named barrier 1 (other warps of the block may have left).
template <int MT, int NT, typename Acc>
__device__ __forceinline__ void reduce_warps_and_store(const LinearArgs& a, const Acc (&acc)[MT][NT][4], Acc* red,
                                                       int kw, int tile0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (kw == 1) {
    store_fragment(a, acc, tile0, lane >> 2, lane & 3);
    return;
  }
  constexpr int E = MT * NT * 4;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(warp * E + (m * NT + n) * 4 + i) * 32 + lane] = acc[m][n][i];
  asm volatile("bar.sync 1, %0;" ::"r"(kw * 32) : "memory");
  for (int idx = threadIdx.x; idx < E * 32; idx += kw * 32) {
    const int e = idx >> 5, ln = idx & 31;
    Acc s = Acc(0);
    for (int w = 0; w < kw; ++w) s += red[(w * E + e) * 32 + ln];
    const int i = e & 3, n = (e >> 2) % NT, m = (e >> 2) / NT;
    const int row = (tile0 + m) * 16 + (ln >> 2) + (i >= 2 ? 8 : 0);
    const int token = n * 8 + 2 * (ln & 3) + (i & 1);
    epilogue_store(a, token, row, s);
  }
}

// One mma k-step j of a chunk: decode the MT m-tiles' A registers and multiply each with the NT B
// fragments (xfrag(n): the two words of n-tile n for this k-step), into accumulator set j % S.
template <int FMT, typename X, int S, int MT, int NT, typename Acc, typename XFrag>
__device__ __forceinline__ void mma_kstep(Acc (&accs)[S][MT][NT][4], const uint32_t (&w)[MT][2 * FormatBits<FMT>::value],
                                          const int j, XFrag xfrag) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    uint32_t ar[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) ar[r] = decode<FMT, X>(w[m], 4 * j + r);
#pragma unroll
    for (int n = 0; n < NT; ++n) mma(accs[j % S][m][n], ar, xfrag(n), X());
  }
}

// Decode one (m-tile, chunk) of weights and multiply it into the accumulator sets: the mma
// k-steps of the chunk rotate over the S sets.
template <int FMT, typename X, int S, int MT, int NT, typename Acc>
__device__ __forceinline__ void mma_chunk(Acc (&accs)[S][MT][NT][4], const uint32_t (&w)[MT][2 * FormatBits<FMT>::value],
                                          const uint32_t (&xb)[NT][PathTraits<X>::xwords]) {
#pragma unroll
  for (int j = 0; j < PathTraits<X>::ksteps; ++j) mma_kstep<FMT, X>(accs, w, j, [&](int n) { return &xb[n][2 * j]; });
}

}  // namespace bitlab
