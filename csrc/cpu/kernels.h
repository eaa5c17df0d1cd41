// fp32 inner loops (kernels.cpp) and the staging that lets bf16/fp16 tensors use them:
// low-precision slices are widened into small L1-resident fp32 blocks, updated, and
// rounded back once, so every op computes in fp32 with a single final rounding, like the
// reference (freezeguard/backends/reference.py).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// fp32 loops, vectorised per CPU (simd.h). All update their float arrays in place.
void adamw_f32(float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c);
double dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* t, const float* d, float s, int64_t n);                     // t += s d
void user_f32(float* t, float* d, const float* g, float c, float keep, int64_t n);  // u = c g; t += keep u; d -= u
void user_adamw_f32(float* t, float* d, const float* g, float* mu, float* nu, int64_t n, const UserAdamCoef& c);

// Widening / rounding (round-to-nearest-even, like torch's .to()).
void to_f32(const c10::BFloat16* s, float* d, int64_t n);
void to_f32(const c10::Half* s, float* d, int64_t n);
void from_f32(const float* s, c10::BFloat16* d, int64_t n);
void from_f32(const float* s, c10::Half* d, int64_t n);

template <typename T>
constexpr bool is_f32 = std::is_same_v<T, float>;

template <typename T>
void adamw_piece(T* p, const T* g, T* m, T* v, int64_t n, const AdamCoef& c) {
  if constexpr (is_f32<T>) {
    adamw_f32(p, g, m, v, n, c);
  } else {
    alignas(64) float bp[kBlock], bg[kBlock], bm[kBlock], bv[kBlock];
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      to_f32(p + o, bp, k);
      to_f32(g + o, bg, k);
      to_f32(m + o, bm, k);
      to_f32(v + o, bv, k);
      adamw_f32(bp, bg, bm, bv, k, c);
      from_f32(bp, p + o, k);
      from_f32(bm, m + o, k);
      from_f32(bv, v + o, k);
    }
  }
}

template <typename T>
double dot_piece(const T* a, const T* b, int64_t n) {
  if constexpr (is_f32<T>) {
    return dot_f32(a, b, n);
  } else {
    alignas(64) float ba[kBlock], bb[kBlock];
    double acc = 0.0;
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      to_f32(a + o, ba, k);
      to_f32(b + o, bb, k);
      acc += dot_f32(ba, bb, k);
    }
    return acc;
  }
}

template <typename T>
void shift_piece(T* t, const T* d, float s, int64_t n) {
  if constexpr (is_f32<T>) {
    axpy_f32(t, d, s, n);
  } else {
    alignas(64) float bt[kBlock], bd[kBlock];
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      to_f32(t + o, bt, k);
      to_f32(d + o, bd, k);
      axpy_f32(bt, bd, s, k);
      from_f32(bt, t + o, k);
    }
  }
}

template <typename T>
void user_piece(T* t, T* d, const T* g, float c, float keep, int64_t n) {
  if constexpr (is_f32<T>) {
    user_f32(t, d, g, c, keep, n);
  } else {
    alignas(64) float bt[kBlock], bd[kBlock], bg[kBlock];
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      to_f32(t + o, bt, k);
      to_f32(d + o, bd, k);
      to_f32(g + o, bg, k);
      user_f32(bt, bd, bg, c, keep, k);
      from_f32(bt, t + o, k);
      from_f32(bd, d + o, k);
    }
  }
}

template <typename T>
void user_adamw_piece(T* t, T* d, const T* g, T* mu, T* nu, int64_t n, const UserAdamCoef& c) {
  if constexpr (is_f32<T>) {
    user_adamw_f32(t, d, g, mu, nu, n, c);
  } else {
    alignas(64) float bt[kBlock], bd[kBlock], bg[kBlock], bm[kBlock], bv[kBlock];
    for (int64_t o = 0; o < n; o += kBlock) {
      const int64_t k = std::min(kBlock, n - o);
      to_f32(t + o, bt, k);
      to_f32(d + o, bd, k);
      to_f32(g + o, bg, k);
      to_f32(mu + o, bm, k);
      to_f32(nu + o, bv, k);
      user_adamw_f32(bt, bd, bg, bm, bv, k, c);
      from_f32(bt, t + o, k);
      from_f32(bd, d + o, k);
      from_f32(bm, mu + o, k);
      from_f32(bv, nu + o, k);
    }
  }
}

}  // namespace freezeguard
