// DDF op: schema (TORCH_LIBRARY) and CPU kernels (forward + backward).
//
//   out[b,c,y,x] = sum_j sp[b, head(c)*k*k + j, y, x] (*|+) ch[b,c,j] * in[b,c, y*s + (jy-r)*d, x*s + (jx-r)*d]
//
// r = (k-1)/2, zero padding, head(c) = c / (C/head). Half types accumulate in float (at::opmath_type).
// Kernels are templates over the dtype and the combine mode (MUL = true for 'mul'); the memory layout picks one
// of two loop nests: NCHW (planes, vectorised over x) or NHWC (pixels, vectorised over channels). Inputs are
// indexed in their own layout; no copy of a contiguous or channels_last input is made.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "ddf_common.h"

#if defined(__GNUC__)
#define DDF_INLINE inline __attribute__((always_inline))
#else
#define DDF_INLINE inline
#endif

#if defined(__GNUC__)
#define DDF_RESTRICT __restrict__
#else
#define DDF_RESTRICT
#endif

// The per-thread loop bodies are compiled twice on x86-64 with GCC >= 12 (AVX2+FMA and baseline SSE2) and the
// best one is picked at load time (function multiversioning); elsewhere they are compiled once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__linux__) && \
    !defined(DDF_NO_MULTIVERSION)
#define DDF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DDF_MULTIVERSION
#endif

// The register-blocked forward kernels are built for AVX2 and AVX-512 too (x86-64 + GCC), chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DDF_NO_MULTIVERSION)
#define DDF_X86_ISAS 1
#include <immintrin.h>
#else
#define DDF_X86_ISAS 0
#endif

// Vectorised sum reductions (reassociation allowed for this loop only); active with -fopenmp-simd.
#if defined(_OPENMP) || defined(__GNUC__)
#define DDF_PRAGMA(x) _Pragma(#x)
#define DDF_SIMD_SUM(var) DDF_PRAGMA(omp simd reduction(+ : var))
#else
#define DDF_SIMD_SUM(var)
#endif

namespace ddf {
namespace {

using at::Tensor;

// Range [x0, x1) of output columns whose tap at input offset `off` (input x = x*s + off) is inside [0, W);
// 0 <= x0 <= x1 <= Wo (empty, at Wo, for an offset past the image).
inline void valid_range(int64_t off, int64_t s, int64_t W, int64_t Wo, int64_t& x0, int64_t& x1) {
  x0 = std::min(Wo, off < 0 ? (-off + s - 1) / s : int64_t(0));
  const int64_t last = W - 1 - off;
  x1 = last < 0 ? 0 : std::min<int64_t>(Wo, last / s + 1);
  if (x1 < x0) x1 = x0;
}

// Stride-phase split of one row of n values: src[ix] goes to dst[((ix + P) % s) * ps + (ix + P) / s] (phase rows
// ps apart; P: the padding columns before the row). Stride 2 runs a loop with a compile-time stride, which GCC
// vectorises with even/odd lane permutes in the instruction set it is inlined into (the scalar gather of every
// other stride cost about as much as the filtering at stride 2).
template <typename scalar_t, typename acc_t>
DDF_INLINE void split_phases(const scalar_t* DDF_RESTRICT src, int64_t n, int64_t s, int64_t P,
                             acc_t* DDF_RESTRICT dst, int64_t ps) {
  if (s == 2) {
    acc_t* DDF_RESTRICT ev = dst + (P % 2) * ps + P / 2;  // even columns ix = 2m
    acc_t* DDF_RESTRICT od = dst + ((P + 1) % 2) * ps + (P + 1) / 2;  // odd columns ix = 2m + 1
    const int64_t h = n / 2;
    for (int64_t m = 0; m < h; ++m) {
      ev[m] = static_cast<acc_t>(src[2 * m]);
      od[m] = static_cast<acc_t>(src[2 * m + 1]);
    }
    if (n % 2) ev[h] = static_cast<acc_t>(src[n - 1]);
    return;
  }
  for (int64_t ix = 0; ix < n; ++ix) dst[((ix + P) % s) * ps + (ix + P) / s] = static_cast<acc_t>(src[ix]);
}

// The inverse of split_phases with P = 0: dst[ix] = src[(ix % s) * ps + ix / s] for ix in [0, n).
template <typename acc_t, typename scalar_t>
DDF_INLINE void merge_phases(const acc_t* DDF_RESTRICT src, int64_t ps, int64_t n, int64_t s,
                             scalar_t* DDF_RESTRICT dst) {
  if (s == 2) {
    const acc_t* DDF_RESTRICT ev = src;
    const acc_t* DDF_RESTRICT od = src + ps;
    const int64_t h = n / 2;
    for (int64_t m = 0; m < h; ++m) {
      dst[2 * m] = static_cast<scalar_t>(ev[m]);
      dst[2 * m + 1] = static_cast<scalar_t>(od[m]);
    }
    if (n % 2) dst[n - 1] = static_cast<scalar_t>(ev[h]);
    return;
  }
  for (int64_t ix = 0; ix < n; ++ix) dst[ix] = static_cast<scalar_t>(src[(ix % s) * ps + ix / s]);
}

struct GeoI {  // problem geometry
  int64_t B, C, H, W, Ho, Wo, k, kk, r, d, s, head, Cg;
};

inline GeoI make_geo(const Tensor& input, int64_t k, int64_t d, int64_t s, int64_t head) {
  GeoI g;
  g.B = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.Ho = out_size(g.H, s); g.Wo = out_size(g.W, s);
  g.k = k; g.kk = k * k; g.r = (k - 1) / 2; g.d = d; g.s = s; g.head = head; g.Cg = g.C / head;
  return g;
}

// FilterNorm (paper Eq. 3), in place, of n filters of kk taps stored tap-major (tap j of filter i at v[j * ts + i]):
// each becomes gain * (v - mean) / (unbiased std + eps). mean[i] and sd[i] receive each filter's statistics (the
// backward keeps them); scale is scratch. The one home of these statistics for every C++ kernel (NCHW forward and
// backward row blocks, NHWC rows, single pixels of the exact fallback): the loops over filters vectorise.
template <typename acc_t>
DDF_INLINE void filter_norm_tap_major(acc_t* DDF_RESTRICT v, int64_t ts, int64_t kk, int64_t n, acc_t gain,
                                      acc_t* DDF_RESTRICT mean, acc_t* DDF_RESTRICT sd, acc_t* DDF_RESTRICT scale) {
  std::fill(mean, mean + n, acc_t(0));
  std::fill(sd, sd + n, acc_t(0));
  for (int64_t j = 0; j < kk; ++j)
    for (int64_t i = 0; i < n; ++i) mean[i] += v[j * ts + i];
  for (int64_t i = 0; i < n; ++i) mean[i] /= acc_t(kk);
  for (int64_t j = 0; j < kk; ++j)
    for (int64_t i = 0; i < n; ++i) sd[i] += (v[j * ts + i] - mean[i]) * (v[j * ts + i] - mean[i]);
  for (int64_t i = 0; i < n; ++i) {
    sd[i] = std::sqrt(sd[i] / acc_t(kk - 1));
    scale[i] = gain / (sd[i] + acc_t(kFilterNormEps));
  }
  for (int64_t j = 0; j < kk; ++j)
    for (int64_t i = 0; i < n; ++i) v[j * ts + i] = (v[j * ts + i] - mean[i]) * scale[i];
}

// -------------------------------------------------------------------------------------------------------------
// The spatial filter of rows [y0, y1) of one (b, head), as acc_t in buf[j * n + i] (n = (y1 - y0) * Wo pixels,
// i = (y - y0) * Wo + x), read once per head and reused by all its channels. With `norm`, each pixel's k*k taps
// are normalised here (FilterNorm, paper Eq. 3: gain * (sp - mean) / (unbiased std + eps)); the normalised filter
// lives only in this per-thread buffer. `tmp` holds 3 * n values.
template <typename scalar_t>
void load_spatial_rows(const scalar_t* spb, const GeoI& g, int64_t y0, int64_t y1, bool norm,
                       at::opmath_type<scalar_t> gain, at::opmath_type<scalar_t>* DDF_RESTRICT buf,
                       at::opmath_type<scalar_t>* DDF_RESTRICT tmp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = (y1 - y0) * g.Wo, HoWo = g.Ho * g.Wo;
  for (int64_t j = 0; j < g.kk; ++j) {
    const scalar_t* DDF_RESTRICT src = spb + j * HoWo + y0 * g.Wo;
    for (int64_t i = 0; i < n; ++i) buf[j * n + i] = static_cast<acc_t>(src[i]);
  }
  if (norm) filter_norm_tap_major(buf, n, g.kk, n, gain, tmp, tmp + n, tmp + 2 * n);
}

// NCHW forward: one task per (b, head, block of output rows). The block's spatial filter is loaded (and
// normalised) once, then every channel of the head is filtered with it; for every output row the taps are
// accumulated into a row buffer (vectorised over x when stride == 1).
template <typename scalar_t, bool MUL>
void forward_nchw(const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& out, const GeoI g, bool norm,
                  double gain) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in_data = input.const_data_ptr<scalar_t>();
  const scalar_t* ch_data = ch.const_data_ptr<scalar_t>();
  const scalar_t* sp_data = sp.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t HW = g.H * g.W, HoWo = g.Ho * g.Wo;
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(g.Ho, 4096 / std::max<int64_t>(1, g.kk * g.Wo)));
  const int64_t n_rb = (g.Ho + R - 1) / R;
  at::parallel_for(0, g.B * g.head * n_rb, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    std::vector<acc_t> row(g.Wo), chv(g.kk), spbuf(g.kk * R * g.Wo), tmp(3 * R * g.Wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % n_rb, bh = task / n_rb, b = bh / g.head, h = bh % g.head;
      const int64_t y0 = rb * R, y1 = std::min(g.Ho, y0 + R), n = (y1 - y0) * g.Wo;
      load_spatial_rows<scalar_t>(sp_data + bh * g.kk * HoWo, g, y0, y1, norm, static_cast<acc_t>(gain),
                                  spbuf.data(), tmp.data());
      for (int64_t c = h * g.Cg; c < (h + 1) * g.Cg; ++c) {
        const int64_t bc = b * g.C + c;
        const scalar_t* DDF_RESTRICT in = in_data + bc * HW;
        for (int64_t j = 0; j < g.kk; ++j) chv[j] = static_cast<acc_t>(ch_data[bc * g.kk + j]);
        for (int64_t y = y0; y < y1; ++y) {
          acc_t* DDF_RESTRICT acc = row.data();
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t jy = 0; jy < g.k; ++jy) {
            const int64_t iy = y * g.s + (jy - g.r) * g.d;
            if (iy < 0 || iy >= g.H) continue;
            const scalar_t* DDF_RESTRICT in_row = in + iy * g.W;
            for (int64_t jx = 0; jx < g.k; ++jx) {
              const int64_t j = jy * g.k + jx;
              const int64_t off = (jx - g.r) * g.d;
              int64_t x0, x1;
              valid_range(off, g.s, g.W, g.Wo, x0, x1);
              const acc_t* DDF_RESTRICT sp_row = spbuf.data() + j * n + (y - y0) * g.Wo;
              const acc_t cj = chv[j];
              if (g.s == 1) {
                const scalar_t* DDF_RESTRICT src = in_row + off;
                for (int64_t x = x0; x < x1; ++x) acc[x] += static_cast<acc_t>(src[x]) * (MUL ? sp_row[x] * cj : sp_row[x] + cj);
              } else {
                for (int64_t x = x0; x < x1; ++x)
                  acc[x] += static_cast<acc_t>(in_row[x * g.s + off]) * (MUL ? sp_row[x] * cj : sp_row[x] + cj);
              }
            }
          }
          scalar_t* DDF_RESTRICT o_row = out_data + bc * HoWo + y * g.Wo;
          for (int64_t x = 0; x < g.Wo; ++x) o_row[x] = static_cast<scalar_t>(acc[x]);
        }
      }
    }
  });
}

// Per-batch transposed channel filter chT[b][j][c] in the accumulation type (small: B*k*k*C).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> transpose_channel_filter(const Tensor& ch, const GeoI g) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> chT(g.B * g.kk * g.C);
  const auto a = ch.accessor<scalar_t, 4>();  // any strides
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t j = 0; j < g.kk; ++j)
        chT[(b * g.kk + j) * g.C + c] = static_cast<acc_t>(a[b][c][j / g.k][j % g.k]);
  return chT;
}

// The k*k taps of every head at one pixel (read through the filter's strides) as acc_t in taps[h * kk + j],
// normalised per head when `norm` (each head one filter of filter_norm_tap_major; the SIMD kernels use
// load_row_taps, a row at a time).
template <typename scalar_t>
inline void load_pixel_taps(const scalar_t* spp, int64_t ssC, const GeoI& g, bool norm, at::opmath_type<scalar_t> gain,
                            at::opmath_type<scalar_t>* DDF_RESTRICT taps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = 0; t < g.head * g.kk; ++t) taps[t] = static_cast<acc_t>(spp[t * ssC]);
  acc_t mean, sd, scale;
  for (int64_t h = 0; norm && h < g.head; ++h)
    filter_norm_tap_major(taps + h * g.kk, 1, g.kk, 1, gain, &mean, &sd, &scale);
}

// NHWC forward: one task per (b, output row). For every output pixel, its taps are loaded (and normalised) once,
// then the k*k taps are accumulated into a C-long buffer, vectorised over the channels of each head.
template <typename scalar_t, bool MUL>
void forward_nhwc(const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& out, const GeoI g, bool norm,
                  double gain) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in_data = input.const_data_ptr<scalar_t>();
  const scalar_t* sp_data = sp.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const auto chT = transpose_channel_filter<scalar_t>(ch, g);
  const int64_t isB = input.stride(0), isH = input.stride(2), isW = input.stride(3);
  const int64_t osB = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  const int64_t ssB = sp.stride(0), ssC = sp.stride(1), ssH = sp.stride(2), ssW = sp.stride(3);
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    std::vector<acc_t> accv(g.C), taps(g.head * g.kk);
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / g.Ho, y = by % g.Ho;
      const acc_t* chb = chT.data() + b * g.kk * g.C;
      for (int64_t x = 0; x < g.Wo; ++x) {
        acc_t* DDF_RESTRICT acc = accv.data();
        std::fill(accv.begin(), accv.end(), acc_t(0));
        load_pixel_taps<scalar_t>(sp_data + b * ssB + y * ssH + x * ssW, ssC, g, norm, static_cast<acc_t>(gain),
                                  taps.data());
        for (int64_t jy = 0; jy < g.k; ++jy) {
          const int64_t iy = y * g.s + (jy - g.r) * g.d;
          if (iy < 0 || iy >= g.H) continue;
          for (int64_t jx = 0; jx < g.k; ++jx) {
            const int64_t ix = x * g.s + (jx - g.r) * g.d;
            if (ix < 0 || ix >= g.W) continue;
            const int64_t j = jy * g.k + jx;
            const scalar_t* DDF_RESTRICT px = in_data + b * isB + iy * isH + ix * isW;
            const acc_t* DDF_RESTRICT cj = chb + j * g.C;
            for (int64_t h = 0; h < g.head; ++h) {
              const acc_t sv = taps[h * g.kk + j];
              const int64_t c0 = h * g.Cg, c1 = c0 + g.Cg;
              for (int64_t c = c0; c < c1; ++c) {
                const acc_t f = MUL ? sv * cj[c] : sv + cj[c];
                acc[c] += static_cast<acc_t>(px[c]) * f;
              }
            }
          }
        }
        scalar_t* DDF_RESTRICT o = out_data + b * osB + y * osH + x * osW;
        for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------------------
// Register-blocked forward kernels (ddf_forward_simd.h), compiled once per instruction set and picked at run time:
// generic 16-byte vectors (SSE2 on x86, NEON/others elsewhere, or plain arrays without GCC vector extensions),
// plus AVX2+FMA+F16C and AVX-512 on x86-64 with GCC. DDF_CPU_ISA=generic|avx2|avx512 caps the choice (tests).
// The kernels above remain the exact path for a channel filter with Inf/NaN values (see ddf_forward_cpu).
#if defined(__GNUC__)
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
#else
template <typename T, int N>
struct ArrVec {  // stand-in for a vector type: element-wise loops the compiler may vectorise
  T v[N];
  T& operator[](int64_t i) { return v[i]; }
  const T& operator[](int64_t i) const { return v[i]; }
  friend ArrVec operator*(ArrVec a, const ArrVec& b) { for (int i = 0; i < N; ++i) a.v[i] *= b.v[i]; return a; }
  friend ArrVec operator+(ArrVec a, const ArrVec& b) { for (int i = 0; i < N; ++i) a.v[i] += b.v[i]; return a; }
  ArrVec& operator+=(const ArrVec& b) { for (int i = 0; i < N; ++i) v[i] += b.v[i]; return *this; }
};
template <typename T, int VB>
struct VecOf {
  using type = ArrVec<T, VB / int(sizeof(T))>;
};
#endif

template <typename scalar_t>
struct ForwardArgs {
  GeoI g;
  const scalar_t* in;
  const scalar_t* ch;  // NCHW: contiguous (B, C, k, k)
  const scalar_t* sp;
  scalar_t* out;
  const at::opmath_type<scalar_t>* chT;  // NHWC: transpose_channel_filter
  int64_t isB, isH, isW, osB, osH, osW, ssB, ssC, ssH, ssW;  // NHWC strides (channel strides of in/out are 1)
  bool norm;
  double gain;
};

template <typename scalar_t>
struct NhwcRow {  // one output row of the NHWC kernel
  const GeoI* g;
  int64_t HK, osW, isW, xstep;  // xstep: input stride between output pixels (stride * isW)
  const at::opmath_type<scalar_t>* taps;
  const int64_t* col;
  const scalar_t* zeros;
  const scalar_t* const* rows;
  const at::opmath_type<scalar_t>* chb;
  scalar_t* out;
};

namespace isa_generic {
#define DDF_VB 16
#define DDF_NC 2
#define DDF_F16C 0
#define DDF_NP 4
#define DDF_NCV 2
#include "ddf_forward_simd.h"  // #undefs its DDF_* parameters
}  // namespace isa_generic

#if DDF_X86_ISAS
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DDF_VB 32
#define DDF_NC 2
#define DDF_F16C 1
#define DDF_NP 4
#define DDF_NCV 2
#include "ddf_forward_simd.h"  // #undefs its DDF_* parameters
#pragma GCC pop_options
}  // namespace isa_avx2

namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define DDF_VB 64
#define DDF_NC 4
#define DDF_F16C 1
#define DDF_NP 4
#define DDF_NCV 4
#include "ddf_forward_simd.h"  // #undefs its DDF_* parameters
#pragma GCC pop_options
}  // namespace isa_avx512
#endif

// 0 generic, 1 AVX2, 2 AVX-512: the best the CPU supports, capped by DDF_CPU_ISA (forward and backward kernels).
int cpu_isa() {
  static const int isa = [] {
    int best = 0;
#if DDF_X86_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = 2;
#endif
    const char* env = std::getenv("DDF_CPU_ISA");
    const std::string cap = env ? env : "";
    if (cap == "generic") return 0;
    if (cap == "avx2") return std::min(best, 1);
    return best;
  }();
  return isa;
}

// Runs the statement(s) with the kernels of the instruction set cpu_isa() picked: unqualified kernel names in them
// resolve in that isa_* namespace (the one ladder for every forward and backward entry point).
#if DDF_X86_ISAS
#define DDF_ON_CPU_ISA(...)                   \
  do {                                        \
    const int isa_ = cpu_isa();               \
    if (isa_ == 2) {                          \
      using namespace isa_avx512;             \
      __VA_ARGS__;                            \
    } else if (isa_ == 1) {                   \
      using namespace isa_avx2;               \
      __VA_ARGS__;                            \
    } else {                                  \
      using namespace isa_generic;            \
      __VA_ARGS__;                            \
    }                                         \
  } while (0)
#else
#define DDF_ON_CPU_ISA(...)        \
  do {                             \
    using namespace isa_generic;   \
    __VA_ARGS__;                   \
  } while (0)
#endif

template <typename scalar_t, bool MUL>
void forward_simd(const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& out, const GeoI g, bool norm,
                  double gain, bool cl) {
  ForwardArgs<scalar_t> a{};
  a.g = g;
  a.in = input.const_data_ptr<scalar_t>();
  a.ch = ch.const_data_ptr<scalar_t>();
  a.sp = sp.const_data_ptr<scalar_t>();
  a.out = out.mutable_data_ptr<scalar_t>();
  a.norm = norm;
  a.gain = gain;
  std::vector<at::opmath_type<scalar_t>> chT;
  if (cl) {
    chT = transpose_channel_filter<scalar_t>(ch, g);
    a.chT = chT.data();
    a.isB = input.stride(0); a.isH = input.stride(2); a.isW = input.stride(3);
    a.osB = out.stride(0); a.osH = out.stride(2); a.osW = out.stride(3);
    a.ssB = sp.stride(0); a.ssC = sp.stride(1); a.ssH = sp.stride(2); a.ssW = sp.stride(3);
  }
  DDF_ON_CPU_ISA(cl ? forward_nhwc_simd<scalar_t, MUL>(a) : forward_nchw_simd<scalar_t, MUL>(a));
}

// -------------------------------------------------------------------------------------------------------------
// Backward kernels. Both layouts compute the three gradients in ONE pass over grad_output and input: a task owns
// a block of output rows [y0, y1) (its grad_spatial and a partial grad_channel) and the input rows [iy0, iy1) that
// those rows start (its grad_input, gathered from output rows [ya, yb) = the block plus a halo of r*d/s rows).
// Every output value is written by one task; grad_channel's per-block partial sums are reduced in block order, so
// the result does not depend on the thread count. The spatial filter is normalised (FilterNorm, spatial_norm)
// inside the task, and FilterNorm's backward is applied to the block's grad_spatial before it is written.

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct BwdRows {  // the rows of one backward task (see above)
  int64_t y0, y1, iy0, iy1, ya, yb;
};

inline BwdRows bwd_rows(const GeoI& g, int64_t rb, int64_t R) {
  BwdRows t;
  t.y0 = rb * R;
  t.y1 = std::min(g.Ho, t.y0 + R);
  t.iy0 = t.y0 * g.s;
  t.iy1 = std::min(g.H, t.y1 * g.s);  // the last block's y1 * s >= H
  t.ya = std::max<int64_t>(0, -floor_div(-(t.iy0 - g.r * g.d), g.s));
  t.yb = std::min(g.Ho, floor_div(t.iy1 - 1 + g.r * g.d, g.s) + 1);
  return t;
}

// Output rows per backward task, from the geometry only (never the thread count: grad_channel is reduced in block
// order): at most `cache_rows` (to keep the per-task buffers near L2 size). A small plane (<= 4096 output pixels)
// is one block when there are >= 8 planes (n_outer = b or b*head): every block re-reads 2*r*d/s halo rows per
// channel and re-normalises them, which at 7x7 to 56x56 costs more than finer blocks gain in load balance
// (NCHW 8x256x56x56, 2 threads: 10.8 ms as one block against 12.8 ms in blocks of 14 rows).
// Otherwise about 32 tasks over n_outer, at least 4 rows so that the halo stays small, and blocks of equal size.
inline int64_t bwd_block_rows(const GeoI& g, int64_t cache_rows, int64_t n_outer) {
  const int64_t cap = std::max<int64_t>(1, cache_rows);
  if (n_outer >= 8 && g.Ho * g.Wo <= 4096 && g.Ho <= cap) return std::max<int64_t>(1, g.Ho);
  const int64_t want = std::max<int64_t>(1, (32 + n_outer - 1) / std::max<int64_t>(1, n_outer));
  int64_t R = std::min(cap, (g.Ho + want - 1) / want);
  R = std::max<int64_t>(1, std::min(std::max<int64_t>(R, 4), g.Ho));
  const int64_t n_rb = (g.Ho + R - 1) / R;
  return (g.Ho + n_rb - 1) / n_rb;
}

inline int64_t bwd_halo_rows(const GeoI& g, int64_t R) { return std::min(g.Ho, R + 2 * g.r * g.d / g.s + 2); }

// `n` values of src in the accumulation type: src itself when it already is, else converted into buf.
template <typename scalar_t>
DDF_INLINE const at::opmath_type<scalar_t>* acc_view(const scalar_t* src, int64_t n,
                                                     at::opmath_type<scalar_t>* DDF_RESTRICT buf) {
  if constexpr (std::is_same<scalar_t, at::opmath_type<scalar_t>>::value) {
    (void)n; (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<at::opmath_type<scalar_t>>(src[i]);
    return buf;
  }
}

#if defined(__GNUC__)
#define DDF_PREFETCH(p) __builtin_prefetch(p)
#else
#define DDF_PREFETCH(p) ((void)(p))
#endif
#if defined(__GNUC__) && !defined(__clang__)
#define DDF_UNROLL _Pragma("GCC unroll 16")
#else
#define DDF_UNROLL
#endif


// Layout of the NCHW backward task buffers. Every row is padded: P zeros on the left, the data (Wo, or Wp = Wo
// values per stride phase), zeros up to Wv (a multiple of the vector length), P zeros on the right, so that all
// row loops run over whole vectors at any tap offset and padded taps read zeros.
struct NchwBwdLayout {
  int64_t V, Wv, P, SW, R, NS, NI;  // lanes, padded width, pad, row stride, block rows, spatial rows, input rows
  // the taps jx whose input columns fall in stride phase p: phase_jx/phase_q[p * k + i] (jx, floor(off / s)),
  // phase_cnt[p] of them
  std::vector<int64_t> phase_jx, phase_q, phase_cnt;
  NchwBwdLayout(const GeoI& g, int64_t R_, int64_t V_)
      : V(V_), R(R_), phase_jx(g.s * g.k), phase_q(g.s * g.k), phase_cnt(g.s, 0) {
    Wv = (g.Wo + V - 1) / V * V;
    P = g.r * g.d / g.s + 1;
    SW = P + Wv + P;
    NS = bwd_halo_rows(g, R);
    NI = (R - 1) * g.s + 2 * g.r * g.d + 1;
    for (int64_t jx = 0; jx < g.k; ++jx) {
      const int64_t off = (jx - g.r) * g.d, ph = ((off % g.s) + g.s) % g.s;
      phase_jx[ph * g.k + phase_cnt[ph]] = jx;
      phase_q[ph * g.k + phase_cnt[ph]++] = (off - ph) / g.s;
    }
  }
};

template <typename acc_t>
struct NchwBwdScratch {
  std::vector<acc_t> spn, gob, inb, gacc, stat, prow;
  std::vector<int64_t> rows;
  NchwBwdScratch(const GeoI& g, const NchwBwdLayout& L)
      : spn(g.kk * L.NS * L.SW), gob(L.NS * L.SW), inb(L.NI * g.s * L.SW), gacc(g.kk * L.R * L.Wv),
        stat(4 * L.NS * L.Wv), prow(g.s * L.Wv), rows(2 * g.k) {}
};

// Zeroes buf's values of the taps that fall on the padding (rows y in [ylo, yhi) at buf + (y - ylo) * row_stride,
// tap j at + j * tap_stride): the spatial filter there is never used (it may even be Inf/NaN) and its gradient is 0.
template <typename acc_t>
DDF_INLINE void zero_padded_taps(acc_t* buf, int64_t tap_stride, int64_t row_stride, int64_t ylo, int64_t yhi,
                                 const GeoI& g) {
  for (int64_t j = 0; j < g.kk; ++j) {
    const int64_t jy = j / g.k, off = (j % g.k - g.r) * g.d;
    int64_t x0, x1;
    valid_range(off, g.s, g.W, g.Wo, x0, x1);
    for (int64_t y = ylo; y < yhi; ++y) {
      acc_t* row = buf + j * tap_stride + (y - ylo) * row_stride;
      const int64_t iy = y * g.s + (jy - g.r) * g.d;
      if (iy < 0 || iy >= g.H) {
        std::fill(row, row + g.Wo, acc_t(0));
      } else {
        std::fill(row, row + x0, acc_t(0));
        std::fill(row + x1, row + g.Wo, acc_t(0));
      }
    }
  }
}

// Prefetch of the next channel's rows that nchw_bwd_load_channel will read (short row blocks of many planes are
// not followed by the hardware prefetcher early enough).
template <typename scalar_t>
DDF_INLINE void bwd_prefetch_channel(const scalar_t* in, const scalar_t* go, const GeoI& g, const BwdRows& t) {
  constexpr int64_t step = 64 / sizeof(scalar_t);
  const char* gp = reinterpret_cast<const char*>(go + t.ya * g.Wo);
  for (int64_t i = 0; i < (t.yb - t.ya) * g.Wo; i += step) DDF_PREFETCH(gp + i * sizeof(scalar_t));
  const int64_t lo = std::max<int64_t>(0, t.y0 * g.s - g.r * g.d);
  const int64_t hi = std::min(g.H, (t.y1 - 1) * g.s + g.r * g.d + 1);
  const char* ip = reinterpret_cast<const char*>(in + lo * g.W);
  for (int64_t i = 0; i < (hi - lo) * g.W; i += step) DDF_PREFETCH(ip + i * sizeof(scalar_t));
}

// Offset of the contiguous view of tap offset `off` in a phase-split row: phase (off mod s), shifted floor(off/s).
DDF_INLINE int64_t phase_offset(int64_t off, int64_t s, int64_t SW) {
  const int64_t ph = ((off % s) + s) % s;
  return ph * SW + (off - ph) / s;
}

// grad_spatial of one pixel (G[t], t = h * kk + j) written through stride tsC; with `norm` mapped to the raw taps
// (FilterNorm backward, as bwd_store_planar).
template <typename scalar_t>
DDF_INLINE void bwd_store_pixel(const at::opmath_type<scalar_t>* DDF_RESTRICT G, const scalar_t* raw, int64_t ssC,
                                const at::opmath_type<scalar_t>* DDF_RESTRICT stat, const GeoI& g, bool norm,
                                at::opmath_type<scalar_t> gain, scalar_t* dst, int64_t tsC) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!norm) {
    for (int64_t t = 0; t < g.head * g.kk; ++t) dst[t * tsC] = static_cast<scalar_t>(G[t]);
    return;
  }
  for (int64_t h = 0; h < g.head; ++h) {
    const int64_t t0 = h * g.kk;
    const acc_t mean = stat[2 * h], sd = stat[2 * h + 1], a = sd + acc_t(kFilterNormEps);
    acc_t sg = 0, sgc = 0;
    for (int64_t j = 0; j < g.kk; ++j) {
      sg += gain * G[t0 + j];
      sgc += gain * G[t0 + j] * (static_cast<acc_t>(raw[(t0 + j) * ssC]) - mean);
    }
    const acc_t coef = sd > acc_t(0) ? sgc / (acc_t(g.kk - 1) * sd * a * a) : acc_t(0);
    sg /= acc_t(g.kk);
    for (int64_t j = 0; j < g.kk; ++j)
      dst[(t0 + j) * tsC] = static_cast<scalar_t>((gain * G[t0 + j] - sg) / a -
                                                  (static_cast<acc_t>(raw[(t0 + j) * ssC]) - mean) * coef);
  }
}

// Arguments of the NCHW backward kernels (contiguous tensors).
template <typename scalar_t>
struct NchwBwdArgs {
  GeoI g;
  const scalar_t *go, *in, *ch, *sp;
  scalar_t *gin, *gsp;
  at::opmath_type<scalar_t>* partial;  // grad_channel partial sums [b * C + c][row block][j]
  int64_t R, n_rb;                     // rows per block, blocks per plane
  bool norm;
  at::opmath_type<scalar_t> gain;
};

// Strides and pointers of the NHWC backward (channel stride 1 for input, grad_output and grad_input).
template <typename scalar_t>
struct NhwcBwdArgs {
  GeoI g;
  const scalar_t *go, *in, *sp;
  scalar_t *gin, *gsp;
  int64_t isB, isH, isW, gsB, gsH, gsW, ssB, ssC, ssH, ssW, tsB, tsC, tsH, tsW, nsB, nsH, nsW;
  const at::opmath_type<scalar_t>* chT;  // transpose_channel_filter
  at::opmath_type<scalar_t>* partial;    // grad_channel partial sums [b][row block][j][c]
  int64_t R, n_rb;
  bool norm;
  at::opmath_type<scalar_t> gain;
};

template <typename scalar_t>
NhwcBwdArgs<scalar_t> nhwc_bwd_args(const Tensor& gout, const Tensor& input, const Tensor& sp, Tensor& gin,
                                    Tensor& gsp) {
  NhwcBwdArgs<scalar_t> a{};
  a.go = gout.const_data_ptr<scalar_t>(); a.in = input.const_data_ptr<scalar_t>();
  a.sp = sp.const_data_ptr<scalar_t>(); a.gin = gin.mutable_data_ptr<scalar_t>();
  a.gsp = gsp.mutable_data_ptr<scalar_t>();
  a.isB = input.stride(0); a.isH = input.stride(2); a.isW = input.stride(3);
  a.gsB = gout.stride(0); a.gsH = gout.stride(2); a.gsW = gout.stride(3);
  a.ssB = sp.stride(0); a.ssC = sp.stride(1); a.ssH = sp.stride(2); a.ssW = sp.stride(3);
  a.tsB = gsp.stride(0); a.tsC = gsp.stride(1); a.tsH = gsp.stride(2); a.tsW = gsp.stride(3);
  a.nsB = gin.stride(0); a.nsH = gin.stride(2); a.nsW = gin.stride(3);
  return a;
}

// Output pixels per group of the NHWC grad_spatial / grad_channel loop (nhwc_filter_grads_row).
constexpr int64_t kNhwcBwdPixels = 4;

// Per-thread scratch of the NHWC backward.
template <typename acc_t>
struct NhwcBwdScratch {
  std::vector<acc_t> spn, stat, G, acc, go_buf, in_buf, go_taps, tap_sp;
  std::vector<const acc_t*> tap_go, tap_ch;  // the valid taps of one grad_input pixel
  NhwcBwdScratch(const GeoI& g, int64_t R)
      : spn(bwd_halo_rows(g, R) * g.Wo * g.head * g.kk), stat(bwd_halo_rows(g, R) * g.Wo * g.head * 2),
        G(kNhwcBwdPixels * g.head * g.kk), acc(g.C), go_buf(kNhwcBwdPixels * g.C), in_buf(kNhwcBwdPixels * g.C),
        go_taps(g.kk * g.C),  // converted grad_output pixels (half types)
        tap_sp(g.kk * g.head), tap_go(g.kk), tap_ch(g.kk) {}
};

// The backward kernels (ddf_backward_simd.h) per instruction set, like the forward's; cpu_isa() picks one.
namespace isa_generic {
#define DDF_VB 16
#include "ddf_backward_simd.h"
#undef DDF_VB
}  // namespace isa_generic

#if DDF_X86_ISAS
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DDF_VB 32
#include "ddf_backward_simd.h"
#undef DDF_VB
#pragma GCC pop_options
}  // namespace isa_avx2

namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define DDF_VB 64
#include "ddf_backward_simd.h"
#undef DDF_VB
#pragma GCC pop_options
}  // namespace isa_avx512
#endif

template <typename scalar_t, bool MUL>
void backward_nchw(const Tensor& gout, const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& gin,
                   Tensor& gch, Tensor& gsp, const GeoI g, bool norm, double gain) {
  using acc_t = at::opmath_type<scalar_t>;
  NchwBwdArgs<scalar_t> a{};
  a.g = g;
  a.go = gout.const_data_ptr<scalar_t>(); a.in = input.const_data_ptr<scalar_t>();
  a.ch = ch.const_data_ptr<scalar_t>(); a.sp = sp.const_data_ptr<scalar_t>();
  a.gin = gin.mutable_data_ptr<scalar_t>(); a.gsp = gsp.mutable_data_ptr<scalar_t>();
  a.R = bwd_block_rows(g, 65536 / std::max<int64_t>(1, g.kk * g.Wo), g.B * g.head);
  a.n_rb = (g.Ho + a.R - 1) / a.R;
  a.norm = norm;
  a.gain = static_cast<acc_t>(gain);
  std::vector<acc_t> partial(g.B * g.C * a.n_rb * g.kk);
  a.partial = partial.data();
  DDF_ON_CPU_ISA(backward_nchw_simd<scalar_t, MUL>(a));
  scalar_t* gch_data = gch.mutable_data_ptr<scalar_t>();
  for (int64_t bc = 0; bc < g.B * g.C; ++bc)
    for (int64_t j = 0; j < g.kk; ++j) {
      acc_t sum = 0;
      for (int64_t rb = 0; rb < a.n_rb; ++rb) sum += partial[(bc * a.n_rb + rb) * g.kk + j];
      gch_data[bc * g.kk + j] = static_cast<scalar_t>(sum);
    }
}

template <typename scalar_t, bool MUL>
void backward_nhwc(const Tensor& gout, const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& gin,
                   Tensor& gch, Tensor& gsp, const GeoI g, bool norm, double gain) {
  using acc_t = at::opmath_type<scalar_t>;
  NhwcBwdArgs<scalar_t> a = nhwc_bwd_args<scalar_t>(gout, input, sp, gin, gsp);
  const auto chT = transpose_channel_filter<scalar_t>(ch, g);
  const int64_t kkC = g.kk * g.C;
  a.g = g;
  a.chT = chT.data();
  a.R = bwd_block_rows(g, g.Ho, g.B);
  a.n_rb = (g.Ho + a.R - 1) / a.R;
  a.norm = norm;
  a.gain = static_cast<acc_t>(gain);
  std::vector<acc_t> partial(g.B * a.n_rb * kkC);
  a.partial = partial.data();
  DDF_ON_CPU_ISA(backward_nhwc_simd<scalar_t, MUL>(a));
  scalar_t* gch_data = gch.mutable_data_ptr<scalar_t>();
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t j = 0; j < g.kk; ++j) {
        acc_t sum = 0;
        for (int64_t rb = 0; rb < a.n_rb; ++rb) sum += partial[(b * a.n_rb + rb) * kkC + j * g.C + c];
        gch_data[(b * g.C + c) * g.kk + j] = static_cast<scalar_t>(sum);
      }
}

// True when every value of t is finite (a plain loop: at::isfinite(t).all() costs four ATen ops per call).
template <typename scalar_t>
bool all_finite(const Tensor& t) {
  const Tensor c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  bool ok = true;
  for (int64_t i = 0; i < c.numel(); ++i) ok &= std::isfinite(static_cast<at::opmath_type<scalar_t>>(p[i]));
  return ok;
}

// -------------------------------------------------------------------------------------------------------------
Tensor ddf_forward_cpu(const Tensor& input_, const Tensor& channel_filter, const Tensor& spatial_filter,
                       int64_t kernel_size, int64_t dilation, int64_t stride, int64_t head, int64_t combine,
                       bool spatial_norm, double spatial_gain) {
  check_args(input_, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm);
  TORCH_CHECK(input_.device().is_cpu(), "ddf_forward_cpu: input must be a CPU tensor");
  const bool cl = use_channels_last(input_);
  const GeoI g = make_geo(input_, kernel_size, dilation, stride, head);
  Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input_.options().memory_format(memory_format_of(input_)));
  if (out.numel() == 0) return out;
  // The register-blocked kernels let an out-of-image tap read a zero input with a zero spatial value, which adds
  // exactly 0 only for a finite channel filter; otherwise the kernels that skip such taps run.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_.scalar_type(), "ddf_forward_cpu", [&] {
    if (all_finite<scalar_t>(channel_filter)) {
      const Tensor input = cl ? input_ : input_.contiguous();
      const Tensor ch = cl ? channel_filter : channel_filter.contiguous();
      const Tensor sp = cl ? spatial_filter : spatial_filter.contiguous();
      if (combine == kCombineMul) forward_simd<scalar_t, true>(input, ch, sp, out, g, spatial_norm, spatial_gain, cl);
      else forward_simd<scalar_t, false>(input, ch, sp, out, g, spatial_norm, spatial_gain, cl);
    } else if (cl) {
      // channels_last input is used as is; channel/spatial filters are read through their strides
      if (combine == kCombineMul)
        forward_nhwc<scalar_t, true>(input_, channel_filter, spatial_filter, out, g, spatial_norm, spatial_gain);
      else
        forward_nhwc<scalar_t, false>(input_, channel_filter, spatial_filter, out, g, spatial_norm, spatial_gain);
    } else {
      // contiguous tensors are used as is (.contiguous() is a no-op); other strided views are compacted
      const Tensor input = input_.contiguous();
      const Tensor ch = channel_filter.contiguous();
      const Tensor sp = spatial_filter.contiguous();
      if (combine == kCombineMul) forward_nchw<scalar_t, true>(input, ch, sp, out, g, spatial_norm, spatial_gain);
      else forward_nchw<scalar_t, false>(input, ch, sp, out, g, spatial_norm, spatial_gain);
    }
  });
  return out;
}

// Backward entry point; with spatial_norm the gradient w.r.t. the spatial filter is w.r.t. its raw taps
// (FilterNorm and its backward run inside the kernels). NCHW tensors go to backward_nchw (other strided views are
// compacted first), channels_last inputs to backward_nhwc (filters read through their strides).
std::tuple<Tensor, Tensor, Tensor> ddf_backward_cpu(const Tensor& grad_output, const Tensor& input_,
                                                    const Tensor& channel_filter, const Tensor& spatial_filter,
                                                    int64_t kernel_size, int64_t dilation, int64_t stride,
                                                    int64_t head, int64_t combine, bool spatial_norm,
                                                    double spatial_gain) {
  check_args(input_, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm);
  check_grad_output(grad_output, input_, stride);
  TORCH_CHECK(input_.device().is_cpu(), "ddf_backward_cpu: input must be a CPU tensor");
  const bool cl = use_channels_last(input_);
  const GeoI g = make_geo(input_, kernel_size, dilation, stride, head);
  Tensor gin = at::empty(input_.sizes(), input_.options().memory_format(memory_format_of(input_)));
  Tensor gch = at::empty(channel_filter.sizes(), channel_filter.options());
  Tensor gsp = at::empty(spatial_filter.sizes(),
                         spatial_filter.options().memory_format(memory_format_of(spatial_filter)));
  if (input_.numel() == 0 || grad_output.numel() == 0) {
    gin.zero_(); gch.zero_(); gsp.zero_();
    return {gin, gch, gsp};
  }
  const bool norm = spatial_norm;
  const double gain = spatial_gain;
  // NCHW with <= 8 output columns: backward_nchw's row vectors are mostly idle lanes and its per-row costs are paid
  // for every channel, while the channels-last kernel vectorises over the channels: converting grad_output and input
  // to channels_last and grad_input back measured ~4x faster (8x256x7x7 float32, 1 thread: 0.45 vs 1.86 ms).
  const bool narrow = !cl && g.Wo <= 8 && g.Cg >= 16;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_.scalar_type(), "ddf_backward_cpu", [&] {
    if (cl || narrow) {
      const auto fmt = at::MemoryFormat::ChannelsLast;
      const Tensor gout = grad_output.contiguous(fmt);
      const Tensor input = cl ? input_ : input_.contiguous(fmt);
      Tensor gin_k = cl ? gin : at::empty(input_.sizes(), input_.options().memory_format(fmt));
      if (combine == kCombineMul)
        backward_nhwc<scalar_t, true>(gout, input, channel_filter, spatial_filter, gin_k, gch, gsp, g, norm, gain);
      else
        backward_nhwc<scalar_t, false>(gout, input, channel_filter, spatial_filter, gin_k, gch, gsp, g, norm, gain);
      if (!cl) gin.copy_(gin_k);
    } else {
      const Tensor gout = grad_output.contiguous();
      const Tensor input = input_.contiguous();
      const Tensor ch = channel_filter.contiguous();
      const Tensor sp = spatial_filter.contiguous();
      Tensor gsp_c = gsp.is_contiguous() ? gsp : at::empty(spatial_filter.sizes(), spatial_filter.options());
      if (combine == kCombineMul) backward_nchw<scalar_t, true>(gout, input, ch, sp, gin, gch, gsp_c, g, norm, gain);
      else backward_nchw<scalar_t, false>(gout, input, ch, sp, gin, gch, gsp_c, g, norm, gain);
      if (!gsp_c.is_same(gsp)) gsp.copy_(gsp_c);
    }
  });
  return {gin, gch, gsp};
}

// How many threads at::parallel_for runs n one-item chunks on: torch's intra-op thread count (capped by n) when this
// file was compiled with OpenMP, 1 without it (at::parallel_for is a header template: then every kernel above runs
// on one thread). Checked by tests/test_op.py; reported by ddf.backend_info().
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, std::max<int64_t>(1, n), 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

}  // namespace

}  // namespace ddf

TORCH_LIBRARY(ddf_cpp, m) {
  m.def("forward(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
        "int stride, int head, int combine, bool spatial_norm, float spatial_gain) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
        "int kernel_size, int dilation, int stride, int head, int combine, bool spatial_norm, float spatial_gain) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("parallel_threads(int n) -> int", &ddf::parallel_threads);
}

TORCH_LIBRARY_IMPL(ddf_cpp, CPU, m) {
  m.impl("forward", &ddf::ddf_forward_cpu);
  m.impl("backward", &ddf::ddf_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DDF op C++ CPU kernels (registered as torch.ops.ddf_cpp.forward / backward)";
}
