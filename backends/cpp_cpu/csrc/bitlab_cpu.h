// Shared declarations of the cpp_cpu kernels: ISA dispatch, activation buffers, epilogue.
//
// The kernel translation units (lowbit_gemm.cpp, float_gemm.cpp, int8_gemm.cpp, xnor_gemm.cpp, activations.cpp,
// bf16_rows.cpp, norms.cpp, decode_attention.cpp, thread_pool.cpp) include only this header (and bitlab_bf16.h),
// never torch: they compile in a second or two.  ops.cpp binds them to torch.library ops.
//
// Every kernel runs the same loop nest (see for_row_blocks below): threads over blocks
// of kRowBlock output rows; inside a block, tokens in groups of up to kTokenGroup, and
// for each row of the block one micro-kernel call that reads the row's prepared weights
// once and produces that row's dot products with every token of the group.  Batch 1
// (GEMV) is the same code with groups of one token.  Row blocks are spread over threads
// by thread_pool.cpp.  The micro-kernels exist in an AVX2 version (compiled with
// __attribute__((target(...))), chosen at run time) and a scalar version, and the low-bit
// kernels with int8 activations also in an AVX-512 VNNI version; the ISA is detected once
// (see active_isa) and can be pinned with BITLAB_CPU_ISA=scalar|avx2|avx512vnni.  A kernel
// without an AVX-512 version runs its AVX2 one at that level.
//
// Weight streams: a batch-1 call reads every weight byte once, so it runs at the speed the
// weights arrive from memory.  Work items hold long contiguous runs of rows (rows_per_item)
// and the low-bit loops prefetch kPrefetchBytes ahead of the byte they read.
#pragma once

#include <cstddef>
#include <cstdint>

// AVX2 kernels exist on x86 only; elsewhere (e.g. ARM laptops) the *_avx2 names forward to
// the scalar kernels and active_isa() reports scalar.
#if defined(__x86_64__) || defined(__i386__)
#define BITLAB_X86 1
#include <immintrin.h>
#else
#define BITLAB_X86 0
#endif

namespace bitlab_cpu {

#if BITLAB_X86
// Sum of the eight int32 lanes of v.
__attribute__((target("avx2"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

// AvxVnni (3) sits between Avx2 and Avx512Vnni in what it offers (AVX2 plus the 256-bit vpdpbusd); its number
// came last, so compare with == or with >= Isa::Avx2 (every level from AVX2 up), never with < between the two.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, AvxVnni = 3 };

Isa active_isa();                  // best supported ISA, or BITLAB_CPU_ISA if set and supported
void set_isa_override(int isa);    // -1: automatic; 0: scalar; 1: avx2; 2: avx512vnni; 3: avxvnni (a set the CPU
                                   // lacks falls to the best one below it: avx512vnni -> avxvnni -> avx2 -> scalar)
const char* cpu_features();        // e.g. "avx2 fma popcnt avx512f avx512vnni (active: avx512vnni)"

enum Epilogue : int { kEpiNone = 0, kEpiRelu = 1, kEpiRelu2 = 2 };

constexpr int kRowBlock = 16;    // rows per work item at least (and the unit items are rounded to)
constexpr int kTokenGroup = 4;   // tokens per micro-kernel call (accumulators stay in registers)
constexpr int64_t kItemBytes = 128 * 1024;  // weight bytes per work item that rows_per_item aims at
constexpr int kPrefetchBytes = 4096;        // how far ahead of its loads a weight stream prefetches

// Rows per work item for rows of row_bytes: about kItemBytes of weights (one long contiguous
// run per claim keeps the memory prefetchers busy: on the 2-core development box a batch-1
// ternary GEMV from DRAM ran at 10 GB/s with 16-row items and no software prefetch, 22-26
// GB/s with 128 KB items and prefetch), but at most N / (4 * threads) rows rounded up to
// kRowBlock, so every thread still gets several items to balance with.
inline int64_t rows_per_item(int64_t N, int64_t row_bytes, int threads) {
  const int64_t by_bytes = kItemBytes / (row_bytes > 0 ? row_bytes : 1);
  const int64_t share = (N + 4 * threads - 1) / (4 * (threads > 0 ? threads : 1));
  int64_t rows = by_bytes < share ? by_bytes : share;
  if (rows < kRowBlock) rows = kRowBlock;
  return (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
}

// Where results go and how accumulators become outputs:
// y[t, r] = epilogue(acc * x_scale[t] * w_scale[r or 0] + bias[r]); with per-group weights
// y[t, r] = epilogue((sum_g acc_g * w_scale[r, g]) * x_scale[t] + bias[r]).
struct OutputSpec {
  float* y;                // [M, N] row-major
  int64_t ldy;             // row stride of y
  const float* w_scale;    // [1], [N] or [N, groups]
  bool w_per_channel;
  const float* bias;       // [N] or nullptr
  int epilogue;
};

// Integer activations, zero-padded: q[t * ldq + k].  With per-group weights each group of
// group_size inputs starts at a multiple of group_len (its own zero padding up to there).
struct Int8Activations {
  const int8_t* q;
  int64_t ldq;
  const int32_t* qsum;     // [M, groups] sum of q over each group (for the code-offset correction)
  const float* scale;      // [M] dequantization scale (amax / 127)
  int64_t groups;          // 1 unless the weights are per_group
  int64_t group_len;       // padded inputs per group (the whole padded row when groups == 1)
};

// Bias and activation (same operation order as the reference).
inline float epilogue(float y, const OutputSpec& o, int64_t r) {
  if (o.bias) y += o.bias[r];
  if (o.epilogue != kEpiNone) {
    y = y > 0.0f ? y : 0.0f;
    if (o.epilogue == kEpiRelu2) y = y * y;
  }
  return y;
}

inline float finish(float acc, float x_scale, const OutputSpec& o, int64_t r) {
  return epilogue(acc * x_scale * o.w_scale[o.w_per_channel ? r : 0], o, r);
}

// ---- norms.cpp: RMSNorm of M contiguous rows of K (float32, or bfloat16 as uint16 bits when bf16) in two passes:
// rms_norm_inputs writes x (float32) from a, after the residual add h = a + b (mode 1, h written) or BitNet's
// squared-ReLU gate of a and b (mode 2); the caller takes mean_sq [M] = mean(x^2) per row; rms_norm_outputs writes
// y = the normed rows times weight [K], rounded as torch's operations round ----
// Rows are spread over `threads` threads in chunks (for_row_chunks) where there are many (a prefill's).
void rms_norm_inputs(const void* a, const void* b, void* h, float* x, int64_t M, int64_t K, int mode, bool bf16,
                     int threads = 1);
void rms_norm_outputs(const float* x, const float* mean_sq, const void* weight, void* y, int64_t M, int64_t K,
                      float eps, bool bf16, int threads = 1);
// out = x * x elementwise (M rows of K): torch's x.pow(2), without a torch operation per norm.
void squares(const float* x, int64_t M, int64_t K, float* out, int threads = 1);

// ---- decode_attention.cpp: one-token grouped-query attention with rotary and the cache write (bitmodels.bitnet) ----
// Tensors of dtype T (float32, or bfloat16 as uint16 bits when bf16); the last two dimensions of q / k / v are
// contiguous heads of D values, rows b apart by the *_stride element counts.
struct DecodeAttentionArgs {
  const void* q;             // [B, H, D] new queries, before rotary
  const void* k;             // [B, KVH, D] new keys, before rotary
  const void* v;             // [B, KVH, D] new values
  const void* cos;           // [B, D]
  const void* sin;           // [B, D]
  void* k_cache;             // [B, KVH, S, D] contiguous; slot `slot` is written
  void* v_cache;             // [B, KVH, S, D] contiguous
  const bool* mask;          // [B, S] (rows mask_stride apart): true = attend
  int64_t q_stride, k_stride, v_stride, cos_stride, sin_stride, mask_stride;
  int64_t B, H, KVH, S, D, slot;
  float scale;
  bool bf16;
  float* q_rot;              // scratch [B, H, D]: the rotated queries
  float* k_rot;              // scratch [B * KVH, D]
  float* scores;             // [B, H, S]: written by decode_attention_scores
  const float* probs;        // [B, H, S]: float32 softmax of the scores, read by decode_attention_values
  void* out;                 // [B, H, D] in T
  int threads;
};
// Rotary, cache write and scores T(T(q . k) * scale) (-inf where not attended); then, with probs, the outputs.
void decode_attention_scores(const DecodeAttentionArgs& a);
void decode_attention_values(const DecodeAttentionArgs& a);

// ---- bf16_rows.cpp: bfloat16 (as uint16 bits) <-> float32 with torch's values ----
// M rows of K, ldx apart, widened into out [M, K]; M rows of N floats (contiguous) rounded to bfloat16 (nearest
// even, NaN kept quiet).  Rows in chunks over `threads` threads where there are many.
void widen_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* out, int threads = 1);
void narrow_to_bf16(const float* x, int64_t M, int64_t N, uint16_t* out, int threads = 1);

// ---- activations.cpp: fill padded activation buffers (rows of x may be strided) ----
// int8 absmax quantization exactly as bitcore.quantize.quantize_activation_int8.
void quantize_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, bool per_token,
                   int8_t* q, int32_t* qsum, float* scale, int threads = 1);
// float32 copy, zero-padded to Kp.
void pad_float(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float* out);
// sign bits (x >= 0 -> 1) packed 64 per word, zero-padded to Kw words; scale = mean|x|.
void pack_signs(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kw, bool per_token,
                uint64_t* bits, float* scale);

// ---- lowbit_gemm.cpp: binary / ternary / int2 / int4 weights (byte-interleaved) x int8 ----
void lowbit_int8_gemm(int nbits, int alpha, int beta, const uint8_t* w, int64_t N, int64_t Kp,
                      const Int8Activations& a, int64_t M, const OutputSpec& o, int threads);
// ---- float_gemm.cpp: binary / ternary / int2 / int4 weights (dword-interleaved) x float32 ----
// odd: value = 2 * code + 1 (binary, int2) instead of value = code (ternary, int4).
void lowbit_float_gemm(int nbits, bool odd, const uint32_t* w, int64_t N, int64_t Kp, const float* x,
                       int64_t M, const OutputSpec& o, int threads);

// ---- int8_gemm.cpp: int8 weights, row-major, zero-padded to Kp ----
void int8_int8_gemm(const int8_t* w, int64_t N, int64_t Kp, const Int8Activations& a, int64_t M,
                    const OutputSpec& o, int threads);

// ---- xnor_gemm.cpp: binary weights and binary activations, 64 signs per word ----
void xnor_gemm(const uint64_t* w, int64_t N, int64_t Kw, int64_t K, const uint64_t* xbits,
               const float* x_scale, int64_t M, const OutputSpec& o, int threads);

// thread_pool.cpp: run fn(ctx, i) for i in [0, items) on up to `threads` threads (caller included).
void parallel_items(int64_t items, int threads, void (*fn)(void*, int64_t), void* ctx);
// How long idle workers spin for the next job before sleeping, in microseconds (us < 0: the default,
// BITLAB_CPU_POOL_SPIN_US or 40); set_ returns the previous setting.
int64_t set_pool_spin_us(int64_t us);
int64_t pool_spin_us();

// The shared loop nest: body(r0, r1, t0, t1) over row blocks of `rows` rows (in parallel) and
// token groups.
template <typename Body>
inline void for_row_blocks(int64_t N, int64_t M, int threads, Body body, int64_t rows = kRowBlock) {
  struct Job {
    int64_t N, M, rows;
    Body* body;
    static void run(void* ctx, int64_t b) {
      const Job& j = *static_cast<Job*>(ctx);
      const int64_t r0 = b * j.rows;
      const int64_t r1 = r0 + j.rows < j.N ? r0 + j.rows : j.N;
      for (int64_t t0 = 0; t0 < j.M; t0 += kTokenGroup) {
        const int64_t t1 = t0 + kTokenGroup < j.M ? t0 + kTokenGroup : j.M;
        (*j.body)(r0, r1, t0, t1);
      }
    }
  };
  Job job{N, M, rows, &body};
  parallel_items((N + rows - 1) / rows, threads, &Job::run, &job);
}

// body(t0, t1) over rows [0, M) in chunks of kRowChunk rows spread over `threads` threads (the caller included);
// fewer than 2 * kRowChunk rows run on the calling thread, so a decode step's single row costs no hand-off.  For
// the row-wise passes around the GEMMs (quantization, norms, dtype copies), which a 512-token prefill ran on one core.
constexpr int64_t kRowChunk = 16;
template <typename Body>
inline void for_row_chunks(int64_t M, int threads, Body body) {
  if (M < 2 * kRowChunk || threads <= 1) {
    body(int64_t{0}, M);
    return;
  }
  struct Job {
    int64_t M;
    Body* body;
    static void run(void* ctx, int64_t i) {
      const Job& j = *static_cast<Job*>(ctx);
      const int64_t t0 = i * kRowChunk;
      (*j.body)(t0, t0 + kRowChunk < j.M ? t0 + kRowChunk : j.M);
    }
  };
  Job job{M, &body};
  parallel_items((M + kRowChunk - 1) / kRowChunk, threads, &Job::run, &job);
}

}  // namespace bitlab_cpu
