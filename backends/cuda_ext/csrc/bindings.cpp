// BitLab cuda_ext: torch binding of the CUDA kernels as the op bitlab::cuda_ext_linear.
//
// The op is defined here (schema + CUDA implementation); its fake (meta) implementation
// is registered from Python (backends/cuda_ext/ops.py) so torch.compile can trace it.
// Everything runs on the current CUDA stream and allocates only through the caching
// allocator, so the op can be captured in a CUDA graph.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bitlab_check.h"
#include "bitlab_launch.h"

// at::mm with an output dtype (float32 from half / bf16 inputs) exists from torch 2.8; before it the float
// GEMM stays on the mma.sync kernels (kernels.TORCH_HAS_MM_OUT_DTYPE mirrors this).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define BITLAB_HAS_MM_OUT_DTYPE 1
#else
#define BITLAB_HAS_MM_OUT_DTYPE 0
#endif

namespace {


// Activation modes (kept in step with backends/cuda_ext/kernels.py).
enum ActMode { kActFloat = 0, kActInt8PerTensor = 1, kActInt8PerToken = 2, kActBinaryPerTensor = 3, kActBinaryPerToken = 4 };

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return bitlab::kDtypeHalf;
    case at::kBFloat16: return bitlab::kDtypeBFloat16;
    case at::kFloat: return bitlab::kDtypeFloat;
    default: BITLAB_CHECK(false, "cuda_ext_linear: x dtype ", t, " is not supported; expected float16, bfloat16 or float32");
  }
  return 0;
}

void check_cuda(cudaError_t err, const char* what) {
  BITLAB_CHECK(err == cudaSuccess, "cuda_ext_linear: ", what, " failed: ", cudaGetErrorString(err));
}

// x as [M, Kp] contiguous, zero-padded past K, 16-byte aligned (a copy only when needed).
at::Tensor padded_activations(const at::Tensor& x, int64_t K, int64_t Kp) {
  const bool ok = x.size(1) == Kp && x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (ok) return x;
  at::Tensor out = at::zeros({x.size(0), Kp}, x.options());
  out.narrow(1, 0, K).copy_(x.narrow(1, 0, K));
  return out;
}

// The weight, epilogue and output part of the kernel arguments (both linear ops); the caller adds
// the activations (x, x_scale) and the launch mode (pdl).  bias_f: float32 bias or undefined.
bitlab::LinearArgs weight_args(const at::Tensor& wq, const at::Tensor& w_scale, const at::Tensor& bias_f,
                               at::Tensor& y, int64_t fmt, int64_t epilogue, int64_t M, int64_t N, int64_t Kp) {
  bitlab::LinearArgs a{};
  a.wq = reinterpret_cast<const uint32_t*>(wq.data_ptr<int>());
  a.w_scale = w_scale.data_ptr<float>();
  a.w_scale_per_row = w_scale.numel() == N && N > 1;
  a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.out_dtype = dtype_code(y.scalar_type());
  a.epilogue = static_cast<int>(epilogue);
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.Kp = static_cast<int>(Kp);
  a.fmt = static_cast<int>(fmt);
  return a;
}

// Past the GEMVs the GEMMs run on cuBLAS on sm_90+: the weight is expanded to exact code values and multiplied
// by cuBLAS (cublas_gemm.cu says why): from kCublasMinTokens tokens, and from 17 where the wide cluster GEMV does
// not take the call (rows too long for its staged activations, or BITLAB_CUDA_GEMV=oneshot / bulk).  Measured (H200):
//   * int8 activations (int8 x int8 -> int32, bit-exact): W1.58A8, 65-2048 tokens at 8192x8192 and BitNet
//     2B's shapes, faster than the mma.sync GEMM everywhere but one tie (13824x2560, 128 tokens),
//     8192x8192 x 2048 697 -> 368 us (notes v11);
//   * float activations (half / bf16 -> float32, accumulated in float32 as the mma.sync kernels do): W1.58A16
//     at the same shapes and token counts, faster than the mma.sync GEMM everywhere (1.2-5x), 8192x8192 x 2048
//     959 -> 446 us (0.95x cuBLAS fp16; notes v12);
//   * 17-64 tokens where the wide GEMV does not fit: 1.6-2.9x faster than the mma.sync GEMM (4096x14336 fp16 at
//     64 tokens 224 -> 77 us, 8192x28672 W1.58A8 at 64 326 -> 165; notes v13).  Where it fits the wide GEMV
//     stays: it beat cuBLAS there (4096x14336 W1.58A8 at 33 tokens 31 vs 58 us).
// BITLAB_CUDA_INT8_GEMM / BITLAB_CUDA_FLOAT_GEMM = mma keeps the mma.sync kernels at every size, = cublas
// takes cuBLAS from 17 tokens up (at::_int_mm needs more than 16 rows); read per call.  Mirrored in
// backends/cuda_ext/kernels.py (gemm_on_cublas).
constexpr int64_t kCublasMinTokens = 65;
constexpr const char* kInt8GemmEnv = "BITLAB_CUDA_INT8_GEMM";
constexpr const char* kFloatGemmEnv = "BITLAB_CUDA_FLOAT_GEMM";

bool gemm_on_cublas(const char* env_name, const bitlab::LinearArgs& a) {
  const bool int8 = std::strcmp(env_name, kInt8GemmEnv) == 0;
  if (!BITLAB_HAS_MM_OUT_DTYPE && !int8) return false;
  const char* env = std::getenv(env_name);
  if (env && std::strcmp(env, "mma") == 0) return false;
  if (a.M <= 16) return false;
  if (env && std::strcmp(env, "cublas") == 0) return true;
  if (a.M < kCublasMinTokens && bitlab::wide_gemv_runs(a.M, a.Kp / 128, int8)) return false;
  return bitlab::device_major() >= 9;
}

// Rows per slice: the whole weight, or $<env>_SLICE rows (rounded down to a multiple of 128) to bound the
// workspace (expanded weight + GEMM result); slices measured slower (notes v11).
int64_t cublas_slice_rows(int64_t Npad, const char* env_name) {
  const std::string name = std::string(env_name) + "_SLICE";
  const char* env = std::getenv(name.c_str());
  int64_t rows = env ? std::atoll(env) / 128 * 128 : 0;
  return rows <= 0 || rows > Npad ? Npad : rows;
}

// x: int8 activations (quantized) or half / bf16 ones, [M, Kp] contiguous, zero-padded past K.  The int8
// weight expansion reads int8-path lane tiles, the float one float-path lane tiles: a.wq must be the
// layout prepared for x's kind, as it is for the mma.sync kernels.
void gemm_via_cublas(const bitlab::LinearArgs& a, const at::Tensor& x, cudaStream_t stream) {
  const bool int8 = x.scalar_type() == at::kChar;
  const int64_t Npad = (a.N + 127) / 128 * 128, Kp = a.Kp, M = a.M;
  const int64_t slice = cublas_slice_rows(Npad, int8 ? kInt8GemmEnv : kFloatGemmEnv);
  at::Tensor wx = at::empty({slice * Kp}, x.options());
  at::Tensor acc = at::empty({M * slice}, x.options().dtype(int8 ? at::kInt : at::kFloat));
  for (int64_t n0 = 0; n0 < Npad; n0 += slice) {
    const int64_t rows = std::min(slice, Npad - n0);
    const int tile0 = static_cast<int>(n0 / 16), tiles = static_cast<int>(rows / 16), nchunks = static_cast<int>(Kp / 128);
    const int cols = static_cast<int>(std::min<int64_t>(rows, a.N - n0));
    at::Tensor out = acc.narrow(0, 0, M * rows).view({M, rows});
    at::Tensor w = wx.narrow(0, 0, rows * Kp).view({rows, Kp}).t();
    if (int8) {
      check_cuda(bitlab::launch_expand_int8(a.wq, a.fmt, tile0, tiles, nchunks, w.data_ptr<int8_t>(), stream),
                 "int8 weight expansion");
      at::_int_mm_out(out, x, w);
      check_cuda(bitlab::launch_int32_epilogue(a, out.data_ptr<int>(), static_cast<int>(rows), static_cast<int>(n0),
                                               cols, stream),
                 "int32 epilogue");
    } else {
      check_cuda(bitlab::launch_expand_float(a.wq, a.fmt, dtype_code(x.scalar_type()), tile0, tiles, nchunks,
                                             w.data_ptr(), stream),
                 "float weight expansion");
#if BITLAB_HAS_MM_OUT_DTYPE
      at::mm_out(out, x, w, at::kFloat);
#else
      BITLAB_CHECK(false, "cuda_ext_linear: the float GEMM on cuBLAS needs torch >= 2.8 (at::mm with out_dtype)");
#endif
      check_cuda(bitlab::launch_float_epilogue(a, out.data_ptr<float>(), static_cast<int>(rows), static_cast<int>(n0),
                                               cols, stream),
                 "float32 epilogue");
    }
  }
}

// The int8-activation GEMV / GEMM: cuBLAS where gemm_on_cublas, the mma.sync kernels elsewhere.
void run_int8_linear(const bitlab::LinearArgs& a, const at::Tensor& xq, cudaStream_t stream) {
  if (gemm_on_cublas(kInt8GemmEnv, a)) {
    gemm_via_cublas(a, xq, stream);
    return;
  }
  check_cuda(bitlab::launch_linear_int8(a, stream), "int8-activation kernel");
}

}  // namespace

at::Tensor cuda_ext_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t act_mode, int64_t epilogue,
                           int64_t N, int64_t K, at::ScalarType out_dtype) {
  BITLAB_CHECK(x.is_cuda() && wq.is_cuda() && w_scale.is_cuda(), "cuda_ext_linear: tensors must be on a CUDA device");
  BITLAB_CHECK(x.dim() == 2, "cuda_ext_linear: x must be 2-D [tokens, in_features], got ", x.sizes());
  BITLAB_CHECK(x.size(1) >= K, "cuda_ext_linear: x has ", x.size(1), " columns, expected at least in_features=", K);
  BITLAB_CHECK(fmt >= 0 && fmt <= 4, "cuda_ext_linear: fmt ", fmt, " not in [0, 4]");
  BITLAB_CHECK(act_mode >= 0 && act_mode <= 4, "cuda_ext_linear: act_mode ", act_mode, " not in [0, 4]");
  BITLAB_CHECK(epilogue >= 0 && epilogue <= 2, "cuda_ext_linear: epilogue ", epilogue, " not in [0, 2]");
  BITLAB_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(), "cuda_ext_linear: w_scale must be contiguous float32");
  BITLAB_CHECK(w_scale.numel() == 1 || w_scale.numel() == N, "cuda_ext_linear: w_scale has ", w_scale.numel(),
              " elements, expected 1 or out_features=", N);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const int64_t Kp = (K + 127) / 128 * 128;
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  const int out_code = dtype_code(out_dtype);
  at::Tensor bias_f;
  if (bias.has_value()) {
    BITLAB_CHECK(bias->numel() == N, "cuda_ext_linear: bias has ", bias->numel(), " elements, expected out_features=", N);
    bias_f = bias->to(at::kFloat).contiguous();
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();

  if (act_mode == kActBinaryPerTensor || act_mode == kActBinaryPerToken) {
    BITLAB_CHECK(fmt == 0, "cuda_ext_linear: binary activations need binary weights (fmt 0), got fmt ", fmt);
    BITLAB_CHECK(wq.scalar_type() == at::kInt && wq.numel() >= N * (Kp / 32),
                "cuda_ext_linear: W1A1 weight bits must be int32 [Npad, Kp/32]");
    at::Tensor xb = at::empty({M, Kp / 32}, x.options().dtype(at::kInt));
    at::Tensor rowmean = at::empty({M + 1}, x.options().dtype(at::kFloat));
    check_cuda(bitlab::launch_binarize(xs.data_ptr(), dtype_code(xs.scalar_type()), M, K, xs.stride(0), Kp,
                                       reinterpret_cast<uint32_t*>(xb.data_ptr<int>()), rowmean.data_ptr<float>(), stream),
               "binarize");
    bitlab::XnorArgs a{};
    a.xb = reinterpret_cast<const uint32_t*>(xb.data_ptr<int>());
    a.wb = reinterpret_cast<const uint32_t*>(wq.data_ptr<int>());
    a.rowmean = rowmean.data_ptr<float>();
    a.per_token = act_mode == kActBinaryPerToken;
    a.w_scale = w_scale.data_ptr<float>();
    a.w_scale_per_row = w_scale.numel() == N && N > 1;
    a.bias = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
    a.y = y.data_ptr();
    a.out_dtype = out_code;
    a.epilogue = static_cast<int>(epilogue);
    a.M = M; a.N = N; a.K = K; a.Kp = Kp;
    check_cuda(bitlab::launch_xnor(a, stream), "xnor kernel");
    return y;
  }

  BITLAB_CHECK(wq.scalar_type() == at::kInt, "cuda_ext_linear: prepared weight must be int32 lane tiles");
  bitlab::LinearArgs a = weight_args(wq, w_scale, bias_f, y, fmt, epilogue, M, N, Kp);

  if (act_mode == kActFloat) {
    const at::ScalarType t = x.scalar_type();
    BITLAB_CHECK(t == at::kHalf || t == at::kBFloat16, "cuda_ext_linear: float activations must be float16 or bfloat16, got ", t);
    at::Tensor xp = padded_activations(xs, K, Kp);
    a.x = xp.data_ptr();
    if (gemm_on_cublas(kFloatGemmEnv, a)) {
      gemm_via_cublas(a, xp, stream);
      return y;
    }
    a.pdl = 1;  // the GEMV's first weight loads overlap the end of the kernel before it (sm_90+)
    check_cuda(bitlab::launch_linear_float(a, dtype_code(t), stream), "float-activation kernel");
    return y;
  }

  const bool per_token = act_mode == kActInt8PerToken;
  at::Tensor xq = at::empty({M, Kp}, x.options().dtype(at::kChar));
  at::Tensor xscale = at::empty({per_token ? M : 1}, x.options().dtype(at::kFloat));
  at::Tensor work = at::empty({per_token ? 1 : M}, x.options().dtype(at::kFloat));
  check_cuda(bitlab::launch_quantize_int8(xs.data_ptr(), dtype_code(xs.scalar_type()), M, K, xs.stride(0), Kp,
                                          per_token, xq.data_ptr<int8_t>(), xscale.data_ptr<float>(),
                                          work.data_ptr<float>(), stream),
             "int8 activation quantization");
  a.x = xq.data_ptr();
  a.x_scale = xscale.data_ptr<float>();
  a.x_scale_per_row = per_token;
  // As the quantizer's programmatic dependent only for K <= 4096 (H100, W1.58A8 batch 1, with / without:
  // 4096x4096 8.6 / 8.9 us, 14336x4096 14.6 / 15.4, 13824x2560 11.8 / 13.0; but 8192x8192 16.4 / 15.1,
  // 28672x8192 36.5 / 35.1).  The float path always uses it (4096x4096 5.3 us with, 6.6 without).
  a.pdl = Kp <= 4096;
  run_int8_linear(a, xq, stream);
  return y;
}

// int8 activations quantized by the caller (bitcore.quantize.quantize_activation_int8): xq [M, K]
// int8, x_scale [M] (per token) or [1] (per tensor) float32; otherwise as cuda_ext_linear's int8
// path.  Lets a model fuse the quantization into the operation before the projection.
at::Tensor cuda_ext_linear_int8(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& wq,
                                const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t fmt,
                                int64_t epilogue, int64_t N, int64_t K, at::ScalarType out_dtype) {
  BITLAB_CHECK(xq.is_cuda() && x_scale.is_cuda() && wq.is_cuda() && w_scale.is_cuda(),
              "cuda_ext_linear_int8: tensors must be on a CUDA device");
  BITLAB_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar, "cuda_ext_linear_int8: xq must be 2-D int8, got ",
              xq.scalar_type(), " ", xq.sizes());
  BITLAB_CHECK(xq.size(1) == K, "cuda_ext_linear_int8: xq has ", xq.size(1), " columns, expected in_features=", K);
  BITLAB_CHECK(x_scale.scalar_type() == at::kFloat && (x_scale.numel() == 1 || x_scale.numel() == xq.size(0)),
              "cuda_ext_linear_int8: x_scale must be float32 with 1 or ", xq.size(0), " elements, got ",
              x_scale.scalar_type(), " with ", x_scale.numel());
  BITLAB_CHECK(fmt >= 0 && fmt <= 4, "cuda_ext_linear_int8: fmt ", fmt, " not in [0, 4]");
  BITLAB_CHECK(epilogue >= 0 && epilogue <= 2, "cuda_ext_linear_int8: epilogue ", epilogue, " not in [0, 2]");
  BITLAB_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  (w_scale.numel() == 1 || w_scale.numel() == N),
              "cuda_ext_linear_int8: w_scale must be contiguous float32 with 1 or out_features=", N, " elements");
  BITLAB_CHECK(wq.scalar_type() == at::kInt, "cuda_ext_linear_int8: prepared weight must be int32 lane tiles");
  const c10::cuda::CUDAGuard guard(xq.device());
  const int64_t M = xq.size(0);
  const int64_t Kp = (K + 127) / 128 * 128;
  at::Tensor y = at::empty({M, N}, xq.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  at::Tensor bias_f;
  if (bias.has_value()) {
    BITLAB_CHECK(bias->numel() == N, "cuda_ext_linear_int8: bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor xp = padded_activations(xq.stride(1) == 1 ? xq : xq.contiguous(), K, Kp);
  at::Tensor xsc = x_scale.contiguous();
  bitlab::LinearArgs a = weight_args(wq, w_scale, bias_f, y, fmt, epilogue, M, N, Kp);
  a.x = xp.data_ptr();
  a.x_scale = xsc.data_ptr<float>();
  a.x_scale_per_row = x_scale.numel() == M && M > 1;
  a.pdl = 1;  // e.g. behind cuda_ext_rms_norm_quant, which lets it start at once (sm_90+)
  run_int8_linear(a, xp, c10::cuda::getCurrentCUDAStream());
  return y;
}

// An int8 projection and the residual add + norm + quantization after it in one kernel (linear_norm_tail.cu):
// y = the projection of (xq, x_scale), h = T(res + y), (q, q_scale) = per-token int8 of RMSNorm(h) * norm_weight;
// returns (h, q, q_scale), the same bits as cuda_ext_linear_int8 then cuda_ext_rms_norm_quant (mode 1).  counter:
// one int32, zero between launches (the kernel's last block resets it).  Inputs checked in Python first
// (backends/cuda_ext/norm_tail.py), again here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_ext_linear_int8_norm_tail(
    const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& wq, const at::Tensor& w_scale, int64_t fmt,
    int64_t N, const at::Tensor& res, const at::Tensor& norm_weight, double eps, const at::Tensor& counter) {
  const char* op = "cuda_ext_linear_int8_norm_tail";
  BITLAB_CHECK(xq.is_cuda() && x_scale.is_cuda() && wq.is_cuda() && w_scale.is_cuda() && res.is_cuda() &&
                  norm_weight.is_cuda() && counter.is_cuda(),
              op, ": tensors must be on a CUDA device");
  BITLAB_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar, op, ": xq must be 2-D int8");
  const int64_t M = xq.size(0), K = xq.size(1);
  BITLAB_CHECK(x_scale.scalar_type() == at::kFloat && (x_scale.numel() == 1 || x_scale.numel() == M), op,
              ": x_scale must be float32 with 1 or ", M, " elements");
  BITLAB_CHECK(bitlab::norm_tail_serves(static_cast<int>(M), static_cast<int>(N)), op, ": ", M, " rows of ", N,
              " outputs not served");
  BITLAB_CHECK(res.dim() == 2 && res.size(0) == M && res.size(1) == N && res.is_contiguous() &&
                  (res.scalar_type() == at::kHalf || res.scalar_type() == at::kBFloat16),
              op, ": res must be contiguous [", M, ", ", N, "] float16 / bfloat16");
  BITLAB_CHECK(norm_weight.dim() == 1 && norm_weight.numel() == N && norm_weight.is_contiguous() &&
                  norm_weight.scalar_type() == res.scalar_type(),
              op, ": norm_weight must be contiguous [", N, "] in the dtype of res");
  BITLAB_CHECK((reinterpret_cast<uintptr_t>(res.data_ptr()) | reinterpret_cast<uintptr_t>(norm_weight.data_ptr())) %
                      16 == 0,
              op, ": res and norm_weight must be 16-byte aligned");
  BITLAB_CHECK(counter.scalar_type() == at::kInt && counter.numel() == 1, op, ": counter must be one int32");
  BITLAB_CHECK(fmt >= 0 && fmt <= 4, op, ": fmt not in [0, 4]");
  BITLAB_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  (w_scale.numel() == 1 || w_scale.numel() == N),
              op, ": w_scale must be contiguous float32 with 1 or ", N, " elements");
  BITLAB_CHECK(wq.scalar_type() == at::kInt, op, ": prepared weight must be int32 lane tiles");
  const c10::cuda::CUDAGuard guard(xq.device());
  at::Tensor h = at::empty_like(res);
  at::Tensor q = at::empty({M, N}, res.options().dtype(at::kChar));
  at::Tensor q_scale = at::empty({M}, res.options().dtype(at::kFloat));
  at::Tensor y = at::empty({M, N}, res.options());  // the projection's output, read back by the last block
  const int64_t Kp = (K + 127) / 128 * 128;
  at::Tensor xp = padded_activations(xq.stride(1) == 1 ? xq : xq.contiguous(), K, Kp);
  at::Tensor xsc = x_scale.contiguous();
  bitlab::LinearArgs args = weight_args(wq, w_scale, at::Tensor(), y, fmt, 0, M, N, Kp);
  args.x = xp.data_ptr();
  args.x_scale = xsc.data_ptr<float>();
  args.x_scale_per_row = x_scale.numel() == M && M > 1;
  args.pdl = 1;  // behind the kernel that produced xq
  bitlab::NormTailArgs t{};
  t.norm.a = res.data_ptr();
  t.norm.b = y.data_ptr();
  t.norm.weight = norm_weight.data_ptr();
  t.norm.h = h.data_ptr();
  t.norm.dtype = dtype_code(res.scalar_type());
  t.norm.mode = 1;
  t.norm.K = static_cast<int>(N);
  t.norm.eps = static_cast<float>(eps);
  t.xq = q.data_ptr<int8_t>();
  t.x_scale = q_scale.data_ptr<float>();
  t.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
  check_cuda(bitlab::launch_linear_int8_norm_tail(args, t, c10::cuda::getCurrentCUDAStream()), "norm tail kernel");
  return {h, q, q_scale};
}

// The norm before an int8 projection and the projection in one kernel (linear_norm.cu): x = per-token int8 of
// RMSNorm(a) * norm_weight (mode 0) or of RMSNorm(h) * norm_weight with h = a + b (mode 1); returns (h or an
// empty tensor, y), the same bits as cuda_ext_rms_norm_quant then cuda_ext_linear_int8.  Inputs checked in
// Python first (backends/cuda_ext/norm_linear.py), again here.
std::tuple<at::Tensor, at::Tensor> cuda_ext_linear_int8_norm(const at::Tensor& a, const c10::optional<at::Tensor>& b,
                                                            const at::Tensor& norm_weight, double eps, int64_t mode,
                                                            const at::Tensor& wq, const at::Tensor& w_scale,
                                                            const c10::optional<at::Tensor>& bias, int64_t fmt,
                                                            int64_t epilogue, int64_t N, at::ScalarType out_dtype) {
  const char* op = "cuda_ext_linear_int8_norm";
  BITLAB_CHECK(a.is_cuda() && norm_weight.is_cuda() && wq.is_cuda() && w_scale.is_cuda(), op,
              ": tensors must be on a CUDA device");
  BITLAB_CHECK(a.dim() == 2 && a.is_contiguous() && (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
              op, ": a must be contiguous 2-D float16 / bfloat16, got ", a.scalar_type(), " ", a.sizes());
  BITLAB_CHECK(mode == 0 || mode == 1, op, ": mode ", mode, " not 0 (norm) or 1 (add, norm)");
  const int64_t M = a.size(0), K = a.size(1);
  BITLAB_CHECK(bitlab::norm_gemv_serves(static_cast<int>(M), static_cast<int>(K)), op, ": ", M, " rows of ", K,
              " columns not served (at most ", bitlab::kNormGemvMaxTokens, " rows, K a multiple of 8 up to ",
              bitlab::kNormGemvMaxK, ", rows x K up to ", bitlab::kNormGemvMaxElements, ")");
  BITLAB_CHECK(norm_weight.dim() == 1 && norm_weight.numel() == K && norm_weight.is_contiguous() &&
                  norm_weight.scalar_type() == a.scalar_type(),
              op, ": norm_weight must be contiguous [", K, "] in ", a.scalar_type());
  if (mode == 1) {
    BITLAB_CHECK(b.has_value() && b->is_cuda() && b->sizes() == a.sizes() && b->is_contiguous() &&
                    b->scalar_type() == a.scalar_type(),
                op, ": mode 1 needs b contiguous and shaped like a");
  }
  const bool aligned = (reinterpret_cast<uintptr_t>(a.data_ptr()) | reinterpret_cast<uintptr_t>(norm_weight.data_ptr()) |
                        (mode == 1 ? reinterpret_cast<uintptr_t>(b->data_ptr()) : 0)) % 16 == 0;
  BITLAB_CHECK(aligned, op, ": a, b and norm_weight must be 16-byte aligned");
  BITLAB_CHECK(fmt >= 0 && fmt <= 4, op, ": fmt ", fmt, " not in [0, 4]");
  BITLAB_CHECK(epilogue >= 0 && epilogue <= 2, op, ": epilogue ", epilogue, " not in [0, 2]");
  BITLAB_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  (w_scale.numel() == 1 || w_scale.numel() == N),
              op, ": w_scale must be contiguous float32 with 1 or out_features=", N, " elements");
  BITLAB_CHECK(wq.scalar_type() == at::kInt, op, ": prepared weight must be int32 lane tiles");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor h = mode == 1 ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor y = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return {h, y};
  at::Tensor bias_f;
  if (bias.has_value()) {
    BITLAB_CHECK(bias->numel() == N, op, ": bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
  }
  bitlab::LinearArgs args = weight_args(wq, w_scale, bias_f, y, fmt, epilogue, M, N, (K + 127) / 128 * 128);
  args.pdl = 1;  // behind the kernel that produced a (and b)
  bitlab::NormInputArgs n{};
  n.a = a.data_ptr();
  n.b = mode == 1 ? b->data_ptr() : nullptr;
  n.weight = norm_weight.data_ptr();
  n.h = mode == 1 ? h.data_ptr() : nullptr;
  n.dtype = dtype_code(a.scalar_type());
  n.mode = static_cast<int>(mode);
  n.K = static_cast<int>(K);
  n.eps = static_cast<float>(eps);
  check_cuda(bitlab::launch_linear_int8_norm(args, n, c10::cuda::getCurrentCUDAStream()), "linear_int8_norm kernel");
  return {h, y};
}

// RMSNorm + per-token int8 quantization (norm_quant.cu): returns (h or an empty tensor, q, scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_ext_rms_norm_quant(const at::Tensor& a,
                                                                       const c10::optional<at::Tensor>& b,
                                                                       const at::Tensor& weight, double eps,
                                                                       int64_t mode) {
  BITLAB_CHECK(a.is_cuda() && weight.is_cuda(), "cuda_ext_rms_norm_quant: tensors must be on a CUDA device");
  BITLAB_CHECK(a.dim() == 2 && a.stride(1) == 1, "cuda_ext_rms_norm_quant: a must be 2-D with contiguous rows, got ",
              a.sizes(), " strides ", a.strides());
  BITLAB_CHECK(mode >= 0 && mode <= 2, "cuda_ext_rms_norm_quant: mode ", mode, " not in [0, 2]");
  const int64_t M = a.size(0), K = a.size(1);
  BITLAB_CHECK(K >= 1 && K <= bitlab::kNormQuantMaxK, "cuda_ext_rms_norm_quant: row length ", K, " not in [1, ",
              bitlab::kNormQuantMaxK, "]");
  BITLAB_CHECK(weight.dim() == 1 && weight.numel() == K && weight.is_contiguous() &&
                  weight.scalar_type() == a.scalar_type(),
              "cuda_ext_rms_norm_quant: weight must be contiguous [", K, "] in ", a.scalar_type(), ", got ",
              weight.scalar_type(), " ", weight.sizes());
  if (mode != 0) {
    BITLAB_CHECK(b.has_value() && b->is_cuda() && b->dim() == 2 && b->size(0) == M && b->size(1) == K &&
                    b->stride(1) == 1 && b->scalar_type() == a.scalar_type(),
                "cuda_ext_rms_norm_quant: mode ", mode, " needs b shaped like a with contiguous rows");
  }
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor h = mode == 1 ? at::empty({M, K}, a.options()) : at::empty({0}, a.options());
  at::Tensor q = at::empty({M, K}, a.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, a.options().dtype(at::kFloat));
  bitlab::NormQuantArgs p{};
  p.a = a.data_ptr();
  p.b = mode != 0 ? b->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.h = mode == 1 ? h.data_ptr() : nullptr;
  p.dtype = dtype_code(a.scalar_type());
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.lda = a.stride(0);
  p.ldb = mode != 0 ? b->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.mode = static_cast<int>(mode);
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  check_cuda(bitlab::launch_rms_norm_quant(p, c10::cuda::getCurrentCUDAStream()), "rms_norm_quant kernel");
  return {h, q, scale};
}

// The arguments both attention ops fill alike (rows B and heads KVH, S, D from the caches).  dependent_launch (the
// caller's promise that no kernel still running when this one starts writes the caches: not the one before it on
// the stream, nor one that kernel lets start early; BitNet's q/k/v projection and the norm before it write none):
// launched as a programmatic dependent, the first chunk's cache loads (and the QKV kernel's weight tiles) leave
// before the wait for its input (decode_attention.cu).  BITLAB_ATTN_PDL=0 launches it plainly all the same (read
// per call; a CUDA graph keeps what its capture saw).
bitlab::DecodeAttentionArgs attention_args(const at::Tensor& cs, const at::Tensor& sn, at::Tensor& k_cache,
                                           at::Tensor& v_cache, const at::Tensor& slot, const at::Tensor& mask,
                                           at::Tensor& out, int64_t H, double scale, bool dependent_launch) {
  bitlab::DecodeAttentionArgs a{};
  a.cos = cs.data_ptr(); a.sin = sn.data_ptr();
  a.k_cache = k_cache.data_ptr(); a.v_cache = v_cache.data_ptr();
  a.slot = slot.data_ptr<int64_t>();
  a.mask = static_cast<const uint8_t*>(mask.data_ptr());
  a.mask_row = mask.stride(0);
  a.out = out.data_ptr();
  a.dtype = dtype_code(k_cache.scalar_type());
  a.B = k_cache.size(0); a.H = H; a.KVH = k_cache.size(1); a.D = k_cache.size(3); a.S = k_cache.size(2);
  a.scale = static_cast<float>(scale);
  a.pdl = dependent_launch && !bitlab::env_is("BITLAB_ATTN_PDL", "0");
  return a;
}

// One-token attention with rotary + cache write (decode_attention.cu, sm_90); inputs checked in Python
// first (backends/cuda_ext/decode_attention.py), again here.
at::Tensor cuda_ext_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                                     at::Tensor& v_cache, const at::Tensor& slot, const at::Tensor& mask,
                                     double scale, bool dependent_launch) {
  BITLAB_CHECK(q.is_cuda() && q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "cuda_ext_decode_attention: q, k, v must be 3-D CUDA tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), S = k_cache.size(2);
  BITLAB_CHECK(D == 64 || D == 128, "cuda_ext_decode_attention: head_dim ", D, " not 64 or 128");
  const int64_t G = KVH > 0 && H % KVH == 0 ? H / KVH : 0;
  BITLAB_CHECK(G == 1 || G == 2 || G == 4 || G == 8, "cuda_ext_decode_attention: heads ", H, " / kv heads ", KVH);
  BITLAB_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(0) == B && k_cache.size(1) == KVH && k_cache.size(3) == D,
              "cuda_ext_decode_attention: caches must be contiguous [B, KVH, S, D]");
  BITLAB_CHECK(q.stride(2) == 1 && q.stride(1) == D && k.stride(2) == 1 && k.stride(1) == D && v.stride(2) == 1 &&
                  v.stride(1) == D, "cuda_ext_decode_attention: q, k, v need contiguous heads");
  BITLAB_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S && mask.stride(1) == 1 &&
                  mask.element_size() == 1, "cuda_ext_decode_attention: mask must be [B, S] bool/uint8");
  BITLAB_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1, "cuda_ext_decode_attention: slot must be int64 [1]");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, H * D}, q.options());
  at::Tensor cs = cos.contiguous(), sn = sin.contiguous();
  bitlab::DecodeAttentionArgs a = attention_args(cs, sn, k_cache, v_cache, slot, mask, out, H, scale, dependent_launch);
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.q_row = q.stride(0); a.k_row = k.stride(0); a.v_row = v.stride(0);
  check_cuda(bitlab::launch_decode_attention(a, c10::cuda::getCurrentCUDAStream()), "decode_attention kernel");
  return out;
}

// The same attention for one row with the fused q/k/v projection inside (decode_attention.cu, QKV): xq [1, K] int8
// and its scale [1], the projection's ternary lane tiles wq and per-row scales w_scale [(H + 2 KVH) D].  Inputs
// checked in Python first (backends/cuda_ext/decode_attention.py), again here.
at::Tensor cuda_ext_decode_qkv_attention(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& wq,
                                         const at::Tensor& w_scale, const at::Tensor& cos, const at::Tensor& sin,
                                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot,
                                         const at::Tensor& mask, double scale, int64_t H, bool dependent_launch) {
  const char* op = "cuda_ext_decode_qkv_attention";
  BITLAB_CHECK(k_cache.is_cuda() && k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == 1,
              op, ": caches must be contiguous CUDA [1, KVH, S, D]");
  const int64_t KVH = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  BITLAB_CHECK(D == 64 || D == 128, op, ": head_dim ", D, " not 64 or 128");
  const int64_t G = KVH > 0 && H % KVH == 0 ? H / KVH : 0;
  BITLAB_CHECK(G == 1 || G == 2 || G == 4 || G == 8, op, ": heads ", H, " / kv heads ", KVH);
  BITLAB_CHECK(xq.scalar_type() == at::kChar && xq.dim() == 2 && xq.size(0) == 1 && xq.stride(1) == 1 &&
                  xq.device() == k_cache.device() && reinterpret_cast<uintptr_t>(xq.data_ptr()) % 16 == 0,
              op, ": xq must be one 16-byte aligned int8 row [1, K] on the caches' device");
  const int64_t K = xq.size(1), Kp = (K + 127) / 128 * 128, N = (H + 2 * KVH) * D;
  BITLAB_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.numel() == 1 && x_scale.device() == xq.device(), op,
              ": x_scale must be one float32 on the GPU");
  BITLAB_CHECK(wq.scalar_type() == at::kInt && wq.is_contiguous() && wq.device() == xq.device() &&
                  reinterpret_cast<uintptr_t>(wq.data_ptr()) % 16 == 0 && wq.numel() >= N / 16 * (Kp / 128) * 128,
              op, ": wq must be contiguous, 16-byte aligned int32 lane tiles of [", N, ", ", K, "] on the GPU");
  BITLAB_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == N &&
                  w_scale.device() == xq.device(),
              op, ": w_scale must be contiguous float32 per row [", N, "]");
  const at::ScalarType dt = k_cache.scalar_type();
  BITLAB_CHECK((dt == at::kHalf || dt == at::kBFloat16) && cos.scalar_type() == dt && sin.scalar_type() == dt &&
                  cos.numel() == D && sin.numel() == D,
              op, ": caches float16 / bfloat16, cos and sin [1, ", D, "] of that dtype");
  BITLAB_CHECK(mask.dim() == 2 && mask.size(0) == 1 && mask.size(1) == S && mask.stride(1) == 1 &&
                  mask.element_size() == 1, op, ": mask must be [1, S] bool/uint8");
  BITLAB_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1, op, ": slot must be int64 [1]");
  const c10::cuda::CUDAGuard guard(xq.device());
  at::Tensor out = at::empty({1, H * D}, k_cache.options());
  at::Tensor cs = cos.contiguous(), sn = sin.contiguous();
  bitlab::DecodeAttentionArgs a = attention_args(cs, sn, k_cache, v_cache, slot, mask, out, H, scale, dependent_launch);
  a.xq = static_cast<const int8_t*>(xq.data_ptr());
  a.x_scale = x_scale.data_ptr<float>();
  a.wq = reinterpret_cast<const uint32_t*>(wq.data_ptr<int32_t>());
  a.w_scale = w_scale.data_ptr<float>();
  a.K = static_cast<int>(K);
  a.Kp = static_cast<int>(Kp);
  check_cuda(bitlab::launch_decode_qkv_attention(a, c10::cuda::getCurrentCUDAStream()), "decode_qkv_attention kernel");
  return out;
}

// Blocks per cluster the q/k/v attention kernel takes for these sizes on the current device (0: it does not run them).
int64_t cuda_ext_decode_qkv_attention_cluster(at::ScalarType dtype, int64_t H, int64_t KVH, int64_t D, int64_t K,
                                              int64_t S) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return 0;
  return bitlab::decode_qkv_attention_cluster(dtype_code(dtype), static_cast<int>(H), static_cast<int>(KVH),
                                              static_cast<int>(D), static_cast<int>(K), static_cast<int>(S));
}

// BitNet's MLP in one kernel (bitnet_mlp.cu, sm_90); inputs checked in Python first
// (backends/cuda_ext/bitnet_mlp.py), again here.  mid and barrier are the layer's scratch.  The arguments
// every form shares: the prepared weights, scales, sub-norm and scratch for M tokens.
bitlab::BitnetMlpArgs bitnet_mlp_args(const char* op, int64_t M, const at::Tensor& gate_wq, const at::Tensor& up_wq,
                                      const at::Tensor& down_wq, const at::Tensor& gate_scale,
                                      const at::Tensor& up_scale, const at::Tensor& down_scale,
                                      const at::Tensor& sub_weight, at::Tensor& mid, at::Tensor& barrier, double eps,
                                      int64_t H, int64_t I) {
  BITLAB_CHECK(M <= bitlab::kBitnetMlpMaxTokens, op, ": ", M, " tokens; at most ", bitlab::kBitnetMlpMaxTokens);
  BITLAB_CHECK(I % 16 == 0, op, ": intermediate size ", I, " is not a multiple of 16");
  const int64_t tile_words = (H + 127) / 128 * 128;  // words per 16-row tile of gate / up (ternary)
  const int64_t down_words = (I + 127) / 128 * 128;
  for (const auto& w : {gate_wq, up_wq, down_wq})
    BITLAB_CHECK(w.is_cuda() && w.scalar_type() == at::kInt && w.is_contiguous() &&
                    reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
                op, ": prepared weights must be contiguous, 16-byte aligned int32 lane tiles on the GPU");
  BITLAB_CHECK(gate_wq.numel() >= I / 16 * tile_words && up_wq.numel() >= I / 16 * tile_words &&
                  down_wq.numel() >= (H + 15) / 16 * down_words,
              op, ": prepared weights are smaller than ternary lane tiles of [", I, ", ", H, "] and [", H, ", ", I, "]");
  BITLAB_CHECK(gate_scale.scalar_type() == at::kFloat && up_scale.scalar_type() == at::kFloat &&
                  down_scale.scalar_type() == at::kFloat && gate_scale.is_contiguous() && up_scale.is_contiguous() &&
                  down_scale.is_contiguous() && gate_scale.numel() == I && up_scale.numel() == I &&
                  down_scale.numel() == H,
              op, ": scales must be contiguous float32 per row ([", I, "], [", I, "], [", H, "])");
  const at::ScalarType dt = sub_weight.scalar_type();
  BITLAB_CHECK((dt == at::kHalf || dt == at::kBFloat16) && sub_weight.is_contiguous() && sub_weight.numel() == I &&
                  reinterpret_cast<uintptr_t>(sub_weight.data_ptr()) % 16 == 0,
              op, ": sub-norm weight must be contiguous, 16-byte aligned float16 / bfloat16 [", I, "], got ", dt, " ",
              sub_weight.sizes());
  BITLAB_CHECK(mid.scalar_type() == dt && mid.is_contiguous() && mid.numel() >= M * I &&
                  reinterpret_cast<uintptr_t>(mid.data_ptr()) % 16 == 0,
              op, ": mid scratch must be contiguous, 16-byte aligned ", dt, " with at least ", M * I, " elements");
  BITLAB_CHECK(barrier.scalar_type() == at::kLong && barrier.numel() == 1 && barrier.is_cuda(), op,
              ": barrier must be one int64 on the GPU");
  bitlab::BitnetMlpArgs a = {};
  a.gate_wq = reinterpret_cast<const uint32_t*>(gate_wq.data_ptr<int>());
  a.up_wq = reinterpret_cast<const uint32_t*>(up_wq.data_ptr<int>());
  a.down_wq = reinterpret_cast<const uint32_t*>(down_wq.data_ptr<int>());
  a.gate_scale = gate_scale.data_ptr<float>();
  a.up_scale = up_scale.data_ptr<float>();
  a.down_scale = down_scale.data_ptr<float>();
  a.sub_weight = sub_weight.data_ptr();
  a.eps = static_cast<float>(eps);
  a.dtype = dtype_code(dt);
  a.mid = mid.data_ptr();
  a.barrier = reinterpret_cast<unsigned long long*>(barrier.data_ptr<int64_t>());
  a.M = static_cast<int>(M);
  a.H = static_cast<int>(H);
  a.I = static_cast<int>(I);
  a.pdl = 1;  // behind a kernel that lets it start at once (cuda_ext_rms_norm_quant, a GEMV)
  return a;
}

// The MLP of int8 rows xq [M, H] with per-token scales (the post-attention norm's output).
at::Tensor cuda_ext_bitnet_mlp(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& gate_wq,
                               const at::Tensor& up_wq, const at::Tensor& down_wq, const at::Tensor& gate_scale,
                               const at::Tensor& up_scale, const at::Tensor& down_scale, const at::Tensor& sub_weight,
                               at::Tensor mid, at::Tensor barrier, double eps, int64_t H, int64_t I) {
  const char* op = "cuda_ext_bitnet_mlp";
  BITLAB_CHECK(xq.is_cuda() && xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.size(1) == H && xq.stride(1) == 1,
              op, ": xq must be int8 [M, ", H, "] with contiguous rows on a CUDA device, got ", xq.scalar_type(), " ",
              xq.sizes());
  const int64_t M = xq.size(0);
  BITLAB_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == M, op,
              ": x_scale must be contiguous float32 with ", M, " elements");
  bitlab::BitnetMlpArgs a = bitnet_mlp_args(op, M, gate_wq, up_wq, down_wq, gate_scale, up_scale, down_scale,
                                            sub_weight, mid, barrier, eps, H, I);
  const c10::cuda::CUDAGuard guard(xq.device());
  at::Tensor y = at::empty({M, H}, xq.options().dtype(sub_weight.scalar_type()));
  if (M == 0) return y;
  a.xq = xq.data_ptr<int8_t>();
  a.ldx = xq.stride(0);
  a.x_scale = x_scale.data_ptr<float>();
  a.y = y.data_ptr();
  check_cuda(bitlab::launch_bitnet_mlp(a, c10::cuda::getCurrentCUDAStream()), "bitnet_mlp kernel");
  return y;
}

// The post-attention norm and the MLP in one kernel: h = T(res + delta), x = quantize(RMSNorm(h) * norm_weight)
// in every block; returns (h, y).
std::tuple<at::Tensor, at::Tensor> cuda_ext_bitnet_mlp_norm(
    const at::Tensor& res, const at::Tensor& delta, const at::Tensor& norm_weight, double norm_eps,
    const at::Tensor& gate_wq, const at::Tensor& up_wq, const at::Tensor& down_wq, const at::Tensor& gate_scale,
    const at::Tensor& up_scale, const at::Tensor& down_scale, const at::Tensor& sub_weight, at::Tensor mid,
    at::Tensor barrier, double eps, int64_t H, int64_t I) {
  const char* op = "cuda_ext_bitnet_mlp_norm";
  const at::ScalarType dt = sub_weight.scalar_type();
  BITLAB_CHECK(H % 8 == 0 && H <= bitlab::kNormGemvMaxK, op, ": hidden size ", H, " is not a multiple of 8 up to ",
              bitlab::kNormGemvMaxK);
  for (const auto& t : {res, delta})
    BITLAB_CHECK(t.is_cuda() && t.dim() == 2 && t.scalar_type() == dt && t.size(1) == H && t.is_contiguous() &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                op, ": res and delta must be contiguous, 16-byte aligned ", dt, " [M, ", H, "] on a CUDA device, got ",
                t.scalar_type(), " ", t.sizes());
  const int64_t M = res.size(0);
  BITLAB_CHECK(delta.size(0) == M, op, ": res has ", M, " rows, delta ", delta.size(0));
  BITLAB_CHECK(M * H <= bitlab::kBitnetMlpNormElements, op, ": ", M, " x ", H, " values to norm; at most ",
              bitlab::kBitnetMlpNormElements);
  BITLAB_CHECK(norm_weight.scalar_type() == dt && norm_weight.is_contiguous() && norm_weight.numel() == H &&
                  reinterpret_cast<uintptr_t>(norm_weight.data_ptr()) % 16 == 0,
              op, ": norm weight must be contiguous, 16-byte aligned ", dt, " [", H, "]");
  bitlab::BitnetMlpArgs a = bitnet_mlp_args(op, M, gate_wq, up_wq, down_wq, gate_scale, up_scale, down_scale,
                                            sub_weight, mid, barrier, eps, H, I);
  const c10::cuda::CUDAGuard guard(res.device());
  at::Tensor h = at::empty_like(res);
  at::Tensor y = at::empty({M, H}, res.options());
  if (M == 0) return {h, y};
  a.res = res.data_ptr();
  a.delta = delta.data_ptr();
  a.norm_weight = norm_weight.data_ptr();
  a.res_out = h.data_ptr();
  a.norm_eps = static_cast<float>(norm_eps);
  a.norm_input = 1;
  a.y = y.data_ptr();
  check_cuda(bitlab::launch_bitnet_mlp(a, c10::cuda::getCurrentCUDAStream()), "bitnet_mlp kernel");
  return {h, y};
}

// Dynamic shared memory the MLP kernel needs for M tokens on the current device (0: it does not run there); with
// norm, the kernel that also takes the post-attention norm.
int64_t cuda_ext_bitnet_mlp_smem(int64_t M, int64_t H, int64_t I, at::ScalarType dtype, bool norm) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return 0;
  return bitlab::bitnet_mlp_smem_bytes(static_cast<int>(M), static_cast<int>(H), static_cast<int>(I), dtype_code(dtype),
                                       norm);
}

// The device address of a pinned host table (its mapped address), naming the problem if it has none.
void* mapped_host_address(const at::Tensor& table, const char* op) {
  void* mapped = nullptr;
  const cudaError_t err = cudaHostGetDevicePointer(&mapped, table.data_ptr(), 0);
  if (err != cudaSuccess) cudaGetLastError();  // clear it; the check below names the problem
  BITLAB_CHECK(err == cudaSuccess && mapped != nullptr, op, ": the table's pinned memory is not mapped into the ",
              "GPU's address space (", cudaGetErrorString(err), ")");
  return mapped;
}

void check_gather_table(const at::Tensor& table, const char* op, const char* name) {
  BITLAB_CHECK(table.dim() == 2 && table.is_contiguous(), op, ": ", name, " must be contiguous [rows, width], got ",
              table.sizes());
  const at::ScalarType dt = table.scalar_type();
  BITLAB_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, ": ", name, " dtype ", dt,
              " is not supported; expected float16, bfloat16 or float32");
}

// out [*ids.shape, width] on ids' device for rows of table.
at::Tensor gather_output(const at::Tensor& table, const at::Tensor& ids) {
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(table.size(1));
  return at::empty(shape, ids.options().dtype(table.scalar_type()));
}

bitlab::RowGather row_gather(const at::Tensor& table, const void* address, const at::Tensor& flat_ids,
                             const at::Tensor& out) {
  return {address, flat_ids.data_ptr<int64_t>(), table.size(0), table.size(1) * table.element_size(), out.data_ptr()};
}

// Rows of a pinned host table gathered by CUDA indices (host_gather.cu): [*ids.shape, H] on ids' device.
at::Tensor cuda_ext_gather_host_rows(const at::Tensor& table, const at::Tensor& ids) {
  const char* op = "cuda_ext_gather_host_rows";
  BITLAB_CHECK(table.device().is_cpu() && table.is_pinned(), op, ": table must be in pinned host memory "
              "(tensor.pin_memory()), got a tensor on ", table.device(), table.device().is_cpu() ? " (not pinned)" : "");
  check_gather_table(table, op, "table");
  BITLAB_CHECK(ids.is_cuda() && ids.scalar_type() == at::kLong, op, ": ids must be int64 on a CUDA device, got ",
              ids.scalar_type(), " on ", ids.device());
  const c10::cuda::CUDAGuard guard(ids.device());
  void* mapped = mapped_host_address(table, op);
  const at::Tensor flat = ids.contiguous().view(-1);
  at::Tensor out = gather_output(table, ids);
  check_cuda(bitlab::launch_gather_host_rows(mapped, flat.data_ptr<int64_t>(), flat.numel(), table.size(0),
                                             table.size(1) * table.element_size(), out.data_ptr(),
                                             c10::cuda::getCurrentCUDAStream()),
             "gather_host_rows kernel");
  return out;
}

// A decode step's inputs in one kernel (host_gather.cu): table[ids] (the embedding rows; table on ids' device or
// in pinned host memory), cos_table[positions] and sin_table[positions] (the rotary rows, tables on ids' device
// in the embedding's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_ext_gather_step_inputs(const at::Tensor& table,
                                                                          const at::Tensor& ids,
                                                                          const at::Tensor& cos_table,
                                                                          const at::Tensor& sin_table,
                                                                          const at::Tensor& positions) {
  const char* op = "cuda_ext_gather_step_inputs";
  BITLAB_CHECK(ids.is_cuda() && ids.scalar_type() == at::kLong, op, ": ids must be int64 on a CUDA device, got ",
              ids.scalar_type(), " on ", ids.device());
  BITLAB_CHECK(positions.device() == ids.device() && positions.scalar_type() == at::kLong &&
                   positions.sizes() == ids.sizes(), op, ": positions must be int64 on ", ids.device(),
              " with ids' shape ", ids.sizes(), ", got ", positions.scalar_type(), " on ", positions.device(), " shape ",
              positions.sizes());
  const bool on_host = table.device().is_cpu();
  BITLAB_CHECK(table.device() == ids.device() || (on_host && table.is_pinned()), op, ": table must be on ",
              ids.device(), " or in pinned host memory, got a tensor on ", table.device(),
              on_host ? " (not pinned)" : "");
  check_gather_table(table, op, "table");
  check_gather_table(cos_table, op, "cos_table");
  check_gather_table(sin_table, op, "sin_table");
  BITLAB_CHECK(cos_table.device() == ids.device() && sin_table.device() == ids.device() &&
                   cos_table.sizes() == sin_table.sizes() && cos_table.scalar_type() == table.scalar_type() &&
                   sin_table.scalar_type() == table.scalar_type(), op,
              ": cos_table and sin_table must be one shape on ", ids.device(), " in table's dtype ",
              table.scalar_type(), ", got ", cos_table.sizes(), " ", cos_table.scalar_type(), " on ",
              cos_table.device(), " and ", sin_table.sizes(), " ", sin_table.scalar_type(), " on ",
              sin_table.device());
  const c10::cuda::CUDAGuard guard(ids.device());
  const void* address = on_host ? mapped_host_address(table, op) : table.data_ptr();
  const at::Tensor flat_ids = ids.contiguous().view(-1), flat_pos = positions.contiguous().view(-1);
  at::Tensor h = gather_output(table, ids), cos = gather_output(cos_table, positions),
             sin = gather_output(sin_table, positions);
  bitlab::RowGathers g = {};
  g.t[0] = row_gather(table, address, flat_ids, h);
  g.t[1] = row_gather(cos_table, cos_table.data_ptr(), flat_pos, cos);
  g.t[2] = row_gather(sin_table, sin_table.data_ptr(), flat_pos, sin);
  g.n = 3;
  g.count = flat_ids.numel();
  check_cuda(bitlab::launch_gather_rows(g, c10::cuda::getCurrentCUDAStream()), "gather_step_inputs kernel");
  return {h, cos, sin};
}

// The index of each row's maximum (argmax.cu): x [B, V] half / bf16 / float with contiguous rows -> int64 [B].
at::Tensor cuda_ext_argmax_rows(const at::Tensor& x) {
  const char* op = "cuda_ext_argmax_rows";
  BITLAB_CHECK(x.is_cuda(), op, ": x must be on a CUDA device, got ", x.device());
  BITLAB_CHECK(x.dim() == 2 && (x.stride(1) == 1 || x.size(1) == 1), op,
              ": x must be [B, V] with contiguous rows, got ", x.sizes(), " strides ", x.strides());
  BITLAB_CHECK(x.size(1) >= 1 && x.size(1) <= (int64_t{1} << 30) && x.size(0) < (int64_t{1} << 31), op,
              ": rows of 1 to 2^30 values, fewer than 2^31 rows; got ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  BITLAB_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, ": x dtype ", dt,
              " is not supported; expected float16, bfloat16 or float32");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  check_cuda(bitlab::launch_argmax_rows(x.data_ptr(), dtype_code(dt), x.stride(0), static_cast<int>(x.size(0)),
                                        static_cast<int>(x.size(1)), out.data_ptr<int64_t>(),
                                        c10::cuda::getCurrentCUDAStream()),
             "argmax_rows kernel");
  return out;
}

// Throws, naming the tensor, unless t is a contiguous `dtype` tensor on `device`.
void require_contiguous(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                        const char* dtype_name, const c10::Device& device) {
  BITLAB_CHECK(t.scalar_type() == dtype && t.device() == device && t.is_contiguous(), op, ": ", name,
              " must be a contiguous ", dtype_name, " tensor on ", device, ", got ", t.scalar_type(), " on ",
              t.device());
}

// The shapes decode_advance needs (B rows): each check in its own statement, each message naming the tensors.
void require_advance_shapes(const char* op, int64_t B, const at::Tensor& pad_id, const at::Tensor& pos,
                            const at::Tensor& done, const at::Tensor& tokens, const at::Tensor& pad,
                            const at::Tensor& positions, const at::Tensor& out, const at::Tensor& mask) {
  BITLAB_CHECK(pad_id.numel() == 1 && pos.numel() == 1, op, ": pad_id and pos must hold one value each");
  const bool per_row =
      done.numel() == B && tokens.numel() == B && pad.numel() == B && positions.numel() == B;
  BITLAB_CHECK(per_row, op, ": done, tokens, pad and positions must hold one value per row (", B, "), got ",
              done.numel(), ", ", tokens.numel(), ", ", pad.numel(), ", ", positions.numel());
  const bool out_ok = out.dim() == 2 && out.size(0) == B;
  const bool mask_ok = mask.dim() >= 2 && mask.size(0) == B && mask.size(-1) >= 1 && mask.numel() == B * mask.size(-1);
  BITLAB_CHECK(out_ok && mask_ok, op, ": out must be [", B, ", columns] and mask [", B, ", slots], got ",
              out.sizes(), " and ", mask.sizes());
}

// A decode step's bookkeeping after its tokens are picked (decode_advance.cu); mutates done, out, pos, tokens,
// positions and mask.
void cuda_ext_decode_advance(const at::Tensor& ids, const at::Tensor& done, const at::Tensor& pad_id,
                             const at::Tensor& stop_ids, const at::Tensor& out, const at::Tensor& pos,
                             int64_t prompt_len, const at::Tensor& tokens, const at::Tensor& pad,
                             const at::Tensor& positions, const at::Tensor& mask) {
  const char* op = "cuda_ext_decode_advance";
  BITLAB_CHECK(ids.is_cuda(), op, ": ids (and every other tensor) must be on a CUDA device, got ", ids.device());
  const int64_t B = ids.numel();
  BITLAB_CHECK(B >= 1 && B <= (int64_t{1} << 30), op, ": ids must hold 1 to 2^30 rows, got ", ids.sizes());
  const c10::Device device = ids.device();
  require_contiguous(ids, op, "ids", at::kLong, "int64", device);
  require_contiguous(pad_id, op, "pad_id", at::kLong, "int64", device);
  require_contiguous(stop_ids, op, "stop_ids", at::kLong, "int64", device);
  require_contiguous(out, op, "out", at::kLong, "int64", device);
  require_contiguous(pos, op, "pos", at::kLong, "int64", device);
  require_contiguous(tokens, op, "tokens", at::kLong, "int64", device);
  require_contiguous(pad, op, "pad", at::kLong, "int64", device);
  require_contiguous(positions, op, "positions", at::kLong, "int64", device);
  require_contiguous(done, op, "done", at::kBool, "bool", device);
  require_contiguous(mask, op, "mask", at::kBool, "bool", device);
  require_advance_shapes(op, B, pad_id, pos, done, tokens, pad, positions, out, mask);
  const c10::cuda::CUDAGuard guard(ids.device());
  bitlab::DecodeAdvanceArgs a{};
  a.ids = ids.data_ptr<int64_t>();
  a.done = done.data_ptr<bool>();
  a.pad_id = pad_id.data_ptr<int64_t>();
  a.stop_ids = stop_ids.numel() ? stop_ids.data_ptr<int64_t>() : nullptr;
  a.n_stop = static_cast<int>(stop_ids.numel());
  a.out = out.data_ptr<int64_t>();
  a.out_cols = out.size(1);
  a.pos = pos.data_ptr<int64_t>();
  a.prompt_len = prompt_len;
  a.tokens = tokens.data_ptr<int64_t>();
  a.pad = pad.data_ptr<int64_t>();
  a.positions = positions.data_ptr<int64_t>();
  a.mask = mask.data_ptr<bool>();
  a.B = static_cast<int>(B);
  a.S = mask.size(-1);
  check_cuda(bitlab::launch_decode_advance(a, c10::cuda::getCurrentCUDAStream()), "decode_advance kernel");
}

TORCH_LIBRARY_FRAGMENT(bitlab, m) {
  m.def(
      "cuda_ext_bitnet_mlp(Tensor xq, Tensor x_scale, Tensor gate_wq, Tensor up_wq, Tensor down_wq, "
      "Tensor gate_scale, Tensor up_scale, Tensor down_scale, Tensor sub_weight, Tensor(a!) mid, Tensor(b!) barrier, "
      "float eps, int H, int I) -> Tensor");
  m.def(
      "cuda_ext_bitnet_mlp_norm(Tensor res, Tensor delta, Tensor norm_weight, float norm_eps, Tensor gate_wq, "
      "Tensor up_wq, Tensor down_wq, Tensor gate_scale, Tensor up_scale, Tensor down_scale, Tensor sub_weight, "
      "Tensor(a!) mid, Tensor(b!) barrier, float eps, int H, int I) -> (Tensor, Tensor)");
  m.def("cuda_ext_bitnet_mlp_smem(int M, int H, int I, ScalarType dtype, bool norm=False) -> int",
        &cuda_ext_bitnet_mlp_smem);
  m.def(
      "cuda_ext_decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slot, Tensor mask, float scale, bool dependent_launch=False) -> Tensor");
  m.def(
      "cuda_ext_decode_qkv_attention(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, Tensor cos, Tensor sin, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot, Tensor mask, float scale, int H, "
      "bool dependent_launch=False) -> Tensor");
  m.def("cuda_ext_decode_qkv_attention_cluster(ScalarType dtype, int H, int KVH, int D, int K, int S) -> int",
        &cuda_ext_decode_qkv_attention_cluster);
  m.def("cuda_ext_gather_host_rows(Tensor table, Tensor ids) -> Tensor");
  m.def(
      "cuda_ext_gather_step_inputs(Tensor table, Tensor ids, Tensor cos_table, Tensor sin_table, Tensor positions) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("cuda_ext_argmax_rows(Tensor x) -> Tensor");
  m.def(
      "cuda_ext_decode_advance(Tensor ids, Tensor(a!) done, Tensor pad_id, Tensor stop_ids, Tensor(b!) out, "
      "Tensor(c!) pos, int prompt_len, Tensor(d!) tokens, Tensor pad, Tensor(e!) positions, Tensor(f!) mask) -> ()");
  m.def("cuda_ext_rms_norm_quant(Tensor a, Tensor? b, Tensor weight, float eps, int mode) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_ext_linear_int8_norm(Tensor a, Tensor? b, Tensor norm_weight, float eps, int mode, Tensor wq, "
      "Tensor w_scale, Tensor? bias, int fmt, int epilogue, int N, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def(
      "cuda_ext_linear_int8_norm_tail(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, int fmt, int N, "
      "Tensor res, Tensor norm_weight, float eps, Tensor(a!) counter) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_ext_linear_int8(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, Tensor? bias, int fmt, "
      "int epilogue, int N, int K, ScalarType out_dtype) -> Tensor");
  m.def(
      "cuda_ext_linear(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias, int fmt, int act_mode, int epilogue, "
      "int N, int K, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitlab, CUDA, m) {
  m.impl("cuda_ext_linear", &cuda_ext_linear);
  m.impl("cuda_ext_linear_int8", &cuda_ext_linear_int8);
  m.impl("cuda_ext_rms_norm_quant", &cuda_ext_rms_norm_quant);
  m.impl("cuda_ext_linear_int8_norm", &cuda_ext_linear_int8_norm);
  m.impl("cuda_ext_linear_int8_norm_tail", &cuda_ext_linear_int8_norm_tail);
  m.impl("cuda_ext_decode_attention", &cuda_ext_decode_attention);
  m.impl("cuda_ext_decode_qkv_attention", &cuda_ext_decode_qkv_attention);
  m.impl("cuda_ext_bitnet_mlp", &cuda_ext_bitnet_mlp);
  m.impl("cuda_ext_bitnet_mlp_norm", &cuda_ext_bitnet_mlp_norm);
  m.impl("cuda_ext_gather_host_rows", &cuda_ext_gather_host_rows);
  m.impl("cuda_ext_gather_step_inputs", &cuda_ext_gather_step_inputs);
  m.impl("cuda_ext_argmax_rows", &cuda_ext_argmax_rows);
  m.impl("cuda_ext_decode_advance", &cuda_ext_decode_advance);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "BitLab cuda_ext kernels (op: torch.ops.bitlab.cuda_ext_linear)"; }
