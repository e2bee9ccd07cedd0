// BitNet's MLP (gate/up GEMV, squared-ReLU gate, ffn_sub_norm + int8 quantization, down GEMV) for a
// few tokens in one persistent kernel (sm_90).  Math: bitlab_launch.h, BitnetMlpArgs.
//
// Why: as three kernels (gate/up GEMV, norm + quantization, down GEMV) the 2B model's MLP takes
// ~18 us per layer at one token for 13.3 MB of weights (4.4 us at 3 TB/s).  Here every block starts
// the bulk copies of its gate/up tiles into shared memory before it waits for the kernel that produces
// x, and those of its down tiles while the grid barrier is pending.
//
// The kernel runs its code once per launch, so code size is instruction fetches from L2: loops over
// tiles and tokens are not unrolled (unrolled, the sub-norm alone took 4400 cycles for ~2 pieces of
// 8 values per thread; rolled, 1600), nor are the loops over a thread's pieces or elements, which run once
// or twice per thread (the compiler unrolled those four times: 75.3 KB of code against 60.5 rolled).
//
//   * grid: G = min(#SMs, tiles) blocks, one per multiprocessor, all resident (the grid barrier needs
//     that; the host checks one block fits on an empty multiprocessor);
//   * x: the int8 rows given, or (norm_input) every block computes them from the residual stream and the o
//     projection's output, as the post-attention norm's kernel would (norm_rows_into_x, its bits);
//   * phase A: block b owns the 16-row pair tiles [b PA / G, (b + 1) PA / G) of gate and up (same
//     rows), one mbarrier per tile; its 16 warps split each tile's 128-column chunks, meet in shared
//     memory (partial sums of the M real tokens only, in the down tiles' region before those arrive;
//     an even number of pair tiles is taken two pairs at a time),
//     and write m = T(T(relu(g)^2) * u) to the scratch `mid`;
//   * grid barrier (a counter that only grows: arrival `old`, a release, waits by acquire loads for the
//     next multiple of G);
//   * every block reads all of `mid`, computes the sub-norm's sums itself (same order in every block,
//     so the same result) and quantizes the whole row into shared memory (one or two tokens: m held in
//     registers, subnorm_in_registers; more: through shared memory, subnorm_in_passes);
//   * phase B: block b owns down tiles [b PB / G, (b + 1) PB / G), already in shared memory (an even
//     number of them multiplied two at a time).
// Epilogues round exactly as the separate kernels do (epilogue_store_f, norm_quant.cu); only the
// norms' sums of squares are added in a different order than norm_quant.cu's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_gemv_bulk.cuh"
#include "bitlab_mma.cuh"
#include "bitlab_norm_math.cuh"
#include "bitlab_norm_rows.cuh"
#include "bitlab_timeline.cuh"

namespace bitlab {
namespace {

constexpr int kMlpWarps = 16, kMlpThreads = 32 * kMlpWarps;
constexpr int kMlpMaxTiles = 4;             // 16-row tiles per block and phase
constexpr int kTileChunkBytes = 512;        // one ternary (m-tile, chunk): 32 lanes x 4 words
constexpr int kTileChunkWords = kTileChunkBytes / 4;
constexpr int kMaxTok = kBitnetMlpMaxTokens;

struct MlpPlan {
  int M, H, I, Hp, Ip, C1, C2;  // C1 / C2: 128-column chunks of H / I
  int PA, PB, G;                // pair tiles of gate/up, tiles of down, blocks
  int tiles_a, tiles_b;         // most tiles one block owns in phase A / B
  int xp, qp;                   // row pitches (bytes) of x and of the quantized m in shared memory
  // shared memory: down tiles, the sub-norm weight, x, phase A region (gate/up tiles, then partial sums,
  // then m and y), quantized m
  int off_b, off_w, off_x, off_a, off_q, smem;
};

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// The plan, or smem = 0 where the kernel does not serve the shape.
MlpPlan make_plan(int M, int H, int I, int elem, int sms, int smem_limit, bool norm = false) {
  MlpPlan p = {};
  p.M = M; p.H = H; p.I = I;
  p.Hp = round_up(H, 128); p.Ip = round_up(I, 128);
  p.C1 = p.Hp / 128; p.C2 = p.Ip / 128;
  p.xp = p.Hp + 16; p.qp = p.Ip + 16;  // +16: the 8 token rows a warp reads start on different banks
  p.PA = (I + 15) / 16; p.PB = (H + 15) / 16;
  p.G = sms < (p.PA > p.PB ? p.PA : p.PB) ? sms : (p.PA > p.PB ? p.PA : p.PB);
  if (M < 1 || M > kMaxTok || H < 1 || I < 1 || I % 16 != 0 || p.G < 1) return p;
  p.tiles_a = (p.PA + p.G - 1) / p.G;
  p.tiles_b = (p.PB + p.G - 1) / p.G;
  if (p.tiles_a > kMlpMaxTiles || p.tiles_b > kMlpMaxTiles) return p;
  const int bars = 8 * (p.tiles_a + p.tiles_b);
  const int part_a = kMlpWarps * p.tiles_a * 2 * 16 * M * 4;  // phase A partial sums (in the down region)
  const int part_b = kMlpWarps * p.tiles_b * 16 * M * 4;      // phase B partial sums (in the phase A region)
  int size_b = p.tiles_b * p.C2 * kTileChunkBytes;
  size_b = size_b > part_a ? size_b : part_a;
  const int stage = norm ? norm_rows_stage_bytes(M, H, 1) : 0;  // the post-attention norm's rows and weight
  size_b = size_b > stage ? size_b : stage;
  p.off_b = round_up(bars, 128);
  p.off_w = p.off_b + round_up(size_b, 128);
  p.off_x = p.off_w + round_up(I * elem, 128);
  p.off_a = p.off_x + round_up(M * p.xp, 128);
  int size_a = p.tiles_a * 2 * p.C1 * kTileChunkBytes;  // gate + up tiles
  const int staged = M * I * elem;                       // m, then y
  size_a = size_a > part_b ? size_a : part_b;
  size_a = size_a > staged ? size_a : staged;
  p.off_q = p.off_a + round_up(size_a, 128);
  p.smem = p.off_q + round_up(M * p.qp, 128);
  if (p.smem > smem_limit) p.smem = 0;
  return p;
}

// Per-token block reductions in two steps: each warp's lane 0 writes its warp's sum (kMax: maximum) to
// scratch[warp * kMaxTok + t] (warp_reduce_to); finish_block_reduce adds them in warp order into
// scratch[kMlpWarps * kMaxTok + t] for t < M.  Every block gets the same results for the same data.
template <bool kMax>
__device__ __forceinline__ void warp_reduce_to(float v, float* slot, int lane) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  if (lane == 0) *slot = v;
}
template <bool kMax>
__device__ __forceinline__ void finish_block_reduce(int M, float* scratch) {
  __syncthreads();
  if (threadIdx.x < M) {
    float s = scratch[threadIdx.x];
    for (int w = 1; w < kMlpWarps; ++w)
      s = kMax ? fmaxf(s, scratch[w * kMaxTok + threadIdx.x]) : s + scratch[w * kMaxTok + threadIdx.x];
    scratch[kMlpWarps * kMaxTok + threadIdx.x] = s;
  }
  __syncthreads();
}

// A bulk copy cut into pieces of at most `piece` bytes (a multiple of 16; BitnetMlpArgs::copy_piece).  Thread 0
// issues every copy, one instruction each: with 4 KB pieces (24 copies for BitNet 2B's four gate/up pair tiles)
// they were all issued 1.53 us after the block started, with 16 KB pieces (8) 0.87 us, and the MLP timeline's
// replay went 13.81 -> 13.55 us per (producer, MLP) pair (H200, notes v24); 2 KB pieces lost 19 tokens/s.
constexpr int kCopyPiece = 16384;
__device__ __forceinline__ void copy_in_pieces(unsigned char* dst, const uint32_t* src, int bytes, uint64_t* bar,
                                               int piece) {
  for (int off = 0; off < bytes; off += piece)
    bulk_copy_to_shared(dst + off, reinterpret_cast<const unsigned char*>(src) + off,
                        bytes - off < piece ? bytes - off : piece, bar);
}

// The block's warps multiply its n tiles (MT m-tiles each, in shared memory at `tiles`, tile lt's m-tile
// m at (lt * MT + m) * C chunks) by the int8 rows at `xs` (pitch `pitch`) and write each warp's partial
// sums of the M real tokens to `part` (partial_index; not over the tiles).  One tile at a time and no
// unrolled copies per tile: the code runs once per launch, so its size is instruction-cache misses.
__device__ __forceinline__ int partial_index(int warp, int n, int MT, int lt, int m, int row, int tok, int M) {
  return (((warp * n + lt) * MT + m) * 16 + row) * M + tok;
}
// Tile lt waits for barriers [lt * BARS, (lt + 1) * BARS) (BARS > 1: tiles of several copies' m-tiles);
// `landed` marks the first tile's arrival in the timeline probe (benchmarks/csrc/mlp_timeline.cu).
template <int MT, int BARS = 1>
__device__ __forceinline__ void block_tiles_gemv(const unsigned char* tiles, int n, int C, uint64_t* bars,
                                                 const unsigned char* xs, int pitch, int M, int* part,
                                                 TimelineMark landed = {}) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int lt = 0; lt < n; ++lt) {
    int acc[1][MT][1][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[0][m][0][i] = 0;
#pragma unroll
    for (int b = 0; b < BARS; ++b) mbar_wait(&bars[lt * BARS + b], 0);
    if (lt == 0) landed();
    for (int c = warp; c < C; c += kMlpWarps) {
      uint32_t w[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
        load_lane_tile_shared<kTernary>(w[m], tiles + static_cast<long>((lt * MT + m) * C + c) * kTileChunkBytes, lane);
      uint32_t xb[1][8];
      load_x_shared<int8_t>(xb[0], xs + g * pitch + c * 128, g < M, t);
      mma_chunk<kTernary, int8_t>(acc, w, xb);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = 2 * t + (i & 1), row = g + 8 * (i >> 1);
        if (tok < M) part[partial_index(warp, n, MT, lt, m, row, tok, M)] = acc[0][m][0][i];
      }
  }
  __syncthreads();
}

// Sum over the warps of element (lt, m, row, token) of block_tiles_gemv's partial sums.
template <int MT>
__device__ __forceinline__ int reduced(const int* part, int n, int lt, int m, int row, int tok, int M) {
  int s = 0;
  for (int w = 0; w < kMlpWarps; ++w) s += part[partial_index(w, n, MT, lt, m, row, tok, M)];
  return s;
}

// ffn_sub_norm of all of m (`mid`, M x I) in every block, into `staged` as y: m comes into shared memory with all
// of a thread's 16-byte loads in flight at once (one L2 round trip); then each thread owns pieces of 8 columns
// p = threadIdx.x + k * kMlpThreads of every token: sums of squares, then norm and absolute maxima (into
// scratch[kMlpWarps * kMaxTok + t]).  Token loops are not unrolled (this code runs once per launch: its size
// costs instruction fetches; unrolled, the sub-norm alone took 4400 cycles, rolled 1600).
template <typename T>
__device__ __forceinline__ void subnorm_in_passes(const MlpPlan& p, float eps, const void* mid, const T* w_sub,
                                                  T* staged, float* scratch, TimelineMark loaded = {},
                                                  TimelineMark summed = {}) {
  const int npieces = p.I / 8, pieces = p.M * npieces, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4* src = static_cast<const uint4*>(mid);
  constexpr int kLoads = 8;  // pieces in flight per thread
#pragma unroll 1
  for (int base = 0; base < pieces; base += kLoads * kMlpThreads) {
    uint4 v[kLoads];
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int i = base + k * kMlpThreads + threadIdx.x;
      if (i < pieces) v[k] = __ldcg(src + i);
    }
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int i = base + k * kMlpThreads + threadIdx.x;
      if (i < pieces) reinterpret_cast<uint4*>(staged)[i] = v[k];
    }
  }
  __syncthreads();
  loaded();  // all of m in shared memory
  float* total = scratch + kMlpWarps * kMaxTok;  // per-token block results
#pragma unroll 1
  for (int tok = 0; tok < p.M; ++tok) {
    float ss = 0.f;
#pragma unroll 1
    for (int pc = threadIdx.x; pc < npieces; pc += kMlpThreads) {
      const uint4 raw = reinterpret_cast<const uint4*>(staged + tok * p.I)[pc];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss = __fmaf_rn(to_f<T>(e[i]), to_f<T>(e[i]), ss);
    }
    warp_reduce_to<false>(ss, scratch + warp * kMaxTok + tok, lane);
  }
  finish_block_reduce<false>(p.M, scratch);
  summed();  // the sub-norm's sums of squares
#pragma unroll 1
  for (int tok = 0; tok < p.M; ++tok) {
    const float r = rsqrtf(__fadd_rn(__fdiv_rn(total[tok], static_cast<float>(p.I)), eps));
    float amax = 0.f;
#pragma unroll 1
    for (int pc = threadIdx.x; pc < npieces; pc += kMlpThreads) {
      uint4* piece = reinterpret_cast<uint4*>(staged + tok * p.I) + pc;
      uint4 raw = *piece;
      amax = fmaxf(amax, rms_normed_piece<T>(raw, reinterpret_cast<const uint4*>(w_sub)[pc], r));
      *piece = raw;  // y (exact: rms_normed rounds to T)
    }
    warp_reduce_to<true>(amax, scratch + warp * kMaxTok + tok, lane);
  }
  finish_block_reduce<true>(p.M, scratch);
}

// Tokens and pieces of 8 columns per thread up to which the sub-norm runs in registers (subnorm_in_registers).
constexpr int kRegisterTokens = 2, kRegisterPieces = 2;

// Whether plan p's sub-norm fits subnorm_in_registers: at most kRegisterTokens tokens, and every piece of a
// quantized row (its zero padding included) owned by one of kRegisterPieces per thread.
__device__ __forceinline__ bool subnorm_fits_registers(const MlpPlan& p) {
  return p.M <= kRegisterTokens && p.qp / 8 <= kRegisterPieces * kMlpThreads;
}

// The sum over the warps, in warp order, of per-warp values at slots[w * kMaxTok] (finish_block_reduce's order),
// read by every thread: no second barrier.
template <bool kMax>
__device__ __forceinline__ float sum_of_warps(const float* slots) {
  float s = slots[0];
#pragma unroll
  for (int w = 1; w < kMlpWarps; ++w) s = kMax ? fmaxf(s, slots[w * kMaxTok]) : s + slots[w * kMaxTok];
  return s;
}

// ffn_sub_norm and the int8 quantization of m, with m held in registers: the same bits as subnorm_in_passes followed
// by the kernel's quantization pass (same per-thread piece order, same warp and block orders of the sums), in three
// barriers instead of six and without m or y in shared memory.  Each thread loads its pieces
// p = threadIdx.x + k * kMlpThreads of every token at once, adds their squares, and after one barrier reads the
// warps' sums itself; norms its pieces in place; after a second barrier reads the warps' maxima and writes its
// pieces' int8 values (zeros in the padding past I) to qs (pitch p.qp), and the per-token scales to q_scale.
template <typename T>
__device__ __forceinline__ void subnorm_in_registers(const MlpPlan& p, float eps, const void* mid, const T* w_sub,
                                                     unsigned char* qs, float* scratch, float* q_scale,
                                                     TimelineMark loaded = {}, TimelineMark summed = {}) {
  const int npieces = p.I / 8, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4* src = static_cast<const uint4*>(mid);
  uint4 v[kRegisterTokens][kRegisterPieces];
#pragma unroll
  for (int tok = 0; tok < kRegisterTokens; ++tok)
#pragma unroll
    for (int k = 0; k < kRegisterPieces; ++k) {
      const int pc = threadIdx.x + k * kMlpThreads;
      v[tok][k] = tok < p.M && pc < npieces ? __ldcg(src + tok * npieces + pc) : make_uint4(0u, 0u, 0u, 0u);
    }
  float* sums = scratch;                          // [warp][token]
  float* maxima = scratch + kMlpWarps * kMaxTok;  // [warp][token], apart: the sums may still be read
#pragma unroll
  for (int tok = 0; tok < kRegisterTokens; ++tok) {
    if (tok >= p.M) break;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kRegisterPieces; ++k) {
      if (threadIdx.x + k * kMlpThreads >= npieces) break;
      const T* e = reinterpret_cast<const T*>(&v[tok][k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss = __fmaf_rn(to_f<T>(e[i]), to_f<T>(e[i]), ss);
    }
    warp_reduce_to<false>(ss, sums + warp * kMaxTok + tok, lane);
  }
  loaded();  // (this thread's part of m loaded and summed)
  __syncthreads();
  summed();  // the sub-norm's sums of squares
#pragma unroll
  for (int tok = 0; tok < kRegisterTokens; ++tok) {
    if (tok >= p.M) break;
    const float r = rsqrtf(__fadd_rn(__fdiv_rn(sum_of_warps<false>(sums + tok), static_cast<float>(p.I)), eps));
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kRegisterPieces; ++k) {
      const int pc = threadIdx.x + k * kMlpThreads;
      if (pc >= npieces) break;
      amax = fmaxf(amax, rms_normed_piece<T>(v[tok][k], reinterpret_cast<const uint4*>(w_sub)[pc], r));
    }
    warp_reduce_to<true>(amax, maxima + warp * kMaxTok + tok, lane);
  }
  __syncthreads();
#pragma unroll
  for (int tok = 0; tok < kRegisterTokens; ++tok) {
    if (tok >= p.M) break;
    const float amax = fmaxf(sum_of_warps<true>(maxima + tok), 1e-5f);
    const float inv = quant_inverse(amax);
    if (threadIdx.x == 0) q_scale[tok] = quant_scale(amax);
#pragma unroll
    for (int k = 0; k < kRegisterPieces; ++k) {
      const int pc = threadIdx.x + k * kMlpThreads;
      if (pc >= p.qp / 8) break;
      const uint2 out = pc < npieces ? quantize_piece<T>(v[tok][k], inv) : make_uint2(0u, 0u);  // zeros past I
      *reinterpret_cast<uint2*>(qs + tok * p.qp + 8 * pc) = out;
    }
  }
  __syncthreads();
}

// The post-attention norm in the kernel (BitnetMlpArgs::norm_input): x = int8 per-token quantization of
// RMSNorm(h) * w for h = T(res + delta), into the block's x rows (pitch p.xp, zeros past H) and x_scale, with
// norm_quant.cu's bits (bitlab_norm_rows.cuh); block 0 writes h to res_out.  The rows and the weight are staged
// in the down tiles' region, whose copies start after phase A (the plan reserves norm_rows_stage_bytes there).
__device__ __forceinline__ NormInputArgs post_attention_norm(const BitnetMlpArgs& a) {
  NormInputArgs n{};
  n.a = a.res;
  n.b = a.delta;
  n.weight = a.norm_weight;
  n.h = a.res_out;
  n.dtype = a.dtype;
  n.mode = 1;
  n.K = a.H;
  n.eps = a.norm_eps;
  return n;
}
__device__ __forceinline__ NormRowsSmem post_attention_norm_smem(const MlpPlan& p, unsigned char* smem,
                                                                 float* x_scale) {
  return norm_rows_smem(smem + p.off_b, p.M, p.H, smem + p.off_x, p.xp, p.Hp, x_scale);
}

template <typename T>
__global__ void __launch_bounds__(kMlpThreads, 1) bitnet_mlp_kernel(BitnetMlpArgs a, MlpPlan p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[(2 * kMlpWarps + 1) * kMaxTok];  // per-warp sums and maxima, block results
  __shared__ float row_scale[3][kMlpMaxTiles * 16];  // gate, up, down scales of the block's rows
  __shared__ float token_scale[2][kMaxTok];  // x_scale, then m's quantization scale
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);  // phase A tiles, then phase B tiles
  const int a0 = blockIdx.x * p.PA / p.G, na = (blockIdx.x + 1) * p.PA / p.G - a0;
  const int b0 = blockIdx.x * p.PB / p.G, nb = (blockIdx.x + 1) * p.PB / p.G - b0;
  const int bytes_a = p.C1 * kTileChunkBytes, bytes_b = p.C2 * kTileChunkBytes;
  BITLAB_TIMELINE_BEGIN(a.down_wq);  // stage clocks in benchmarks/csrc/mlp_timeline.cu only
  BITLAB_STAMP(0);

  // Weights are written by no kernel: their copies start before the wait for the producer of x.  The
  // gate/up tiles go first; the down tiles after this block's phase A (they land during the barrier
  // and the sub-norm instead of taking bandwidth from phase A).
  if (threadIdx.x == 0) {
    for (int i = 0; i < na + nb; ++i) mbar_init(&bars[i], 1);
    mbar_init_fence();
    for (int i = 0; i < na; ++i) {
      const long src = static_cast<long>(a0 + i) * p.C1 * kTileChunkWords;
      mbar_arrive_expect_bytes(&bars[i], 2 * bytes_a);
      copy_in_pieces(smem + p.off_a + (2 * i) * bytes_a, a.gate_wq + src, bytes_a, &bars[i], a.copy_piece);
      copy_in_pieces(smem + p.off_a + (2 * i + 1) * bytes_a, a.up_wq + src, bytes_a, &bars[i], a.copy_piece);
    }
  }
  BITLAB_STAMP(1);  // the gate/up copies issued
  if (threadIdx.x < na * 16) {
    row_scale[0][threadIdx.x] = a.gate_scale[a0 * 16 + threadIdx.x];
    row_scale[1][threadIdx.x] = a.up_scale[a0 * 16 + threadIdx.x];
  }
  if (threadIdx.x < nb * 16 && b0 * 16 + threadIdx.x < p.H) row_scale[2][threadIdx.x] = a.down_scale[b0 * 16 + threadIdx.x];
  T* w_sub = reinterpret_cast<T*>(smem + p.off_w);
#pragma unroll 1
  for (int i = threadIdx.x; i < p.I / 8; i += kMlpThreads)  // I % 16 == 0: 16-byte pieces
    reinterpret_cast<uint4*>(w_sub)[i] = __ldg(reinterpret_cast<const uint4*>(a.sub_weight) + i);
  if (a.norm_input) norm_rows_copy_weight(post_attention_norm(a), post_attention_norm_smem(p, smem, nullptr).weight);
  pdl_wait();
  BITLAB_STAMP(2);  // the wait for x returned

  // x into shared memory, zero-padded to Hp columns: the int8 rows given, or the post-attention norm's.
  unsigned char* xs = smem + p.off_x;
  const bool vec = a.ldx % 16 == 0 && reinterpret_cast<uintptr_t>(a.xq) % 16 == 0;
  if (a.norm_input)
    norm_rows_into_x<T>(post_attention_norm(a), p.M, post_attention_norm_smem(p, smem, token_scale[0]), blockIdx.x == 0);
#pragma unroll 1
  for (int idx = threadIdx.x; !a.norm_input && idx < p.M * (p.xp / 16); idx += kMlpThreads) {
    const int tok = idx / (p.xp / 16), c = (idx % (p.xp / 16)) * 16;
    const int8_t* row = a.xq + tok * a.ldx;
    union {
      uint4 v;
      unsigned char b[16];
    } piece;
    if (vec && c + 16 <= p.H) {
      piece.v = __ldg(reinterpret_cast<const uint4*>(row + c));
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) piece.b[e] = c + e < p.H ? static_cast<unsigned char>(row[c + e]) : 0;
    }
    *reinterpret_cast<uint4*>(xs + tok * p.xp + c) = piece.v;
  }
  if (threadIdx.x < p.M && !a.norm_input) token_scale[0][threadIdx.x] = a.x_scale[threadIdx.x];
  __syncthreads();  // also: the barriers are initialised before any warp waits on them
  BITLAB_STAMP(3);  // x in shared memory
  pdl_launch_dependents();

  // Phase A: gate and up of the block's pair tiles, then m = relu(g)^2 * u into `mid`.
  int* part_a = reinterpret_cast<int*>(smem + p.off_b);  // the down tiles' region: their copies start later
  // An even number of pair tiles is multiplied two pairs at a time (the blocks with the most tiles set the
  // grid barrier's time); partial_index puts the sums where one pair at a time would.
  if (na % 2 == 0 && !a.gate_up_apart)
    block_tiles_gemv<4, 2>(smem + p.off_a, na / 2, p.C1, bars, xs, p.xp, p.M, part_a, BITLAB_MARK(4));
  else
    block_tiles_gemv<2>(smem + p.off_a, na, p.C1, bars, xs, p.xp, p.M, part_a, BITLAB_MARK(4));
  BITLAB_STAMP(5);  // gate and up multiplied (4: the first pair tile landed)
  T* mid = static_cast<T*>(a.mid);
#pragma unroll 1
  for (int idx = threadIdx.x; idx < na * 16 * p.M; idx += kMlpThreads) {
    const int tok = idx % p.M, row = (idx / p.M) % 16, lt = idx / (16 * p.M);
    const int j = (a0 + lt) * 16 + row;  // < I: I % 16 == 0
    const float xsc = token_scale[0][tok];
    const float g = round_t<T>(__fmul_rn(__fmul_rn(static_cast<float>(reduced<2>(part_a, na, lt, 0, row, tok, p.M)), xsc),
                                         row_scale[0][lt * 16 + row]));
    const float u = round_t<T>(__fmul_rn(__fmul_rn(static_cast<float>(reduced<2>(part_a, na, lt, 1, row, tok, p.M)), xsc),
                                         row_scale[1][lt * 16 + row]));
    mid[static_cast<long>(tok) * p.I + j] = from_f<T>(relu2_gate<T>(g, u));
  }
  BITLAB_STAMP(6);  // this thread's m written

  // Grid barrier: every block's m is written.  A block with an even number of down tiles multiplies them
  // in pairs (two m-tiles per chunk load: the 28 blocks of BitNet 2B with two tiles finish sooner).
  const bool down_pairs = nb % 2 == 0 && !a.down_tiles_apart;
  __syncthreads();
  if (threadIdx.x == 0) {
    // Arrival releases what the block wrote (its threads' writes are ordered before by __syncthreads); the
    // spin's acquire loads order the reads after it.  BITLAB_MLP_BARRIER=fence: __threadfence around a
    // relaxed atomic, as before (0.5 us slower per MLP at one token on the H200).
    unsigned long long old;
    if (a.fenced_barrier) {
      __threadfence();
      old = atomicAdd(a.barrier, 1ull);
    } else {
      asm volatile("atom.add.release.gpu.global.u64 %0, [%1], 1;" : "=l"(old) : "l"(a.barrier) : "memory");
    }
    const unsigned long long target = (old / p.G + 1) * p.G;
    unsigned long long now = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(a.barrier) : "memory");
    } while (now < target);
    if (a.fenced_barrier) __threadfence();
    BITLAB_STAMP(7);  // the grid barrier passed
  } else if (threadIdx.x == kMlpThreads - 32) {
    // Meanwhile the last warp starts the down tiles' copies: the phase A partials in their region are read.
    // With down_pairs, tiles 2 k and 2 k + 1 share barrier k (phase B multiplies them together).
    fence_proxy_async_shared();
    for (int i = 0; i < nb; ++i) {
      const long src = static_cast<long>(b0 + i) * p.C2 * kTileChunkWords;
      uint64_t* bar = &bars[na + (down_pairs ? i / 2 : i)];
      if (!down_pairs || i % 2 == 0) mbar_arrive_expect_bytes(bar, (down_pairs ? 2 : 1) * bytes_b);
      copy_in_pieces(smem + p.off_b + i * bytes_b, a.down_wq + src, bytes_b, bar, a.copy_piece);
    }
  }
  __syncthreads();

  // ffn_sub_norm of all of m in every block, and m's int8 quantization into qs: in registers where it fits
  // (one or two tokens of BitNet 2B), else m and y pass through shared memory.
  unsigned char* qs = smem + p.off_q;
  if (subnorm_fits_registers(p) && !a.subnorm_passes) {
    subnorm_in_registers<T>(p, a.eps, a.mid, w_sub, qs, scratch, token_scale[1], BITLAB_MARK(8), BITLAB_MARK(9));
    BITLAB_STAMP(10);  // (the stamps of this path: 8 summed in registers, 9 sums read, 10 = 11 quantized)
  } else {
    T* staged = reinterpret_cast<T*>(smem + p.off_a);  // m, then y = the normed m
    const int npieces = p.I / 8;  // 8 columns each
    subnorm_in_passes<T>(p, a.eps, a.mid, w_sub, staged, scratch, BITLAB_MARK(8), BITLAB_MARK(9));
    BITLAB_STAMP(10);  // normed, absolute maxima
    const float* amax_of = scratch + kMlpWarps * kMaxTok;  // per token
#pragma unroll 1
    for (int tok = 0; tok < p.M; ++tok) {
      const float amax = fmaxf(amax_of[tok], 1e-5f);
      const float inv = quant_inverse(amax);
      if (threadIdx.x == 0) token_scale[1][tok] = quant_scale(amax);
#pragma unroll 1
      for (int pc = threadIdx.x; pc < p.qp / 8; pc += kMlpThreads) {
        uint2 out = make_uint2(0u, 0u);  // zeros past I
        if (pc < npieces) out = quantize_piece<T>(reinterpret_cast<const uint4*>(staged + tok * p.I)[pc], inv);
        *reinterpret_cast<uint2*>(qs + tok * p.qp + 8 * pc) = out;
      }
    }
    __syncthreads();
  }
  BITLAB_STAMP(11);  // quantized

  // Phase B: down projection of the quantized m.
  int* part_b = reinterpret_cast<int*>(smem + p.off_a);
  // (Tiles taken in pairs leave their partial sums where one at a time would: partial_index.)
  if (down_pairs)
    block_tiles_gemv<2>(smem + p.off_b, nb / 2, p.C2, bars + na, qs, p.qp, p.M, part_b, BITLAB_MARK(12));
  else
    block_tiles_gemv<1>(smem + p.off_b, nb, p.C2, bars + na, qs, p.qp, p.M, part_b, BITLAB_MARK(12));
  BITLAB_STAMP(13);  // down multiplied (12: the first down tile landed)
  T* y = static_cast<T*>(a.y);
#pragma unroll 1
  for (int idx = threadIdx.x; idx < nb * 16 * p.M; idx += kMlpThreads) {
    const int tok = idx % p.M, row = (idx / p.M) % 16, lt = idx / (16 * p.M);
    const int n = (b0 + lt) * 16 + row;
    if (n < p.H) {
      const float s = static_cast<float>(reduced<1>(part_b, nb, lt, 0, row, tok, p.M));
      y[static_cast<long>(tok) * p.H + n] = from_f<T>(__fmul_rn(__fmul_rn(s, token_scale[1][tok]), row_scale[2][lt * 16 + row]));
    }
  }
  BITLAB_STAMP(14);  // this thread's y written
}

struct DeviceLimits {
  int sms = 0, smem_optin = 0, major = 0;
};
DeviceLimits device_limits() {
  DeviceLimits d;
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  // The kernel's static shared memory (reduction scratch, token and row scales: ~1.4 KB) comes out of
  // the same budget.
  d.smem_optin -= 4096;
  return d;
}

template <typename T>
cudaError_t launch_typed(const BitnetMlpArgs& a, const MlpPlan& p, cudaStream_t stream) {
  static int configured = 0;  // the largest dynamic shared memory this instantiation was allowed so far
  if (p.smem > configured) {
    const cudaError_t err =
        cudaFuncSetAttribute(bitnet_mlp_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem);
    if (err != cudaSuccess) return err;
    configured = p.smem;
  }
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bitnet_mlp_kernel<T>, kMlpThreads, p.smem);
  if (per_sm < 1) return cudaErrorInvalidConfiguration;  // the grid barrier needs every block resident
  return launch_maybe_pdl(bitnet_mlp_kernel<T>, dim3(p.G), dim3(kMlpThreads), p.smem, stream, a.pdl != 0, a, p);
}

}  // namespace

int bitnet_mlp_smem_bytes(int M, int H, int I, int dtype, bool norm) {
  const DeviceLimits d = device_limits();
  if (d.major < 9 || (dtype != kDtypeHalf && dtype != kDtypeBFloat16)) return 0;
  if (norm && (H % 8 != 0 || H > kNormRowsMaxK || M * H > kBitnetMlpNormElements)) return 0;
  return make_plan(M, H, I, 2, d.sms, d.smem_optin, norm).smem;
}

// Bytes per bulk copy of the weight tiles: kCopyPiece, or BITLAB_MLP_COPY_PIECE (for A/B timing; read per
// launch; rounded down to a multiple of 16, at least 16).
int copy_piece_bytes() {
  const char* env = std::getenv("BITLAB_MLP_COPY_PIECE");
  const long bytes = env ? std::atol(env) / 16 * 16 : kCopyPiece;
  return bytes < 16 ? 16 : (bytes > (1 << 19) ? (1 << 19) : static_cast<int>(bytes));
}

cudaError_t launch_bitnet_mlp(const BitnetMlpArgs& a, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  const DeviceLimits d = device_limits();
  if (d.major < 9) return cudaErrorNotSupported;  // bulk copies and mbarrier transaction counts
  if (a.norm_input && (a.H % 8 != 0 || a.H > kNormRowsMaxK || a.M * a.H > kBitnetMlpNormElements))
    return cudaErrorInvalidValue;
  const MlpPlan p = make_plan(a.M, a.H, a.I, 2, d.sms, d.smem_optin, a.norm_input != 0);
  if (p.smem == 0) return cudaErrorInvalidValue;
  BitnetMlpArgs args = a;
  args.down_tiles_apart = env_is("BITLAB_MLP_DOWN", "single");  // for A/B timing (read per launch)
  args.gate_up_apart = env_is("BITLAB_MLP_GATE_UP", "single");
  args.fenced_barrier = env_is("BITLAB_MLP_BARRIER", "fence");
  args.subnorm_passes = env_is("BITLAB_MLP_SUBNORM", "passes");
  args.copy_piece = copy_piece_bytes();
  if (a.dtype == kDtypeHalf) return launch_typed<__half>(args, p, stream);
  if (a.dtype == kDtypeBFloat16) return launch_typed<__nv_bfloat16>(args, p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitlab
