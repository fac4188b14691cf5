// Register-blocked forward kernels of the DDF op, written once over a vector type of DDF_VB bytes (GCC/clang vector
// extensions, or a plain array type elsewhere). NOT a normal header: ddf.cpp includes it once per instruction set,
// each time inside its own namespace and (x86 + GCC) under `#pragma GCC target`, with
//   DDF_VB    vector size in bytes (16: SSE2/NEON/generic, 32: AVX2, 64: AVX-512),
//   DDF_F16C  1 when float16 <-> float32 vector conversions (F16C / AVX-512F) may be used,
//   DDF_NC    channels per register block of the NCHW kernel,
//   DDF_NP, DDF_NCV  register block of the NHWC kernel (pixels x channel vectors);
// it #undefs them at its end.
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

// -------------------------------------------------------------------------------------------------------------
// NCHW. A task's input planes are copied into zero-padded (P = r*d) buffers split into s x s stride phases (phase
// (py, px) holds the padded rows = py and columns = px mod s), each flattened with row stride Wp = ceil((W+2P)/s):
// output (y, x) sits at flat index i = y * Wp + x, and its tap (jy, jx) reads phase (jy*d mod s, jx*d mod s) at
// flat i + (jy*d / s) * Wp + jx*d / s: one constant offset per tap, at any stride and dilation. So a vector runs
// across row ends (the Wp - Wo columns in between compute values that are never stored) and a block of any width
// keeps all lanes busy, with no per-row tap lists, bounds tests or partial stores.

// Geometry of the flat buffers of one task of R output rows.
struct FlatGeo {
  int64_t P, Wp, R, SS, PQ, PS;  // pad, phase row, rows per task, tap/stage stride (whole vectors),
                                 // phase plane stride, channel plane stride (s*s phases)
};

template <typename acc_t>
FlatGeo make_flat_geo(const GeoI& g) {
  constexpr int64_t L = lanes<acc_t>();
  FlatGeo f;
  f.P = g.r * g.d;
  f.Wp = (g.W + 2 * f.P + g.s - 1) / g.s;
  f.R = std::max<int64_t>(1, std::min<int64_t>(g.Ho, 65536 / (g.kk * f.Wp)));  // filter <= 256 KB
  f.SS = (f.R * f.Wp + L - 1) / L * L;
  f.PQ = (f.R + 2 * f.P / g.s + 1) * f.Wp + L;  // + the reach of the last vector's farthest tap
  f.PS = g.s * g.s * f.PQ;
  return f;
}

// DDF_NC channels x NV vectors at flat index i. in: the group's first padded plane (plane ci at + ci * PS); spf:
// the block's masked spatial filter (tap t at + t * SS); off[t]: tap offsets; chv[t * DDF_NC + ci]: channel filter;
// stage: the results (channel ci at + ci * SS).
template <int NV, typename acc_t, bool MUL>
DDF_INLINE void nchw_flat_block(const acc_t* in, const acc_t* spf, const int64_t* off, const acc_t* chv, int64_t kk,
                                int64_t PS, int64_t SS, int64_t i, acc_t* stage) {
  using V = Vec<acc_t>;
  constexpr int64_t L = lanes<acc_t>();
  V acc[DDF_NC][NV];
  for (int ci = 0; ci < DDF_NC; ++ci)
    for (int v = 0; v < NV; ++v) acc[ci][v] = splat<acc_t>(acc_t(0));
  for (int64_t t = 0; t < kk; ++t) {
    const acc_t* x = in + off[t] + i;
    const acc_t* s = spf + t * SS + i;
    V sv[NV];
    for (int v = 0; v < NV; ++v) sv[v] = vload<acc_t>(s + v * L);
    for (int ci = 0; ci < DDF_NC; ++ci) {
      const V cj = splat<acc_t>(chv[t * DDF_NC + ci]);
      for (int v = 0; v < NV; ++v) acc[ci][v] += vload<acc_t>(x + ci * PS + v * L) * (MUL ? sv[v] * cj : sv[v] + cj);
    }
  }
  for (int ci = 0; ci < DDF_NC; ++ci)
    for (int v = 0; v < NV; ++v) vstore<acc_t>(stage + ci * SS + i + v * L, acc[ci][v]);
}

// The spatial filter of output rows [y0, y1) of plane spb in the flat layout: spf[j * SS + (y - y0) * Wp + x],
// normalised when `norm`, zero for taps outside the image, for the padding columns and past the block.
// raw/tmp: scratch of kk * R * Wo and 3 * R * Wo values.
template <typename scalar_t>
void load_spatial_flat(const ForwardArgs<scalar_t>& a, const FlatGeo& f, const scalar_t* spb, int64_t y0, int64_t y1,
                       at::opmath_type<scalar_t>* spf, at::opmath_type<scalar_t>* raw,
                       at::opmath_type<scalar_t>* tmp) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI& g = a.g;
  const int64_t n = (y1 - y0) * g.Wo;
  load_spatial_rows<scalar_t>(spb, g, y0, y1, a.norm, static_cast<acc_t>(a.gain), raw, tmp);
  for (int64_t j = 0; j < g.kk; ++j) {
    const int64_t jy = j / g.k;
    int64_t x0, x1;
    valid_range((j % g.k - g.r) * g.d, g.s, g.W, g.Wo, x0, x1);
    acc_t* dst = spf + j * f.SS;
    std::fill(dst, dst + f.SS, acc_t(0));
    for (int64_t y = y0; y < y1; ++y) {
      const int64_t iy = y * g.s + (jy - g.r) * g.d;
      if (iy < 0 || iy >= g.H) continue;
      const acc_t* src = raw + j * n + (y - y0) * g.Wo;
      for (int64_t x = x0; x < x1; ++x) dst[(y - y0) * f.Wp + x] = src[x];
    }
  }
}

// The input rows that output rows [y0, y1) read, of one channel plane, into its padded, phase-split flat buffer
// (zeros outside the image).
template <typename scalar_t>
void load_plane_flat(const scalar_t* DDF_RESTRICT in, const GeoI& g, const FlatGeo& f, int64_t y0, int64_t y1,
                     at::opmath_type<scalar_t>* DDF_RESTRICT plane) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = lanes<acc_t>();
  std::fill(plane, plane + f.PS, acc_t(0));
  const int64_t iy0 = std::max<int64_t>(0, y0 * g.s - f.P), iy1 = std::min(g.H, (y1 - 1) * g.s + f.P + 1);
  for (int64_t iy = iy0; iy < iy1; ++iy) {
    const int64_t yy = iy + f.P;  // padded row: phase yy % s, phase row yy / s - y0
    acc_t* DDF_RESTRICT row = plane + (yy % g.s) * g.s * f.PQ + (yy / g.s - y0) * f.Wp;
    const scalar_t* DDF_RESTRICT src = in + iy * g.W;
    if (g.s == 1) {
      int64_t x = 0;
      for (; x + L <= g.W; x += L) vstore<acc_t>(row + f.P + x, load_acc<scalar_t>(src + x));
      for (; x < g.W; ++x) row[f.P + x] = static_cast<acc_t>(src[x]);
    } else {  // phase px holds padded columns px + m*s (input column ix at padded column ix + P)
      split_phases<scalar_t, acc_t>(src, g.W, g.s, f.P, row, f.PQ);
    }
  }
}

// Rows [y0, y1) of one channel's results from the flat stage into the output plane.
template <typename scalar_t>
DDF_INLINE void store_plane_flat(const at::opmath_type<scalar_t>* DDF_RESTRICT stage, const GeoI& g,
                                 const FlatGeo& f, int64_t y0, int64_t y1, scalar_t* DDF_RESTRICT out) {
  constexpr int64_t L = lanes<at::opmath_type<scalar_t>>();
  for (int64_t y = y0; y < y1; ++y) {
    const auto* src = stage + (y - y0) * f.Wp;
    scalar_t* dst = out + y * g.Wo;
    int64_t x = 0;
    for (; x + L <= g.Wo; x += L) store_acc<scalar_t>(dst + x, vload<at::opmath_type<scalar_t>>(src + x));
    for (; x < g.Wo; ++x) dst[x] = static_cast<scalar_t>(src[x]);
  }
}

// The flat blocks of one group of DDF_NC channels over a task's nv vectors.
template <typename acc_t, bool MUL>
DDF_INLINE void nchw_flat_group(const acc_t* in, const acc_t* spf, const int64_t* off, const acc_t* chv, int64_t kk,
                                const FlatGeo& f, int64_t nv, acc_t* stage) {
  constexpr int64_t L = lanes<acc_t>();
  int64_t v = 0;
  for (; v + 4 <= nv; v += 4) nchw_flat_block<4, acc_t, MUL>(in, spf, off, chv, kk, f.PS, f.SS, v * L, stage);
  switch (nv - v) {
    case 3: nchw_flat_block<3, acc_t, MUL>(in, spf, off, chv, kk, f.PS, f.SS, v * L, stage); break;
    case 2: nchw_flat_block<2, acc_t, MUL>(in, spf, off, chv, kk, f.PS, f.SS, v * L, stage); break;
    case 1: nchw_flat_block<1, acc_t, MUL>(in, spf, off, chv, kk, f.PS, f.SS, v * L, stage); break;
    default: break;
  }
}

// Prefetch of n values from p: the NCHW kernel reads many planes in short row blocks, each too short a stream for
// the hardware prefetcher to start on time.
template <typename scalar_t>
DDF_INLINE void prefetch_values(const scalar_t* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(scalar_t)); i += 64) __builtin_prefetch(c + i);
#else
  (void)p; (void)n;
#endif
}

// NCHW forward: one task per (b, head, block of R output rows, chunk of the head's channels).
// Loop order: task -> group of DDF_NC channels -> flat x-block of up to 4 vectors -> taps -> channels -> vectors,
// with the DDF_NC x 4 accumulators in registers. Why: the block's spatial filter (L2-resident, prepared once per
// task, normalised when `norm`) is reused by all the chunk's channels and each of its vectors by the DDF_NC channels
// of a group; the flat layout (above) keeps every lane busy at any width. Channel chunks give small images enough
// tasks for all threads (the forward has no reduction: any split gives the same result). A last, incomplete group
// computes its missing slots on whatever their buffers hold (zeros or an earlier group's planes) and stores only
// its real channels. Blocks are as tall as a 256 KB filter allows (whole planes up to ~84x84 at k = 3): every block
// re-reads the 2*r*d halo rows of each channel and streams each plane in shorter runs (8x256x56x56, 2 threads:
// 3.0 ms as one block, 4.0 ms in the earlier 7-row blocks of a 16 KB filter).
template <typename scalar_t, bool MUL>
void forward_nchw_simd(const ForwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI g = a.g;
  const FlatGeo f = make_flat_geo<acc_t>(g);
  const int64_t HW = g.H * g.W, HoWo = g.Ho * g.Wo, n_rb = (g.Ho + f.R - 1) / f.R;
  const int64_t n_groups = (g.Cg + DDF_NC - 1) / DDF_NC, outer = g.B * g.head * n_rb;
  const int64_t n_cc = std::min(n_groups, (4 * at::get_num_threads() + outer - 1) / outer);
  const int64_t gpc = (n_groups + n_cc - 1) / n_cc;  // groups per chunk
  std::vector<int64_t> off(g.kk);
  for (int64_t j = 0; j < g.kk; ++j) {
    const int64_t oy = (j / g.k) * g.d, ox = (j % g.k) * g.d;
    off[j] = ((oy % g.s) * g.s + ox % g.s) * f.PQ + (oy / g.s) * f.Wp + ox / g.s;
  }
  at::parallel_for(0, outer * n_cc, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> spf(g.kk * f.SS), raw(g.kk * f.R * g.Wo), tmp(3 * f.R * g.Wo);
    std::vector<acc_t> plane(DDF_NC * f.PS), stage(DDF_NC * f.SS), chv(g.kk * DDF_NC);
    int64_t bcs[DDF_NC];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cc = task % n_cc, rb = (task / n_cc) % n_rb, bh = task / (n_cc * n_rb);
      const int64_t b = bh / g.head, h = bh % g.head, y0 = rb * f.R, y1 = std::min(g.Ho, y0 + f.R);
      const int64_t c1 = (h + 1) * g.Cg, cg0 = h * g.Cg + cc * gpc * DDF_NC;
      const int64_t cg1 = std::min(c1, cg0 + gpc * DDF_NC);
      if (cg0 >= cg1) continue;
      load_spatial_flat<scalar_t>(a, f, a.sp + bh * g.kk * HoWo, y0, y1, spf.data(), raw.data(), tmp.data());
      const int64_t nv = ((y1 - y0) * f.Wp + lanes<acc_t>() - 1) / lanes<acc_t>();
      for (int64_t cb = cg0; cb < cg1; cb += DDF_NC) {
        const int64_t nc = std::min<int64_t>(DDF_NC, cg1 - cb);  // real channels of the group
        for (int ci = 0; ci < DDF_NC; ++ci) {
          bcs[ci] = b * g.C + std::min(cb + ci, cg1 - 1);
          if (ci < nc) load_plane_flat<scalar_t>(a.in + bcs[ci] * HW, g, f, y0, y1, plane.data() + ci * f.PS);
          for (int64_t j = 0; j < g.kk; ++j) chv[j * DDF_NC + ci] = static_cast<acc_t>(a.ch[bcs[ci] * g.kk + j]);
        }
        const int64_t lo = std::max<int64_t>(0, y0 * g.s - f.P), hi = std::min(g.H, (y1 - 1) * g.s + f.P + 1);
        for (int64_t c = cb + DDF_NC; c < std::min(cg1, cb + 2 * DDF_NC); ++c)  // the next group's input rows
          prefetch_values(a.in + (b * g.C + c) * HW + lo * g.W, (hi - lo) * g.W);
        nchw_flat_group<acc_t, MUL>(plane.data(), spf.data(), off.data(), chv.data(), g.kk, f, nv, stage.data());
        for (int ci = 0; ci < nc; ++ci)
          store_plane_flat<scalar_t>(stage.data() + ci * f.SS, g, f, y0, y1, a.out + bcs[ci] * HoWo);
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------------------
// NHWC: NP pixels x NCV channel vectors [c, c + NCV*L) of one output row. px[p]: the pixels' column indices;
// taps[x * HK + h*kk + j]: the row's (masked) spatial filter; col[x * k + jx]: input column offset of each pixel's
// tap column, -1 outside the image; rows[jy]: input row pointer, null outside the image. INTERIOR: the pixels are
// px[0] + p and all their tap columns are in the image, so addresses are computed, not looked up (no table loads,
// no zero-pixel selects: most of the scalar work per pixel and tap when a head has few channel vectors).
template <int NP, int NCV, typename scalar_t, bool MUL, bool INTERIOR>
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
      const scalar_t* base = row + (px[0] * g.s + (jx - g.r) * g.d) * r.isW + c;  // INTERIOR only
      const acc_t* tap0 = r.taps + px[0] * r.HK + hk0 + j;
      for (int p = 0; p < NP; ++p) {
        const V sv = splat<acc_t>(INTERIOR ? tap0[p * r.HK] : r.taps[px[p] * r.HK + hk0 + j]);
        const int64_t o = INTERIOR ? 0 : r.col[px[p] * g.k + jx];
        const scalar_t* in = INTERIOR ? base + p * r.xstep : (o < 0 ? r.zeros : row + o) + c;
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
template <int NP, typename scalar_t, bool MUL, bool INTERIOR>
DDF_INLINE void nhwc_pixels(const NhwcRow<scalar_t>& r, const int64_t* px) {
  constexpr int64_t L = lanes<at::opmath_type<scalar_t>>(), W4 = DDF_NCV * L;
  const GeoI& g = *r.g;
  for (int64_t h = 0; h < g.head; ++h) {
    const int64_t c0 = h * g.Cg, c1 = c0 + g.Cg, hk0 = h * g.kk;
    if (g.Cg >= W4) {  // blocks of NCV vectors, the last one overlapping its predecessor
      for (int64_t c = c0; c < c1; c += W4) nhwc_block<NP, DDF_NCV, scalar_t, MUL, INTERIOR>(r, px, hk0, std::min(c, c1 - W4));
    } else if (g.Cg >= L) {
      for (int64_t c = c0; c < c1; c += L) nhwc_block<NP, 1, scalar_t, MUL, INTERIOR>(r, px, hk0, std::min(c, c1 - L));
    } else {
      for (int p = 0; p < NP; ++p) nhwc_pixel_scalar<scalar_t, MUL>(r, px[p], hk0, c0, c1);
    }
  }
}

// The spatial taps of one output row (spr: its first pixel; ssW, ssC: pixel and tap strides), every pixel and
// head, into taps[x * HK + h * kk + j], normalised per pixel and head when `norm`, keeping each pixel's mean and
// unbiased std in keep[(x * head + h) * 2 + {0, 1}] when keep is not null (the backward's FilterNorm statistics).
// They are read tap-major into tm (HK rows of Wo values), so that FilterNorm vectorises over the row's pixels
// (filter_norm_tap_major): per-pixel scalar statistics cost about as much as the filtering itself at C = 64.
// stat: scratch of 3 * Wo values.
template <typename scalar_t>
void load_row_taps(const scalar_t* DDF_RESTRICT spr, int64_t ssW, int64_t ssC, const GeoI& g, bool norm,
                   at::opmath_type<scalar_t> gain, at::opmath_type<scalar_t>* DDF_RESTRICT tm,
                   at::opmath_type<scalar_t>* DDF_RESTRICT stat, at::opmath_type<scalar_t>* DDF_RESTRICT taps,
                   at::opmath_type<scalar_t>* DDF_RESTRICT keep = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HK = g.head * g.kk, Wo = g.Wo;
  for (int64_t t = 0; t < HK; ++t)
    for (int64_t x = 0; x < Wo; ++x) tm[t * Wo + x] = static_cast<acc_t>(spr[x * ssW + t * ssC]);
  for (int64_t h = 0; norm && h < g.head; ++h) {
    filter_norm_tap_major(tm + h * g.kk * Wo, Wo, g.kk, Wo, gain, stat, stat + Wo, stat + 2 * Wo);
    if (keep != nullptr)
      for (int64_t x = 0; x < Wo; ++x) {
        keep[(x * g.head + h) * 2] = stat[x];
        keep[(x * g.head + h) * 2 + 1] = stat[Wo + x];
      }
  }
  for (int64_t x = 0; x < Wo; ++x)
    for (int64_t t = 0; t < HK; ++t) taps[x * HK + t] = tm[t * Wo + x];
}

// NHWC forward: one task per (b, output row y).
// Loop order: task -> block of NP output pixels -> head -> block of NCV channel vectors (NP x NCV accumulators in
// registers) -> taps -> pixels -> vectors. Why: each pixel's spatial tap (a broadcast) is reused over NCV vectors and
// each channel-filter vector chT[b][j][c..] (per-batch transposed table) over NP pixels, so an accumulate costs one
// input load, the filter product and one fma; a block's input (NP + k - 1 pixels x k rows x C) stays in L1. The
// row's taps are read (and normalised: load_row_taps) once into a table, zeroed where the tap is outside the
// image; such taps read a zero pixel, so the inner loops have no bounds tests. Pixels past the row end are clamped
// to the last one, and a head's last channel block overlaps the previous one: both only recompute and rewrite
// equal values.
template <typename scalar_t, bool MUL>
void forward_nhwc_simd(const ForwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI g = a.g;
  const int64_t HK = g.head * g.kk;
  // output columns [x_in0, x_in1) have all k tap columns inside the image
  const int64_t x_in0 = (g.r * g.d + g.s - 1) / g.s;
  const int64_t x_in1 = std::max(x_in0, g.W - 1 - g.r * g.d >= 0 ? (g.W - 1 - g.r * g.d) / g.s + 1 : int64_t(0));
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps(g.Wo * HK), tm(g.Wo * HK), stat(3 * g.Wo);
    std::vector<int64_t> col(g.Wo * g.k);
    std::vector<scalar_t> zeros(g.C, scalar_t(0));
    std::vector<const scalar_t*> rows(g.k);
    NhwcRow<scalar_t> r;
    r.g = &g; r.HK = HK; r.osW = a.osW; r.isW = a.isW; r.xstep = g.s * a.isW;
    r.taps = taps.data(); r.col = col.data(); r.zeros = zeros.data();
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
      load_row_taps<scalar_t>(a.sp + b * a.ssB + y * a.ssH, a.ssW, a.ssC, g, a.norm, static_cast<acc_t>(a.gain),
                              tm.data(), stat.data(), taps.data());
      for (int64_t x = 0; x < g.Wo; ++x) {
        acc_t* t = taps.data() + x * HK;
        for (int64_t jx = 0; jx < g.k; ++jx) {
          if (col[x * g.k + jx] >= 0) continue;
          for (int64_t h = 0; h < g.head; ++h)
            for (int64_t jy = 0; jy < g.k; ++jy) t[h * g.kk + jy * g.k + jx] = acc_t(0);
        }
      }
      int64_t px[DDF_NP];
      for (int64_t x = 0; x < g.Wo; x += DDF_NP) {
        for (int p = 0; p < DDF_NP; ++p) px[p] = std::min<int64_t>(x + p, g.Wo - 1);
        if (x >= x_in0 && x + DDF_NP <= x_in1) nhwc_pixels<DDF_NP, scalar_t, MUL, true>(r, px);
        else nhwc_pixels<DDF_NP, scalar_t, MUL, false>(r, px);
      }
    }
  });
}

// The parameters are per inclusion: the next one defines its own.
#undef DDF_VB
#undef DDF_NC
#undef DDF_F16C
#undef DDF_NP
#undef DDF_NCV
