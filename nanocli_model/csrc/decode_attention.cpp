// nano's CPU decode attention: one new token's query heads against the cached keys and values.
//
// Built into the same library as row_gemv.cpp (nanocli_model/row_gemv.py; g++ -O3 -march=native, AOTInductor's C
// shim header only) and called the same two ways: ctypes for eager calls, the C shim below from an ahead-of-time
// compiled decode step. At decode every query row is a single token, so attention is a pass over the cache:
// scores s = scale * q k^T (R query heads share one KV head under GQA), p = softmax(s), out = p v. SDPA (MKL's
// small GEMMs) ran this at 490 us a layer with 2304 cached tokens (medium: 4 KV heads x 64, 3 queries per KV head;
// from memory, as in a decode step) against 118 us for reading K and V once at the machine's 40 GB/s (AMD EPYC,
// Zen 5, 2026-12-07): a decode step at 2k context spent 8% of its time there.
//
// Per (batch row, KV head): pass 1 reads each key once for all R queries (R dot products of length d), pass 2
// exponentiates (s - max) in place and sums, pass 3 reads each value once per query (from L2: a head's values are
// L d floats). The float32 sums run in 16 lanes (AVX-512) or whatever the compiler makes of the plain loops.
// A left-padded batch row starts at its first real key (pad[b]): the padding keys are never read.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define NANO_ATT_AVX512 1
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

namespace {

constexpr int64_t MAX_D = 256;  // head_dim this kernel takes (the released models: 128)
constexpr int64_t VALUE_BLOCK_BYTES = 32768;  // values summed for every query of a KV head while in L1

#ifdef NANO_ATT_AVX512
// exp(x) for x <= 0 (Cephes' single-precision polynomial on x - n ln 2, then 2^n by vscalefps): within a few ulp
// of expf on [-87, 0], denormal below, 0 from -104 on (x is clamped there); nan stays nan.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // (2^-150 and below scale to 0); a nan x, the second operand, stays
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }
#endif

#ifdef NANO_ATT_AVX512
// The sum of v's 16 lanes folded to 4 (lane i: i, i + 4, i + 8, i + 12)
inline __m128 fold4(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// q . k for one query against four keys k, k + kl, k + 2 kl, k + 3 kl: the four sums, one per lane. Full chunks
// of 16 are plain loads (masked loads measured 2x slower streaming keys from memory on the Zen 5), the tail masked.
inline __m128 dot4(const float* q, const float* k, int64_t kl, int64_t d) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    const __m512 qv = _mm512_loadu_ps(q + c);
    a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + c), a0);
    a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + kl + c), a1);
    a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + 2 * kl + c), a2);
    a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + 3 * kl + c), a3);
  }
  if (c < d) {
    const __mmask16 m = tail_mask(d - c);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + c);
    a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + c), a0);
    a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + kl + c), a1);
    a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + 2 * kl + c), a2);
    a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + 3 * kl + c), a3);
  }
  return _mm_hadd_ps(_mm_hadd_ps(fold4(a0), fold4(a1)), _mm_hadd_ps(fold4(a2), fold4(a3)));
}
#endif

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

// scores s (R x L, row r at s + r L) = scale * q_r . k_j, each key read once for every query
inline void scores(const float* q, const float* k, int64_t kl, int64_t R, int64_t L, int64_t d, float scale,
                   float* s) {
  int64_t j = 0;
#ifdef NANO_ATT_AVX512
  const __m128 sv = _mm_set1_ps(scale);
  for (; j + 4 <= L; j += 4)
    for (int64_t r = 0; r < R; ++r)
      _mm_storeu_ps(s + r * L + j, _mm_mul_ps(sv, dot4(q + r * d, k + j * kl, kl, d)));
#endif
  for (; j < L; ++j)
    for (int64_t r = 0; r < R; ++r) s[r * L + j] = scale * dot(q + r * d, k + j * kl, d);
}

// The largest of s[0..n) (a nan among them may or may not come out: exp(nan - m) makes the row nan either way)
inline float row_max(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef NANO_ATT_AVX512
  __m512 mv = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[0..n) = exp(s - m) in place; returns their sum
inline float exp_and_sum(float* s, int64_t n, float m) {
  int64_t j = 0;
  float total = 0.f;
#ifdef NANO_ATT_AVX512
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv));
    _mm512_mask_storeu_ps(s + j, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  return total;
}

#ifdef NANO_ATT_AVX512
// o[0..d) += sum_j p[j] v[j * vl + 0..d) for C = ceil(d / 16) chunks of 16 (a constant: the accumulators stay in
// registers), two values a step into two sets of accumulators (their FMA chains overlap)
template <int C>
void accumulate_c(const float* p, const float* v, int64_t vl, int64_t n, int64_t d, float* o) {
  __m512 a0[C], a1[C];
  const __mmask16 last = tail_mask(d - 16 * (C - 1));  // the last chunk's columns; every other chunk is whole
  const bool whole = last == 0xFFFF;  // d a multiple of 16: plain loads only
  auto load = [&](const float* x, int c) {
    return c < C - 1 || whole ? _mm512_loadu_ps(x + 16 * c) : _mm512_maskz_loadu_ps(last, x + 16 * c);
  };
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    a0[c] = load(o, c);
    a1[c] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    const float *v0 = v + j * vl, *v1 = v0 + vl;
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm512_fmadd_ps(p0, load(v0, c), a0[c]);
      a1[c] = _mm512_fmadd_ps(p1, load(v1, c), a1[c]);
    }
  }
  if (j < n) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) a0[c] = _mm512_fmadd_ps(p0, load(v + j * vl, c), a0[c]);
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(o + 16 * c, c < C - 1 ? (__mmask16)0xFFFF : last, _mm512_add_ps(a0[c], a1[c]));
}
#endif

// o[0..d) += sum_j p[j] v[j * vl + 0..d)
inline void accumulate(const float* p, const float* v, int64_t vl, int64_t n, int64_t d, float* o) {
#ifdef NANO_ATT_AVX512
  switch ((d + 15) / 16) {
    case 1: return accumulate_c<1>(p, v, vl, n, d, o);
    case 2: return accumulate_c<2>(p, v, vl, n, d, o);
    case 3: return accumulate_c<3>(p, v, vl, n, d, o);
    case 4: return accumulate_c<4>(p, v, vl, n, d, o);
    case 5: return accumulate_c<5>(p, v, vl, n, d, o);
    case 6: return accumulate_c<6>(p, v, vl, n, d, o);
    case 7: return accumulate_c<7>(p, v, vl, n, d, o);
    case 8: return accumulate_c<8>(p, v, vl, n, d, o);
    default: break;  // d > 128: the loop below
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) o[c] += p[j] * v[j * vl + c];
}

}  // namespace

extern "C" {

// out (batch, heads, R, d) = softmax(scale * q k^T) v for each (batch row, KV head): q (batch, heads, R, d)
// contiguous; k and v (batch, heads, L, d) with unit stride along d and strides (sb, sh, sl) otherwise (views of
// a longer cache). pad (batch,), or null: batch row b's first pad[b] keys are left padding, which its query does
// not see (it always sees the last key, its own: padded_causal_mask at the decode position L - 1). Returns 0, or
// 1 when d is above MAX_D (nothing written).
int nano_decode_attention_f32(const float* q, const float* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                              const float* v, int64_t v_sb, int64_t v_sh, int64_t v_sl, int64_t batch,
                              int64_t heads, int64_t R, int64_t L, int64_t d, float scale, float* out,
                              const int64_t* pad) {
  if (d > MAX_D || d < 1 || L < 1 || R < 1) return 1;
  thread_local std::vector<float> buffer, totals;  // the R x L scores, R sums; kept per thread: no allocation
  if (buffer.size() < (size_t)(R * L)) buffer.resize((size_t)(R * L));
  if (totals.size() < (size_t)R) totals.resize((size_t)R);
  float* s = buffer.data();
  const int64_t block = std::max<int64_t>(1, VALUE_BLOCK_BYTES / (4 * d));  // values read from L1 for every query
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t skip = pad == nullptr ? 0 : std::min(std::max<int64_t>(pad[b], 0), L - 1);  // padding keys
    const int64_t n = L - skip;  // the keys this row's query sees
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + (b * heads + h) * R * d;
      const float* kh = k + b * k_sb + h * k_sh + skip * k_sl;
      const float* vh = v + b * v_sb + h * v_sh + skip * v_sl;
      float* oh = out + (b * heads + h) * R * d;
      scores(qh, kh, k_sl, R, n, d, scale, s);
      for (int64_t r = 0; r < R; ++r) {
        const float m = row_max(s + r * n, n);
        // a nan or an infinite score makes the row nan, as SDPA's softmax does (a nan score that row_max
        // passed over gives a nan total through its exp)
        totals[r] = std::isnan(m) || std::isinf(m) ? std::numeric_limits<float>::quiet_NaN()
                                                   : exp_and_sum(s + r * n, n, m);
        std::fill(oh + r * d, oh + (r + 1) * d, 0.f);
      }
      for (int64_t j = 0; j < n; j += block)
        for (int64_t r = 0; r < R; ++r)
          if (!std::isnan(totals[r])) accumulate(s + r * n + j, vh + j * v_sl, v_sl, std::min(block, n - j), d, oh + r * d);
      for (int64_t r = 0; r < R; ++r) {
        const float inv = 1.f / totals[r];  // nan for a nan row
        for (int64_t c = 0; c < d; ++c) oh[r * d + c] = std::isnan(inv) ? inv : oh[r * d + c] * inv;
      }
    }
  }
  return 0;
}

// The AOTInductor C shims of nano::decode_attention(q, k, v) and nano::decode_attention_padded(q, k, v, pad): q
// (b, heads, R, d) contiguous, k and v (b, heads, L, d) with unit stride along d, all float32; pad (b,) int64
// contiguous, or none; scale 1 / sqrt(d), as SDPA's default.
static AOTITorchError decode_attention_shim(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                            AtenTensorHandle pad, AtenTensorHandle* ret0) {
  int64_t nd, *qs, *qst, *ks, *kst, *vs, *vst;
  int32_t dq, dk, dv;
  if (aoti_torch_get_dtype(q, &dq) || aoti_torch_get_dtype(k, &dk) || aoti_torch_get_dtype(v, &dv)) return 1;
  if (dq != aoti_torch_dtype_float32() || dk != dq || dv != dq) return 1;
  if (aoti_torch_get_dim(q, &nd) || nd != 4 || aoti_torch_get_sizes(q, &qs) || aoti_torch_get_strides(q, &qst))
    return 1;
  if (aoti_torch_get_dim(k, &nd) || nd != 4 || aoti_torch_get_sizes(k, &ks) || aoti_torch_get_strides(k, &kst))
    return 1;
  if (aoti_torch_get_dim(v, &nd) || nd != 4 || aoti_torch_get_sizes(v, &vs) || aoti_torch_get_strides(v, &vst))
    return 1;
  const int64_t B = qs[0], H = qs[1], R = qs[2], D = qs[3], L = ks[2];
  if (qst[3] != 1 || qst[2] != D || qst[1] != R * D || (B > 1 && qst[0] != H * R * D)) return 1;
  for (int i = 0; i < 4; ++i)
    if (vs[i] != (i == 2 ? L : ks[i]) || (i != 2 && ks[i] != (i == 3 ? D : qs[i]))) return 1;
  if (kst[3] != 1 || vst[3] != 1) return 1;
  if (D > MAX_D || D < 1 || L < 1 || R < 1) return 1;  // what the kernel refuses, refused before allocating
  void* pp = nullptr;
  if (pad != nullptr) {
    int32_t dp;
    int64_t *ps, *pst;
    if (aoti_torch_get_dtype(pad, &dp) || dp != aoti_torch_dtype_int64() || aoti_torch_get_dim(pad, &nd) ||
        nd != 1 || aoti_torch_get_sizes(pad, &ps) || ps[0] != B || aoti_torch_get_strides(pad, &pst) ||
        (B > 1 && pst[0] != 1) || aoti_torch_get_data_ptr(pad, &pp))
      return 1;
  }
  int64_t osizes[4] = {B, H, R, D}, ostrides[4] = {H * R * D, R * D, D, 1};
  if (aoti_torch_empty_strided(4, osizes, ostrides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0,
                               ret0))
    return 1;
  void *qp, *kp, *vp, *op;
  if (aoti_torch_get_data_ptr(q, &qp) || aoti_torch_get_data_ptr(k, &kp) || aoti_torch_get_data_ptr(v, &vp) ||
      aoti_torch_get_data_ptr(*ret0, &op))
    return 1;
  return nano_decode_attention_f32((const float*)qp, (const float*)kp, kst[0], kst[1], kst[2], (const float*)vp,
                                   vst[0], vst[1], vst[2], B, H, R, L, D, 1.f / std::sqrt((float)D), (float*)op,
                                   (const int64_t*)pp);
}

AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                               AtenTensorHandle* ret0) {
  return decode_attention_shim(q, k, v, nullptr, ret0);
}

AOTITorchError aoti_torch_cpu_decode_attention_padded(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                                      AtenTensorHandle pad, AtenTensorHandle* ret0) {
  return decode_attention_shim(q, k, v, pad, ret0);
}

}  // extern "C"
