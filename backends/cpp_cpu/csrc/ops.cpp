// torch.library bindings of the cpp_cpu kernels (namespace "bitlab", names prefixed cpu_).
//
//   cpu_linear_a8(x, weight, w_scale, bias, in_features, weight_format, per_token, group_size, epilogue)
//       int8 activations quantized here (per token or per tensor); weight_format is
//       "binary" | "ternary" | "int2" | "int4" (interleaved layout, lowbit_gemm.cpp) or
//       "int8" (int8_gemm.cpp); group_size > 0 for per_group weights (w_scale [N, groups],
//       each group of the weight row padded to a whole number of kernel blocks)
//   cpu_linear_float(x, weight, w_scale, bias, in_features, weight_format, epilogue)
//       float32 activations; binary / ternary / int2 / int4 weights, int32 words in the
//       dword-interleaved layout (float_gemm.cpp)
//   cpu_linear_a1(x, weight, w_scale, bias, in_features, per_token, epilogue)
//       binary activations, XNOR + popcount (xnor_gemm.cpp); weight is int64 words
//   cpu_quantize_int8(x, per_token) -> (q, scale)      the activation quantizer, for tests
//   cpu_rms_norm(a, b, weight, eps, mode) -> (h, y)    RMSNorm of a's rows (mode 0), of h = a + b (mode 1) or of
//                                                     BitNet's relu(a)^2 * b (mode 2); float32 / bfloat16 (norms.cpp),
//                                                     torch's bits
//   cpu_decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, mask, scale) -> out
//                                                     one-token rotary + cache write + grouped-query attention
//                                                     (decode_attention.cpp); writes the caches at slots[0]
//   cpu_features() -> str;  cpu_set_isa(isa)          ISA report / override (-1 auto, 0 scalar, 1 avx2,
//                                                     2 avx512vnni)
//   cpu_set_pool_spin(us) -> int;  cpu_pool_spin() -> int
//                                                     how long idle kernel threads spin for the next call before
//                                                     sleeping, in us (us < 0: the default); set_ returns the previous
//   cpu_set_threads(n);  cpu_threads() -> int         the kernels' thread count: n > 0 pins it, n <= 0 follows
//                                                     torch.get_num_threads() (the default)
//
// x is [tokens, in_features] in any float dtype with unit inner stride (other inputs are
// made so); the output is [tokens, out_features] in x's dtype.  Activation buffers are
// thread-local and reused: the only per-call allocation is the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "bitlab_check.h"
#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

struct Format {
  int nbits;   // bits per code in the prepared layout (8: plain int8 rows)
  int alpha;   // value = alpha * code - beta (interleaved formats)
  int beta;
};

Format parse_format(const std::string& name) {
  if (name == "binary") return {1, 2, 1};
  if (name == "ternary") return {2, 1, 1};
  if (name == "int2") return {2, 2, 3};
  if (name == "int4") return {4, 1, 8};
  if (name == "int8") return {8, 1, 0};
  BITLAB_CHECK(false, "weight_format: got '", name, "'; allowed values are binary, ternary, int2, int4, int8");
}

int parse_epilogue(const std::string& name) {
  if (name == "none") return kEpiNone;
  if (name == "relu") return kEpiRelu;
  if (name == "relu2") return kEpiRelu2;
  BITLAB_CHECK(false, "epilogue: got '", name, "'; allowed values are none, relu, relu2");
}

// Inputs padded to the next multiple of this many values per weight row.
int64_t padded_k(int64_t K, int nbits) {
  const int64_t block = nbits == 8 ? 32 : 32 * (8 / nbits);
  return (K + block - 1) / block * block;
}

// Threads the kernels run on: pinned by cpu_set_threads, else torch's intra-op count (read per call).
std::atomic<int> g_threads{0};

int kernel_threads() {
  const int pinned = g_threads.load(std::memory_order_relaxed);
  return pinned > 0 ? pinned : at::get_num_threads();
}

template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// x as float32 rows with unit inner stride.  bfloat16 rows (the BitNet decode step's) are widened into a buffer of
// the calling thread (bf16_rows.cpp), which the returned tensor views until the thread's next call: torch's x.to()
// cost ~10 us per call at one thread.
at::Tensor as_float_rows(const at::Tensor& x, int64_t in_features) {
  BITLAB_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be 2-D [tokens, in_features=", in_features,
              "], got shape ", x.sizes());
  BITLAB_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  BITLAB_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  if (x.scalar_type() == at::kBFloat16 && (x.size(1) <= 1 || x.stride(1) == 1)) {
    static thread_local std::vector<float> widened;
    const int64_t M = x.size(0), K = x.size(1);
    float* out = scratch(widened, M * K);
    widen_bf16_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, K, out, kernel_threads());
    return at::from_blob(out, {M, K}, at::TensorOptions().dtype(at::kFloat));
  }
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (xf.size(1) > 1 && xf.stride(1) != 1) xf = xf.contiguous();  // rows may be strided
  return xf;
}

struct Prepared {
  at::Tensor out;      // float32 [M, N]
  at::Tensor bias;     // float32 or undefined
  at::Tensor w_scale;  // float32 contiguous
  OutputSpec spec;
};

// scale_numel: the number of weight scales when they are per group (-1: 1 or N).
Prepared prepare_output(int64_t M, int64_t N, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                        const std::string& epilogue, int64_t scale_numel = -1) {
  Prepared p;
  p.w_scale = w_scale.to(at::kFloat).contiguous();
  BITLAB_CHECK(scale_numel >= 0 || p.w_scale.numel() == 1 || p.w_scale.numel() == N,
              "w_scale must have 1 or out_features=", N, " elements, got ", p.w_scale.numel());
  if (bias.has_value() && bias->defined()) {
    BITLAB_CHECK(bias->numel() == N, "bias must have out_features=", N, " elements, got ", bias->numel());
    p.bias = bias->to(at::kFloat).contiguous();
  }
  p.out = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
  p.spec = OutputSpec{p.out.data_ptr<float>(), N, p.w_scale.data_ptr<float>(), p.w_scale.numel() == N,
                      p.bias.defined() ? p.bias.data_ptr<float>() : nullptr, parse_epilogue(epilogue)};
  return p;
}

at::Tensor finish_output(const at::Tensor& out, const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16) {  // one rounding loop instead of torch's out.to() (see as_float_rows)
    at::Tensor y = at::empty(out.sizes(), out.options().dtype(at::kBFloat16));
    narrow_to_bf16(out.data_ptr<float>(), out.size(0), out.size(1), reinterpret_cast<uint16_t*>(y.data_ptr()),
                   kernel_threads());
    return y;
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

struct Int8Scratch {
  std::vector<int8_t> q;
  std::vector<int32_t> qsum;
  std::vector<float> scale;
  std::vector<int8_t> grouped;    // per_group weights: q with each group padded to group_len
  std::vector<int32_t> group_sum;
};

// Quantize x into zero-padded rows of Kp; with groups > 1 also lay each group of group_size
// inputs out at a multiple of group_len (zero-padded) and sum q per group.
Int8Activations quantize_into(Int8Scratch& s, const at::Tensor& xf, int64_t Kp, bool per_token, int64_t groups,
                              int64_t group_size, int64_t group_len) {
  const int64_t M = xf.size(0), K = xf.size(1);
  int8_t* q = scratch(s.q, M * Kp);
  int32_t* qsum = scratch(s.qsum, M);
  float* scale = scratch(s.scale, M);
  quantize_int8(xf.data_ptr<float>(), xf.stride(0), M, K, Kp, per_token, q, qsum, scale, kernel_threads());
  if (groups == 1) return Int8Activations{q, Kp, qsum, scale, 1, Kp};
  const int64_t ldg = groups * group_len;
  int8_t* qg = scratch(s.grouped, M * ldg);
  int32_t* gsum = scratch(s.group_sum, M * groups);
  std::memset(qg, 0, static_cast<size_t>(M * ldg));
  for (int64_t t = 0; t < M; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, n = std::min(group_size, K - k0);
      const int8_t* src = q + t * Kp + k0;
      std::memcpy(qg + t * ldg + g * group_len, src, static_cast<size_t>(n));
      int32_t sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += src[i];
      gsum[t * groups + g] = sum;
    }
  return Int8Activations{qg, ldg, gsum, scale, groups, group_len};
}

at::Tensor linear_a8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                     const c10::optional<at::Tensor>& bias, int64_t in_features, std::string weight_format,
                     bool per_token, int64_t group_size, std::string epilogue) {
  const Format f = parse_format(weight_format);
  at::Tensor xf = as_float_rows(x, in_features);
  const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
  BITLAB_CHECK(group_size >= 0, "group_size: got ", group_size, "; expected 0 (not per_group) or a positive size");
  // per_group: each group is padded to group_len, a whole number of the kernel's blocks
  const int64_t groups = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  const int64_t group_len = group_size > 0 ? padded_k(group_size, f.nbits) : padded_k(K, f.nbits);
  const int64_t Kp = padded_k(K, f.nbits);
  const int64_t Kw = groups * group_len;  // padded inputs per weight row
  const int64_t row_bytes = f.nbits == 8 ? Kw : Kw / (8 / f.nbits);
  BITLAB_CHECK(weight.dim() == 2 && weight.size(1) == row_bytes && weight.is_contiguous(),
              "prepared ", weight_format, " weight for in_features=", K, ", group_size=", group_size,
              " must be contiguous [out_features, ", row_bytes, "], got shape ", weight.sizes());
  BITLAB_CHECK(weight.scalar_type() == (f.nbits == 8 ? at::kChar : at::kByte), "prepared ", weight_format,
              " weight has dtype ", weight.scalar_type(), ", expected ", f.nbits == 8 ? "int8" : "uint8");
  BITLAB_CHECK(group_size == 0 || w_scale.numel() == N * groups, "per_group w_scale must have out_features * groups = ",
              N * groups, " elements, got ", w_scale.numel());
  Prepared p = prepare_output(M, N, w_scale, bias, epilogue, group_size > 0 ? N * groups : -1);
  if (M == 0 || N == 0) return finish_output(p.out, x);
  static thread_local Int8Scratch s;
  const Int8Activations a = quantize_into(s, xf, Kp, per_token, groups, group_size, group_len);
  const int threads = kernel_threads();
  if (f.nbits == 8)
    int8_int8_gemm(weight.data_ptr<int8_t>(), N, Kw, a, M, p.spec, threads);
  else
    lowbit_int8_gemm(f.nbits, f.alpha, f.beta, weight.data_ptr<uint8_t>(), N, Kw, a, M, p.spec, threads);
  return finish_output(p.out, x);
}

at::Tensor linear_float(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, int64_t in_features, std::string weight_format,
                        std::string epilogue) {
  const Format f = parse_format(weight_format);
  BITLAB_CHECK(f.nbits != 8, "cpu_linear_float serves binary, ternary, int2 and int4 weights, got ", weight_format);
  at::Tensor xf = as_float_rows(x, in_features);
  const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
  const int64_t Kp = padded_k(K, f.nbits);
  const int64_t row_words = Kp / (32 / f.nbits);
  BITLAB_CHECK(weight.dim() == 2 && weight.size(1) == row_words && weight.is_contiguous() &&
                  weight.scalar_type() == at::kInt,
              "prepared ", weight_format, " weight for in_features=", K, " must be contiguous int32 [out_features, ",
              row_words, "], got ", weight.scalar_type(), " ", weight.sizes());
  Prepared p = prepare_output(M, N, w_scale, bias, epilogue);
  if (M == 0 || N == 0) return finish_output(p.out, x);
  static thread_local std::vector<float> buf;
  float* xp = scratch(buf, M * Kp);
  pad_float(xf.data_ptr<float>(), xf.stride(0), M, K, Kp, xp);
  lowbit_float_gemm(f.nbits, f.alpha == 2, reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()), N, Kp,
                    xp, M, p.spec, kernel_threads());
  return finish_output(p.out, x);
}

at::Tensor linear_a1(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                     const c10::optional<at::Tensor>& bias, int64_t in_features, bool per_token,
                     std::string epilogue) {
  at::Tensor xf = as_float_rows(x, in_features);
  const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
  const int64_t Kw = (K + 255) / 256 * 4;
  BITLAB_CHECK(weight.dim() == 2 && weight.size(1) == Kw && weight.is_contiguous() &&
                  weight.scalar_type() == at::kLong,
              "prepared binary sign words for in_features=", K, " must be contiguous int64 [out_features, ", Kw,
              "], got ", weight.scalar_type(), " ", weight.sizes());
  Prepared p = prepare_output(M, N, w_scale, bias, epilogue);
  if (M == 0 || N == 0) return finish_output(p.out, x);
  static thread_local std::vector<uint64_t> bits;
  static thread_local std::vector<float> scale;
  uint64_t* xb = scratch(bits, M * Kw);
  float* xs = scratch(scale, M);
  pack_signs(xf.data_ptr<float>(), xf.stride(0), M, K, Kw, per_token, xb, xs);
  xnor_gemm(reinterpret_cast<const uint64_t*>(weight.data_ptr<int64_t>()), N, Kw, K, xb, xs, M, p.spec,
            kernel_threads());
  return finish_output(p.out, x);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_op(const at::Tensor& x, bool per_token) {
  at::Tensor xf = as_float_rows(x, x.dim() == 2 ? x.size(1) : -1);
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor q = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, at::TensorOptions().dtype(at::kFloat));
  if (M == 0) return {q, scale.fill_(1.0f)};
  std::vector<int32_t> qsum(static_cast<size_t>(M));
  quantize_int8(xf.data_ptr<float>(), xf.stride(0), M, K, K, per_token, q.data_ptr<int8_t>(), qsum.data(),
                scale.data_ptr<float>());
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& a, const c10::optional<at::Tensor>& b,
                                               const at::Tensor& weight, double eps, int64_t mode) {
  BITLAB_CHECK(mode >= 0 && mode <= 2, "cpu_rms_norm: mode ", mode, " is not 0 (norm), 1 (add, norm) or 2 (gate, norm)");
  BITLAB_CHECK(a.device().is_cpu() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) && a.dim() >= 1,
              "cpu_rms_norm: a must be a float32 or bfloat16 CPU tensor, got ", a.scalar_type(), " on ", a.device());
  const int64_t K = a.size(-1);
  BITLAB_CHECK(weight.dim() == 1 && weight.size(0) == K && weight.scalar_type() == a.scalar_type() &&
                  weight.device().is_cpu(),
              "cpu_rms_norm: weight must be [", K, "] ", a.scalar_type(), " on the CPU, got ", weight.scalar_type(), " ",
              weight.sizes());
  BITLAB_CHECK(mode == 0 || (b.has_value() && b->sizes() == a.sizes() && b->scalar_type() == a.scalar_type() &&
                            b->device().is_cpu()),
              "cpu_rms_norm: mode ", mode, " needs b shaped like a (", a.sizes(), ") in ", a.scalar_type());
  const at::Tensor rows = a.contiguous();
  const at::Tensor other = mode == 0 ? at::Tensor() : b->contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(rows);
  at::Tensor h = mode == 1 ? at::empty_like(rows) : at::empty({0}, rows.options());
  const int64_t M = K ? rows.numel() / K : 0;
  if (M == 0 || K == 0) return {h, y};
  const bool bf16 = rows.scalar_type() == at::kBFloat16;
  at::Tensor x = at::empty({M, K}, rows.options().dtype(at::kFloat));
  rms_norm_inputs(rows.data_ptr(), mode == 0 ? nullptr : other.data_ptr(), mode == 1 ? h.data_ptr() : nullptr,
                  x.data_ptr<float>(), M, K, static_cast<int>(mode), bf16, kernel_threads());
  // The mean of squares by torch's own mean (bitmodels.bitnet.ops.rms_norm): the same bits.  The squares are
  // x * x here, which is what torch's pow(x, 2) computes (one torch operation less per norm: ~8 us at one thread).
  at::Tensor sq = at::empty_like(x);
  squares(x.data_ptr<float>(), M, K, sq.data_ptr<float>(), kernel_threads());
  const at::Tensor mean_sq = sq.mean(-1).contiguous();
  rms_norm_outputs(x.data_ptr<float>(), mean_sq.data_ptr<float>(), w.data_ptr(), y.data_ptr(), M, K,
                   static_cast<float>(eps), bf16, kernel_threads());
  return {h, y};
}

// Shape checks of cpu_decode_attention's one-token tensors [B, 1, heads, D]: unit strides within the heads.
void check_heads(const at::Tensor& t, const char* name, int64_t B, int64_t heads, int64_t D, at::ScalarType dtype) {
  BITLAB_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == 1 && t.size(2) == heads && t.size(3) == D &&
                   t.scalar_type() == dtype && t.device().is_cpu(),
               "cpu_decode_attention: ", name, " must be [", B, ", 1, ", heads, ", ", D, "] ", dtype,
               " on the CPU, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  BITLAB_CHECK(t.stride(3) == 1 && (heads == 1 || t.stride(2) == D),
               "cpu_decode_attention: ", name, " needs contiguous heads (strides ", t.strides(), ")");
}

at::Tensor decode_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                               const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                               const at::Tensor& mask, double scale) {
  BITLAB_CHECK(q.dim() == 4 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
               "cpu_decode_attention: q must be [B, 1, H, D] float32 or bfloat16, got ", q.sizes(), " ", q.scalar_type());
  const auto dtype = q.scalar_type();
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  BITLAB_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(3) == D && k_cache.size(1) > 0 &&
                   H % k_cache.size(1) == 0 && k_cache.is_contiguous() && k_cache.scalar_type() == dtype &&
                   k_cache.device().is_cpu(),
               "cpu_decode_attention: k_cache must be a contiguous [", B, ", KVH, S, ", D, "] ", dtype,
               " CPU tensor with KVH dividing H=", H, ", got ", k_cache.sizes(), " ", k_cache.scalar_type());
  const int64_t KVH = k_cache.size(1), S = k_cache.size(2);
  BITLAB_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && v_cache.scalar_type() == dtype &&
                   v_cache.device().is_cpu(),
               "cpu_decode_attention: v_cache must be contiguous and shaped like k_cache (", k_cache.sizes(), ") in ",
               dtype, ", got ", v_cache.sizes(), " ", v_cache.scalar_type());
  check_heads(q, "q", B, H, D, dtype);
  check_heads(k, "k", B, KVH, D, dtype);
  check_heads(v, "v", B, KVH, D, dtype);
  check_heads(cos, "cos", B, 1, D, dtype);
  check_heads(sin, "sin", B, 1, D, dtype);
  BITLAB_CHECK(D % 2 == 0, "cpu_decode_attention: head_dim ", D, " must be even (rotary halves)");
  BITLAB_CHECK(slots.numel() == 1 && slots.scalar_type() == at::kLong && slots.device().is_cpu(),
               "cpu_decode_attention: slots must hold one int64 cache position on the CPU, got ", slots.sizes(), " ",
               slots.scalar_type());
  const int64_t slot = slots.reshape({-1})[0].item<int64_t>();
  BITLAB_CHECK(slot >= 0 && slot < S, "cpu_decode_attention: slot ", slot, " is outside the cache's ", S, " positions");
  BITLAB_CHECK(mask.scalar_type() == at::kBool && mask.device().is_cpu() && mask.numel() == B * S &&
                   mask.size(0) == B && mask.size(-1) == S && mask.stride(-1) == 1,
               "cpu_decode_attention: mask must be bool [", B, ", 1, 1, ", S, "] on the CPU with unit stride along S, got ",
               mask.sizes(), " ", mask.scalar_type());
  at::Tensor out = at::empty({B, 1, H * D}, q.options());
  if (B == 0 || H == 0 || D == 0) return out;
  // Scratch of the calling thread, reused across calls (one call per layer and decode step).
  static thread_local std::vector<float> q_rot, k_rot, score_buf;
  float* scores = scratch(score_buf, B * H * S);
  DecodeAttentionArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                        k_cache.data_ptr(), v_cache.data_ptr(), mask.data_ptr<bool>(),
                        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), mask.stride(0),
                        B, H, KVH, S, D, slot, static_cast<float>(scale), dtype == at::kBFloat16,
                        scratch(q_rot, B * H * D), scratch(k_rot, B * KVH * D), scores, nullptr,
                        out.data_ptr(), kernel_threads()};
  decode_attention_scores(a);
  // torch's own softmax on the same float32 scores: the torch path's probabilities, bit for bit.
  const at::Tensor probs =
      at::_softmax(at::from_blob(scores, {B, H, S}, at::TensorOptions().dtype(at::kFloat)), -1, false);
  a.probs = probs.data_ptr<float>();
  decode_attention_values(a);
  return out;
}

std::string features_op() { return cpu_features(); }

void set_isa_op(int64_t isa) { set_isa_override(static_cast<int>(isa)); }

void set_threads_op(int64_t n) { g_threads.store(n > 0 ? static_cast<int>(n) : 0, std::memory_order_relaxed); }

int64_t threads_op() { return kernel_threads(); }

int64_t set_pool_spin_op(int64_t us) { return set_pool_spin_us(us); }

int64_t pool_spin_op() { return pool_spin_us(); }

}  // namespace
}  // namespace bitlab_cpu

TORCH_LIBRARY_FRAGMENT(bitlab, m) {
  m.def("cpu_linear_a8(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int in_features, "
        "str weight_format, bool per_token, int group_size, str epilogue) -> Tensor");
  m.def("cpu_linear_float(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int in_features, "
        "str weight_format, str epilogue) -> Tensor");
  m.def("cpu_linear_a1(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int in_features, "
        "bool per_token, str epilogue) -> Tensor");
  m.def("cpu_quantize_int8(Tensor x, bool per_token) -> (Tensor, Tensor)");
  m.def("cpu_rms_norm(Tensor a, Tensor? b, Tensor weight, float eps, int mode) -> (Tensor, Tensor)");
  m.def("cpu_decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor mask, float scale) -> Tensor");
  m.def("cpu_features() -> str", &bitlab_cpu::features_op);
  m.def("cpu_set_isa(int isa) -> ()", &bitlab_cpu::set_isa_op);
  m.def("cpu_set_threads(int n) -> ()", &bitlab_cpu::set_threads_op);
  m.def("cpu_threads() -> int", &bitlab_cpu::threads_op);
  m.def("cpu_set_pool_spin(int us) -> int", &bitlab_cpu::set_pool_spin_op);
  m.def("cpu_pool_spin() -> int", &bitlab_cpu::pool_spin_op);
}

TORCH_LIBRARY_IMPL(bitlab, CPU, m) {
  m.impl("cpu_linear_a8", &bitlab_cpu::linear_a8);
  m.impl("cpu_linear_float", &bitlab_cpu::linear_float);
  m.impl("cpu_linear_a1", &bitlab_cpu::linear_a1);
  m.impl("cpu_quantize_int8", &bitlab_cpu::quantize_int8_op);
  m.impl("cpu_rms_norm", &bitlab_cpu::rms_norm_op);
  m.impl("cpu_decode_attention", &bitlab_cpu::decode_attention_op);
}
