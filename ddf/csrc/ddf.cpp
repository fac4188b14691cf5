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
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "ddf_common.h"

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

// Range [x0, x1) of output columns whose tap at input offset `off` (input x = x*s + off) is inside [0, W).
inline void valid_range(int64_t off, int64_t s, int64_t W, int64_t Wo, int64_t& x0, int64_t& x1) {
  x0 = off < 0 ? (-off + s - 1) / s : 0;
  const int64_t last = W - 1 - off;
  x1 = last < 0 ? 0 : std::min<int64_t>(Wo, last / s + 1);
  if (x1 < x0) x1 = x0;
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

// -------------------------------------------------------------------------------------------------------------
// The spatial filter of rows [y0, y1) of one (b, head), as acc_t in buf[j * n + i] (n = (y1 - y0) * Wo pixels,
// i = (y - y0) * Wo + x), read once per head and reused by all its channels. With `norm`, each pixel's k*k taps
// are normalised here (FilterNorm, paper Eq. 3: gain * (sp - mean) / (unbiased std + eps)); the normalised filter
// lives only in this per-thread buffer. `tmp` holds 2 * n values.
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
  if (!norm) return;
  acc_t* DDF_RESTRICT mean = tmp;
  acc_t* DDF_RESTRICT var = tmp + n;
  std::fill(tmp, tmp + 2 * n, acc_t(0));
  for (int64_t j = 0; j < g.kk; ++j)
    for (int64_t i = 0; i < n; ++i) mean[i] += buf[j * n + i];
  for (int64_t i = 0; i < n; ++i) mean[i] /= acc_t(g.kk);
  for (int64_t j = 0; j < g.kk; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t c = buf[j * n + i] - mean[i];
      var[i] += c * c;
    }
  for (int64_t i = 0; i < n; ++i) var[i] = gain / (std::sqrt(var[i] / acc_t(g.kk - 1)) + acc_t(kFilterNormEps));
  for (int64_t j = 0; j < g.kk; ++j)
    for (int64_t i = 0; i < n; ++i) buf[j * n + i] = (buf[j * n + i] - mean[i]) * var[i];
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
    std::vector<acc_t> row(g.Wo), chv(g.kk), spbuf(g.kk * R * g.Wo), tmp(2 * R * g.Wo);
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
// normalised per head when `norm` (see load_spatial_rows).
template <typename scalar_t>
inline void load_pixel_taps(const scalar_t* spp, int64_t ssC, const GeoI& g, bool norm, at::opmath_type<scalar_t> gain,
                            at::opmath_type<scalar_t>* DDF_RESTRICT taps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = 0; t < g.head * g.kk; ++t) taps[t] = static_cast<acc_t>(spp[t * ssC]);
  if (!norm) return;
  for (int64_t h = 0; h < g.head; ++h) {
    acc_t* DDF_RESTRICT v = taps + h * g.kk;
    acc_t mean = 0, var = 0;
    for (int64_t j = 0; j < g.kk; ++j) mean += v[j];
    mean /= acc_t(g.kk);
    for (int64_t j = 0; j < g.kk; ++j) var += (v[j] - mean) * (v[j] - mean);
    const acc_t scale = gain / (std::sqrt(var / acc_t(g.kk - 1)) + acc_t(kFilterNormEps));
    for (int64_t j = 0; j < g.kk; ++j) v[j] = (v[j] - mean) * scale;
  }
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
#define DDF_INLINE inline __attribute__((always_inline))
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
#else
#define DDF_INLINE inline
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
  int64_t HK, osW;
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
#include "ddf_forward_simd.h"
#undef DDF_VB
#undef DDF_NC
#undef DDF_F16C
#undef DDF_NP
#undef DDF_NCV
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
#include "ddf_forward_simd.h"
#undef DDF_VB
#undef DDF_NC
#undef DDF_F16C
#undef DDF_NP
#undef DDF_NCV
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
#include "ddf_forward_simd.h"
#undef DDF_VB
#undef DDF_NC
#undef DDF_F16C
#undef DDF_NP
#undef DDF_NCV
#pragma GCC pop_options
}  // namespace isa_avx512
#endif

// 0 generic, 1 AVX2, 2 AVX-512: the best the CPU supports, capped by DDF_CPU_ISA.
int forward_isa() {
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
  const int isa = forward_isa();
#if DDF_X86_ISAS
  if (isa == 2) return cl ? isa_avx512::forward_nhwc_simd<scalar_t, MUL>(a) : isa_avx512::forward_nchw_simd<scalar_t, MUL>(a);
  if (isa == 1) return cl ? isa_avx2::forward_nhwc_simd<scalar_t, MUL>(a) : isa_avx2::forward_nchw_simd<scalar_t, MUL>(a);
#endif
  (void)isa;
  return cl ? isa_generic::forward_nhwc_simd<scalar_t, MUL>(a) : isa_generic::forward_nchw_simd<scalar_t, MUL>(a);
}

// -------------------------------------------------------------------------------------------------------------
// NCHW backward.
//  pass 1, task per (b, c): grad_input plane (scatter into a plane-private buffer) and grad_channel[b, c, :].
//  pass 2, task per (b, head, output row): grad_spatial[b, head*kk + j, y, :] summed over the head's channels.
template <typename scalar_t, bool MUL>
void backward_nchw(const Tensor& gout, const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& gin,
                   Tensor& gch, Tensor& gsp, const GeoI g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go_data = gout.const_data_ptr<scalar_t>();
  const scalar_t* in_data = input.const_data_ptr<scalar_t>();
  const scalar_t* ch_data = ch.const_data_ptr<scalar_t>();
  const scalar_t* sp_data = sp.const_data_ptr<scalar_t>();
  scalar_t* gin_data = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gch_data = gch.mutable_data_ptr<scalar_t>();
  scalar_t* gsp_data = gsp.mutable_data_ptr<scalar_t>();
  const int64_t HW = g.H * g.W, HoWo = g.Ho * g.Wo;

  at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    std::vector<acc_t> plane(HW);
    std::vector<acc_t> chv(g.kk), gcv(g.kk);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C, h = c / g.Cg;
      const scalar_t* DDF_RESTRICT in = in_data + bc * HW;
      const scalar_t* DDF_RESTRICT go = go_data + bc * HoWo;
      const scalar_t* spb = sp_data + (b * g.head + h) * g.kk * HoWo;
      for (int64_t j = 0; j < g.kk; ++j) {
        chv[j] = static_cast<acc_t>(ch_data[bc * g.kk + j]);
        gcv[j] = acc_t(0);
      }
      std::fill(plane.begin(), plane.end(), acc_t(0));
      acc_t* DDF_RESTRICT gp = plane.data();
      for (int64_t y = 0; y < g.Ho; ++y) {
        const scalar_t* DDF_RESTRICT go_row = go + y * g.Wo;
        for (int64_t jy = 0; jy < g.k; ++jy) {
          const int64_t iy = y * g.s + (jy - g.r) * g.d;
          if (iy < 0 || iy >= g.H) continue;
          const scalar_t* DDF_RESTRICT in_row = in + iy * g.W;
          acc_t* DDF_RESTRICT gp_row = gp + iy * g.W;
          for (int64_t jx = 0; jx < g.k; ++jx) {
            const int64_t j = jy * g.k + jx;
            const int64_t off = (jx - g.r) * g.d;
            int64_t x0, x1;
            valid_range(off, g.s, g.W, g.Wo, x0, x1);
            const scalar_t* DDF_RESTRICT sp_row = spb + j * HoWo + y * g.Wo;
            const acc_t cj = chv[j];
            acc_t sum = 0;
            if (g.s == 1) {
              for (int64_t x = x0; x < x1; ++x) {
                const acc_t sv = static_cast<acc_t>(sp_row[x]);
                const acc_t gv = static_cast<acc_t>(go_row[x]);
                gp_row[x + off] += gv * (MUL ? sv * cj : sv + cj);
              }
            } else {
              for (int64_t x = x0; x < x1; ++x) {
                const acc_t sv = static_cast<acc_t>(sp_row[x]);
                const acc_t gv = static_cast<acc_t>(go_row[x]);
                gp_row[x * g.s + off] += gv * (MUL ? sv * cj : sv + cj);
              }
            }
            if (g.s == 1) {
              const scalar_t* DDF_RESTRICT src = in_row + off;
              DDF_SIMD_SUM(sum)
              for (int64_t x = x0; x < x1; ++x) {
                const acc_t gv = static_cast<acc_t>(go_row[x]) * static_cast<acc_t>(src[x]);
                sum += MUL ? gv * static_cast<acc_t>(sp_row[x]) : gv;
              }
            } else {
              DDF_SIMD_SUM(sum)
              for (int64_t x = x0; x < x1; ++x) {
                const acc_t gv = static_cast<acc_t>(go_row[x]) * static_cast<acc_t>(in_row[x * g.s + off]);
                sum += MUL ? gv * static_cast<acc_t>(sp_row[x]) : gv;
              }
            }
            gcv[j] += sum;
          }
        }
      }
      scalar_t* DDF_RESTRICT gi = gin_data + bc * HW;
      for (int64_t i = 0; i < HW; ++i) gi[i] = static_cast<scalar_t>(gp[i]);
      for (int64_t j = 0; j < g.kk; ++j) gch_data[bc * g.kk + j] = static_cast<scalar_t>(gcv[j]);
    }
  });

  at::parallel_for(0, g.B * g.head * g.Ho, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    std::vector<acc_t> buf(g.kk * g.Wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t y = task % g.Ho, bh = task / g.Ho, b = bh / g.head, h = bh % g.head;
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t cg = 0; cg < g.Cg; ++cg) {
        const int64_t bc = b * g.C + h * g.Cg + cg;
        const scalar_t* DDF_RESTRICT in = in_data + bc * HW;
        const scalar_t* DDF_RESTRICT go_row = go_data + bc * HoWo + y * g.Wo;
        for (int64_t jy = 0; jy < g.k; ++jy) {
          const int64_t iy = y * g.s + (jy - g.r) * g.d;
          if (iy < 0 || iy >= g.H) continue;
          const scalar_t* DDF_RESTRICT in_row = in + iy * g.W;
          for (int64_t jx = 0; jx < g.k; ++jx) {
            const int64_t j = jy * g.k + jx;
            const int64_t off = (jx - g.r) * g.d;
            int64_t x0, x1;
            valid_range(off, g.s, g.W, g.Wo, x0, x1);
            acc_t* DDF_RESTRICT bj = buf.data() + j * g.Wo;
            const acc_t cj = MUL ? static_cast<acc_t>(ch_data[bc * g.kk + j]) : acc_t(1);
            if (g.s == 1) {
              const scalar_t* DDF_RESTRICT src = in_row + off;
              for (int64_t x = x0; x < x1; ++x)
                bj[x] += static_cast<acc_t>(go_row[x]) * static_cast<acc_t>(src[x]) * cj;
            } else {
              for (int64_t x = x0; x < x1; ++x)
                bj[x] += static_cast<acc_t>(go_row[x]) * static_cast<acc_t>(in_row[x * g.s + off]) * cj;
            }
          }
        }
      }
      for (int64_t j = 0; j < g.kk; ++j) {
        scalar_t* DDF_RESTRICT dst = gsp_data + ((b * g.head + h) * g.kk + j) * HoWo + y * g.Wo;
        const acc_t* DDF_RESTRICT src = buf.data() + j * g.Wo;
        for (int64_t x = 0; x < g.Wo; ++x) dst[x] = static_cast<scalar_t>(src[x]);
      }
    }
  });
}

// NHWC backward.
//  pass 1, task per (b, output row): grad_spatial (sum over a head's channels, owned by the pixel) and per-row
//          partial sums of grad_channel, reduced afterwards per (b, c).
//  pass 2, task per (b, input row): grad_input gathered from the output pixels that read it.
template <typename scalar_t, bool MUL>
void backward_nhwc(const Tensor& gout, const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& gin,
                   Tensor& gch, Tensor& gsp, const GeoI g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go_data = gout.const_data_ptr<scalar_t>();
  const scalar_t* in_data = input.const_data_ptr<scalar_t>();
  const scalar_t* sp_data = sp.const_data_ptr<scalar_t>();
  scalar_t* gin_data = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gch_data = gch.mutable_data_ptr<scalar_t>();
  scalar_t* gsp_data = gsp.mutable_data_ptr<scalar_t>();
  const auto chT = transpose_channel_filter<scalar_t>(ch, g);
  const int64_t isB = input.stride(0), isH = input.stride(2), isW = input.stride(3);
  const int64_t gsB = gout.stride(0), gsH = gout.stride(2), gsW = gout.stride(3);
  const int64_t ssB = sp.stride(0), ssC = sp.stride(1), ssH = sp.stride(2), ssW = sp.stride(3);
  const int64_t tsB = gsp.stride(0), tsC = gsp.stride(1), tsH = gsp.stride(2), tsW = gsp.stride(3);
  const int64_t nsB = gin.stride(0), nsH = gin.stride(2), nsW = gin.stride(3);
  const int64_t kkC = g.kk * g.C;
  std::vector<acc_t> partial(g.B * g.Ho * kkC);

  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / g.Ho, y = by % g.Ho;
      const acc_t* chb = chT.data() + b * kkC;
      acc_t* DDF_RESTRICT part = partial.data() + by * kkC;
      std::fill(part, part + kkC, acc_t(0));
      for (int64_t x = 0; x < g.Wo; ++x) {
        const scalar_t* spp = sp_data + b * ssB + y * ssH + x * ssW;
        scalar_t* tp = gsp_data + b * tsB + y * tsH + x * tsW;
        const scalar_t* DDF_RESTRICT gp = go_data + b * gsB + y * gsH + x * gsW;
        for (int64_t jy = 0; jy < g.k; ++jy) {
          const int64_t iy = y * g.s + (jy - g.r) * g.d;
          for (int64_t jx = 0; jx < g.k; ++jx) {
            const int64_t ix = x * g.s + (jx - g.r) * g.d;
            const int64_t j = jy * g.k + jx;
            if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) {
              for (int64_t h = 0; h < g.head; ++h) tp[(h * g.kk + j) * tsC] = scalar_t(0);
              continue;
            }
            const scalar_t* DDF_RESTRICT px = in_data + b * isB + iy * isH + ix * isW;
            const acc_t* DDF_RESTRICT cj = chb + j * g.C;
            acc_t* DDF_RESTRICT pj = part + j * g.C;
            for (int64_t h = 0; h < g.head; ++h) {
              const acc_t sv = static_cast<acc_t>(spp[(h * g.kk + j) * ssC]);
              const int64_t c0 = h * g.Cg, c1 = c0 + g.Cg;
              acc_t sum = 0;
              DDF_SIMD_SUM(sum)
              for (int64_t c = c0; c < c1; ++c) {
                const acc_t gi = static_cast<acc_t>(gp[c]) * static_cast<acc_t>(px[c]);
                sum += MUL ? gi * cj[c] : gi;
                pj[c] += MUL ? gi * sv : gi;
              }
              tp[(h * g.kk + j) * tsC] = static_cast<scalar_t>(sum);
            }
          }
        }
      }
    }
  });

  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C;
      for (int64_t j = 0; j < g.kk; ++j) {
        acc_t sum = 0;
        for (int64_t y = 0; y < g.Ho; ++y) sum += partial[(b * g.Ho + y) * kkC + j * g.C + c];
        gch_data[bc * g.kk + j] = static_cast<scalar_t>(sum);
      }
    }
  });

  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) DDF_MULTIVERSION {
    std::vector<acc_t> accv(g.C);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / g.H, iy = bi % g.H;
      const acc_t* chb = chT.data() + b * kkC;
      for (int64_t ix = 0; ix < g.W; ++ix) {
        acc_t* DDF_RESTRICT acc = accv.data();
        std::fill(accv.begin(), accv.end(), acc_t(0));
        for (int64_t jy = 0; jy < g.k; ++jy) {
          const int64_t ty = iy - (jy - g.r) * g.d;
          if (ty < 0 || ty % g.s != 0) continue;
          const int64_t y = ty / g.s;
          if (y >= g.Ho) continue;
          for (int64_t jx = 0; jx < g.k; ++jx) {
            const int64_t tx = ix - (jx - g.r) * g.d;
            if (tx < 0 || tx % g.s != 0) continue;
            const int64_t x = tx / g.s;
            if (x >= g.Wo) continue;
            const int64_t j = jy * g.k + jx;
            const scalar_t* DDF_RESTRICT gp = go_data + b * gsB + y * gsH + x * gsW;
            const scalar_t* spp = sp_data + b * ssB + y * ssH + x * ssW;
            const acc_t* DDF_RESTRICT cj = chb + j * g.C;
            for (int64_t h = 0; h < g.head; ++h) {
              const acc_t sv = static_cast<acc_t>(spp[(h * g.kk + j) * ssC]);
              const int64_t c0 = h * g.Cg, c1 = c0 + g.Cg;
              for (int64_t c = c0; c < c1; ++c) acc[c] += static_cast<acc_t>(gp[c]) * (MUL ? sv * cj[c] : sv + cj[c]);
            }
          }
        }
        scalar_t* DDF_RESTRICT dst = gin_data + b * nsB + iy * nsH + ix * nsW;
        for (int64_t c = 0; c < g.C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
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
  // NCHW with stride > 1: the row-buffer kernel below measured faster (10 vs 16 ms, 8x256x56x56 s=2, 2 threads).
  const bool simd = (cl || stride == 1) && at::isfinite(channel_filter).all().item<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_.scalar_type(), "ddf_forward_cpu", [&] {
    if (simd) {
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

std::tuple<Tensor, Tensor, Tensor> ddf_backward_unfused(const Tensor& grad_output, const Tensor& input_,
                                                    const Tensor& channel_filter, const Tensor& spatial_filter,
                                                    int64_t kernel_size, int64_t dilation, int64_t stride,
                                                    int64_t head, int64_t combine, bool spatial_norm,
                                                    double spatial_gain) {
  check_args(input_, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, false);
  (void)spatial_norm;
  (void)spatial_gain;
  check_grad_output(grad_output, input_, stride);
  TORCH_CHECK(input_.device().is_cpu(), "ddf_backward_cpu: input must be a CPU tensor");
  const bool cl = use_channels_last(input_);
  const GeoI g = make_geo(input_, kernel_size, dilation, stride, head);
  Tensor gin = at::empty(input_.sizes(), input_.options().memory_format(memory_format_of(input_)));
  Tensor gch = at::empty(channel_filter.sizes(), channel_filter.options());
  Tensor gsp = at::empty(spatial_filter.sizes(), spatial_filter.options().memory_format(memory_format_of(spatial_filter)));
  if (input_.numel() == 0 || grad_output.numel() == 0) {
    gin.zero_(); gch.zero_(); gsp.zero_();
    return {gin, gch, gsp};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_.scalar_type(), "ddf_backward_cpu", [&] {
    if (cl) {
      const Tensor gout = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
      if (combine == kCombineMul)
        backward_nhwc<scalar_t, true>(gout, input_, channel_filter, spatial_filter, gin, gch, gsp, g);
      else
        backward_nhwc<scalar_t, false>(gout, input_, channel_filter, spatial_filter, gin, gch, gsp, g);
    } else {
      const Tensor gout = grad_output.contiguous();
      const Tensor input = input_.contiguous();
      const Tensor ch = channel_filter.contiguous();
      const Tensor sp = spatial_filter.contiguous();
      Tensor gsp_c = gsp.is_contiguous() ? gsp : at::empty(spatial_filter.sizes(), spatial_filter.options());
      if (combine == kCombineMul) backward_nchw<scalar_t, true>(gout, input, ch, sp, gin, gch, gsp_c, g);
      else backward_nchw<scalar_t, false>(gout, input, ch, sp, gin, gch, gsp_c, g);
      if (!gsp_c.is_same(gsp)) gsp.copy_(gsp_c);
    }
  });
  return {gin, gch, gsp};
}

// FilterNorm of a spatial filter (B, head*kk, Ho, Wo) in its dtype, and the gradient w.r.t. its raw taps.
Tensor spatial_filter_norm(const Tensor& raw, int64_t head, int64_t kk, double gain) {
  const auto v = raw.reshape({raw.size(0), head, kk, raw.size(2), raw.size(3)});
  const auto centred = v - v.mean({2}, true);
  const auto sd = (centred * centred).sum({2}, true).div(double(kk - 1)).sqrt();
  return (centred / (sd + kFilterNormEps) * gain).reshape(raw.sizes());
}

Tensor spatial_filter_norm_backward(const Tensor& raw, const Tensor& grad, int64_t head, int64_t kk, double gain) {
  const std::vector<int64_t> shape5{raw.size(0), head, kk, raw.size(2), raw.size(3)};
  const auto v = raw.reshape(shape5);
  const auto g = grad.reshape(shape5) * gain;
  const auto centred = v - v.mean({2}, true);
  const auto sd = (centred * centred).sum({2}, true).div(double(kk - 1)).sqrt();
  const auto first = (g - g.mean({2}, true)) / (sd + kFilterNormEps);
  const auto denom = sd * (sd + kFilterNormEps) * (sd + kFilterNormEps) * double(kk - 1);
  const auto coef = at::where(sd > 0, (g * centred).sum({2}, true) / at::where(sd > 0, denom, at::ones_like(denom)),
                              at::zeros_like(denom));
  return (first - centred * coef).reshape(raw.sizes());
}

// Backward with the fused FilterNorm: the normalised filter of the whole batch is materialised (in float32 for
// half types, so the result is as accurate as the reference), the unfused backward runs on it, and FilterNorm's
// backward maps grad_spatial to the raw taps.
std::tuple<Tensor, Tensor, Tensor> ddf_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                    const Tensor& channel_filter, const Tensor& spatial_filter,
                                                    int64_t kernel_size, int64_t dilation, int64_t stride,
                                                    int64_t head, int64_t combine, bool spatial_norm,
                                                    double spatial_gain) {
  check_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm);
  if (!spatial_norm || input.numel() == 0 || grad_output.numel() == 0)
    return ddf_backward_unfused(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                head, combine, false, 1.0);
  check_grad_output(grad_output, input, stride);
  const auto dtype = input.scalar_type();
  const auto acc = (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
  const int64_t kk = kernel_size * kernel_size;
  const Tensor raw = spatial_filter.to(acc);
  const Tensor spn = spatial_filter_norm(raw, head, kk, spatial_gain).contiguous(memory_format_of(spatial_filter));
  auto grads = ddf_backward_unfused(grad_output.to(acc), input.to(acc), channel_filter.to(acc), spn, kernel_size,
                                    dilation, stride, head, combine, false, 1.0);
  const Tensor gsp = spatial_filter_norm_backward(raw, std::get<2>(grads), head, kk, spatial_gain);
  return {std::get<0>(grads).to(dtype).contiguous(memory_format_of(input)), std::get<1>(grads).to(dtype).contiguous(),
          gsp.to(dtype).contiguous(memory_format_of(spatial_filter))};
}

}  // namespace

}  // namespace ddf

TORCH_LIBRARY(ddf_cpp, m) {
  m.def("forward(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
        "int stride, int head, int combine, bool spatial_norm, float spatial_gain) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
        "int kernel_size, int dilation, int stride, int head, int combine, bool spatial_norm, float spatial_gain) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddf_cpp, CPU, m) {
  m.impl("forward", &ddf::ddf_forward_cpu);
  m.impl("backward", &ddf::ddf_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DDF op C++ CPU kernels (registered as torch.ops.ddf_cpp.forward / backward)";
}
