// Where the one-token attention kernel's time goes, stage by stage (benchmarks/bench_attention_timeline.py builds
// and runs it).  It compiles backends/cuda_ext/csrc/decode_attention.cu with BITLAB_ATTN_TIMELINE, so thread 0 of
// every block of the recorded launch (the last layer's) stores clock64() at each stage (ATTN_STAMP) and
// %globaltimer at the first and last.
//
// The graph mimics BitNet 2B's decode at one layer per pair: a "projection" kernel (reads its own weight bytes,
// then writes the q/k/v row the attention reads, letting its dependent start at once, as the GEMVs do) and the
// attention kernel, LAYERS pairs over separate caches and weights (more bytes than L2 holds).  Arguments:
//   attention_timeline B S POS LAYERS PDL REPS
// Prints "span_us <median per layer pair>", "clock_khz <SM clock>", then for every block of the last layer's
// attention one line "block <i> <ns at start> <ns at end> <cycles at stages 1..10 from stage 0, -1 if unset>".
#define BITLAB_ATTN_TIMELINE 1
#include "../../backends/cuda_ext/csrc/decode_attention.cu"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "graph_timing.cuh"

namespace {

constexpr int kHeads = 20, kKvHeads = 5, kHeadDim = 128;          // BitNet 2B
constexpr long kProjectionBytes = 3840L * 2560 / 4;                // its q/k/v weights, 2 bits each

// Reads its weight bytes (before the wait, as the GEMVs prefetch theirs), then writes the q/k/v rows.
__global__ void projection_kernel(const uint4* weights, long words, const __nv_bfloat16* src, __nv_bfloat16* dst,
                                  int n) {
  bitlab::pdl_launch_dependents();
  unsigned acc = 0;
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += static_cast<long>(gridDim.x) * blockDim.x) {
    const uint4 w = __ldg(weights + i);
    acc ^= w.x ^ w.y ^ w.z ^ w.w;
  }
  bitlab::pdl_wait();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    dst[i] = __float2bfloat16(__bfloat162float(src[i]) + (acc == 0x12345678u ? 1e-30f : 0.f));
}

__global__ void fill_random(__nv_bfloat16* p, long n, unsigned seed) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16((static_cast<float>(h & 0xffff) / 32768.f - 1.f));
  }
}

struct Layer {
  __nv_bfloat16 *qkv, *src, *k_cache, *v_cache, *out;
  uint4* weights;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s B S POS LAYERS PDL REPS\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), S = std::atoi(argv[2]), pos = std::atoi(argv[3]), layers = std::atoi(argv[4]);
  const int pdl = std::atoi(argv[5]), reps = std::atoi(argv[6]);
  const int row = (kHeads + 2 * kKvHeads) * kHeadDim;
  const long cache = static_cast<long>(B) * kKvHeads * S * kHeadDim;
  std::vector<Layer> ls(layers);
  for (int l = 0; l < layers; ++l) {
    Layer& L = ls[l];
    CHECK(cudaMalloc(&L.qkv, sizeof(__nv_bfloat16) * B * row));
    CHECK(cudaMalloc(&L.src, sizeof(__nv_bfloat16) * B * row));
    CHECK(cudaMalloc(&L.k_cache, sizeof(__nv_bfloat16) * cache));
    CHECK(cudaMalloc(&L.v_cache, sizeof(__nv_bfloat16) * cache));
    CHECK(cudaMalloc(&L.out, sizeof(__nv_bfloat16) * B * kHeads * kHeadDim));
    CHECK(cudaMalloc(&L.weights, kProjectionBytes));
    fill_random<<<256, 256>>>(L.src, static_cast<long>(B) * row, 17u * l + 1);
    fill_random<<<256, 256>>>(L.k_cache, cache, 17u * l + 2);
    fill_random<<<256, 256>>>(L.v_cache, cache, 17u * l + 3);
    fill_random<<<256, 256>>>(reinterpret_cast<__nv_bfloat16*>(L.weights), kProjectionBytes / 2, 17u * l + 4);
  }
  __nv_bfloat16 *cosv, *sinv;
  uint8_t* mask;
  long* slot;
  CHECK(cudaMalloc(&cosv, sizeof(__nv_bfloat16) * B * kHeadDim));
  CHECK(cudaMalloc(&sinv, sizeof(__nv_bfloat16) * B * kHeadDim));
  fill_random<<<8, 256>>>(cosv, static_cast<long>(B) * kHeadDim, 91u);
  fill_random<<<8, 256>>>(sinv, static_cast<long>(B) * kHeadDim, 92u);
  CHECK(cudaMalloc(&mask, static_cast<size_t>(B) * S));
  CHECK(cudaMemset(mask, 1, static_cast<size_t>(B) * S));
  CHECK(cudaMalloc(&slot, sizeof(long)));
  const long pos_l = pos;
  CHECK(cudaMemcpy(slot, &pos_l, sizeof(long), cudaMemcpyHostToDevice));
  CHECK(cudaDeviceSynchronize());

  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < layers; ++l) {
    const Layer& L = ls[l];
    CHECK(bitlab::launch_maybe_pdl(projection_kernel, dim3(bitlab::device_sm_count()), dim3(256), 0, stream, true,
                                   static_cast<const uint4*>(L.weights), kProjectionBytes / 16,
                                   static_cast<const __nv_bfloat16*>(L.src), L.qkv, B * row));
    bitlab::DecodeAttentionArgs a{};
    a.q = L.qkv;
    a.k = L.qkv + kHeads * kHeadDim;
    a.v = L.qkv + (kHeads + kKvHeads) * kHeadDim;
    a.q_row = a.k_row = a.v_row = row;
    a.cos = cosv;
    a.sin = sinv;
    a.k_cache = L.k_cache;
    a.v_cache = L.v_cache;
    a.slot = slot;
    a.mask = mask;
    a.mask_row = S;
    a.out = L.out;
    a.dtype = bitlab::kDtypeBFloat16;
    a.B = B;
    a.H = kHeads;
    a.KVH = kKvHeads;
    a.D = kHeadDim;
    a.S = S;
    a.scale = 0.08838834764831845f;
    a.pdl = pdl;
    CHECK(bitlab::launch_decode_attention(a, stream));
  }
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));

  std::printf("span_us %.4f\n", median_replay_ms(exec, stream, reps) * 1000.f / layers);

  // One more replay with the stamps cleared, recording the last layer's attention launch.
  static long long clocks[bitlab::kTimelineBlocks][bitlab::kTimelineStages];
  static unsigned long long ns[bitlab::kTimelineBlocks][2];
  std::memset(clocks, 0, sizeof(clocks));
  std::memset(ns, 0, sizeof(ns));
  CHECK(cudaMemcpyToSymbol(bitlab::g_attention_clock, clocks, sizeof(clocks)));
  CHECK(cudaMemcpyToSymbol(bitlab::g_attention_ns, ns, sizeof(ns)));
  const unsigned long long recorded = reinterpret_cast<unsigned long long>(ls[layers - 1].k_cache);
  CHECK(cudaMemcpyToSymbol(bitlab::g_attention_cache, &recorded, sizeof(recorded)));
  CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaStreamSynchronize(stream));
  CHECK(cudaMemcpyFromSymbol(clocks, bitlab::g_attention_clock, sizeof(clocks)));
  CHECK(cudaMemcpyFromSymbol(ns, bitlab::g_attention_ns, sizeof(ns)));
  int khz = 0;
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  std::printf("clock_khz %d\n", khz);
  for (int b = 0; b < bitlab::kTimelineBlocks; ++b) {
    if (clocks[b][0] == 0) continue;
    std::printf("block %d %llu %llu", b, ns[b][0], ns[b][1]);
    for (int s = 1; s < bitlab::kTimelineStages; ++s)
      std::printf(" %lld", clocks[b][s] ? clocks[b][s] - clocks[b][0] : -1LL);
    std::printf("\n");
  }
  return 0;
}
