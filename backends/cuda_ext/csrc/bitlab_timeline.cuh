// Stage clocks for the timeline probes in benchmarks/csrc (bench_attention_timeline.py, bench_mlp_timeline.py).
// Compiled in only where BITLAB_TIMELINE is defined (a probe that includes a kernel's .cu file): the extension's
// kernels carry none of it, and their code is unchanged.
//
// A kernel opens its record with BITLAB_TIMELINE_BEGIN(key): it records only in the launch whose `key` (an
// argument's address) equals g_timeline_key, set by the probe.  Then thread 0 of each block stores clock64()
// at each BITLAB_STAMP(stage) (stage 0: the start) and %globaltimer at stage 0 and at its latest stamp.  A
// helper the stage falls in takes a TimelineMark (BITLAB_MARK(stage); empty outside the probes) and calls it.
#pragma once

#ifdef BITLAB_TIMELINE
namespace bitlab {
constexpr int kTimelineStages = 16, kTimelineBlocks = 2048;
__device__ long long g_timeline_clock[kTimelineBlocks][kTimelineStages];
__device__ unsigned long long g_timeline_ns[kTimelineBlocks][2];  // at stage 0, at the latest stamp
__device__ unsigned long long g_timeline_key;                     // the recorded launch's key

__device__ __forceinline__ bool timeline_recorded(const void* key) {
  return threadIdx.x == 0 && blockIdx.x < kTimelineBlocks && reinterpret_cast<unsigned long long>(key) == g_timeline_key;
}
__device__ __forceinline__ void timeline_stamp(bool recorded, int stage) {
  if (!recorded) return;
  g_timeline_clock[blockIdx.x][stage] = clock64();
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  g_timeline_ns[blockIdx.x][stage == 0 ? 0 : 1] = ns;
}
struct TimelineMark {
  bool recorded;
  int stage;
  __device__ __forceinline__ void operator()() const { timeline_stamp(recorded, stage); }
};
}  // namespace bitlab
#define BITLAB_TIMELINE_BEGIN(key) const bool bitlab_timeline_on = ::bitlab::timeline_recorded(key)
#define BITLAB_STAMP(stage) ::bitlab::timeline_stamp(bitlab_timeline_on, stage)
#define BITLAB_MARK(stage) (::bitlab::TimelineMark{bitlab_timeline_on, stage})
#else
namespace bitlab {
struct TimelineMark {
  __device__ __forceinline__ void operator()() const {}
};
}  // namespace bitlab
#define BITLAB_TIMELINE_BEGIN(key)
#define BITLAB_STAMP(stage)
#define BITLAB_MARK(stage) (::bitlab::TimelineMark{})
#endif
