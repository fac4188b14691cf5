// Backward kernels of the DDF op (see the "Backward kernels" comment in ddf.cpp), written once over a vector type
// of DDF_VB bytes. NOT a normal header: ddf.cpp includes it once per instruction set, each time inside its own
// namespace and (x86 + GCC) under `#pragma GCC target`, like ddf_forward_simd.h, so that these loops and the
// DDF_INLINE helpers of ddf.cpp inlined into them are compiled for 16-, 32- or 64-byte vectors.

// GCC vector of the accumulation type with unaligned, aliasing loads and stores. Other compilers get a 1-lane
// "vector" (the scalar type).
#if defined(__GNUC__)
// Sum of the lanes by halving: log2(lanes) vector adds on the critical path (it runs once per tap and channel in
// NCHW, once per tap and pixel in NHWC).
template <typename acc_t, int VB, typename V>
DDF_INLINE acc_t bwd_hsum(V x) {
  constexpr int n = VB / int(sizeof(acc_t));
  if constexpr (n == 1) {
    return x[0];
  } else {  // lane subscripts, not memcpy: an addressed accumulator would be kept on the stack in the loops
    typedef acc_t half_t __attribute__((vector_size(VB / 2)));
    half_t lo, hi;
    DDF_UNROLL for (int i = 0; i < n / 2; ++i) {
      lo[i] = x[i];
      hi[i] = x[i + n / 2];
    }
    return bwd_hsum<acc_t, VB / 2>(lo + hi);
  }
}

template <typename acc_t>
struct BwdVec {
  typedef acc_t v __attribute__((vector_size(DDF_VB)));
  typedef acc_t vu __attribute__((vector_size(DDF_VB), aligned(alignof(acc_t)), may_alias));
  static constexpr int64_t n = DDF_VB / sizeof(acc_t);
  static DDF_INLINE v load(const acc_t* p) { return *reinterpret_cast<const vu*>(p); }
  static DDF_INLINE void store(acc_t* p, v x) { *reinterpret_cast<vu*>(p) = x; }
  static DDF_INLINE v splat(acc_t a) { return v{} + a; }
  static DDF_INLINE acc_t sum(v x) { return bwd_hsum<acc_t, DDF_VB>(x); }
};
#else
template <typename acc_t>
struct BwdVec {
  typedef acc_t v;
  static constexpr int64_t n = 1;
  static inline v load(const acc_t* p) { return *p; }
  static inline void store(acc_t* p, v x) { *p = x; }
  static inline v splat(acc_t a) { return a; }
  static inline acc_t sum(v x) { return x; }
};
#endif

// The spatial filter rows [ya, yb) of one (b, head) into spn (row (j * NS + y - ya), data at offset P); with
// `norm` normalised per pixel, keeping each pixel's mean and unbiased std in mean/sd[(y - ya) * Wv + x].
template <typename scalar_t>
DDF_INLINE void nchw_bwd_load_spatial(const scalar_t* spb, const GeoI& g, const NchwBwdLayout& L, int64_t ya,
                                      int64_t yb, bool norm, at::opmath_type<scalar_t> gain,
                                      NchwBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HoWo = g.Ho * g.Wo;
  acc_t *mean = ws.stat.data(), *sd = mean + L.NS * L.Wv;
  for (int64_t y = ya; y < yb; ++y) {
    const int64_t yy = y - ya;
    for (int64_t j = 0; j < g.kk; ++j) {
      const scalar_t* DDF_RESTRICT s = spb + j * HoWo + y * g.Wo;
      acc_t* DDF_RESTRICT d = ws.spn.data() + (j * L.NS + yy) * L.SW + L.P;
      for (int64_t x = 0; x < g.Wo; ++x) d[x] = static_cast<acc_t>(s[x]);
    }
    if (norm)  // scale scratch: the grad_spatial sums' rows (sg, used only when the block is stored)
      filter_norm_tap_major(ws.spn.data() + yy * L.SW + L.P, L.NS * L.SW, g.kk, g.Wo, gain, mean + yy * L.Wv,
                            sd + yy * L.Wv, ws.stat.data() + 2 * L.NS * L.Wv);
  }
  zero_padded_taps(ws.spn.data() + L.P, L.NS * L.SW, L.SW, ya, yb, g);
}

// grad_spatial of the block (gacc, row (j * R + y - y0), stride Wv) written to dst (rows of Wo, plane stride
// HoWo); with `norm` mapped to the raw taps first (FilterNorm backward, see ddf/reference.py:_filter_norm_backward):
// with c = raw - mean, a = sd + eps, g = gain * G:  d raw_j = (g_j - mean(g)) / a - c_j * sum(g c) / ((kk-1) sd a^2)
// (the second term 0 where sd = 0).
template <typename scalar_t>
DDF_INLINE void nchw_bwd_store_spatial(const scalar_t* spb, const GeoI& g, const NchwBwdLayout& L, int64_t ya,
                                       int64_t y0, int64_t y1, bool norm, at::opmath_type<scalar_t> gain,
                                       scalar_t* gspb, NchwBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HoWo = g.Ho * g.Wo;
  zero_padded_taps(ws.gacc.data(), L.R * L.Wv, L.Wv, y0, y1, g);
  const acc_t *mean = ws.stat.data(), *sd = mean + L.NS * L.Wv;
  acc_t *sg = ws.stat.data() + 2 * L.NS * L.Wv, *sgc = sg + L.NS * L.Wv;
  for (int64_t y = y0; y < y1; ++y) {
    const acc_t* G = ws.gacc.data() + (y - y0) * L.Wv;
    const acc_t* DDF_RESTRICT m = mean + (y - ya) * L.Wv;
    const acc_t* DDF_RESTRICT v = sd + (y - ya) * L.Wv;
    if (norm) {
      std::fill(sg, sg + g.Wo, acc_t(0));
      std::fill(sgc, sgc + g.Wo, acc_t(0));
      for (int64_t j = 0; j < g.kk; ++j) {
        const scalar_t* DDF_RESTRICT raw = spb + j * HoWo + y * g.Wo;
        const acc_t* DDF_RESTRICT Gj = G + j * L.R * L.Wv;
        for (int64_t x = 0; x < g.Wo; ++x) {
          sg[x] += gain * Gj[x];
          sgc[x] += gain * Gj[x] * (static_cast<acc_t>(raw[x]) - m[x]);
        }
      }
      for (int64_t x = 0; x < g.Wo; ++x) {
        const acc_t a = v[x] + acc_t(kFilterNormEps);
        sgc[x] = v[x] > acc_t(0) ? sgc[x] / (acc_t(g.kk - 1) * v[x] * a * a) : acc_t(0);
        sg[x] /= acc_t(g.kk);
      }
    }
    for (int64_t j = 0; j < g.kk; ++j) {
      const scalar_t* DDF_RESTRICT raw = spb + j * HoWo + y * g.Wo;
      const acc_t* DDF_RESTRICT Gj = G + j * L.R * L.Wv;
      scalar_t* DDF_RESTRICT d = gspb + j * HoWo + y * g.Wo;
      if (!norm) {
        for (int64_t x = 0; x < g.Wo; ++x) d[x] = static_cast<scalar_t>(Gj[x]);
      } else {
        for (int64_t x = 0; x < g.Wo; ++x)
          d[x] = static_cast<scalar_t>((gain * Gj[x] - sg[x]) / (v[x] + acc_t(kFilterNormEps)) -
                                       (static_cast<acc_t>(raw[x]) - m[x]) * sgc[x]);
      }
    }
  }
}

// One channel's grad_output rows [ya, yb) and input rows [y0*s - r*d, (y1-1)*s + r*d] into the padded task
// buffers (input rows split into s stride phases: phase p holds columns p, p+s, ...). Rows outside the image are
// skipped by the loops that would read them.
template <typename scalar_t>
DDF_INLINE void nchw_bwd_load_channel(const scalar_t* in, const scalar_t* go, const GeoI& g, const NchwBwdLayout& L,
                                      const BwdRows& t, NchwBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t y = t.ya; y < t.yb; ++y) {
    const scalar_t* DDF_RESTRICT s = go + y * g.Wo;
    acc_t* DDF_RESTRICT d = ws.gob.data() + (y - t.ya) * L.SW + L.P;
    for (int64_t x = 0; x < g.Wo; ++x) d[x] = static_cast<acc_t>(s[x]);
  }
  const int64_t ylo = t.y0 * g.s - g.r * g.d;
  for (int64_t i = 0; i < (t.y1 - 1 - t.y0) * g.s + 2 * g.r * g.d + 1; ++i) {
    const int64_t iy = ylo + i;
    if (iy < 0 || iy >= g.H) continue;
    const scalar_t* DDF_RESTRICT s = in + iy * g.W;
    acc_t* DDF_RESTRICT d = ws.inb.data() + i * g.s * L.SW + L.P;
    if (g.s == 1) {
      for (int64_t x = 0; x < g.W; ++x) d[x] = static_cast<acc_t>(s[x]);
    } else {
      split_phases<scalar_t, acc_t>(s, g.W, g.s, 0, d, L.SW);
    }
  }
}

// Taps jx0 .. jx0 + NT - 1 of tap row jy over the block's rows, for one channel (ws.gob / ws.inb, chv, gcv) or, with
// TWO, also a second one (gob2 / inb2, chv2, gcv2): their grad_spatial rows are accumulated in gacc (one load +
// store per vector for both channels), their grad_channel sums in registers (reduced once per channel), and one
// grad_output load per channel serves the NT taps.
template <int NT, bool TWO, typename acc_t, bool MUL>
DDF_INLINE void nchw_tap_group(const GeoI& g, const NchwBwdLayout& L, const BwdRows& t, int64_t jy, int64_t jx0,
                               const acc_t* chv, acc_t* gcv, const acc_t* chv2, acc_t* gcv2, const acc_t* gob2,
                               const acc_t* inb2, NchwBwdScratch<acc_t>& ws) {
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  constexpr int64_t V = VT::n;  // loop bounds in locals: the may_alias vector stores would force reloads
  const int64_t Wv = L.Wv, j0 = jy * g.k + jx0;
  vec gs[NT], cj[NT], gs2[NT], cj2[NT];
  int64_t soff[NT];
  DDF_UNROLL for (int i = 0; i < NT; ++i) {
    gs[i] = VT::splat(0);
    cj[i] = VT::splat(chv[j0 + i]);
    gs2[i] = VT::splat(0);
    cj2[i] = VT::splat(TWO ? chv2[j0 + i] : acc_t(0));
    soff[i] = phase_offset((jx0 + i - g.r) * g.d, g.s, L.SW);
  }
  for (int64_t y = t.y0; y < t.y1; ++y) {
    const int64_t iy = y * g.s + (jy - g.r) * g.d;
    if (iy < 0 || iy >= g.H) continue;
    const int64_t go_off = (y - t.ya) * L.SW + L.P, in_off = ((y - t.y0) * g.s + jy * g.d) * g.s * L.SW + L.P;
    const acc_t* gor = ws.gob.data() + go_off;
    const acc_t* inr = ws.inb.data() + in_off;
    const acc_t* gor2 = TWO ? gob2 + go_off : gor;
    const acc_t* inr2 = TWO ? inb2 + in_off : inr;
    const acc_t* spr[NT];
    acc_t* acc[NT];
    DDF_UNROLL for (int i = 0; i < NT; ++i) {
      spr[i] = ws.spn.data() + ((j0 + i) * L.NS + y - t.ya) * L.SW + L.P;
      acc[i] = ws.gacc.data() + ((j0 + i) * L.R + y - t.y0) * Wv;
    }
    for (int64_t x = 0; x < Wv; x += V) {
      const vec go = VT::load(gor + x);
      const vec go2 = TWO ? VT::load(gor2 + x) : go;
      DDF_UNROLL for (int i = 0; i < NT; ++i) {
        const vec v = go * VT::load(inr + soff[i] + x);
        const vec sv = VT::load(spr[i] + x);
        vec a = VT::load(acc[i] + x) + (MUL ? v * cj[i] : v);
        gs[i] += MUL ? v * sv : v;
        if constexpr (TWO) {
          const vec v2 = go2 * VT::load(inr2 + soff[i] + x);
          a += MUL ? v2 * cj2[i] : v2;
          gs2[i] += MUL ? v2 * sv : v2;
        }
        VT::store(acc[i] + x, a);
      }
    }
  }
  DDF_UNROLL for (int i = 0; i < NT; ++i) {
    gcv[j0 + i] = VT::sum(gs[i]);
    if constexpr (TWO) gcv2[j0 + i] = VT::sum(gs2[i]);
  }
}

// grad_spatial (accumulated into gacc) and grad_channel (gcv[j]) of one channel (or, with TWO, two: see
// nchw_tap_group) over the block's output rows. Loop order: tap row > group of up to 3 taps > row > x-vector.
template <bool TWO, typename acc_t, bool MUL>
DDF_INLINE void nchw_filter_grads(const GeoI& g, const NchwBwdLayout& L, const BwdRows& t, const acc_t* chv,
                                  acc_t* gcv, const acc_t* chv2, acc_t* gcv2, const acc_t* gob2, const acc_t* inb2,
                                  NchwBwdScratch<acc_t>& ws) {
  for (int64_t jy = 0; jy < g.k; ++jy) {
    int64_t jx = 0;
    for (; jx + 3 <= g.k; jx += 3)
      nchw_tap_group<3, TWO, acc_t, MUL>(g, L, t, jy, jx, chv, gcv, chv2, gcv2, gob2, inb2, ws);
    if (g.k - jx == 2) nchw_tap_group<2, TWO, acc_t, MUL>(g, L, t, jy, jx, chv, gcv, chv2, gcv2, gob2, inb2, ws);
    if (g.k - jx == 1) nchw_tap_group<1, TWO, acc_t, MUL>(g, L, t, jy, jx, chv, gcv, chv2, gcv2, gob2, inb2, ws);
  }
}

// grad_input row buffer pr of an input row read by 3 output rows (rows_jy/rows_yy) through the 3 taps of one
// stride phase each (k = 3, stride 1): the 9 products are summed in registers and pr is stored once.
template <typename acc_t, bool MUL>
DDF_INLINE void nchw_input_row9(const NchwBwdScratch<acc_t>& ws, const NchwBwdLayout& L, const int64_t* rows_jy,
                                const int64_t* rows_yy, const int64_t* pjx, const int64_t* pq, const acc_t* chv,
                                int64_t k, int64_t tap_stride, acc_t* DDF_RESTRICT pr) {
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  const acc_t* gr[3];
  const acc_t* sr[3];
  acc_t cf[9];
  DDF_UNROLL for (int e = 0; e < 3; ++e) {
    gr[e] = ws.gob.data() + rows_yy[e] * L.SW + L.P;
    sr[e] = ws.spn.data() + (rows_jy[e] * k * L.NS + rows_yy[e]) * L.SW + L.P;
    DDF_UNROLL for (int i = 0; i < 3; ++i) cf[e * 3 + i] = chv[rows_jy[e] * k + pjx[i]];
  }
  const int64_t q0 = pq[0], q1 = pq[1], q2 = pq[2];
  const int64_t o0 = pjx[0] * tap_stride - q0, o1 = pjx[1] * tap_stride - q1, o2 = pjx[2] * tap_stride - q2;
  const acc_t *g0 = gr[0], *g1 = gr[1], *g2 = gr[2], *s0 = sr[0], *s1 = sr[1], *s2 = sr[2];
  const acc_t c00 = cf[0], c01 = cf[1], c02 = cf[2], c10 = cf[3], c11 = cf[4], c12 = cf[5];
  const acc_t c20 = cf[6], c21 = cf[7], c22 = cf[8];
  const int64_t Wv = L.Wv;
  for (int64_t m = 0; m < Wv; m += VT::n) {
#define DDF_T(gp, sp, q, o, c) (VT::load(gp + m - q) * (MUL ? VT::load(sp + m + o) * c : VT::load(sp + m + o) + c))
    const vec r0 = DDF_T(g0, s0, q0, o0, c00) + DDF_T(g0, s0, q1, o1, c01) + DDF_T(g0, s0, q2, o2, c02);
    const vec r1 = DDF_T(g1, s1, q0, o0, c10) + DDF_T(g1, s1, q1, o1, c11) + DDF_T(g1, s1, q2, o2, c12);
    const vec r2 = DDF_T(g2, s2, q0, o0, c20) + DDF_T(g2, s2, q1, o1, c21) + DDF_T(g2, s2, q2, o2, c22);
#undef DDF_T
    VT::store(pr + m, r0 + r1 + r2);
  }
}

// grad_input of one channel over the block's input rows, gathered from the output rows that read each row.
// Loop order: input row > stride phase > taps of that phase > x-vector, accumulated in a row buffer (no
// loop-carried dependency in the x loop) and written once. The taps that read an input row (jy) and those of a
// stride phase (jx, from L.phase_*) are listed up front.
template <typename scalar_t, bool MUL>
DDF_INLINE void nchw_input_grads(const GeoI& g, const NchwBwdLayout& L, const BwdRows& t,
                                 const at::opmath_type<scalar_t>* chv, scalar_t* gi,
                                 NchwBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  int64_t* rows_jy = ws.rows.data();
  int64_t* rows_yy = rows_jy + g.k;
  const int64_t tap_stride = L.NS * L.SW, Wv = L.Wv;
  for (int64_t iy = t.iy0; iy < t.iy1; ++iy) {
    int64_t nrows = 0;
    for (int64_t jy = 0; jy < g.k; ++jy) {
      const int64_t ty = iy - (jy - g.r) * g.d;
      if (ty < 0 || ty % g.s != 0 || ty / g.s >= g.Ho) continue;
      rows_jy[nrows] = jy;
      rows_yy[nrows++] = ty / g.s - t.ya;
    }
    for (int64_t p = 0; p < g.s; ++p) {
      const int64_t cnt = L.phase_cnt[p];
      const int64_t* pjx = L.phase_jx.data() + p * g.k;
      const int64_t* pq = L.phase_q.data() + p * g.k;
      acc_t* pr = ws.prow.data() + p * Wv;
      if (nrows == 3 && cnt == 3) {  // k = 3, stride 1, an inner row: all 9 taps in one pass, summed in registers
        nchw_input_row9<acc_t, MUL>(ws, L, rows_jy, rows_yy, pjx, pq, chv, g.k, tap_stride, pr);
        continue;
      }
      std::fill(pr, pr + Wv, acc_t(0));
      for (int64_t e = 0; e < nrows; ++e) {
        const int64_t jy = rows_jy[e], yy = rows_yy[e];
        const acc_t* gor = ws.gob.data() + yy * L.SW + L.P;
        const acc_t* spr = ws.spn.data() + (jy * g.k * L.NS + yy) * L.SW + L.P;
        int64_t i = 0;
        for (; i + 3 <= cnt; i += 3) {  // three taps per pass over the row buffer (k = 3, stride 1: all of them)
          const acc_t *g0 = gor - pq[i], *g1 = gor - pq[i + 1], *g2 = gor - pq[i + 2];
          const acc_t* s0 = spr + pjx[i] * tap_stride - pq[i];
          const acc_t* s1 = spr + pjx[i + 1] * tap_stride - pq[i + 1];
          const acc_t* s2 = spr + pjx[i + 2] * tap_stride - pq[i + 2];
          const acc_t c0 = chv[jy * g.k + pjx[i]], c1 = chv[jy * g.k + pjx[i + 1]], c2 = chv[jy * g.k + pjx[i + 2]];
          for (int64_t m = 0; m < Wv; m += VT::n) {
            const vec v0 = VT::load(s0 + m), v1 = VT::load(s1 + m), v2 = VT::load(s2 + m);
            const vec t0 = VT::load(g0 + m) * (MUL ? v0 * c0 : v0 + c0);
            const vec t1 = VT::load(g1 + m) * (MUL ? v1 * c1 : v1 + c1);
            const vec t2 = VT::load(g2 + m) * (MUL ? v2 * c2 : v2 + c2);
            VT::store(pr + m, VT::load(pr + m) + (t0 + t1 + t2));
          }
        }
        for (; i < cnt; ++i) {
          const int64_t jx = pjx[i], q = pq[i];
          const acc_t* gq = gor - q;
          const acc_t* sq = spr + jx * tap_stride - q;
          const acc_t cj = chv[jy * g.k + jx];
          for (int64_t m = 0; m < Wv; m += VT::n) {
            const vec sv = VT::load(sq + m);
            VT::store(pr + m, VT::load(pr + m) + VT::load(gq + m) * (MUL ? sv * cj : sv + cj));
          }
        }
      }
    }
    scalar_t* DDF_RESTRICT out = gi + iy * g.W;
    const acc_t* DDF_RESTRICT row = ws.prow.data();
    if (g.s == 1) {
      for (int64_t ix = 0; ix < g.W; ++ix) out[ix] = static_cast<scalar_t>(row[ix]);
    } else {
      merge_phases<acc_t, scalar_t>(row, L.Wv, g.W, g.s, out);
    }
  }
}

// NCHW backward: one task per (b, head, block of R output rows) (see the section comment).
// Loop order: channel of the head (outer) > row > tap > x-vector (inner). Channel-outer streams each channel's rows
// of grad_output / input / grad_input from memory once (plus the halo rows at block edges) into small padded
// buffers, while the block's spatial filter (normalised with `norm`) and its grad_spatial accumulator stay in cache
// for all the head's channels; grad_spatial is written once per block.
template <typename scalar_t, bool MUL>
void backward_nchw_simd(const NchwBwdArgs<scalar_t>& A) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI g = A.g;
  const int64_t HW = g.H * g.W, HoWo = g.Ho * g.Wo, R = A.R, n_rb = A.n_rb;
  const bool norm = A.norm;
  const acc_t gn = A.gain;
  const NchwBwdLayout L(g, R, BwdVec<acc_t>::n);
  at::parallel_for(0, g.B * g.head * n_rb, 1, [&](int64_t begin, int64_t end) {
    NchwBwdScratch<acc_t> ws(g, L);
    std::vector<acc_t> chv(g.kk), gcv(g.kk), chv2(g.kk), gcv2(g.kk), gob2(ws.gob.size()), inb2(ws.inb.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % n_rb, bh = task / n_rb, b = bh / g.head, h = bh % g.head;
      const BwdRows t = bwd_rows(g, rb, R);
      const scalar_t* spb = A.sp + bh * g.kk * HoWo;
      nchw_bwd_load_spatial<scalar_t>(spb, g, L, t.ya, t.yb, norm, gn, ws);
      std::fill(ws.gacc.begin(), ws.gacc.end(), acc_t(0));
      const int64_t c_end = (h + 1) * g.Cg;
      for (int64_t c = h * g.Cg; c < c_end; c += 2) {  // channel pairs (see nchw_tap_group), a last single one
        const bool two = c + 1 < c_end;
        const int64_t bc = b * g.C + c;
        for (int64_t j = 0; j < g.kk; ++j) chv[j] = static_cast<acc_t>(A.ch[bc * g.kk + j]);
        if (two) {  // channel c + 1 into ws2's buffers (swapped, not copied)
          for (int64_t j = 0; j < g.kk; ++j) chv2[j] = static_cast<acc_t>(A.ch[(bc + 1) * g.kk + j]);
          nchw_bwd_load_channel<scalar_t>(A.in + (bc + 1) * HW, A.go + (bc + 1) * HoWo, g, L, t, ws);
          std::swap(ws.gob, gob2);
          std::swap(ws.inb, inb2);
        }
        nchw_bwd_load_channel<scalar_t>(A.in + bc * HW, A.go + bc * HoWo, g, L, t, ws);
        if (c + 2 < c_end) bwd_prefetch_channel(A.in + (bc + 2) * HW, A.go + (bc + 2) * HoWo, g, t);
        if (c + 3 < c_end) bwd_prefetch_channel(A.in + (bc + 3) * HW, A.go + (bc + 3) * HoWo, g, t);
        if (two) {
          nchw_filter_grads<true, acc_t, MUL>(g, L, t, chv.data(), gcv.data(), chv2.data(), gcv2.data(),
                                              gob2.data(), inb2.data(), ws);
        } else {
          nchw_filter_grads<false, acc_t, MUL>(g, L, t, chv.data(), gcv.data(), nullptr, nullptr, nullptr, nullptr, ws);
        }
        nchw_input_grads<scalar_t, MUL>(g, L, t, chv.data(), A.gin + bc * HW, ws);
        for (int64_t j = 0; j < g.kk; ++j) A.partial[(bc * n_rb + rb) * g.kk + j] = gcv[j];
        if (!two) continue;
        std::swap(ws.gob, gob2);
        std::swap(ws.inb, inb2);
        nchw_input_grads<scalar_t, MUL>(g, L, t, chv2.data(), A.gin + (bc + 1) * HW, ws);
        for (int64_t j = 0; j < g.kk; ++j) A.partial[(bc + 1) * n_rb * g.kk + rb * g.kk + j] = gcv2[j];
      }
      nchw_bwd_store_spatial<scalar_t>(spb, g, L, t.ya, t.y0, t.y1, norm, gn, A.gsp + bh * g.kk * HoWo, ws);
    }
  });
}

// One tap of one pixel over channels [c0, c1): returns sum_c go*in*ch (grad_spatial; go*in for 'add') and adds
// go*in*sp (go*in) to the grad_channel partial sums pj. Two vector accumulators (two vectors per iteration) halve
// the dependency chain of the sum; the remainder is scalar.
template <typename acc_t, bool MUL>
DDF_INLINE acc_t nhwc_tap_sum(const acc_t* DDF_RESTRICT gp, const acc_t* DDF_RESTRICT px, const acc_t* DDF_RESTRICT cj,
                              acc_t* DDF_RESTRICT pj, acc_t sv, int64_t c0, int64_t c1) {
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  constexpr int64_t V = VT::n;
  vec s0 = VT::splat(0), s1 = VT::splat(0);
  int64_t c = c0;
  for (; c + 2 * V <= c1; c += 2 * V) {
    const vec v0 = VT::load(gp + c) * VT::load(px + c), v1 = VT::load(gp + c + V) * VT::load(px + c + V);
    s0 += MUL ? v0 * VT::load(cj + c) : v0;
    s1 += MUL ? v1 * VT::load(cj + c + V) : v1;
    VT::store(pj + c, VT::load(pj + c) + (MUL ? v0 * sv : v0));
    VT::store(pj + c + V, VT::load(pj + c + V) + (MUL ? v1 * sv : v1));
  }
  acc_t sum = VT::sum(s0 + s1);
  for (; c < c1; ++c) {
    const acc_t v = gp[c] * px[c];
    sum += MUL ? v * cj[c] : v;
    pj[c] += MUL ? v * sv : v;
  }
  return sum;
}

// As nhwc_tap_sum for 4 pixels at once (sums[p], spatial taps sv[p]): the pixels share one load of the channel
// filter and one load + store of pj per vector. Named registers, not arrays: arrays of vectors were kept on the
// stack (the may_alias stores to pj may alias them).
template <typename acc_t, bool MUL>
DDF_INLINE void nhwc_tap_sum4(const acc_t* const* gp, const acc_t* const* px, const acc_t* DDF_RESTRICT cj,
                              acc_t* DDF_RESTRICT pj, const acc_t* sv, acc_t* sums, int64_t c0, int64_t c1) {
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  constexpr int64_t V = VT::n;
  const acc_t *g0 = gp[0], *g1 = gp[1], *g2 = gp[2], *g3 = gp[3];
  const acc_t *x0 = px[0], *x1 = px[1], *x2 = px[2], *x3 = px[3];
  const acc_t a0 = sv[0], a1 = sv[1], a2 = sv[2], a3 = sv[3];
  const vec w0 = VT::splat(a0), w1 = VT::splat(a1), w2 = VT::splat(a2), w3 = VT::splat(a3);
  vec s0 = VT::splat(0), s1 = s0, s2 = s0, s3 = s0;
  int64_t c = c0;
  for (; c + V <= c1; c += V) {
    const vec cv = VT::load(cj + c);
    const vec v0 = VT::load(g0 + c) * VT::load(x0 + c), v1 = VT::load(g1 + c) * VT::load(x1 + c);
    const vec v2 = VT::load(g2 + c) * VT::load(x2 + c), v3 = VT::load(g3 + c) * VT::load(x3 + c);
    s0 += MUL ? v0 * cv : v0;
    s1 += MUL ? v1 * cv : v1;
    s2 += MUL ? v2 * cv : v2;
    s3 += MUL ? v3 * cv : v3;
    VT::store(pj + c, VT::load(pj + c) + (MUL ? (v0 * w0 + v1 * w1) + (v2 * w2 + v3 * w3) : (v0 + v1) + (v2 + v3)));
  }
  acc_t t0 = VT::sum(s0), t1 = VT::sum(s1), t2 = VT::sum(s2), t3 = VT::sum(s3);
  for (; c < c1; ++c) {
    const acc_t v0 = g0[c] * x0[c], v1 = g1[c] * x1[c], v2 = g2[c] * x2[c], v3 = g3[c] * x3[c];
    t0 += MUL ? v0 * cj[c] : v0;
    t1 += MUL ? v1 * cj[c] : v1;
    t2 += MUL ? v2 * cj[c] : v2;
    t3 += MUL ? v3 * cj[c] : v3;
    pj[c] += MUL ? (v0 * a0 + v1 * a1) + (v2 * a2 + v3 * a3) : (v0 + v1) + (v2 + v3);
  }
  sums[0] = t0; sums[1] = t1; sums[2] = t2; sums[3] = t3;
}

// grad_spatial (written) and grad_channel contributions (part[j * C + c]) of the NP output pixels x .. x+NP-1 of
// row y, which read the same taps inside the image. Loop order: tap > head > channel (inner, vectorised; the
// head's channel sum is grad_spatial of the tap) > pixel.
template <int NP, typename scalar_t, bool MUL>
DDF_INLINE void nhwc_filter_grads_pixels(const NhwcBwdArgs<scalar_t>& A, const GeoI& g, const BwdRows& t,
                                         int64_t b, int64_t y, int64_t x, const at::opmath_type<scalar_t>* chb,
                                         at::opmath_type<scalar_t>* part, NhwcBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hkk = g.head * g.kk;
  acc_t* DDF_RESTRICT G = ws.G.data();
  const acc_t* taps[NP];
  const acc_t* gp[NP];
  const acc_t* px[NP];
  acc_t sv[NP], sums[NP];
  DDF_UNROLL for (int p = 0; p < NP; ++p) {
    taps[p] = ws.spn.data() + ((y - t.ya) * g.Wo + x + p) * hkk;
    gp[p] = acc_view(A.go + b * A.gsB + y * A.gsH + (x + p) * A.gsW, g.C, ws.go_buf.data() + p * g.C);
  }
  std::fill(G, G + NP * hkk, acc_t(0));
  for (int64_t jy = 0; jy < g.k; ++jy) {
    const int64_t iy = y * g.s + (jy - g.r) * g.d;
    if (iy < 0 || iy >= g.H) continue;
    for (int64_t jx = 0; jx < g.k; ++jx) {
      const int64_t ix = x * g.s + (jx - g.r) * g.d, j = jy * g.k + jx;
      if (ix < 0 || ix >= g.W) continue;
      DDF_UNROLL for (int p = 0; p < NP; ++p)
        px[p] = acc_view(A.in + b * A.isB + iy * A.isH + (ix + p * g.s) * A.isW, g.C, ws.in_buf.data() + p * g.C);
      for (int64_t h = 0; h < g.head; ++h) {
        DDF_UNROLL for (int p = 0; p < NP; ++p) sv[p] = taps[p][h * g.kk + j];
        if constexpr (NP == 4)
          nhwc_tap_sum4<acc_t, MUL>(gp, px, chb + j * g.C, part + j * g.C, sv, sums, h * g.Cg, (h + 1) * g.Cg);
        else
          sums[0] = nhwc_tap_sum<acc_t, MUL>(gp[0], px[0], chb + j * g.C, part + j * g.C, sv[0], h * g.Cg, (h + 1) * g.Cg);
        DDF_UNROLL for (int p = 0; p < NP; ++p) G[p * hkk + h * g.kk + j] = sums[p];
      }
    }
  }
}

// True when the output pixels x .. x+n-1 of a row all read (or all skip) each tap column jx.
inline bool same_tap_columns(const GeoI& g, int64_t x, int64_t n) {
  if (x + n > g.Wo) return false;
  for (int64_t jx = 0; jx < g.k; ++jx) {
    const int64_t off = (jx - g.r) * g.d, a = x * g.s + off, e = (x + n - 1) * g.s + off;
    const bool in_a = a >= 0 && a < g.W, in_e = e >= 0 && e < g.W;
    if (in_a != in_e || (!in_a && a < 0 && e >= g.W)) return false;  // monotone in x: the ends decide
  }
  return true;
}

// grad_spatial of output row y (written) and its grad_channel contributions, in groups of kNhwcBwdPixels pixels
// that read the same taps (single pixels at the image edges).
template <typename scalar_t, bool MUL>
DDF_INLINE void nhwc_filter_grads_row(const NhwcBwdArgs<scalar_t>& A, const GeoI& g, const BwdRows& t, int64_t b,
                                      int64_t y, const at::opmath_type<scalar_t>* chb, bool norm,
                                      at::opmath_type<scalar_t> gain, at::opmath_type<scalar_t>* part,
                                      NhwcBwdScratch<at::opmath_type<scalar_t>>& ws) {
  constexpr int NP = int(kNhwcBwdPixels);
  static_assert(NP == 4, "nhwc_filter_grads_pixels has 1- and 4-pixel tap kernels");
  const int64_t hkk = g.head * g.kk;
  for (int64_t x = 0; x < g.Wo;) {
    const int np = same_tap_columns(g, x, NP) ? NP : 1;
    if (np == NP) nhwc_filter_grads_pixels<NP, scalar_t, MUL>(A, g, t, b, y, x, chb, part, ws);
    else nhwc_filter_grads_pixels<1, scalar_t, MUL>(A, g, t, b, y, x, chb, part, ws);
    for (int p = 0; p < np; ++p, ++x) {
      const int64_t pix = (y - t.ya) * g.Wo + x;
      bwd_store_pixel<scalar_t>(ws.G.data() + p * hkk, A.sp + b * A.ssB + y * A.ssH + x * A.ssW, A.ssC,
                                ws.stat.data() + pix * g.head * 2, g, norm, gain,
                                A.gsp + b * A.tsB + y * A.tsH + x * A.tsW, A.tsC);
    }
  }
}

// grad_input of input row iy, gathered per pixel from the output pixels that read it.
// Loop order: ix > head > 4 (else 2) channel vectors (register accumulators) > the pixel's valid taps (listed first:
// grad_output pixel, channel filter row, spatial tap per head), so each tap costs two loads and two vector
// operations and the result is stored once.
template <typename scalar_t, bool MUL>
DDF_INLINE void nhwc_input_grads_row(const NhwcBwdArgs<scalar_t>& A, const GeoI& g, const BwdRows& t, int64_t b,
                                     int64_t iy, const at::opmath_type<scalar_t>* chb,
                                     NhwcBwdScratch<at::opmath_type<scalar_t>>& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  using VT = BwdVec<acc_t>;
  using vec = typename VT::v;
  constexpr int64_t V = VT::n;
  const int64_t hkk = g.head * g.kk;
  acc_t* DDF_RESTRICT acc = ws.acc.data();
  const acc_t** tgp = ws.tap_go.data();
  const acc_t** tcj = ws.tap_ch.data();
  acc_t* tsv = ws.tap_sp.data();
  for (int64_t ix = 0; ix < g.W; ++ix) {
    int64_t nt = 0;
    for (int64_t jy = 0; jy < g.k; ++jy) {
      const int64_t ty = iy - (jy - g.r) * g.d;
      if (ty < 0 || ty % g.s != 0 || ty / g.s >= g.Ho) continue;
      const int64_t y = ty / g.s;
      for (int64_t jx = 0; jx < g.k; ++jx) {
        const int64_t tx = ix - (jx - g.r) * g.d, j = jy * g.k + jx;
        if (tx < 0 || tx % g.s != 0 || tx / g.s >= g.Wo) continue;
        const int64_t x = tx / g.s;
        tgp[nt] = acc_view(A.go + b * A.gsB + y * A.gsH + x * A.gsW, g.C, ws.go_taps.data() + nt * g.C);
        tcj[nt] = chb + j * g.C;
        const acc_t* taps = ws.spn.data() + ((y - t.ya) * g.Wo + x) * hkk;
        for (int64_t h = 0; h < g.head; ++h) tsv[nt * g.head + h] = taps[h * g.kk + j];
        ++nt;
      }
    }
    for (int64_t h = 0; h < g.head; ++h) {
      const int64_t c1 = (h + 1) * g.Cg;
      int64_t c = h * g.Cg;
      for (; c + 4 * V <= c1; c += 4 * V) {  // four accumulators: the sums over taps are a dependency chain
        vec a0 = VT::splat(0), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t e = 0; e < nt; ++e) {
          const acc_t sv = tsv[e * g.head + h];
          const acc_t *gp = tgp[e] + c, *cj = tcj[e] + c;
          a0 += VT::load(gp) * (MUL ? VT::load(cj) * sv : VT::load(cj) + sv);
          a1 += VT::load(gp + V) * (MUL ? VT::load(cj + V) * sv : VT::load(cj + V) + sv);
          a2 += VT::load(gp + 2 * V) * (MUL ? VT::load(cj + 2 * V) * sv : VT::load(cj + 2 * V) + sv);
          a3 += VT::load(gp + 3 * V) * (MUL ? VT::load(cj + 3 * V) * sv : VT::load(cj + 3 * V) + sv);
        }
        VT::store(acc + c, a0);
        VT::store(acc + c + V, a1);
        VT::store(acc + c + 2 * V, a2);
        VT::store(acc + c + 3 * V, a3);
      }
      for (; c + 2 * V <= c1; c += 2 * V) {
        vec a0 = VT::splat(0), a1 = VT::splat(0);
        for (int64_t e = 0; e < nt; ++e) {
          const acc_t sv = tsv[e * g.head + h];
          const acc_t *gp = tgp[e] + c, *cj = tcj[e] + c;
          a0 += VT::load(gp) * (MUL ? VT::load(cj) * sv : VT::load(cj) + sv);
          a1 += VT::load(gp + V) * (MUL ? VT::load(cj + V) * sv : VT::load(cj + V) + sv);
        }
        VT::store(acc + c, a0);
        VT::store(acc + c + V, a1);
      }
      for (; c < c1; ++c) {
        acc_t a = 0;
        for (int64_t e = 0; e < nt; ++e) {
          const acc_t sv = tsv[e * g.head + h];
          a += tgp[e][c] * (MUL ? sv * tcj[e][c] : sv + tcj[e][c]);
        }
        acc[c] = a;
      }
    }
    scalar_t* DDF_RESTRICT dst = A.gin + b * A.nsB + iy * A.nsH + ix * A.nsW;
    for (int64_t c = 0; c < g.C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
  }
}

// NHWC backward: one task per (b, block of R output rows) (see the section comment).
// Loop order: output row y > [grad_spatial + grad_channel of row y, then grad_input of input rows y*s .. y*s+s-1]
// > pixel > tap > head > channel (inner, vectorised: channels are contiguous). Interleaving the two parts row by
// row keeps the few rows of grad_output / input that both read in cache; the block's taps are loaded (and
// normalised) once, with the halo rows that grad_input needs.
template <typename scalar_t, bool MUL>
void backward_nhwc_simd(const NhwcBwdArgs<scalar_t>& A) {
  using acc_t = at::opmath_type<scalar_t>;
  const GeoI g = A.g;
  const int64_t kkC = g.kk * g.C, hkk = g.head * g.kk, R = A.R, n_rb = A.n_rb;
  const bool norm = A.norm;
  const acc_t gn = A.gain;
  at::parallel_for(0, g.B * n_rb, 1, [&](int64_t begin, int64_t end) {
    NhwcBwdScratch<acc_t> ws(g, R);
    std::vector<acc_t> tm(g.Wo * hkk), row_stat(3 * g.Wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_rb, rb = task % n_rb;
      const BwdRows t = bwd_rows(g, rb, R);
      for (int64_t y = t.ya; y < t.yb; ++y) {
        const int64_t pix = (y - t.ya) * g.Wo;
        load_row_taps<scalar_t>(A.sp + b * A.ssB + y * A.ssH, A.ssW, A.ssC, g, norm, gn, tm.data(), row_stat.data(),
                                ws.spn.data() + pix * hkk, ws.stat.data() + pix * g.head * 2);
      }
      acc_t* part = A.partial + task * kkC;
      std::fill(part, part + kkC, acc_t(0));
      const acc_t* chb = A.chT + b * kkC;
      for (int64_t y = t.y0; y < t.y1; ++y) {
        nhwc_filter_grads_row<scalar_t, MUL>(A, g, t, b, y, chb, norm, gn, part, ws);
        for (int64_t iy = y * g.s; iy < std::min(g.H, (y + 1) * g.s); ++iy)
          nhwc_input_grads_row<scalar_t, MUL>(A, g, t, b, iy, chb, ws);
      }
    }
  });
}
