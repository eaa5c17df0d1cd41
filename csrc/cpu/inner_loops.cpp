// The fp32 inner loops and dtype conversions behind every CPU op (declared in inner_loops.h).
// Plain loops over __restrict pointers: the compiler vectorises each one for the CPU it
// runs on (simd.h), which keeps the code readable and portable.
#include "inner_loops.h"

#include <cmath>
#include <cstring>

#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FG_HAVE_F16C_PATH 1
#endif

namespace freezeguard {

FG_CLONES void adamw_f32(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                         int64_t n, const AdamCoef& c) {
  const float decay = c.decay, omb1 = c.one_minus_b1, b2 = c.beta2, omb2 = c.one_minus_b2;
  const float bc2 = c.bc2_sqrt, eps = c.eps, step = c.neg_step_size;
  for (int64_t i = 0; i < n; ++i) {
    // torch.optim.AdamW's order: decay, lerp into exp_avg, exp_avg_sq, then the step.
    const float gi = g[i];
    const float mi = m[i] + (gi - m[i]) * omb1;
    const float vi = v[i] * b2 + omb2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2 + eps;
    p[i] = p[i] * decay + step * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

FG_CLONES double dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  // 64 independent lanes in a fixed order: vectorisable without -ffast-math (4 AVX-512 or
  // 8 AVX2 accumulators, enough to hide the FMA latency), and the same bits on every call
  // whatever the thread count (segment_dot is deterministic).
  constexpr int L = 64;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) acc[j] += a[i + j] * b[i + j];
  }
  double total = 0.0;
  for (int j = 0; j < L; ++j) total += acc[j];
  for (; i < n; ++i) total += static_cast<double>(a[i]) * b[i];
  return total;
}

FG_CLONES void axpy_f32(float* __restrict t, const float* __restrict d, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] += d[i] * s;
}

FG_CLONES void user_f32(float* __restrict t, float* __restrict d, const float* __restrict g, float c, float keep,
                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = c * g[i];
    t[i] += keep * u;
    d[i] -= u;
  }
}

FG_CLONES void user_adamw_f32(float* __restrict t, float* __restrict d, const float* __restrict g,
                              float* __restrict mu, float* __restrict nu, int64_t n, const UserAdamCoef& c) {
  const float keep = c.keep, mi = c.m, omb1 = c.one_minus_b1, b2 = c.beta2, omb2 = c.one_minus_b2;
  const float bc2 = c.bc2_sqrt, eps = c.eps, step = c.neg_step_size, lr_wd = c.lr_wd;
  for (int64_t i = 0; i < n; ++i) {
    // the reference's order: moments of the user's gradient, the step, decay on theta_ft
    const float gf = g[i] * keep;
    const float m1 = mu[i] + (gf - mu[i]) * omb1;
    const float v1 = nu[i] * b2 + omb2 * gf * gf;
    float u = m1 / (std::sqrt(v1) / bc2 + eps) * step;
    if (lr_wd != 0.0f) u = u - lr_wd * (t[i] - mi * d[i]);
    t[i] = t[i] + keep * u;
    d[i] = d[i] - u;
    mu[i] = m1;
    nu[i] = v1;
  }
}

FG_CLONES void sgd_momentum_f32(float* __restrict p, const float* __restrict g, float* __restrict buf, int64_t n,
                                const SgdCoef& c) {
  const float lr = c.lr, mom = c.momentum, keep = c.one_minus_dampening, wd = c.weight_decay;
  for (int64_t i = 0; i < n; ++i) {
    // torch.optim.SGD's order: decay into the gradient, the buffer, then the step.
    const float gi = wd != 0.0f ? g[i] + wd * p[i] : g[i];
    const float b = buf[i] * mom + gi * keep;
    const float step = c.nesterov ? gi + mom * b : b;
    p[i] = p[i] - lr * step;
    buf[i] = b;
  }
}

// bf16 is the top half of an fp32: widening is a shift, rounding is integer arithmetic
// (nearest-even, NaN kept quiet), both of which vectorise.
FG_CLONES void to_f32(const c10::BFloat16* __restrict s, float* __restrict d, int64_t n) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(s);
  uint32_t* dst = reinterpret_cast<uint32_t*>(d);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
}

FG_CLONES void from_f32(const float* __restrict s, c10::BFloat16* __restrict d, int64_t n) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(s);
  uint16_t* dst = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = src[i];
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = nan ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
  }
}

// fp16: compilers do not vectorise scalar half conversions, so use the F16C instructions
// (present on every AVX2 CPU) when the CPU has them, and c10's portable code otherwise.
static void h2f_scalar(const c10::Half* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
static void f2h_scalar(const float* s, c10::Half* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(s[i]);
}

#ifdef FG_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) static void h2f_f16c(const c10::Half* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
  h2f_scalar(s + i, d + i, n - i);
}
__attribute__((target("avx,f16c"))) static void f2h_f16c(const float* s, c10::Half* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  f2h_scalar(s + i, d + i, n - i);
}
static bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return has;
}
#endif

void to_f32(const c10::Half* s, float* d, int64_t n) {
#ifdef FG_HAVE_F16C_PATH
  if (cpu_has_f16c()) return h2f_f16c(s, d, n);
#endif
  h2f_scalar(s, d, n);
}

void from_f32(const float* s, c10::Half* d, int64_t n) {
#ifdef FG_HAVE_F16C_PATH
  if (cpu_has_f16c()) return f2h_f16c(s, d, n);
#endif
  f2h_scalar(s, d, n);
}

}  // namespace freezeguard
