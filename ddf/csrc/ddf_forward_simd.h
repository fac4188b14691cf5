// Register-blocked forward kernels of the DDF op, written once over a vector type of DDF_VB bytes (GCC/clang vector
// extensions, or a plain array type elsewhere). NOT a normal header: ddf.cpp includes it once per instruction set,
// each time inside its own namespace and (x86 + GCC) under `#pragma GCC target`, with
//   DDF_VB    vector size in bytes (16: SSE2/NEON/generic, 32: AVX2, 64: AVX-512),
//   DDF_F16C  1 when float16 <-> float32 vector conversions (F16C / AVX-512F) may be used,
//   DDF_NC    channels per register block of the NCHW kernel,
//   DDF_NP, DDF_NCV  register block of the NHWC kernel (pixels x channel vectors).
// The loop nests are described at the top of each kernel. Both rely on the channel filter being finite (checked by
// the caller): a tap outside the image reads a zero input with its spatial filter value zeroed, which contributes
// exactly 0 only then (the caller runs the exact skipping kernels otherwise).

template <typename T>
using Vec = typename VecOf<T, DDF_VB>::type;

template <typename T>
constexpr int64_t lanes() {
  return DDF_VB / int64_t(sizeof(T));
}

template <typename T>
DDF_INLINE Vec<T> splat(T s) {
#if defined(__GNUC__)
  return s - Vec<T>{};  // one broadcast (a lane-by-lane fill compiles to lane inserts)
#else
  Vec<T> v;
  for (int64_t i = 0; i < lanes<T>(); ++i) v[i] = s;
  return v;
#endif
}

template <typename T>
DDF_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
DDF_INLINE void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// One vector of the accumulation type from lanes<acc_t>() consecutive values of any dtype.
template <typename scalar_t>
DDF_INLINE Vec<at::opmath_type<scalar_t>> load_acc(const scalar_t* p) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return vload<acc_t>(p);
#if defined(__GNUC__)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // bfloat16 is the upper half of a float32
    typedef uint16_t U16 __attribute__((vector_size(DDF_VB / 2)));
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    const Vec<uint32_t> u = __builtin_convertvector(h, Vec<uint32_t>) << 16;
    Vec<float> f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
#endif
#if DDF_F16C
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && DDF_VB == 32) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    Vec<float> v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && DDF_VB == 64) {
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    Vec<float> v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
#endif
  } else {
    Vec<acc_t> v;
    for (int64_t i = 0; i < lanes<acc_t>(); ++i) v[i] = static_cast<acc_t>(p[i]);
    return v;
  }
}

// Stores one accumulator vector as lanes<acc_t>() values of the output dtype (round to nearest even).
template <typename scalar_t>
DDF_INLINE void store_acc(scalar_t* p, const Vec<at::opmath_type<scalar_t>>& v) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    vstore<acc_t>(p, v);
#if defined(__GNUC__)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // as c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0
    Vec<uint32_t> u;
    std::memcpy(&u, &v, sizeof(u));
    u = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    const Vec<uint32_t> nan = (Vec<uint32_t>)(v != v);  // all ones where NaN
    u = (u & ~nan) | (nan & 0x7FC0u);
    typedef uint16_t U16 __attribute__((vector_size(DDF_VB / 2)));
    const U16 h = __builtin_convertvector(u, U16);
    std::memcpy(p, &h, sizeof(h));
#endif
#if DDF_F16C
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && DDF_VB == 32) {
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && DDF_VB == 64) {
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
#endif
  } else {
    for (int64_t i = 0; i < lanes<acc_t>(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  }
}

// The first n (< lanes) values of v, converted.
template <typename scalar_t>
DDF_INLINE void store_acc_partial(scalar_t* p, const Vec<at::opmath_type<scalar_t>>& v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
}

// n values converted to acc_t (vectorised body, scalar tail).
template <typename scalar_t>
DDF_INLINE void convert_row(const scalar_t* DDF_RESTRICT src, at::opmath_type<scalar_t>* DDF_RESTRICT dst,
                            int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = lanes<acc_t>();
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore<acc_t>(dst + i, load_acc<scalar_t>(src + i));
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// -------------------------------------------------------------------------------------------------------------
// NCHW: DDF_NC channels x NV vectors of one output row, x in [x, x + NV*L), over the row's nt in-image taps.
// tap_in[t]: the first channel's padded input row aligned with output column 0 (channel ci at + ci * PS);
// tap_sp[t]: the masked spatial filter row; tap_ch[t * DDF_NC + ci]: the channel filter values.
template <int NV, typename scalar_t, bool MUL>
DDF_INLINE void nchw_block(const at::opmath_type<scalar_t>* const* tap_in, const at::opmath_type<scalar_t>* const* tap_sp,
                           const at::opmath_type<scalar_t>* tap_ch, int64_t nt, int64_t PS, int64_t x, int64_t Wo,
                           scalar_t* const* out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = lanes<acc_t>();
  V acc[DDF_NC][NV];
  for (int ci = 0; ci < DDF_NC; ++ci)
    for (int v = 0; v < NV; ++v) acc[ci][v] = splat<acc_t>(acc_t(0));
  for (int64_t t = 0; t < nt; ++t) {
    const acc_t* in = tap_in[t] + x;
    const acc_t* sp = tap_sp[t] + x;
    V sv[NV];
    for (int v = 0; v < NV; ++v) sv[v] = vload<acc_t>(sp + v * L);
    for (int ci = 0; ci < DDF_NC; ++ci) {
      const V cj = splat<acc_t>(tap_ch[t * DDF_NC + ci]);
      for (int v = 0; v < NV; ++v) acc[ci][v] += vload<acc_t>(in + ci * PS + v * L) * (MUL ? sv[v] * cj : sv[v] + cj);
    }
  }
  for (int ci = 0; ci < DDF_NC; ++ci)
    for (int v = 0; v < NV; ++v) {
      const int64_t xv = x + v * L;
      if (xv + L <= Wo) store_acc<scalar_t>(out_rows[ci] + xv, acc[ci][v]);
      else if (xv < Wo) store_acc_partial<scalar_t>(out_rows[ci] + xv, acc[ci][v], Wo - xv);
    }
}

// The spatial filter of output rows [y0, y1) of one (b, head) as spbuf[(j * R + y - y0) * Wr + x], normalised when
// `norm`, zero for taps outside the image and for x >= Wo. raw/tmp: scratch of kk * R * Wo and 2 * R * Wo values.
template <typename scalar_t>
void load_spatial_masked(const ForwardArgs<scalar_t>& a, int64_t bh, int64_t y0, int64_t y1, int64_t R, int64_t Wr,
                         at::opmath_type<scalar_t>* spbuf, at::opmath_type<scalar_t>* raw,
                         at::opmath_type<scalar_t>* tmp) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI& g = a.g;
  const int64_t n = (y1 - y0) * g.Wo;
  load_spatial_rows<scalar_t>(a.sp + bh * g.kk * g.Ho * g.Wo, g, y0, y1, a.norm, static_cast<acc_t>(a.gain), raw, tmp);
  for (int64_t j = 0; j < g.kk; ++j) {
    int64_t x0, x1;
    valid_range((j % g.k - g.r) * g.d, g.s, g.W, g.Wo, x0, x1);
    for (int64_t yy = 0; yy < y1 - y0; ++yy) {
      acc_t* dst = spbuf + (j * R + yy) * Wr;
      const acc_t* src = raw + j * n + yy * g.Wo;
      for (int64_t x = 0; x < Wr; ++x) dst[x] = (x >= x0 && x < x1) ? src[x] : acc_t(0);
    }
  }
}

// Input rows [iy_lo, iy_hi) of one channel plane as float rows of s phases of Lp values: input column ix at
// phase ix % s, index ix / s + Q; zeros elsewhere (the padding).
template <typename scalar_t>
void load_padded_rows(const scalar_t* DDF_RESTRICT in, const GeoI& g, int64_t iy_lo, int64_t iy_hi, int64_t Q,
                      int64_t Lp, at::opmath_type<scalar_t>* DDF_RESTRICT plane) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t iy = iy_lo; iy < iy_hi; ++iy) {
    acc_t* DDF_RESTRICT row = plane + (iy - iy_lo) * g.s * Lp;
    if (g.s == 1) {
      for (int64_t i = 0; i < Q; ++i) row[i] = acc_t(0);
      for (int64_t i = Q + g.W; i < Lp; ++i) row[i] = acc_t(0);
      convert_row<scalar_t>(in + iy * g.W, row + Q, g.W);
    } else {
      std::fill(row, row + g.s * Lp, acc_t(0));
      for (int64_t ix = 0; ix < g.W; ++ix) row[(ix % g.s) * Lp + ix / g.s + Q] = static_cast<acc_t>(in[iy * g.W + ix]);
    }
  }
}

// NCHW forward: one task per (b, head, block of R output rows).
// Loop order: task -> group of DDF_NC channels of the head -> output row -> x-block of up to 4 vectors -> in-image
// taps -> channels -> vectors, with the DDF_NC x 4 accumulators in registers. Why: the block's spatial filter
// (kk x R x Wr values, L1-resident, out-of-image taps zeroed, normalised when `norm`) is prepared once per task and
// reused by all Cg channels, and each of its vectors by the DDF_NC channels of a group (fewer loads per fma); the
// group's input rows are converted once into zero-padded buffers split into s column phases, so that every tap, at
// any stride and dilation, is one unaligned vector load without bounds tests. A last, incomplete group repeats its
// last channel (recomputing and rewriting equal values).
template <typename scalar_t, bool MUL>
void forward_nchw_simd(const ForwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = lanes<acc_t>();
  const GeoI g = a.g;
  const int64_t Wr = (g.Wo + L - 1) / L * L, nvec = Wr / L;
  const int64_t Q = (g.r * g.d + g.s - 1) / g.s, Lp = Wr + 2 * Q;  // Q: left padding of a phase row
  const int64_t HW = g.H * g.W, HoWo = g.Ho * g.Wo;
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(g.Ho, 4096 / (g.kk * Wr)));
  const int64_t n_rb = (g.Ho + R - 1) / R;
  const int64_t rows_in = std::min<int64_t>(g.H, (R - 1) * g.s + 2 * g.r * g.d + 1), PS = rows_in * g.s * Lp;
  at::parallel_for(0, g.B * g.head * n_rb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> spbuf(g.kk * R * Wr), raw(g.kk * R * g.Wo), tmp(2 * R * g.Wo), plane(DDF_NC * PS);
    std::vector<const acc_t*> tap_in(g.kk), tap_sp(g.kk);
    std::vector<acc_t> tap_ch(g.kk * DDF_NC);
    std::vector<int64_t> col_off(g.k);  // per tap column: phase row * Lp + first index, in the padded buffer
    for (int64_t jx = 0; jx < g.k; ++jx) {
      const int64_t off = (jx - g.r) * g.d, p = ((off % g.s) + g.s) % g.s;
      col_off[jx] = p * Lp + (off - p) / g.s + Q;
    }
    scalar_t* out_rows[DDF_NC];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % n_rb, bh = task / n_rb, b = bh / g.head, h = bh % g.head;
      const int64_t y0 = rb * R, y1 = std::min(g.Ho, y0 + R);
      load_spatial_masked<scalar_t>(a, bh, y0, y1, R, Wr, spbuf.data(), raw.data(), tmp.data());
      const int64_t iy_lo = std::max<int64_t>(0, y0 * g.s - g.r * g.d);
      const int64_t iy_hi = std::min<int64_t>(g.H, (y1 - 1) * g.s + g.r * g.d + 1);
      const int64_t c1 = (h + 1) * g.Cg;
      for (int64_t cb = h * g.Cg; cb < c1; cb += DDF_NC) {
        int64_t bcs[DDF_NC];
        for (int ci = 0; ci < DDF_NC; ++ci) {
          bcs[ci] = b * g.C + std::min(cb + ci, c1 - 1);
          load_padded_rows<scalar_t>(a.in + bcs[ci] * HW, g, iy_lo, iy_hi, Q, Lp, plane.data() + ci * PS);
        }
        for (int64_t y = y0; y < y1; ++y) {
          int64_t nt = 0;
          for (int64_t jy = 0; jy < g.k; ++jy) {
            const int64_t iy = y * g.s + (jy - g.r) * g.d;
            if (iy < 0 || iy >= g.H) continue;
            const acc_t* in_row = plane.data() + (iy - iy_lo) * g.s * Lp;
            for (int64_t jx = 0; jx < g.k; ++jx, ++nt) {
              const int64_t j = jy * g.k + jx;
              tap_in[nt] = in_row + col_off[jx];
              tap_sp[nt] = spbuf.data() + (j * R + (y - y0)) * Wr;
              for (int ci = 0; ci < DDF_NC; ++ci) tap_ch[nt * DDF_NC + ci] = static_cast<acc_t>(a.ch[bcs[ci] * g.kk + j]);
            }
          }
          for (int ci = 0; ci < DDF_NC; ++ci) out_rows[ci] = a.out + bcs[ci] * HoWo + y * g.Wo;
          const acc_t* const* ti = tap_in.data();
          const acc_t* const* ts = tap_sp.data();
          const acc_t* tc = tap_ch.data();
          int64_t v = 0;
          for (; v + 4 <= nvec; v += 4) nchw_block<4, scalar_t, MUL>(ti, ts, tc, nt, PS, v * L, g.Wo, out_rows);
          switch (nvec - v) {
            case 3: nchw_block<3, scalar_t, MUL>(ti, ts, tc, nt, PS, v * L, g.Wo, out_rows); break;
            case 2: nchw_block<2, scalar_t, MUL>(ti, ts, tc, nt, PS, v * L, g.Wo, out_rows); break;
            case 1: nchw_block<1, scalar_t, MUL>(ti, ts, tc, nt, PS, v * L, g.Wo, out_rows); break;
            default: break;
          }
        }
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------------------
// NHWC: NP pixels x NCV channel vectors [c, c + NCV*L) of one output row. px[p]: the pixels' column indices;
// taps[x * HK + h*kk + j]: the row's (masked) spatial filter; col[x * k + jx]: input column offset of each pixel's
// tap column, -1 outside the image; rows[jy]: input row pointer, null outside the image.
template <int NP, int NCV, typename scalar_t, bool MUL>
DDF_INLINE void nhwc_block(const NhwcRow<scalar_t>& r, const int64_t* px, int64_t hk0, int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = lanes<acc_t>();
  const GeoI& g = *r.g;
  V acc[NP][NCV];
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NCV; ++v) acc[p][v] = splat<acc_t>(acc_t(0));
  for (int64_t jy = 0; jy < g.k; ++jy) {
    const scalar_t* row = r.rows[jy];
    if (row == nullptr) continue;
    for (int64_t jx = 0; jx < g.k; ++jx) {
      const int64_t j = jy * g.k + jx;
      const acc_t* chj = r.chb + j * g.C + c;
      V cv[NCV];
      for (int v = 0; v < NCV; ++v) cv[v] = vload<acc_t>(chj + v * L);
      for (int p = 0; p < NP; ++p) {
        const V sv = splat<acc_t>(r.taps[px[p] * r.HK + hk0 + j]);
        const int64_t o = r.col[px[p] * g.k + jx];
        const scalar_t* in = (o < 0 ? r.zeros : row + o) + c;
        for (int v = 0; v < NCV; ++v) acc[p][v] += load_acc<scalar_t>(in + v * L) * (MUL ? sv * cv[v] : sv + cv[v]);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NCV; ++v) store_acc<scalar_t>(r.out + px[p] * r.osW + c + v * L, acc[p][v]);
}

// NHWC, channels [c0, c1) of one pixel, scalar (heads narrower than a vector).
template <typename scalar_t, bool MUL>
DDF_INLINE void nhwc_pixel_scalar(const NhwcRow<scalar_t>& r, int64_t x, int64_t hk0, int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI& g = *r.g;
  for (int64_t c = c0; c < c1; ++c) {
    acc_t acc = 0;
    for (int64_t jy = 0; jy < g.k; ++jy) {
      if (r.rows[jy] == nullptr) continue;
      for (int64_t jx = 0; jx < g.k; ++jx) {
        const int64_t j = jy * g.k + jx, o = r.col[x * g.k + jx];
        if (o < 0) continue;
        const acc_t sv = r.taps[x * r.HK + hk0 + j], cj = r.chb[j * g.C + c];
        acc += static_cast<acc_t>(r.rows[jy][o + c]) * (MUL ? sv * cj : sv + cj);
      }
    }
    r.out[x * r.osW + c] = static_cast<scalar_t>(acc);
  }
}

// All channels of the NP pixels px[] (clamped to the row), head by head.
template <int NP, typename scalar_t, bool MUL>
DDF_INLINE void nhwc_pixels(const NhwcRow<scalar_t>& r, const int64_t* px) {
  constexpr int64_t L = lanes<at::opmath_type<scalar_t>>(), W4 = DDF_NCV * L;
  const GeoI& g = *r.g;
  for (int64_t h = 0; h < g.head; ++h) {
    const int64_t c0 = h * g.Cg, c1 = c0 + g.Cg, hk0 = h * g.kk;
    if (g.Cg >= W4) {  // blocks of NCV vectors, the last one overlapping its predecessor
      for (int64_t c = c0; c < c1; c += W4) nhwc_block<NP, DDF_NCV, scalar_t, MUL>(r, px, hk0, std::min(c, c1 - W4));
    } else if (g.Cg >= L) {
      for (int64_t c = c0; c < c1; c += L) nhwc_block<NP, 1, scalar_t, MUL>(r, px, hk0, std::min(c, c1 - L));
    } else {
      for (int p = 0; p < NP; ++p) nhwc_pixel_scalar<scalar_t, MUL>(r, px[p], hk0, c0, c1);
    }
  }
}

// NHWC forward: one task per (b, output row y).
// Loop order: task -> block of NP output pixels -> head -> block of NCV channel vectors (NP x NCV accumulators in
// registers) -> taps -> pixels -> vectors. Why: each pixel's spatial tap (a broadcast) is reused over NCV vectors and
// each channel-filter vector chT[b][j][c..] (per-batch transposed table) over NP pixels, so an accumulate costs one
// input load, the filter product and one fma; a block's input (NP + k - 1 pixels x k rows x C) stays in L1. The
// row's taps are read (and normalised) once per pixel into a table, zeroed where the tap is outside the image; such
// taps read a zero pixel, so the inner loops have no bounds tests. Pixels past the row end are clamped to the last
// one, and a head's last channel block overlaps the previous one: both only recompute and rewrite equal values.
template <typename scalar_t, bool MUL>
void forward_nhwc_simd(const ForwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI g = a.g;
  const int64_t HK = g.head * g.kk;
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps(g.Wo * HK);
    std::vector<int64_t> col(g.Wo * g.k);
    std::vector<scalar_t> zeros(g.C, scalar_t(0));
    std::vector<const scalar_t*> rows(g.k);
    NhwcRow<scalar_t> r;
    r.g = &g; r.HK = HK; r.osW = a.osW; r.taps = taps.data(); r.col = col.data(); r.zeros = zeros.data();
    r.rows = rows.data();
    for (int64_t x = 0; x < g.Wo; ++x)
      for (int64_t jx = 0; jx < g.k; ++jx) {
        const int64_t ix = x * g.s + (jx - g.r) * g.d;
        col[x * g.k + jx] = (ix < 0 || ix >= g.W) ? -1 : ix * a.isW;
      }
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / g.Ho, y = by % g.Ho;
      r.chb = a.chT + b * g.kk * g.C;
      r.out = a.out + b * a.osB + y * a.osH;
      for (int64_t jy = 0; jy < g.k; ++jy) {
        const int64_t iy = y * g.s + (jy - g.r) * g.d;
        rows[jy] = (iy < 0 || iy >= g.H) ? nullptr : a.in + b * a.isB + iy * a.isH;
      }
      for (int64_t x = 0; x < g.Wo; ++x) {
        acc_t* t = taps.data() + x * HK;
        load_pixel_taps<scalar_t>(a.sp + b * a.ssB + y * a.ssH + x * a.ssW, a.ssC, g, a.norm,
                                  static_cast<acc_t>(a.gain), t);
        for (int64_t jx = 0; jx < g.k; ++jx) {
          if (col[x * g.k + jx] >= 0) continue;
          for (int64_t h = 0; h < g.head; ++h)
            for (int64_t jy = 0; jy < g.k; ++jy) t[h * g.kk + jy * g.k + jx] = acc_t(0);
        }
      }
      int64_t px[DDF_NP];
      for (int64_t x = 0; x < g.Wo; x += DDF_NP) {
        for (int p = 0; p < DDF_NP; ++p) px[p] = std::min<int64_t>(x + p, g.Wo - 1);
        nhwc_pixels<DDF_NP, scalar_t, MUL>(r, px);
      }
    }
  });
}
