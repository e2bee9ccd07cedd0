// Where BitNet's MLP kernel spends its time, stage by stage (benchmarks/bench_mlp_timeline.py builds and runs
// it).  It compiles backends/cuda_ext/csrc/bitnet_mlp.cu with BITLAB_TIMELINE, so thread 0 of every block of
// the recorded launch (the last layer's) stores clock64() at each stage (BITLAB_STAMP, bitlab_timeline.cuh).
//
// The graph mimics BitNet 2B's decode at one layer per pair: a producer kernel standing in for the o
// projection and the norm (reads 2560 x 2560 ternary weight bytes, then writes the int8 rows x the MLP reads,
// letting its dependent start at once) and the MLP kernel launched as its programmatic dependent, as in the
// model; LAYERS pairs over separate weights (more bytes than L2 holds).  With NORM_IN = 1 the producer writes
// the o projection's bf16 output instead and the MLP kernel takes the residual add and the post-attention norm
// itself (BitnetMlpArgs::norm_input; stage 3 is then "x normed and quantized").  With EVICT_KB > 0, EVICT_KB
// kilobytes of other code run before each producer (code_flush.cuh): the MLP kernel starts with none of its code
// in the instruction caches, as in a model whose layer runs more code than they hold.  Arguments:
//   mlp_timeline M LAYERS REPS [NORM_IN [EVICT_KB]]
// Prints "span_us <median per layer pair>", "plan <blocks> <gate/up pair tiles> <down tiles>", "clock_khz <SM
// clock>", then for every block of the last layer's MLP one line "block <i> <ns at start> <ns at its last
// stamp> <cycles at stages 1..15 from stage 0, -1 if unset>".
#define BITLAB_TIMELINE 1
#include "../../backends/cuda_ext/csrc/bitnet_mlp.cu"
#include "code_flush.cuh"
#include "timeline_probe.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kHidden = 2560, kInter = 6912;        // BitNet 2B
constexpr long kProducerBytes = 2560L * 2560 / 4;   // the o projection's weights, 2 bits each
constexpr long kWordsPerTileChunk = 128;            // one 16-row tile's 128-column chunk: 512 bytes

__global__ void fill_uniform(float* p, long n, unsigned seed, float lo, float hi) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x)
    p[i] = lo + (hi - lo) * static_cast<float>(probe::hash(i, seed) & 0xffff) / 65536.f;
}
__global__ void fill_uniform_bf16(__nv_bfloat16* p, long n, unsigned seed, float lo, float hi) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(lo + (hi - lo) * static_cast<float>(probe::hash(i, seed) & 0xffff) / 65536.f);
}

struct Layer {
  int8_t *xq, *src;
  uint32_t *gate, *up, *down;
  float *gate_scale, *up_scale, *down_scale;
  __nv_bfloat16 *sub_weight, *mid, *y;
  __nv_bfloat16 *res, *delta_src, *delta, *norm_weight, *res_out;  // NORM_IN: the post-attention norm's inputs
  uint4* producer_weights;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M LAYERS REPS [NORM_IN [EVICT_KB]]\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[1]), layers = std::atoi(argv[2]), reps = std::atoi(argv[3]);
  const bool norm_in = argc > 4 && std::atoi(argv[4]) != 0;
  const int evict_kb = argc > 5 ? std::atoi(argv[5]) : 0;
  if (norm_in && M * kHidden > bitlab::kBitnetMlpNormElements) {
    std::fprintf(stderr, "NORM_IN: M x %d must be at most %d\n", kHidden, bitlab::kBitnetMlpNormElements);
    return 2;
  }
  if (M < 1 || M > bitlab::kBitnetMlpMaxTokens || layers < 1 || reps < 1) {
    std::fprintf(stderr, "M must lie in [1, %d], LAYERS and REPS at least 1\n", bitlab::kBitnetMlpMaxTokens);
    return 2;
  }
  const long chunks_h = (kHidden + 127) / 128, chunks_i = (kInter + 127) / 128;
  const long pair_tiles = kInter / 16, down_tiles = (kHidden + 15) / 16;
  const long gate_words = pair_tiles * chunks_h * kWordsPerTileChunk, down_words = down_tiles * chunks_i * kWordsPerTileChunk;
  std::vector<Layer> ls(layers);
  unsigned seed = 1;
  for (Layer& L : ls) {
    CHECK(cudaMalloc(&L.xq, static_cast<size_t>(M) * kHidden));
    CHECK(cudaMalloc(&L.src, static_cast<size_t>(M) * kHidden));
    CHECK(cudaMalloc(&L.gate, sizeof(uint32_t) * gate_words));
    CHECK(cudaMalloc(&L.up, sizeof(uint32_t) * gate_words));
    CHECK(cudaMalloc(&L.down, sizeof(uint32_t) * down_words));
    CHECK(cudaMalloc(&L.gate_scale, sizeof(float) * kInter));
    CHECK(cudaMalloc(&L.up_scale, sizeof(float) * kInter));
    CHECK(cudaMalloc(&L.down_scale, sizeof(float) * kHidden));
    CHECK(cudaMalloc(&L.sub_weight, sizeof(__nv_bfloat16) * kInter));
    CHECK(cudaMalloc(&L.mid, sizeof(__nv_bfloat16) * M * kInter));
    CHECK(cudaMalloc(&L.y, sizeof(__nv_bfloat16) * M * kHidden));
    CHECK(cudaMalloc(&L.producer_weights, kProducerBytes));
    for (__nv_bfloat16** t : {&L.res, &L.delta_src, &L.delta, &L.res_out})
      CHECK(cudaMalloc(t, sizeof(__nv_bfloat16) * M * kHidden));
    CHECK(cudaMalloc(&L.norm_weight, sizeof(__nv_bfloat16) * kHidden));
    fill_uniform_bf16<<<32, 256>>>(L.res, M * kHidden, seed++, -2.f, 2.f);
    fill_uniform_bf16<<<32, 256>>>(L.delta_src, M * kHidden, seed++, -1.f, 1.f);
    fill_uniform_bf16<<<32, 256>>>(L.norm_weight, kHidden, seed++, 0.5f, 1.5f);
    probe::fill_random<<<64, 256>>>(reinterpret_cast<uint32_t*>(L.src), M * kHidden / 4, seed++);
    probe::fill_random<<<256, 256>>>(L.gate, gate_words, seed++);
    probe::fill_random<<<256, 256>>>(L.up, gate_words, seed++);
    probe::fill_random<<<256, 256>>>(L.down, down_words, seed++);
    probe::fill_random<<<256, 256>>>(reinterpret_cast<uint32_t*>(L.producer_weights), kProducerBytes / 4, seed++);
    fill_uniform<<<32, 256>>>(L.gate_scale, kInter, seed++, 0.5f, 1.5f);
    fill_uniform<<<32, 256>>>(L.up_scale, kInter, seed++, 0.5f, 1.5f);
    fill_uniform<<<32, 256>>>(L.down_scale, kHidden, seed++, 0.5f, 1.5f);
    probe::fill_random<<<32, 256>>>(L.sub_weight, kInter, seed++);
  }
  float* x_scale;
  unsigned long long* barrier;
  CHECK(cudaMalloc(&x_scale, sizeof(float) * M));
  fill_uniform<<<1, 32>>>(x_scale, M, 77u, 0.005f, 0.02f);
  CHECK(cudaMalloc(&barrier, sizeof(unsigned long long)));
  CHECK(cudaMemset(barrier, 0, sizeof(unsigned long long)));
  CHECK(cudaDeviceSynchronize());

  auto mlp_args = [&](const Layer& L) {
    bitlab::BitnetMlpArgs a{};
    a.xq = L.xq;
    a.ldx = kHidden;
    a.x_scale = x_scale;
    a.gate_wq = L.gate;
    a.up_wq = L.up;
    a.down_wq = L.down;
    a.gate_scale = L.gate_scale;
    a.up_scale = L.up_scale;
    a.down_scale = L.down_scale;
    a.sub_weight = L.sub_weight;
    a.eps = 1e-5f;
    a.dtype = bitlab::kDtypeBFloat16;
    a.mid = L.mid;
    a.barrier = barrier;
    a.y = L.y;
    a.M = M;
    a.H = kHidden;
    a.I = kInter;
    a.pdl = 1;
    if (norm_in) {  // as the model with prepare_for_inference(norm_in_mlp=True): no x, the norm's inputs
      a.res = L.res;
      a.delta = L.delta;
      a.norm_weight = L.norm_weight;
      a.res_out = L.res_out;
      a.norm_eps = 1e-5f;
      a.norm_input = 1;
    }
    return a;
  };
  float* evict_scratch;
  CHECK(cudaMalloc(&evict_scratch, sizeof(float) * 128 * bitlab::device_sm_count()));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  CHECK(bitlab::launch_bitnet_mlp(mlp_args(ls[0]), stream));  // once outside the graph: the kernel's attributes
  CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (const Layer& L : ls) {
    if (evict_kb > 0) probe::evict_code(stream, evict_kb, bitlab::device_sm_count(), evict_scratch);
    if (norm_in)  // the producer writes the o projection's output (bf16), not int8 rows
      CHECK(bitlab::launch_maybe_pdl(probe::producer_kernel<__nv_bfloat16>, dim3(bitlab::device_sm_count()), dim3(256), 0,
                                     stream, true, static_cast<const uint4*>(L.producer_weights), kProducerBytes / 16,
                                     static_cast<const __nv_bfloat16*>(L.delta_src), L.delta, M * kHidden));
    else
      CHECK(bitlab::launch_maybe_pdl(probe::producer_kernel<int8_t>, dim3(bitlab::device_sm_count()), dim3(256), 0, stream, true,
                                     static_cast<const uint4*>(L.producer_weights), kProducerBytes / 16,
                                     static_cast<const int8_t*>(L.src), L.xq, M * kHidden));
    CHECK(bitlab::launch_bitnet_mlp(mlp_args(L), stream));
  }
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));

  std::printf("span_us %.4f\n", median_replay_ms(exec, stream, reps) * 1000.f / layers);
  const long most = pair_tiles > down_tiles ? pair_tiles : down_tiles;
  const long blocks = bitlab::device_sm_count() < most ? bitlab::device_sm_count() : most;
  std::printf("plan %ld %ld %ld\n", blocks, pair_tiles, down_tiles);
  probe::print_timeline(exec, stream, ls.back().down);  // the last layer's MLP
  return 0;
}
