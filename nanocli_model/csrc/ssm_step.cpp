// nano's CPU Mamba-2 decode step: one token of the SSM recurrence, the state updated in place in one pass.
//
// Built into the same library as row_gemv.cpp (nanocli_model/row_gemv.py; g++ -O3 -march=native, AOTInductor's C
// shim header only) and called the same two ways: ctypes for eager calls, the C shim below from an ahead-of-time
// compiled decode step. For head h (group g = h / (H / G)) and channel p, with the discretized dt:
//   s[h, p, :] <- exp(dt[h] A[h]) s[h, p, :] + dt[h] x[h, p] B[g, :]
//   y[h, p]     = s[h, p, :] . C[g, :] + D[h] x[h, p]
// Decode reads and writes the whole state every token (medium profile: 7.9 MB over 10 layers, the 9B: 2.6 MB a
// layer), and nothing else it reads is as large besides the weights. Inductor's fused kernel for the same update wrote
// the new state to a temporary, copied it into the cache and read it again for y (measured 5-6% of a medium step,
// AMD EPYC Zen 5, 2026-12-07); here each state row is loaded once, updated, stored back and dotted with C while in
// registers. The float32 sums run in 16 lanes (AVX-512) or whatever the compiler makes of the plain loops.
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define NANO_SSM_AVX512 1
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

namespace {

// One state row of n floats: s <- a s + xdt B, in place; returns s . C (the updated s)
inline float update_row(float* s, float a, float xdt, const float* B, const float* C, int64_t n) {
#ifdef NANO_SSM_AVX512
  const __m512 av = _mm512_set1_ps(a), xv = _mm512_set1_ps(xdt);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 s0 = _mm512_fmadd_ps(_mm512_loadu_ps(s + i), av, _mm512_mul_ps(xv, _mm512_loadu_ps(B + i)));
    const __m512 s1 = _mm512_fmadd_ps(_mm512_loadu_ps(s + i + 16), av, _mm512_mul_ps(xv, _mm512_loadu_ps(B + i + 16)));
    _mm512_storeu_ps(s + i, s0);
    _mm512_storeu_ps(s + i + 16, s1);
    acc0 = _mm512_fmadd_ps(s0, _mm512_loadu_ps(C + i), acc0);
    acc1 = _mm512_fmadd_ps(s1, _mm512_loadu_ps(C + i + 16), acc1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512 s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + i), av,
                                      _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(m, B + i)));
    _mm512_mask_storeu_ps(s + i, m, s0);
    acc0 = _mm512_fmadd_ps(s0, _mm512_maskz_loadu_ps(m, C + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float v = s[i + j] * a + xdt * B[i + j];
      s[i + j] = v;
      acc[j] += v * C[i + j];
    }
  for (; i < n; ++i) {
    const float v = s[i] * a + xdt * B[i];
    s[i] = v;
    acc[0] += v * C[i];
  }
  float total = 0.f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
#endif
}

}  // namespace

extern "C" {

// state (batch, H, P, N) float32 contiguous, updated in place; x (batch, H, P) with strides (x_sb, P, 1); dt
// (batch, H) discretized, strides (dt_sb, 1); A and D (H,) contiguous; B and C (batch, G, N) with strides (sb, N,
// 1); y (batch, H, P) contiguous, written. Returns 0, or 1 for sizes it does not take (nothing written).
int nano_ssm_step_f32(float* state, const float* x, int64_t x_sb, const float* dt, int64_t dt_sb, const float* A,
                      const float* B, int64_t B_sb, const float* C, int64_t C_sb, const float* D, int64_t batch,
                      int64_t H, int64_t G, int64_t P, int64_t N, float* y) {
  if (batch < 1 || H < 1 || G < 1 || H % G != 0 || P < 1 || N < 1) return 1;
  const int64_t R = H / G;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const float d = dt[b * dt_sb + h], a = std::exp(d * A[h]);
      const float* Bg = B + b * B_sb + (h / R) * N;
      const float* Cg = C + b * C_sb + (h / R) * N;
      const float* xh = x + b * x_sb + h * P;
      float* s = state + (b * H + h) * P * N;
      float* yh = y + (b * H + h) * P;
      for (int64_t p = 0; p < P; ++p) yh[p] = update_row(s + p * N, a, xh[p] * d, Bg, Cg, N) + D[h] * xh[p];
    }
  return 0;
}

// The AOTInductor C shim of nano::ssm_step(state, x, dt, A, B, C, D) -> y: the layouts above; state mutated.
AOTITorchError aoti_torch_cpu_ssm_step(AtenTensorHandle state, AtenTensorHandle x, AtenTensorHandle dt,
                                       AtenTensorHandle A, AtenTensorHandle B, AtenTensorHandle C,
                                       AtenTensorHandle D, AtenTensorHandle* ret0) {
  AtenTensorHandle all[7] = {state, x, dt, A, B, C, D};
  const int64_t dims[7] = {4, 3, 2, 1, 3, 3, 1};
  int64_t *sz[7], *st[7];
  for (int i = 0; i < 7; ++i) {
    int32_t dtype;
    int64_t nd;
    if (aoti_torch_get_dtype(all[i], &dtype) || dtype != aoti_torch_dtype_float32() ||
        aoti_torch_get_dim(all[i], &nd) || nd != dims[i] || aoti_torch_get_sizes(all[i], &sz[i]) ||
        aoti_torch_get_strides(all[i], &st[i]))
      return 1;
  }
  const int64_t b = sz[0][0], H = sz[0][1], P = sz[0][2], N = sz[0][3], G = sz[4][1];
  // the state contiguous; x (b, H, P), dt (b, H), A and D (H,), B and C (b, G, N); unit inner strides
  if (st[0][3] != 1 || st[0][2] != N || st[0][1] != P * N || (b > 1 && st[0][0] != H * P * N)) return 1;
  if (sz[1][0] != b || sz[1][1] != H || sz[1][2] != P || st[1][2] != 1 || (H > 1 && st[1][1] != P)) return 1;
  if (sz[2][0] != b || sz[2][1] != H || (H > 1 && st[2][1] != 1)) return 1;
  if (sz[3][0] != H || sz[6][0] != H || (H > 1 && (st[3][0] != 1 || st[6][0] != 1))) return 1;
  for (int i = 4; i < 6; ++i)
    if (sz[i][0] != b || sz[i][1] != G || sz[i][2] != N || st[i][2] != 1 || (G > 1 && st[i][1] != N)) return 1;
  if (G < 1 || H % G != 0 || P < 1 || N < 1 || H < 1 || b < 1) return 1;  // what the kernel refuses, before allocating
  int64_t osizes[3] = {b, H, P}, ostrides[3] = {H * P, P, 1};
  if (aoti_torch_empty_strided(3, osizes, ostrides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0,
                               ret0))
    return 1;
  void* p[8];
  for (int i = 0; i < 7; ++i)
    if (aoti_torch_get_data_ptr(all[i], &p[i])) return 1;
  if (aoti_torch_get_data_ptr(*ret0, &p[7])) return 1;
  return nano_ssm_step_f32((float*)p[0], (const float*)p[1], st[1][0], (const float*)p[2], st[2][0],
                           (const float*)p[3], (const float*)p[4], st[4][0], (const float*)p[5], st[5][0],
                           (const float*)p[6], b, H, G, P, N, (float*)p[7]);
}

}  // extern "C"
