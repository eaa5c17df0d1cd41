// fp32 inner loops (inner_loops.cpp) and the staging that lets bf16/fp16 tensors use them:
// low-precision slices are widened into small L1-resident fp32 blocks, updated, and
// rounded back once, so every op computes in fp32 with a single final rounding, like the
// reference (freezeguard/backends/reference.py).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace freezeguard {

// Elements per staging block: 4 operands x 1024 x 4 B = 16 KB, well inside L1.
constexpr int64_t kBlock = 1024;

struct AdamCoef {
  float decay;          // 1 - lr * weight_decay
  float one_minus_b1;   // lerp weight of the new gradient into exp_avg
  float beta2;
  float one_minus_b2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};

struct UserAdamCoef {   // the AdamW simulated user (freezeguard.backends.reference.user_adamw_)
  float keep;           // 1 - m_i: the unfrozen share of tensor i
  float m;              // m_i
  float one_minus_b1;
  float beta2;
  float one_minus_b2;
  float bc2_sqrt;
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float lr_wd;          // lr * weight_decay (0: no decay term)
};

struct SgdCoef {        // masked SGD with momentum (freezeguard.backends.reference.masked_sgd_momentum_)
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;   // 0: no decay term
  bool nesterov;
};

// fp32 loops, vectorised per CPU (simd.h). All update their float arrays in place.
void adamw_f32(float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c);
double dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* t, const float* d, float s, int64_t n);                     // t += s d
void user_f32(float* t, float* d, const float* g, float c, float keep, int64_t n);  // u = c g; t += keep u; d -= u
void user_adamw_f32(float* t, float* d, const float* g, float* mu, float* nu, int64_t n, const UserAdamCoef& c);
void sgd_momentum_f32(float* p, const float* g, float* buf, int64_t n, const SgdCoef& c);

// Widening / rounding (round-to-nearest-even, like torch's .to()).
void to_f32(const c10::BFloat16* s, float* d, int64_t n);
void to_f32(const c10::Half* s, float* d, int64_t n);
void from_f32(const float* s, c10::BFloat16* d, int64_t n);
void from_f32(const float* s, c10::Half* d, int64_t n);

template <typename T>
constexpr bool is_f32 = std::is_same_v<T, float>;

// loop(buf[0], ..., buf[N-1], k) (C++17: no template lambdas, torch < 2.10 builds with -std=c++17).
template <typename Loop, size_t N, size_t... I>
inline void call_on_blocks(const Loop& loop, float (&buf)[N][kBlock], int64_t k, std::index_sequence<I...>) {
  loop(buf[I]..., k);
}

// The one staging harness of every op: runs loop(operands..., k) over n elements of operands
// of storage type T. fp32 operands go straight to the loop; bf16/fp16 ones are widened block by
// block into L1-resident fp32 buffers, and those whose bit is set in WRITES (bit j: operand j)
// are rounded back once. An op is then an fp32 loop plus one call of this.
template <unsigned WRITES, typename T, typename Loop, typename... P>
void staged(const Loop& loop, int64_t n, P*... operands) {
  if constexpr (is_f32<T>) {
    loop(operands..., n);
  } else {
    constexpr size_t N = sizeof...(P);
    T* ptrs[N] = {const_cast<T*>(operands)...};
    alignas(64) float buf[N][kBlock];
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      for (size_t j = 0; j < N; ++j) to_f32(ptrs[j] + o, buf[j], k);
      call_on_blocks(loop, buf, k, std::make_index_sequence<N>{});
      for (size_t j = 0; j < N; ++j) {
        if (WRITES & (1u << j)) from_f32(buf[j], ptrs[j] + o, k);
      }
    }
  }
}

template <typename T>
void adamw_piece(T* p, const T* g, T* m, T* v, int64_t n, const AdamCoef& c) {
  staged<0b1101, T>([&](auto* bp, auto* bg, auto* bm, auto* bv, int64_t k) { adamw_f32(bp, bg, bm, bv, k, c); },
                    n, p, g, m, v);
}

template <typename T>
double dot_piece(const T* a, const T* b, int64_t n) {
  double acc = 0.0;  // one fp32 dot per block, summed in double (the fp32 path: one block)
  staged<0b00, T>([&](auto* ba, auto* bb, int64_t k) { acc += dot_f32(ba, bb, k); }, n, a, b);
  return acc;
}

template <typename T>
void shift_piece(T* t, const T* d, float s, int64_t n) {
  staged<0b01, T>([&](auto* bt, auto* bd, int64_t k) { axpy_f32(bt, bd, s, k); }, n, t, d);
}

template <typename T>
void user_piece(T* t, T* d, const T* g, float c, float keep, int64_t n) {
  staged<0b011, T>([&](auto* bt, auto* bd, auto* bg, int64_t k) { user_f32(bt, bd, bg, c, keep, k); }, n, t, d, g);
}

template <typename T>
void user_adamw_piece(T* t, T* d, const T* g, T* mu, T* nu, int64_t n, const UserAdamCoef& c) {
  staged<0b11011, T>([&](auto* bt, auto* bd, auto* bg, auto* bm, auto* bv,
                         int64_t k) { user_adamw_f32(bt, bd, bg, bm, bv, k, c); },
                     n, t, d, g, mu, nu);
}

template <typename T>
void sgd_momentum_piece(T* p, const T* g, T* buf, int64_t n, const SgdCoef& c) {
  staged<0b101, T>([&](auto* bp, auto* bg, auto* bb, int64_t k) { sgd_momentum_f32(bp, bg, bb, k, c); }, n, p, g, buf);
}

}  // namespace freezeguard
