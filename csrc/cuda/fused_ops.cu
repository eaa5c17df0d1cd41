// freezeguard CUDA kernels: multi-tensor, persistent, one launch per op per storage dtype.
//
// Depends on CUDA headers only (no torch), so `nvcc -c fused_ops.cu` checks it standalone.
// The math mirrors freezeguard/backends/reference.py line by line: fp32 arithmetic, the same
// order of operations, one rounding to the storage dtype per output. See fused_ops.h for the
// table layout.
#include "fused_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// ---- storage <-> fp32 --------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// Round-to-nearest-even, as torch's Tensor.copy_ from fp32 does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---- chunk traversal -----------------------------------------------------------------------
// Applies fn(float (&v)[NPTR]) to every element of one chunk of entry e; v[k] holds element i
// of e.ptr[k] in fp32, and v[0..NWRITE) are stored back (the written tensors come first).
// Uses 128-bit loads/stores when every pointer of the entry is 16-byte aligned (chunk starts
// are multiples of the vector width, so then every vector is aligned); otherwise, e.g. for a
// view with an odd storage offset, falls back to scalar accesses.
template <typename T, int NPTR, int NWRITE, typename Fn>
__device__ __forceinline__ void chunk_apply(const FgTensorEntry& e, int64_t start, Fn& fn) {
  constexpr int N = 16 / sizeof(T);
  static_assert(FG_CHUNK_SIZE % N == 0, "chunk size must be a multiple of the vector width");
  const int64_t end = (e.numel - start < FG_CHUNK_SIZE) ? e.numel : start + FG_CHUNK_SIZE;
  T* ptr[NPTR];
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < NPTR; ++k) {
    ptr[k] = static_cast<T*>(e.ptr[k]);
    aligned = aligned && (reinterpret_cast<uintptr_t>(ptr[k]) % 16 == 0);
  }
  int64_t tail = start;
  if (aligned) {
    const int64_t n_vec = (end - start) / N;
    for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
      const int64_t off = start + i * N;
      alignas(16) T raw[NPTR][N];
#pragma unroll
      for (int k = 0; k < NPTR; ++k) {
        *reinterpret_cast<uint4*>(raw[k]) = *reinterpret_cast<const uint4*>(ptr[k] + off);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float v[NPTR];
#pragma unroll
        for (int k = 0; k < NPTR; ++k) v[k] = to_float<T>(raw[k][j]);
        fn(v);
#pragma unroll
        for (int k = 0; k < NWRITE; ++k) raw[k][j] = from_float<T>(v[k]);
      }
#pragma unroll
      for (int k = 0; k < NWRITE; ++k) {
        *reinterpret_cast<uint4*>(ptr[k] + off) = *reinterpret_cast<const uint4*>(raw[k]);
      }
    }
    tail = start + n_vec * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    float v[NPTR];
#pragma unroll
    for (int k = 0; k < NPTR; ++k) v[k] = to_float<T>(ptr[k][i]);
    fn(v);
#pragma unroll
    for (int k = 0; k < NWRITE; ++k) ptr[k][i] = from_float<T>(v[k]);
  }
}

// ---- the multi-tensor harness ---------------------------------------------------------------
// An op is a functor with
//   kPtrs, kWrites       pointers per table entry and how many of them (the first ones) it writes;
//   at(entry)            the per-tensor setup: returns the element functor for that tensor's chunks;
//   done(chunk, element) what happens after a chunk (nothing, or a reduction's partial sum); every
//                        thread of the block calls it.
// multi_tensor_kernel walks the chunk list with a persistent grid; launch_multi_tensor picks the
// storage dtype. A new element-wise op is a functor plus a one-line launcher (apex's
// multi_tensor_apply, with the table in device memory).
struct NoReduction {
  template <typename Element>
  __device__ __forceinline__ void done(int64_t, const Element&) const {}
};

template <typename T, typename Op>
__global__ void __launch_bounds__(FG_BLOCK_THREADS)
    multi_tensor_kernel(const FgTensorEntry* __restrict__ entries, const FgChunk* __restrict__ chunks,
                        int64_t n_chunks, Op op) {
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const FgChunk ch = chunks[c];
    const FgTensorEntry e = entries[ch.entry];
    auto element = op.at(e);
    chunk_apply<T, Op::kPtrs, Op::kWrites>(e, ch.start, element);
    op.done(c, element);
  }
}

// A persistent grid never needs more blocks than chunks.
inline int clamp_grid(int grid, int64_t work) {
  if (grid < 1) grid = 1;
  return work < grid ? static_cast<int>(work) : grid;
}

template <typename Op>
cudaError_t launch_multi_tensor(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                                int64_t n_chunks, const Op& op, int grid, cudaStream_t stream) {
  if (n_chunks <= 0) return cudaSuccess;
  grid = clamp_grid(grid, n_chunks);
  switch (dtype) {
    case FG_FLOAT32:
      multi_tensor_kernel<float, Op><<<grid, FG_BLOCK_THREADS, 0, stream>>>(entries, chunks, n_chunks, op);
      break;
    case FG_BFLOAT16:
      multi_tensor_kernel<__nv_bfloat16, Op><<<grid, FG_BLOCK_THREADS, 0, stream>>>(entries, chunks, n_chunks, op);
      break;
    case FG_FLOAT16:
      multi_tensor_kernel<__half, Op><<<grid, FG_BLOCK_THREADS, 0, stream>>>(entries, chunks, n_chunks, op);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ---- masked AdamW --------------------------------------------------------------------------
struct AdamWElement {
  float decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  // v = {param, exp_avg, exp_avg_sq, grad}; reference.py masked_adamw_, same order.
  __device__ __forceinline__ void operator()(float (&v)[4]) const {
    const float g = v[3];
    const float p = v[0] * decay;
    const float m = v[1] + (g - v[1]) * one_minus_beta1;
    const float s = v[2] * beta2 + one_minus_beta2 * g * g;
    const float denom = sqrtf(s) / bc2_sqrt + eps;
    v[0] = p + neg_step_size * m / denom;
    v[1] = m;
    v[2] = s;
  }
};

struct AdamWOp : NoReduction {
  static constexpr int kPtrs = 4, kWrites = 3;
  const double* steps;      // device, fp64: each tensor's count including this update
  const double* lr_device;  // read on the device when not NULL, so a CUDA graph replays with the current lr
  double lr_host, beta1, beta2, eps, weight_decay;

  __device__ __forceinline__ AdamWElement at(const FgTensorEntry& e) const {
    const double lr = lr_device != nullptr ? *lr_device : lr_host;
    // Scalars in fp64 like the Python reference, then fp32 like torch's tensor-scalar ops.
    const double step = steps[e.index];
    return AdamWElement{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                        static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                        static_cast<float>(sqrt(1.0 - pow(beta2, step))), static_cast<float>(eps),
                        static_cast<float>(-(lr / (1.0 - pow(beta1, step))))};
  }
};

// ---- segment dot -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
  // xor butterfly: a fixed tree, so the result does not depend on scheduling.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block in a fixed order; every thread of the block must call it.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_totals[FG_BLOCK_THREADS / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) warp_totals[warp] = x;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < (int)(blockDim.x >> 5) ? warp_totals[lane] : 0.f;
    total = warp_sum(total);
  }
  // warp_totals is reused by the block's next chunk.
  __syncthreads();
  return total;  // valid in warp 0
}

struct DotElement {
  float acc = 0.f;
  __device__ __forceinline__ void operator()(float (&v)[2]) { acc += v[0] * v[1]; }
};

// Each chunk's sum lands in partials[chunk] (a fixed-order block reduction, no atomics).
struct DotPartialOp {
  static constexpr int kPtrs = 2, kWrites = 0;
  float* partials;

  __device__ __forceinline__ DotElement at(const FgTensorEntry&) const { return DotElement{}; }
  __device__ __forceinline__ void done(int64_t chunk, const DotElement& element) const {
    const float total = block_sum(element.acc);
    if (threadIdx.x == 0) partials[chunk] = total;
  }
};

// One warp per tensor: adds its chunk partials in a fixed order; tensors without elements get 0.
__global__ void __launch_bounds__(FG_BLOCK_THREADS)
    segment_dot_reduce_kernel(const FgTensorEntry* __restrict__ entries, int64_t n_entries,
                              const float* __restrict__ partials, float* __restrict__ out) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= n_entries) return;  // uniform per warp, so the shuffles below see all 32 lanes
  const FgTensorEntry e = entries[w];
  float acc = 0.f;
  for (int64_t j = lane; j < e.n_chunks; j += 32) acc += partials[e.first_chunk + j];
  acc = warp_sum(acc);
  if (lane == 0) out[e.index] = acc;
}

// ---- mask shift / user update ---------------------------------------------------------------
struct MaskShiftElement {
  float dm;
  __device__ __forceinline__ void operator()(float (&v)[2]) const { v[0] = v[0] + v[1] * dm; }
};

struct MaskShiftOp : NoReduction {
  static constexpr int kPtrs = 2, kWrites = 1;  // {theta, delta}
  const float* dm;
  __device__ __forceinline__ MaskShiftElement at(const FgTensorEntry& e) const { return MaskShiftElement{dm[e.index]}; }
};

struct UserUpdateElement {
  float keep, coef;  // coef = (-lr) * keep, rounded to fp32 as the reference's 0-d tensor is
  // v = {theta, delta, grad}
  __device__ __forceinline__ void operator()(float (&v)[3]) const {
    const float u = coef * v[2];
    v[0] = v[0] + keep * u;
    v[1] = v[1] - u;
  }
};

struct UserUpdateOp : NoReduction {
  static constexpr int kPtrs = 3, kWrites = 2;  // {theta, delta, grad}
  const float* m;
  double lr;
  __device__ __forceinline__ UserUpdateElement at(const FgTensorEntry& e) const {
    const float keep = 1.0f - m[e.index];
    return UserUpdateElement{keep, static_cast<float>(-lr) * keep};
  }
};

// ---- masked SGD with momentum ----------------------------------------------------------------
struct SgdMomentumElement {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov;
  // v = {param, momentum_buffer, grad}; reference.py masked_sgd_momentum_, same order.
  __device__ __forceinline__ void operator()(float (&v)[3]) const {
    const float g = weight_decay != 0.f ? v[2] + weight_decay * v[0] : v[2];
    const float b = v[1] * momentum + g * one_minus_dampening;
    const float step = nesterov ? g + momentum * b : b;
    v[0] = v[0] - lr * step;
    v[1] = b;
  }
};

struct SgdMomentumOp : NoReduction {
  static constexpr int kPtrs = 3, kWrites = 2;
  SgdMomentumElement element;
  __device__ __forceinline__ SgdMomentumElement at(const FgTensorEntry&) const { return element; }
};

}  // namespace

extern "C" {

cudaError_t fg_masked_adamw(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                            int64_t n_chunks, const double* steps, const double* lr_device, double lr,
                            double beta1, double beta2, double eps, double weight_decay, int grid,
                            cudaStream_t stream) {
  return launch_multi_tensor(dtype, entries, chunks, n_chunks,
                             AdamWOp{{}, steps, lr_device, lr, beta1, beta2, eps, weight_decay}, grid, stream);
}

cudaError_t fg_segment_dot(FgDtype dtype, const FgTensorEntry* entries, int64_t n_entries,
                           const FgChunk* chunks, int64_t n_chunks, float* partials, float* out,
                           int grid, cudaStream_t stream) {
  if (n_entries <= 0) return cudaSuccess;
  const cudaError_t err = launch_multi_tensor(dtype, entries, chunks, n_chunks, DotPartialOp{partials}, grid, stream);
  if (err != cudaSuccess) return err;
  const int64_t warps_per_block = FG_BLOCK_THREADS / 32;
  const int64_t blocks = (n_entries + warps_per_block - 1) / warps_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  segment_dot_reduce_kernel<<<static_cast<unsigned int>(blocks), FG_BLOCK_THREADS, 0, stream>>>(
      entries, n_entries, partials, out);
  return cudaGetLastError();
}

cudaError_t fg_mask_shift(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                          int64_t n_chunks, const float* dm, int grid, cudaStream_t stream) {
  return launch_multi_tensor(dtype, entries, chunks, n_chunks, MaskShiftOp{{}, dm}, grid, stream);
}

cudaError_t fg_user_update(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                           int64_t n_chunks, const float* m, double lr, int grid, cudaStream_t stream) {
  return launch_multi_tensor(dtype, entries, chunks, n_chunks, UserUpdateOp{{}, m, lr}, grid, stream);
}

cudaError_t fg_masked_sgd_momentum(FgDtype dtype, const FgTensorEntry* entries, const FgChunk* chunks,
                                   int64_t n_chunks, double lr, double momentum, double dampening,
                                   double weight_decay, int nesterov, int grid, cudaStream_t stream) {
  const SgdMomentumElement element{static_cast<float>(lr), static_cast<float>(momentum),
                                   static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                                   nesterov != 0};
  return launch_multi_tensor(dtype, entries, chunks, n_chunks, SgdMomentumOp{{}, element}, grid, stream);
}

}  // extern "C"
