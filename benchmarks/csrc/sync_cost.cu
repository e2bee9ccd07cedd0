// What one synchronization of the whole GPU costs, two ways (benchmarks/bench_sync_cost.py builds and runs it):
//   * a kernel boundary: a CUDA graph of STEPS dependent kernels, launched plainly or as programmatic dependents
//     (griddepcontrol: the next kernel starts early and waits for the one before);
//   * a grid barrier: one persistent kernel crossing STEPS barriers (a 64-bit counter that only grows,
//     release add + acquire spin).
// Every step each block reads a value another block wrote in the step before, so the dependency is real.
// Prints one line per case: "<kind> <blocks> <pdl> <microseconds per step>".
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "graph_timing.cuh"

__global__ void step_kernel(float* buf, int step) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  if (threadIdx.x == 0) {
    const float v = buf[((step - 1) & 1) * 1024 + (blockIdx.x + 1) % gridDim.x];
    buf[(step & 1) * 1024 + blockIdx.x] = v + 1.f;
  }
}

__global__ void barrier_kernel(float* buf, unsigned long long* counter, int steps) {
  for (int s = 1; s <= steps; ++s) {
    if (threadIdx.x == 0) {
      const float v = *reinterpret_cast<volatile float*>(&buf[((s - 1) & 1) * 1024 + (blockIdx.x + 1) % gridDim.x]);
      buf[(s & 1) * 1024 + blockIdx.x] = v + 1.f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned long long target = static_cast<unsigned long long>(s) * gridDim.x;
      asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(counter) : "memory");
      unsigned long long seen;
      do {
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(counter) : "memory");
      } while (seen < target);
    }
    __syncthreads();
  }
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300, reps = 12;
  float* buf;
  unsigned long long* counter;
  CHECK(cudaMalloc(&buf, 2048 * sizeof(float)));
  CHECK(cudaMemset(buf, 0, 2048 * sizeof(float)));
  CHECK(cudaMalloc(&counter, sizeof(unsigned long long)));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int blocks : {1, sms, 2 * sms}) {
    for (int pdl = 0; pdl < 2; ++pdl) {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      for (int s = 1; s <= steps; ++s) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = blocks;
        cfg.blockDim = 256;
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = pdl;
        CHECK(cudaLaunchKernelEx(&cfg, step_kernel, buf, s));
      }
      CHECK(cudaStreamEndCapture(stream, &graph));
      CHECK(cudaGraphInstantiate(&exec, graph, 0));
      std::printf("kernel_boundary %d %d %.4f\n", blocks, pdl, median_replay_ms(exec, stream, reps) * 1000.f / steps);
      CHECK(cudaGraphExecDestroy(exec));
      CHECK(cudaGraphDestroy(graph));
    }
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      CHECK(cudaMemset(counter, 0, sizeof(unsigned long long)));
      CHECK(cudaEventRecord(e0, stream));
      barrier_kernel<<<blocks, 256, 0, stream>>>(buf, counter, steps);
      CHECK(cudaEventRecord(e1, stream));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaGetLastError());
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t);
    }
    std::printf("grid_barrier %d 0 %.4f\n", blocks, median(ms) * 1000.f / steps);
  }
  return 0;
}
