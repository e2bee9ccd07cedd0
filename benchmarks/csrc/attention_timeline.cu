// Where the one-token attention kernel's time goes, stage by stage (benchmarks/bench_attention_timeline.py builds
// and runs it).  It compiles backends/cuda_ext/csrc/decode_attention.cu with BITLAB_TIMELINE, so thread 0 of
// every block of the recorded launch (the last layer's) stores clock64() at each stage (BITLAB_STAMP) and
// %globaltimer at the first and last (bitlab_timeline.cuh).
//
// The graph mimics BitNet 2B's decode at one layer per pair: a "projection" kernel (reads its own weight bytes,
// then writes the q/k/v row the attention reads, letting its dependent start at once, as the GEMVs do) and the
// attention kernel, LAYERS pairs over separate caches and weights (more bytes than L2 holds).  With EVICT_KB > 0,
// EVICT_KB kilobytes of other code run before each projection (code_flush.cuh): the attention kernel starts with
// none of its code in the instruction caches.  Arguments:
//   attention_timeline B S POS LAYERS PDL REPS [EVICT_KB]
// Prints "span_us <median per layer pair>", "clock_khz <SM clock>", then for every block of the last layer's
// attention one line "block <i> <ns at start> <ns at end> <cycles at stages 1..15 from stage 0, -1 if unset>".
#define BITLAB_TIMELINE 1
#include "../../backends/cuda_ext/csrc/decode_attention.cu"
#include "code_flush.cuh"
#include "timeline_probe.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kHeads = 20, kKvHeads = 5, kHeadDim = 128;          // BitNet 2B
constexpr long kProjectionBytes = 3840L * 2560 / 4;                // its q/k/v weights, 2 bits each

struct Layer {
  __nv_bfloat16 *qkv, *src, *k_cache, *v_cache, *out;
  uint4* weights;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s B S POS LAYERS PDL REPS [EVICT_KB]\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), S = std::atoi(argv[2]), pos = std::atoi(argv[3]), layers = std::atoi(argv[4]);
  const int pdl = std::atoi(argv[5]), reps = std::atoi(argv[6]);
  const int evict_kb = argc > 7 ? std::atoi(argv[7]) : 0;
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
    probe::fill_random<<<256, 256>>>(L.src, static_cast<long>(B) * row, 17u * l + 1);
    probe::fill_random<<<256, 256>>>(L.k_cache, cache, 17u * l + 2);
    probe::fill_random<<<256, 256>>>(L.v_cache, cache, 17u * l + 3);
    probe::fill_random<<<256, 256>>>(reinterpret_cast<uint32_t*>(L.weights), kProjectionBytes / 4, 17u * l + 4);
  }
  __nv_bfloat16 *cosv, *sinv;
  uint8_t* mask;
  long* slot;
  CHECK(cudaMalloc(&cosv, sizeof(__nv_bfloat16) * B * kHeadDim));
  CHECK(cudaMalloc(&sinv, sizeof(__nv_bfloat16) * B * kHeadDim));
  probe::fill_random<<<8, 256>>>(cosv, static_cast<long>(B) * kHeadDim, 91u);
  probe::fill_random<<<8, 256>>>(sinv, static_cast<long>(B) * kHeadDim, 92u);
  CHECK(cudaMalloc(&mask, static_cast<size_t>(B) * S));
  CHECK(cudaMemset(mask, 1, static_cast<size_t>(B) * S));
  CHECK(cudaMalloc(&slot, sizeof(long)));
  const long pos_l = pos;
  CHECK(cudaMemcpy(slot, &pos_l, sizeof(long), cudaMemcpyHostToDevice));
  CHECK(cudaDeviceSynchronize());

  float* evict_scratch;
  CHECK(cudaMalloc(&evict_scratch, sizeof(float) * 128 * bitlab::device_sm_count()));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < layers; ++l) {
    const Layer& L = ls[l];
    if (evict_kb > 0) probe::evict_code(stream, evict_kb, bitlab::device_sm_count(), evict_scratch);
    CHECK(bitlab::launch_maybe_pdl(probe::producer_kernel<__nv_bfloat16>, dim3(bitlab::device_sm_count()), dim3(256), 0, stream, true,
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

  probe::print_timeline(exec, stream, ls[layers - 1].k_cache);  // the last layer's attention
  return 0;
}
