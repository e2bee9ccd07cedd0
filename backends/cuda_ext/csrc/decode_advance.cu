// BitLab cuda_ext: a decode step's bookkeeping after its tokens are picked, in one kernel.
//
// After the model and the sampler, a step records each row's token and moves on: the token (or the pad id
// for a row that has stopped) goes to the output and becomes the next input, a stop token ends its row, the
// cache slot advances, and the next step's rotary positions and attention mask follow from the new slot.
// As torch ops that is a dozen small kernels in the step's CUDA graph (at batch 1 each costs more than its
// work); here one block does all of it.  For every row b, with p the slot of this step's token (`*pos`):
//
//   t = done[b] ? *pad_id : ids[b];  out[b, p - prompt_len + 1] = t;  tokens[b] = t;
//   done[b] = done[b] || t in stop_ids;  positions[b] = p + 1 - pad[b];
//   mask[b, k] = pad[b] <= k <= p + 1 for every cache slot k;  and once: *pos = p + 1.
//
// One block, so every thread reads *pos before any writes it (a second block could start after the first
// had moved it on).  Launched as a programmatic dependent of the sampler's last kernel (sm_90): its launch
// overlaps that kernel's tail, and it waits for it before reading anything.  An output column outside [0, out_cols) stops the kernel with a message, as torch's
// index_copy does on CUDA.
#include <stdint.h>
#include <stdio.h>

#include "bitlab_cp_async.cuh"
#include "bitlab_launch.h"

namespace bitlab {
namespace {

constexpr int kAdvanceThreads = 1024;

__global__ void __launch_bounds__(kAdvanceThreads) decode_advance_kernel(DecodeAdvanceArgs a) {
  pdl_wait();  // the picked tokens come from the kernel before this one
  const int64_t p = *a.pos;
  const int64_t col = p - a.prompt_len + 1;
  if (col < 0 || col >= a.out_cols) {  // thread 0 says why before it stops the kernel; the others leave
    if (threadIdx.x != 0) return;
    printf("cuda_ext_decode_advance: output column %lld is outside [0, %lld)\n", static_cast<long long>(col),
           static_cast<long long>(a.out_cols));
    __trap();
  }
  const int64_t pad_id = *a.pad_id;
  for (int b = threadIdx.x; b < a.B; b += kAdvanceThreads) {
    const bool was_done = a.done[b];
    const int64_t t = was_done ? pad_id : a.ids[b];
    bool stop = false;
    for (int j = 0; j < a.n_stop; ++j) stop = stop || t == a.stop_ids[j];
    a.out[b * a.out_cols + col] = t;
    a.tokens[b] = t;
    a.done[b] = was_done || stop;
    a.positions[b] = p + 1 - a.pad[b];
  }
  // The mask row by row (no division per element): 16 slots per store where the rows are 16-byte aligned
  // (the generator's cache length is a multiple of 64), else one.
  const bool wide = a.S % 16 == 0 && reinterpret_cast<uintptr_t>(a.mask) % 16 == 0;
  const int64_t last = p + 1;
  for (int b = 0; b < a.B; ++b) {
    const int64_t first = a.pad[b];
    bool* row = a.mask + static_cast<long>(b) * a.S;
    if (wide) {
      for (long k0 = 16L * threadIdx.x; k0 < a.S; k0 += 16L * kAdvanceThreads) {
        union {
          uint4 v;
          bool e[16];
        } piece;
#pragma unroll
        for (int e = 0; e < 16; ++e) piece.e[e] = k0 + e >= first && k0 + e <= last;
        *reinterpret_cast<uint4*>(row + k0) = piece.v;
      }
    } else {
      for (long k = threadIdx.x; k < a.S; k += kAdvanceThreads) row[k] = k >= first && k <= last;
    }
  }
  __syncthreads();  // every thread has read *pos
  if (threadIdx.x == 0) *a.pos = p + 1;
}

}  // namespace

cudaError_t launch_decode_advance(const DecodeAdvanceArgs& a, cudaStream_t stream) {
  if (a.B < 1 || a.S < 1 || a.out_cols < 1 || a.n_stop < 0) return cudaErrorInvalidValue;
  return launch_maybe_pdl(decode_advance_kernel, dim3(1), dim3(kAdvanceThreads), 0, stream, true, a);
}

}  // namespace bitlab
