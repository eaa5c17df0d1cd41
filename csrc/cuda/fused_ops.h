// Host launchers of the freezeguard CUDA kernels (fused_ops.cu): one per op, each a line over the
// multi-tensor harness there (a functor per op).
//
// Plain C types and cudaStream_t only, so the kernels compile with nvcc alone and the torch
// glue (bindings.cpp) compiles with the host compiler alone.
//
// Every op walks a *table* that lives in device memory:
//   - one FgTensorEntry per tensor of the list (its pointers, its length, its position in the
//     caller's list, and where its chunks start in the chunk list);
//   - one FgChunk per FG_CHUNK_SIZE-element slice of a tensor.
// A launch is persistent: a fixed grid strides over the chunk list, so a 686-tensor model is
// one launch however small or large its tensors are (apex multi_tensor_apply, with the table
// in global memory instead of kernel arguments so there is no limit on the list length).
//
// Math is fp32 whatever the storage dtype; each output is rounded to its storage dtype once.
// All offsets are 64-bit.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Elements per chunk. A multiple of every vector width (4 fp32, 8 bf16/fp16), so a chunk of
// a 16-byte-aligned tensor starts 16-byte aligned.
#define FG_CHUNK_SIZE 16384
// Threads per block of the element-wise kernels.
#define FG_BLOCK_THREADS 256

typedef enum FgDtype { FG_FLOAT32 = 0, FG_BFLOAT16 = 1, FG_FLOAT16 = 2 } FgDtype;

// One tensor of the list. Unused pointer slots are NULL. All pointers of an entry share one
// storage dtype and hold `numel` elements each.
typedef struct FgTensorEntry {
  void* ptr[4];
  int64_t numel;
  int64_t index;        // position in the caller's list: selects per-tensor scalars and outputs
  int64_t first_chunk;  // this tensor's chunks are chunks[first_chunk, first_chunk + n_chunks)
  int64_t n_chunks;
} FgTensorEntry;

// One slice [start, min(start + FG_CHUNK_SIZE, numel)) of entry `entry`.
typedef struct FgChunk {
  int64_t start;
  int64_t entry;
} FgChunk;

// AdamW (torch.optim.AdamW semantics) on entries whose ptr = {param, exp_avg, exp_avg_sq, grad}
// (the written tensors first).
// steps[index] (device, fp64) is the tensor's step count including this update. The learning
// rate is *lr_device when lr_device is not NULL (so a captured CUDA graph can change it), else lr.
cudaError_t fg_masked_adamw(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                            int64_t n_chunks, const double* steps, const double* lr_device, double lr,
                            double beta1, double beta2, double eps, double weight_decay, int grid,
                            cudaStream_t stream);

// out[index] = <a, b> for entries whose ptr = {a, b}, accumulated in fp32. Deterministic: each
// chunk's partial sum lands in partials[chunk] (a fixed-order block reduction, no atomics),
// then one warp per tensor adds that tensor's partials in a fixed order. `partials` holds
// n_chunks floats (may be NULL when n_chunks is 0).
cudaError_t fg_segment_dot(FgDtype dtype, const FgTensorEntry* entries, int64_t n_entries,
                           const FgChunk* chunks, int64_t n_chunks, float* partials, float* out,
                           int grid, cudaStream_t stream);

// theta += delta * dm[index] for entries whose ptr = {theta, delta}; dm is fp32 on the device.
cudaError_t fg_mask_shift(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                          int64_t n_chunks, const float* dm, int grid, cudaStream_t stream);

// The simulated user's step for entries whose ptr = {theta, delta, grad}; m is fp32 on the device:
// u = -lr (1 - m) g;  theta += (1 - m) u;  delta -= u.
cudaError_t fg_user_update(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                           int64_t n_chunks, const float* m, double lr, int grid, cudaStream_t stream);

// SGD with momentum for entries whose ptr = {param, momentum_buffer, grad} (reference.py
// masked_sgd_momentum_); buffers start at zero.
cudaError_t fg_masked_sgd_momentum(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                                   int64_t n_chunks, double lr, double momentum, double dampening,
                                   double weight_decay, int nesterov, int grid, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"

// The host (g++) and device (nvcc) sides must agree on the table layout byte for byte.
static_assert(sizeof(FgTensorEntry) == 64, "FgTensorEntry layout changed: update both compilers' view");
static_assert(sizeof(FgChunk) == 16, "FgChunk layout changed: update both compilers' view");
#endif
