// nano's CPU decode GEMVs: y = x @ W^T for a few rows of x against a row-major weight, float32 or int8.
//
// Built once per machine by nanocli_model/row_gemv.py (g++ -O3 -march=native, no torch C++ headers: only
// AOTInductor's C shim, a C API), loaded with ctypes for eager calls and linked by the ahead-of-time decode
// library through inductor's `aot_inductor.custom_ops_to_c_shims`, so a compiled decode step calls these
// functions directly. Decode streams every weight once per token; these loops read eight weight rows side
// by side with AVX2 FMAs (one 8-wide accumulator a row: eight independent chains) and load x once per eight
// rows, which measured faster on the decode shapes than four rows with two accumulators each (an AVX2 CPU).
// With AVX-512 (-march=native on such a CPU) the float32 loop for a single row of x (decode at batch 1) reads
// one weight row at a time instead, and with VNNI the int8 loop on long rows takes 32 columns a step.
// Without AVX2/FMA the plain C++ loops below compute the same sums (the compiler vectorises what it can).
//
// float32: y[b, r] = sum_k x[b, k] * W[r, k].
// int8:    y[b, r] = scale[r] * sx[b] * sum_k xq[b, k] * Q[r, k], with xq = round(x / sx) in int16 and
//          sx = max_k |x[b, k]| / 32767 per row of x: the int8 weights times a 16-bit activation (relative
//          rounding of x below 2e-5 of its largest entry, so the result is that of weight-only int8),
//          multiplied in int16 pairs (vpmaddwd) and summed in int32. The int32 sums move into float32
//          every Q8_FLUSH columns, which bounds each of the 8 lanes: 2 * 127 * 32767 * Q8_FLUSH / 16 < 2^31
//          (the one-row scalar path: every Q8_SCALAR_FLUSH columns, 127 * 32767 * 256 < 2^31).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NANO_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define NANO_AVX512_VNNI 1  // the int8 loop: 32 columns a step, multiply-add-accumulate in one vpdpwssd
#endif
#if defined(__AVX512F__)
#define NANO_AVX512 1  // the float32 loop for one row of x: a weight row at a time, 64 columns a step
#endif
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

namespace {

constexpr int64_t Q8_FLUSH = 2048;
constexpr int64_t Q8_SCALAR_FLUSH = 256;
constexpr int64_t Q8_PREFETCH = 32768;
constexpr int64_t Q8_PREFETCH_MAX_IN = 12288;

#ifdef NANO_AVX2
// (sum of a, sum of b, sum of c, sum of d)
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#endif

// One row of W against one row of x, the tail and narrow-matrix path.
inline float dot_f32(const float* w, const float* x, int64_t n) {
  float s = 0.f;
  int64_t k = 0;
#ifdef NANO_AVX2
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), b);
  }
  s = hsum(_mm256_add_ps(a, b));
#endif
  for (; k < n; ++k) s += w[k] * x[k];
  return s;
}

// Eight rows of W (w, w + n, ..., w + 7 n) against one row of x: one 8-wide accumulator a row (eight
// independent FMA chains), x loaded once for the eight.
inline void dot8_f32(const float* w, const float* x, int64_t n, float* y) {
  int64_t k = 0;
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#ifdef NANO_AVX2
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * n + k), xv, a[i]);
  }
  _mm_storeu_ps(s, hsum4(a[0], a[1], a[2], a[3]));
  _mm_storeu_ps(s + 4, hsum4(a[4], a[5], a[6], a[7]));
#endif
  for (; k < n; ++k)
    for (int i = 0; i < 8; ++i) s[i] += w[i * n + k] * x[k];
  for (int i = 0; i < 8; ++i) y[i] = s[i];
}

#ifdef NANO_AVX512
// One row of W against one row of x in 512-bit registers (four 16-wide accumulators, a masked tail): the
// one-row-of-x loop where AVX-512 is there. Reading a single row at a time, the weight is one sequential
// stream, which the hardware prefetcher follows at the full read rate; eight rows side by side are eight short
// streams. On the AMD EPYC (Zen 5, 40 GB/s) medium's decode shapes read at 36-43 GB/s this way, 26-36 with
// dot8_f32, and the medium decode step ran 1.15-1.2x faster (interleaved runs, 2026-12-07). With several rows
// of x, dot8_f32 is faster (x loaded once per eight rows): 20 GB/s at 4 rows to 15-17 this way.
inline float dot_f32_512(const float* w, const float* x, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
  if (k < n) {
    const __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

// x (in) float32 -> xq (in) int16 with x ~= xq * sx (round to nearest even); returns sx (0 for an all-zero
// row, nan when x holds an inf or a nan: the row's outputs are then nan, as a float GEMV gives).
inline float quantize_x(const float* x, int64_t n, int16_t* xq) {
  float m = 0.f;
  bool finite = true;
  int64_t k = 0;
#ifdef NANO_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mv = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 big = _mm256_set1_ps(3.4e38f);
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // > 3.4e38, or unordered (nan)
    mv = _mm256_max_ps(mv, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mv);
  for (int i = 0; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
  finite = _mm256_movemask_ps(bad) == 0;
#endif
  for (; k < n; ++k) {
    const float a = std::fabs(x[k]);
    finite = finite && a <= 3.4e38f;  // false for inf and nan
    m = a > m ? a : m;
  }
  if (!finite || m == 0.f) {
    for (int64_t j = 0; j < n; ++j) xq[j] = 0;
    return finite ? 0.f : NAN;
  }
  const float inv = 32767.f / m;
  k = 0;
#ifdef NANO_AVX2
  const __m256 iv = _mm256_set1_ps(inv);
  for (; k + 16 <= n; k += 16) {  // round (the default mode: nearest even), pack to int16, undo the lane interleave
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), iv));
    _mm256_storeu_si256((__m256i*)(xq + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
#endif
  for (; k < n; ++k) xq[k] = (int16_t)std::nearbyint(x[k] * inv);
  return m / 32767.f;
}

inline int32_t dot_q8_scalar(const int8_t* q, const int16_t* xq, int64_t n) {
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += (int32_t)q[k] * (int32_t)xq[k];
  return s;
}

// One int8 row: one int32 sum takes Q8_SCALAR_FLUSH products (127 * 32767 * 256 < 2^31), then float.
inline float dot_q8(const int8_t* q, const int16_t* xq, int64_t n) {
  float f = 0.f;
  for (int64_t k = 0; k < n; k += Q8_SCALAR_FLUSH)
    f += (float)dot_q8_scalar(q + k, xq + k, std::min(Q8_SCALAR_FLUSH, n - k));
  return f;
}

// Eight int8 rows against one int16 row: float sums of the int32 partials, every Q8_FLUSH columns. With
// PREFETCH, the block Q8_PREFETCH bytes ahead is requested as this one is read (the eight rows are one
// contiguous run, read here at eight bytes of it per column): rows of fewer than Q8_PREFETCH_MAX_IN bytes end
// before the hardware prefetchers pick them up. Measured: medium's 768-byte rows at 5-7 GB/s without, 9-11
// with (an AVX2 CPU at 13-18 GB/s of memory, where 3072-byte rows read as fast either way); on an AMD EPYC
// (Zen 5, 40 GB/s) 3072- and 4480-byte rows (medium's down_proj; the 9B's hidden size) at 20-24 GB/s without,
// 35-36 with, 10240 at 26 / 28, 15680-16384 faster without (interleaved runs, 2026-12-07).
template <bool PREFETCH>
inline void dot8_q8(const int8_t* q, const int16_t* xq, int64_t n, float* y) {
  float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
#ifdef NANO_AVX2
  __m256 g[8];
  for (int i = 0; i < 8; ++i) g[i] = _mm256_setzero_ps();
  while (k + 16 <= n) {
    const int64_t end = std::min<int64_t>(n, k + Q8_FLUSH);
    __m256i a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_si256();
#ifdef NANO_AVX512_VNNI
    // Long rows only: on the AMD EPYC (Zen 5) this was measured on, the 512-bit loop read medium's 3072- and
    // 16384-column int8 rows 9-17% faster than the AVX2 loop, its prefetched 768-1536-column rows 12-17%
    // slower (interleaved runs, 2026-12-07).
    if (!PREFETCH) {  // int32 lanes: 16 here, folded into the 8 below; per lane at most Q8_FLUSH / 8 products
      __m512i a5[8];
      for (int i = 0; i < 8; ++i) a5[i] = _mm512_setzero_si512();
      for (; k + 32 <= end; k += 32) {
        const __m512i xv = _mm512_loadu_si512((const void*)(xq + k));
        for (int i = 0; i < 8; ++i) {
          const __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(q + i * n + k)));
          a5[i] = _mm512_dpwssd_epi32(a5[i], w16, xv);
        }
      }
      for (int i = 0; i < 8; ++i)
        a[i] = _mm256_add_epi32(_mm512_castsi512_si256(a5[i]), _mm512_extracti64x4_epi64(a5[i], 1));
    }
#endif
    for (; k + 16 <= end; k += 16) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + k));
      if (PREFETCH) {
        _mm_prefetch((const char*)q + Q8_PREFETCH + 8 * k, _MM_HINT_T0);
        _mm_prefetch((const char*)q + Q8_PREFETCH + 8 * k + 64, _MM_HINT_T0);
      }
      for (int i = 0; i < 8; ++i) {
        const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + i * n + k)));
        a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(w16, xv));
      }
    }
    for (int i = 0; i < 8; ++i) g[i] = _mm256_add_ps(g[i], _mm256_cvtepi32_ps(a[i]));
  }
  _mm_storeu_ps(f, hsum4(g[0], g[1], g[2], g[3]));
  _mm_storeu_ps(f + 4, hsum4(g[4], g[5], g[6], g[7]));
#endif
  if (k < n)  // the tail, or every column without AVX2: flushed into float as the one-row path is
    for (int i = 0; i < 8; ++i) f[i] += dot_q8(q + i * n + k, xq + k, n - k);
  for (int i = 0; i < 8; ++i) y[i] = f[i];
}

}  // namespace

extern "C" {

// y (batch, out) = x (batch, in; rows x_stride apart) @ W (out, in; row-major)^T
void nano_row_gemv_f32(const float* x, int64_t x_stride, int64_t batch, const float* W, int64_t out, int64_t in,
                       float* y) {
  int64_t r = 0;
#ifdef NANO_AVX512
  if (batch == 1)  // one row at a time: the weight read as one sequential stream
    for (; r < out; ++r) y[r] = dot_f32_512(W + r * in, x, in);
#endif
  for (; r + 8 <= out; r += 8)  // each block of eight rows (8 in floats, L2-resident) serves every row of x
    for (int64_t b = 0; b < batch; ++b) dot8_f32(W + r * in, x + b * x_stride, in, y + b * out + r);
  for (; r < out; ++r)
    for (int64_t b = 0; b < batch; ++b) y[b * out + r] = dot_f32(W + r * in, x + b * x_stride, in);
}

// 1 where the float32 GEMV has the one-weight-row loop for a single row of x (AVX-512), else 0
int nano_row_gemv_f32_one_row_loop(void) {
#ifdef NANO_AVX512
  return 1;
#else
  return 0;
#endif
}

// y (batch, out) = (x @ Q^T) * scale, Q (out, in) int8 row-major, scale (out,) float32
void nano_row_gemv_q8(const float* x, int64_t x_stride, int64_t batch, const int8_t* Q, const float* scale,
                      int64_t out, int64_t in, float* y) {
  // x rounded to 16 bits, kept per thread and grown when needed: no allocation on a decode step
  thread_local std::vector<int16_t> xq;
  thread_local std::vector<float> sx;
  if (xq.size() < (size_t)(batch * in + 16)) xq.resize((size_t)(batch * in + 16));
  if (sx.size() < (size_t)batch) sx.resize((size_t)batch);
  for (int64_t b = 0; b < batch; ++b) sx[b] = quantize_x(x + b * x_stride, in, xq.data() + b * in);
  int64_t r = 0;
  float s8[8];
  for (; r + 8 <= out; r += 8)
    for (int64_t b = 0; b < batch; ++b) {
      if (b == 0 && in < Q8_PREFETCH_MAX_IN)  // the later rows of x find the block in cache
        dot8_q8<true>(Q + r * in, xq.data() + b * in, in, s8);
      else
        dot8_q8<false>(Q + r * in, xq.data() + b * in, in, s8);
      for (int i = 0; i < 8; ++i) y[b * out + r + i] = s8[i] * sx[b] * scale[r + i];
    }
  for (; r < out; ++r)
    for (int64_t b = 0; b < batch; ++b) y[b * out + r] = dot_q8(Q + r * in, xq.data() + b * in, in) * sx[b] * scale[r];
}

// --- AOTInductor C shims: aoti_torch_cpu_<op name> for the ops nano::row_gemv_f32 / nano::row_gemv_q8 -----

// x (..., in) with unit stride along in and its leading dims one evenly strided run of rows; y (..., out).
static AOTITorchError rows_of(AtenTensorHandle x, int64_t in, int64_t* batch, int64_t* stride, int64_t* ndim,
                              int64_t** sizes) {
  int64_t* st;
  if (aoti_torch_get_dim(x, ndim) || aoti_torch_get_sizes(x, sizes) || aoti_torch_get_strides(x, &st)) return 1;
  if (*ndim < 1 || (*sizes)[*ndim - 1] != in || ((*sizes)[*ndim - 1] > 1 && st[*ndim - 1] != 1)) return 1;
  *batch = 1;
  *stride = in;
  int64_t expect = -1;
  for (int64_t d = *ndim - 2; d >= 0; --d) {  // innermost leading dim with size > 1 sets the row stride
    if ((*sizes)[d] == 1) continue;
    if (expect < 0) {
      *stride = st[d];
      expect = st[d] * (*sizes)[d];
    } else if (st[d] != expect) {
      return 1;
    } else {
      expect *= (*sizes)[d];
    }
    *batch *= (*sizes)[d];
  }
  return 0;
}

static AOTITorchError new_output(int64_t ndim, const int64_t* xsizes, int64_t out, AtenTensorHandle* ret,
                                 float** y) {
  int64_t sizes[16], strides[16];
  if (ndim > 16) return 1;
  for (int64_t d = 0; d < ndim; ++d) sizes[d] = xsizes[d];
  sizes[ndim - 1] = out;
  int64_t s = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = s;
    s *= sizes[d];
  }
  if (aoti_torch_empty_strided(ndim, sizes, strides, aoti_torch_dtype_float32(), aoti_torch_device_type_cpu(), 0,
                               ret))
    return 1;
  void* p;
  if (aoti_torch_get_data_ptr(*ret, &p)) return 1;
  *y = (float*)p;
  return 0;
}

AOTITorchError aoti_torch_cpu_row_gemv_f32(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle* ret0) {
  int64_t *ws, *wst, wdim, batch, stride, ndim, *xs;
  void *xp, *wp;
  float* y;
  if (aoti_torch_get_dim(w, &wdim) || wdim != 2 || aoti_torch_get_sizes(w, &ws) || aoti_torch_get_strides(w, &wst))
    return 1;
  if (wst[1] != 1 || wst[0] != ws[1]) return 1;  // the weight must be row-major (the decode layout)
  if (rows_of(x, ws[1], &batch, &stride, &ndim, &xs) || new_output(ndim, xs, ws[0], ret0, &y)) return 1;
  if (aoti_torch_get_data_ptr(x, &xp) || aoti_torch_get_data_ptr(w, &wp)) return 1;
  nano_row_gemv_f32((const float*)xp, stride, batch, (const float*)wp, ws[0], ws[1], y);
  return 0;
}

AOTITorchError aoti_torch_cpu_row_gemv_q8(AtenTensorHandle x, AtenTensorHandle q, AtenTensorHandle scale,
                                          AtenTensorHandle* ret0) {
  int64_t *qs, *qst, qdim, batch, stride, ndim, *xs;
  void *xp, *qp, *sp;
  float* y;
  if (aoti_torch_get_dim(q, &qdim) || qdim != 2 || aoti_torch_get_sizes(q, &qs) || aoti_torch_get_strides(q, &qst))
    return 1;
  if (qst[1] != 1 || qst[0] != qs[1]) return 1;
  if (rows_of(x, qs[1], &batch, &stride, &ndim, &xs) || new_output(ndim, xs, qs[0], ret0, &y)) return 1;
  if (aoti_torch_get_data_ptr(x, &xp) || aoti_torch_get_data_ptr(q, &qp) || aoti_torch_get_data_ptr(scale, &sp))
    return 1;
  nano_row_gemv_q8((const float*)xp, stride, batch, (const int8_t*)qp, (const float*)sp, qs[0], qs[1], y);
  return 0;
}

}  // extern "C"
