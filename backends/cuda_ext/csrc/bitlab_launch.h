// BitLab cuda_ext: host-side launch interface of the CUDA kernels.
//
// Plain C++ (no torch headers): the kernel files (*.cu) include only this and the
// CUDA headers, so CI compiles them with a bare nvcc; bindings.cpp adapts torch
// tensors to these structs and calls the launchers on the current stream.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <cstdlib>
#include <cstring>

namespace bitlab {

// Multiprocessors of the current device (cached; 132 if the query fails).
inline int device_sm_count() {
  static int count = 0;
  if (count == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    if (count <= 0) count = 132;
  }
  return count;
}

// Compute-capability major of the current device (cached).
inline int device_major() {
  static int major = -1;
  if (major < 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  }
  return major;
}

// Whether the environment variable `name` is set to `value`.
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, value) == 0;
}

// Launch configuration of a kernel with thread-block clusters: `cluster` blocks per cluster along x; room
// for one more attribute (dependent launch) after the cluster dimension.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  ClusterLaunch(dim3 grid, int cluster, int smem_bytes, cudaStream_t stream, int threads) : cfg{}, attr{} {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // cfg.attrs points into this object
  // Launch as a programmatic dependent of the stream's previous kernel (the caller checks the device has it).
  void as_dependent() {
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 2;
  }
};

enum OutDtype { kDtypeFloat = 0, kDtypeHalf = 1, kDtypeBFloat16 = 2 };
enum Epilogue { kEpilogueNone = 0, kEpilogueRelu = 1, kEpilogueRelu2 = 2 };

struct LinearArgs {
  const void* x;         // activations [M, Kp]: half / bf16 (float path) or int8 (int8 path), zero-padded
  const uint32_t* wq;    // prepared lane tiles (bitlab_mma.cuh)
  const float* w_scale;  // [N] or [1]
  int w_scale_per_row;
  const float* x_scale;  // int8 path: [M] or [1] dequantization scale; nullptr on the float path
  int x_scale_per_row;
  const float* bias;     // [N] float32 or nullptr
  void* y;               // [M, N] in out_dtype
  int out_dtype;
  int epilogue;
  int M, N, Kp;
  int fmt;               // WeightFormat
  int pdl;               // launch as a programmatic dependent of the previous kernel (sm_90+)
};

// Float activations (x_dtype kDtypeHalf / kDtypeBFloat16), decode-to-half/bf16 mma.
cudaError_t launch_linear_float(const LinearArgs& args, int x_dtype, cudaStream_t stream);
// int8 activations, int8 mma with exact int32 accumulation.
cudaError_t launch_linear_int8(const LinearArgs& args, cudaStream_t stream);

// The GEMMs on cuBLAS (cublas_gemm.cu): expand m-tiles tile0 .. tile0 + tiles - 1 of int8-path lane tiles
// (format fmt) into out, row-major int8 [16 tiles, nchunks * 128], or of float-path lane tiles into half /
// bf16 (x_dtype); then, after the caller's GEMM acc [M, cols] (int32 or float32, row stride ld_acc, a
// multiple of 4), store y[:, n0 .. n0 + cols) with a's epilogue.
cudaError_t launch_expand_int8(const uint32_t* wq, int fmt, int tile0, int tiles, int nchunks, int8_t* out,
                               cudaStream_t stream);
cudaError_t launch_expand_float(const uint32_t* wq, int fmt, int x_dtype, int tile0, int tiles, int nchunks,
                                void* out, cudaStream_t stream);
cudaError_t launch_int32_epilogue(const LinearArgs& a, const int32_t* acc, int ld_acc, int n0, int cols,
                                  cudaStream_t stream);
cudaError_t launch_float_epilogue(const LinearArgs& a, const float* acc, int ld_acc, int n0, int cols,
                                  cudaStream_t stream);

// Absmax int8 quantization of x [M, K] (row stride ldx elements) into xq [M, Kp] (zero-padded)
// and the dequantization scale xs ([M] per token, [1] per tensor), exactly as
// bitcore.quantize.quantize_activation_int8. workspace: M floats (per tensor only).
cudaError_t launch_quantize_int8(const void* x, int x_dtype, int M, int K, long ldx, int Kp, int per_token,
                                 int8_t* xq, float* xs, float* workspace, cudaStream_t stream);

// Sign bits of x [M, K] into xb [M, Kp / 32] (bit 1 = +1, padding 0) and mean|x| per row into rowmean [M].
cudaError_t launch_binarize(const void* x, int x_dtype, int M, int K, long ldx, int Kp, uint32_t* xb,
                            float* rowmean, cudaStream_t stream);

// W1A1: y = (K - 2 popc(xb ^ wb)) * x_scale * w_scale (+ bias, activation).
// wb: binary weight bits [Npad, Kp / 32]; x scale from rowmean (per_token) or its mean (per_tensor).
struct XnorArgs {
  const uint32_t* xb;
  const uint32_t* wb;
  const float* rowmean;
  int per_token;
  const float* w_scale;
  int w_scale_per_row;
  const float* bias;
  void* y;
  int out_dtype, epilogue;
  int M, N, K, Kp;
};
cudaError_t launch_xnor(const XnorArgs& args, cudaStream_t stream);
// W1A1 from this many tokens runs on the tensor cores (mma .b1) on sm_80+ (xnor.cu).
constexpr int kXnorMmaMinTokens = 33;
bool xnor_on_tensor_cores(int M);

// RMSNorm + per-token int8 quantization of rows of a (norm_quant.cu): mode 0 x = a, mode 1
// h = a + b (written to h, [M, K] contiguous), mode 2 x = relu(a)^2 * b; q [M, K], scale [M].
constexpr int kNormQuantMaxK = 16 * 1024;
struct NormQuantArgs {
  const void* a;
  const void* b;       // modes 1 and 2
  const void* weight;  // [K], dtype as a
  void* h;             // mode 1
  int dtype;           // kDtypeHalf / kDtypeBFloat16 / kDtypeFloat, for a, b, weight, h
  int M, K;
  long lda, ldb;       // row strides (elements); columns are contiguous
  float eps;
  int mode;
  int8_t* q;
  float* scale;
};
cudaError_t launch_rms_norm_quant(const NormQuantArgs& args, cudaStream_t stream);

// The int8 GEMV with its input's RMSNorm + quantization in the same kernel (linear_norm.cu): every block
// computes x = int8 per-token quantization of RMSNorm(r) * weight for r = a (mode 0) or h = T(a + b) (mode 1;
// block 0 writes h, [M, K] contiguous), into shared memory, exactly as norm_quant.cu computes it (same
// reduction order, so the same bits), then y = x . W with launch_linear_int8's epilogue (args.x and
// args.x_scale are not read).  a, b, weight, h: half / bf16 (dtype), contiguous rows, 16-byte aligned.
constexpr int kNormGemvMaxTokens = 8;
constexpr int kNormGemvMaxK = 8192;         // norm_quant.cu's one-piece-per-thread range
constexpr int kNormGemvMaxElements = 8192;  // M * K: the block stages r (2 bytes each) and x in shared memory
struct NormInputArgs {
  const void* a;
  const void* b;       // mode 1
  const void* weight;  // [K]
  void* h;             // mode 1
  int dtype;           // kDtypeHalf or kDtypeBFloat16
  int mode;            // 0: r = a, 1: r = h = T(a + b)
  int K;               // columns of a (args.Kp: K padded to 128)
  float eps;
};
// Whether launch_linear_int8_norm serves M tokens of K columns.
bool norm_gemv_serves(int M, int K);
cudaError_t launch_linear_int8_norm(const LinearArgs& args, const NormInputArgs& norm, cudaStream_t stream);

// The int8 GEMV followed, in the same kernel, by the residual add, RMSNorm and per-token int8 quantization of its
// output (linear_norm_tail.cu): norm.a = the residual [M, N], norm.b = args.y (the GEMV's output, scratch),
// norm.h = h out [M, N], norm.mode = 1, norm.K = N; xq [M, N] int8 and x_scale [M] out; counter: one unsigned int,
// zero before the launch and zero again after it (the last block resets it).  The same bits as
// launch_linear_int8 then launch_rms_norm_quant (mode 1).
struct NormTailArgs {
  NormInputArgs norm;
  int8_t* xq;
  float* x_scale;
  unsigned int* counter;
};
// Whether launch_linear_int8_norm_tail serves M tokens of N outputs.
bool norm_tail_serves(int M, int N);
cudaError_t launch_linear_int8_norm_tail(const LinearArgs& args, const NormTailArgs& tail, cudaStream_t stream);

// One-token grouped-query attention with rotary embedding and KV-cache write (decode_attention.cu,
// sm_90). q [B, H, D], k, v [B, KVH, D] (row strides below; heads contiguous, D unit stride),
// cos / sin [B, D], caches [B, KVH, S, D] contiguous, mask [B, S] (nonzero = attend), all of dtype
// T but mask; key and value are written at cache position *slot; out [B, H * D].  D is 64 or 128,
// H / KVH is 1, 2, 4 or 8.
struct DecodeAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  long q_row, k_row, v_row;
  const void* cos;
  const void* sin;
  void* k_cache;
  void* v_cache;
  const long* slot;      // int64 [1]
  const uint8_t* mask;   // [B, S], row stride mask_row
  long mask_row;
  void* out;             // [B, H * D]
  int dtype;             // kDtypeHalf or kDtypeBFloat16
  int B, H, KVH, D, S;
  float scale;
  int pdl;               // launch as a programmatic dependent of the kernel before it
  int merge;             // set by the launcher: kAttentionMergePush, or for A/B (BITLAB_ATTN_MERGE) a pull merge
  // launch_decode_qkv_attention only (B == 1; q, k, v unused): the kernel computes this step's q, k, v itself,
  // q/k/v = T(acc * x_scale * w_scale[row]) of the fused q/k/v projection (rows: H D queries, KVH D keys, KVH D
  // values) on the int8 input, as the int8 GEMV's epilogue rounds them.
  const int8_t* xq;      // [Kp] int8, zero past the input length
  const float* x_scale;  // [1]
  const uint32_t* wq;    // ternary int8-path lane tiles of the fused projection ((H + 2 KVH) D / 16 m-tiles)
  const float* w_scale;  // [(H + 2 KVH) D] float32, per row
  int K, Kp;             // input length, and padded: a multiple of 128
};
// How the blocks of an attention cluster combine their partial sums (decode_attention.cu).
enum AttentionMerge : int {
  kAttentionMergePush = 0,    // each block sends its sums for every other block's slice before the barrier
  kAttentionMergeSpread = 1,  // BITLAB_ATTN_MERGE=spread: each block reads its slice from every block after it
  kAttentionMergeBlock0 = 2,  // BITLAB_ATTN_MERGE=block0: block 0 reads every output from every block
};
cudaError_t launch_decode_attention(const DecodeAttentionArgs& args, cudaStream_t stream);
// The same attention for one row (B == 1) with the q/k/v projection inside (DecodeAttentionArgs::xq ...): each
// cluster computes its KV head's (G + 2) D rows from weight tiles copied into shared memory before the wait.
cudaError_t launch_decode_qkv_attention(const DecodeAttentionArgs& args, cudaStream_t stream);
// Blocks per cluster launch_decode_qkv_attention would take for these sizes (dtype kDtypeHalf / kDtypeBFloat16,
// K inputs, S cache positions) on the current device, or 0 where it cannot run them (sm_90, D 64 / 128, groups
// 1-8, the block's weight tiles within kQkvAttentionTileBytes).
int decode_qkv_attention_cluster(int dtype, int H, int KVH, int D, int K, int S);
constexpr int kQkvAttentionTileBytes = 96 * 1024;  // most weight-tile bytes one block of the cluster holds

// BitNet's MLP for up to kBitnetMlpMaxTokens tokens in one persistent kernel (bitnet_mlp.cu, sm_90):
//   g = T(xq . gate * x_scale * gate_scale), u likewise, m = T(T(relu(g)^2) * u)   (phase A)
//   mq, ms = per-token int8 quantization of ffn_sub_norm(m)                          (every block)
//   y = T(mq . down * ms * down_scale)                                              (phase B)
// with ternary int8-path lane tiles (bitlab_mma.cuh) and per-row float32 scales; T is dtype.
// One block per multiprocessor, one grid barrier between the phases.
constexpr int kBitnetMlpMaxTokens = 8;
// Most elements M * H of the rows the kernel norms itself (norm_input; also H <= 8192 and the staged rows fit).
constexpr int kBitnetMlpNormElements = 4 * 8 * 512;
struct BitnetMlpArgs {
  const int8_t* xq;         // [M, H] rows, row stride ldx
  long ldx;
  const float* x_scale;     // [M]
  const uint32_t* gate_wq;  // lane tiles of the I gate rows (tile t at word t * ceil(H / 128) * 128)
  const uint32_t* up_wq;    // lane tiles of the I up rows
  const uint32_t* down_wq;  // lane tiles of down [H rows, I inputs]
  const float* gate_scale;  // [I]
  const float* up_scale;    // [I]
  const float* down_scale;  // [H]
  const void* sub_weight;   // ffn_sub_norm weight [I], dtype
  float eps;
  int dtype;                // kDtypeHalf or kDtypeBFloat16
  void* mid;                // scratch [M, I], dtype: m between the phases
  unsigned long long* barrier;  // grid barrier counter, only ever incremented (zero when allocated)
  void* y;                  // [M, H], dtype
  int M, H, I;
  int pdl;
  // The post-attention norm inside the kernel (norm_input != 0; then xq and x_scale are not read): every block
  // computes x = int8 per-token quantization of RMSNorm(h) * norm_weight for h = T(res + delta) (the residual
  // stream plus the o projection's output, [M, H] contiguous and 16-byte aligned, H % 8 == 0, H <= 8192,
  // M * H <= kBitnetMlpNormElements) with norm_quant.cu's mode-1 bits; block 0 writes h to res_out.
  const void* res;
  const void* delta;
  const void* norm_weight;  // [H], dtype
  void* res_out;            // [M, H], dtype; not res
  float norm_eps;
  int norm_input;
  // set by the launcher (read per launch, for A/B timing): a block's down tiles one at a time
  // (BITLAB_MLP_DOWN=single), its gate/up pair tiles one pair at a time (BITLAB_MLP_GATE_UP=single)
  int down_tiles_apart, gate_up_apart;
  // set by the launcher: the grid barrier with __threadfence around a relaxed atomic (BITLAB_MLP_BARRIER=fence, A/B)
  int fenced_barrier;
  // set by the launcher: the sub-norm in shared-memory passes even where it fits in registers
  // (BITLAB_MLP_SUBNORM=passes, A/B)
  int subnorm_passes;
  // set by the launcher: bytes per bulk copy of the weight tiles (16384; BITLAB_MLP_COPY_PIECE for A/B)
  int copy_piece;
};
// Dynamic shared memory the kernel needs for M tokens, or 0 where it cannot run (M out of range,
// more than 4 tiles of 16 rows per block in either phase, or over the device's shared memory).
// With norm, for the kernel that also takes the post-attention norm (its rows staged in shared memory too).
int bitnet_mlp_smem_bytes(int M, int H, int I, int dtype, bool norm = false);
cudaError_t launch_bitnet_mlp(const BitnetMlpArgs& args, cudaStream_t stream);

// Whether M tokens (17-64) over nchunks 128-column chunks run the wide cluster GEMV on this device
// (launch_linear_fmt in bitlab_linear.cuh; BITLAB_CUDA_GEMV=oneshot / bulk turn it off); float activations
// of either type stage the same bytes.
bool wide_gemv_runs(int M, int nchunks, bool int8_activations);

// host_gather.cu: out[i] = table[ids[i]] for count indices, for up to kMaxRowGathers tables in one kernel; a
// table is device memory or pinned host memory (its device-mapped address), rows of row_bytes bytes (even); the
// kernel traps on an index outside [0, rows).
struct RowGather {
  const void* table;    // [rows, row_bytes]
  const int64_t* ids;   // [count]
  int64_t rows;
  int64_t row_bytes;
  void* out;            // [count, row_bytes]
};
constexpr int kMaxRowGathers = 3;
struct RowGathers {
  RowGather t[kMaxRowGathers];
  int n;          // tables used
  int64_t count;  // indices per table
};
cudaError_t launch_gather_rows(const RowGathers& gathers, cudaStream_t stream);
cudaError_t launch_gather_host_rows(const void* table, const int64_t* ids, int64_t count, int64_t rows,
                                    int64_t row_bytes, void* out, cudaStream_t stream);

// decode_advance.cu: a decode step's bookkeeping after its tokens are picked (the file comment has the math).
// int64 tensors except done and mask (bool); out and mask contiguous [B, out_cols] / [B, S].
struct DecodeAdvanceArgs {
  const int64_t* ids;       // [B] the picked tokens
  bool* done;               // [B]
  const int64_t* pad_id;    // 0-d
  const int64_t* stop_ids;  // [n_stop]
  int n_stop;
  int64_t* out;             // [B, out_cols]
  long out_cols;
  int64_t* pos;             // 0-d: this step's cache slot, advanced by one
  long prompt_len;
  int64_t* tokens;          // [B] the next step's input
  const int64_t* pad;       // [B] left padding of each row
  int64_t* positions;       // [B] the next step's rotary positions
  bool* mask;               // [B, S] the next step's attention mask
  int B;
  long S;
};
cudaError_t launch_decode_advance(const DecodeAdvanceArgs& args, cudaStream_t stream);

// argmax.cu: out[b] = torch.argmax(row b) for B rows of V values (dtype kDtypeHalf / kDtypeBFloat16 /
// kDtypeFloat, row stride ldx elements, columns contiguous): NaN counts as the largest, ties go to the first.
cudaError_t launch_argmax_rows(const void* x, int dtype, long ldx, int B, int V, int64_t* out, cudaStream_t stream);

}  // namespace bitlab
