// What running code that is not in a multiprocessor's instruction cache costs (benchmarks/bench_code_fetch.py
// builds and runs it).
//
// A batch-1 decode step launches a chain of short kernels, each running most of its code once per launch;
// BitNet 2B's layer runs ~150 KB of distinct code.  If the instruction caches hold less than that, every kernel of
// every layer fetches its code from L2 again.  This probe measures it with kernels of straight-line code (KB
// kilobytes of independent FFMAs, eight chains per thread, 16 bytes each: 64 per KB, executed once):
//   * a CUDA graph of LAUNCHES launches cycling through N distinct kernels of KB kilobytes (footprint N x KB);
//     N = 1 is the same kernel again and again (its code stays cached);
//   * per launch and block, thread 0's clock64() from the block's start to after the code (all warps, block
//     barrier), and the graph's time per launch.
// Prints "clock_khz <k>", "sm <count>", and per case "run <threads> <kb> <kernels> <us per launch> <median
// cycles> <p90 cycles>".
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "code_flush.cuh"
#include "graph_timing.cuh"

namespace {

constexpr int kLaunches = 240;  // a multiple of every kernel count used

template <typename T>
T percentile(std::vector<T> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * (v.size() - 1))];
}

void run_case(const std::array<probe::CodeKernel, probe::kCodeKernels>& table, int kb, int n, int threads, int sms,
              float* out, long long* cycles, cudaStream_t stream) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < kLaunches; ++l) table[l % n]<<<sms, threads, 0, stream>>>(out, cycles, l, 0.999f);
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, stream));  // warm-up
  CHECK(cudaStreamSynchronize(stream));
  const float ms = median_replay_ms(exec, stream, 15);
  std::vector<long long> host(static_cast<size_t>(kLaunches) * sms);
  CHECK(cudaMemcpy(host.data(), cycles, host.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  // The first cycle of launches starts a replay: skip it.
  std::vector<long long> kept(host.begin() + static_cast<long>(n) * sms, host.end());
  std::printf("run %d %d %d %.4f %lld %lld\n", threads, kb, n, ms * 1000.f / kLaunches, percentile(kept, 0.5),
              percentile(kept, 0.9));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
}

}  // namespace

int main() {
  int sms = 0, khz = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  std::printf("clock_khz %d\nsm %d\n", khz, sms);
  float* out;
  long long* cycles;
  CHECK(cudaMalloc(&out, static_cast<size_t>(sms) * 1024 * sizeof(float)));
  CHECK(cudaMalloc(&cycles, static_cast<size_t>(kLaunches) * sms * sizeof(long long)));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  for (int threads : {128, 512}) {
    for (int n : {1, 2, 4, 6, 8, 10, 12, 16})
      run_case(probe::code_kernels<8>(), 8, n, threads, sms, out, cycles, stream);
    for (int n : {1, 2, 3, 4, 5, 6, 8, 12, 16})
      run_case(probe::code_kernels<32>(), 32, n, threads, sms, out, cycles, stream);
  }
  CHECK(cudaGetLastError());
  return 0;
}
