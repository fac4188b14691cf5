// DDF op: CUDA kernels (forward + backward), registered with TORCH_LIBRARY_IMPL(ddf, CUDA).
//
// Same semantics and template structure as the CPU kernels in ddf.cpp: templates over the dtype (scalar_t,
// accumulating in at::opmath_type), the combine mode (MUL) and the memory layout (CL = channels_last). The
// layout only decides how a thread's linear index is split into (b, c, y, x) so that neighbouring threads touch
// neighbouring addresses; all tensors are indexed through their strides, so no input copy is made.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ddf_common.h"

namespace ddf {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct Geo {
  int64_t B, C, H, W, Ho, Wo, k, kk, r, d, s, head, Cg;
};

inline Geo make_geo(const Tensor& input, int64_t k, int64_t d, int64_t s, int64_t head) {
  Geo g;
  g.B = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.Ho = out_size(g.H, s); g.Wo = out_size(g.W, s);
  g.k = k; g.kk = k * k; g.r = (k - 1) / 2; g.d = d; g.s = s; g.head = head; g.Cg = g.C / head;
  return g;
}

inline unsigned int num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

// Split a linear index over a (B, C, Y, X) tensor in NCHW or NHWC order.
template <bool CL>
__device__ __forceinline__ void split_index(int64_t idx, int64_t C, int64_t Y, int64_t X, int64_t& b, int64_t& c,
                                            int64_t& y, int64_t& x) {
  if (CL) {
    c = idx % C; idx /= C;
    x = idx % X; idx /= X;
    y = idx % Y; b = idx / Y;
  } else {
    x = idx % X; idx /= X;
    y = idx % Y; idx /= Y;
    c = idx % C; b = idx / C;
  }
}

// ---------------------------------------------------------------------------------------------------- forward
template <typename scalar_t, bool MUL, bool CL>
__global__ void ddf_forward_kernel(const scalar_t* __restrict__ in, Strides4 is, const scalar_t* __restrict__ ch,
                                   const scalar_t* __restrict__ sp, Strides4 ss, scalar_t* __restrict__ out,
                                   Strides4 os, Geo g, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t b, c, y, x;
    split_index<CL>(idx, g.C, g.Ho, g.Wo, b, c, y, x);
    const int64_t h = c / g.Cg;
    const scalar_t* inb = in + b * is.b + c * is.c;
    const scalar_t* spb = sp + b * ss.b + h * g.kk * ss.c + y * ss.h + x * ss.w;
    const scalar_t* chb = ch + (b * g.C + c) * g.kk;  // contiguous
    acc_t acc = 0;
    for (int64_t jy = 0; jy < g.k; ++jy) {
      const int64_t iy = y * g.s + (jy - g.r) * g.d;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t jx = 0; jx < g.k; ++jx) {
        const int64_t ix = x * g.s + (jx - g.r) * g.d;
        if (ix < 0 || ix >= g.W) continue;
        const int64_t j = jy * g.k + jx;
        const acc_t sv = static_cast<acc_t>(spb[j * ss.c]);
        const acc_t cv = static_cast<acc_t>(chb[j]);
        acc += static_cast<acc_t>(inb[iy * is.h + ix * is.w]) * (MUL ? sv * cv : sv + cv);
      }
    }
    out[b * os.b + c * os.c + y * os.h + x * os.w] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------- backward
// grad_input: one thread per input element, gathering from the output pixels whose taps read it.
template <typename scalar_t, bool MUL, bool CL>
__global__ void ddf_grad_input_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ ch,
                                      const scalar_t* __restrict__ sp, Strides4 ss, scalar_t* __restrict__ gin,
                                      Strides4 ns, Geo g, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t b, c, iy, ix;
    split_index<CL>(idx, g.C, g.H, g.W, b, c, iy, ix);
    const int64_t h = c / g.Cg;
    const scalar_t* chb = ch + (b * g.C + c) * g.kk;
    acc_t acc = 0;
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
        const acc_t sv = static_cast<acc_t>(sp[b * ss.b + (h * g.kk + j) * ss.c + y * ss.h + x * ss.w]);
        const acc_t cv = static_cast<acc_t>(chb[j]);
        acc += static_cast<acc_t>(go[b * gs.b + c * gs.c + y * gs.h + x * gs.w]) * (MUL ? sv * cv : sv + cv);
      }
    }
    gin[b * ns.b + c * ns.c + iy * ns.h + ix * ns.w] = static_cast<scalar_t>(acc);
  }
}

// grad_spatial: one thread per element of (B, head*k*k, Ho, Wo), summing over the head's channels.
template <typename scalar_t, bool MUL, bool CL>
__global__ void ddf_grad_spatial_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ in,
                                        Strides4 is, const scalar_t* __restrict__ ch, scalar_t* __restrict__ gsp,
                                        Strides4 ts, Geo g, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HK = g.head * g.kk;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t b, hj, y, x;
    split_index<CL>(idx, HK, g.Ho, g.Wo, b, hj, y, x);
    const int64_t h = hj / g.kk, j = hj % g.kk, jy = j / g.k, jx = j % g.k;
    const int64_t iy = y * g.s + (jy - g.r) * g.d;
    const int64_t ix = x * g.s + (jx - g.r) * g.d;
    acc_t acc = 0;
    if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
      for (int64_t c = h * g.Cg; c < (h + 1) * g.Cg; ++c) {
        const acc_t gi = static_cast<acc_t>(go[b * gs.b + c * gs.c + y * gs.h + x * gs.w]) *
                         static_cast<acc_t>(in[b * is.b + c * is.c + iy * is.h + ix * is.w]);
        acc += MUL ? gi * static_cast<acc_t>(ch[(b * g.C + c) * g.kk + j]) : gi;
      }
    }
    gsp[b * ts.b + hj * ts.c + y * ts.h + x * ts.w] = static_cast<scalar_t>(acc);
  }
}

// grad_channel: one block per (b, c); for every tap j the block reduces over the Ho*Wo output pixels.
template <typename scalar_t, bool MUL>
__global__ void ddf_grad_channel_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ in,
                                        Strides4 is, const scalar_t* __restrict__ sp, Strides4 ss,
                                        scalar_t* __restrict__ gch, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kThreads];
  const int64_t bc = blockIdx.x;
  const int64_t b = bc / g.C, c = bc % g.C, h = c / g.Cg;
  const int64_t P = g.Ho * g.Wo;
  for (int64_t j = 0; j < g.kk; ++j) {
    const int64_t jy = j / g.k, jx = j % g.k;
    acc_t acc = 0;
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
      const int64_t y = p / g.Wo, x = p % g.Wo;
      const int64_t iy = y * g.s + (jy - g.r) * g.d;
      const int64_t ix = x * g.s + (jx - g.r) * g.d;
      if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) continue;
      const acc_t gi = static_cast<acc_t>(go[b * gs.b + c * gs.c + y * gs.h + x * gs.w]) *
                       static_cast<acc_t>(in[b * is.b + c * is.c + iy * is.h + ix * is.w]);
      acc += MUL ? gi * static_cast<acc_t>(sp[b * ss.b + (h * g.kk + j) * ss.c + y * ss.h + x * ss.w]) : gi;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int off = blockDim.x / 2; off > 0; off >>= 1) {
      if (threadIdx.x < off) red[threadIdx.x] += red[threadIdx.x + off];
      __syncthreads();
    }
    if (threadIdx.x == 0) gch[bc * g.kk + j] = static_cast<scalar_t>(red[0]);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------- host side
template <typename scalar_t, bool MUL, bool CL>
void launch_forward(const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& out, const Geo& g) {
  const int64_t n = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  ddf_forward_kernel<scalar_t, MUL, CL><<<num_blocks(n), kThreads, 0, stream>>>(
      input.const_data_ptr<scalar_t>(), strides_of(input), ch.const_data_ptr<scalar_t>(),
      sp.const_data_ptr<scalar_t>(), strides_of(sp), out.mutable_data_ptr<scalar_t>(), strides_of(out), g, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool MUL, bool CL>
void launch_backward(const Tensor& gout, const Tensor& input, const Tensor& ch, const Tensor& sp, Tensor& gin,
                     Tensor& gch, Tensor& gsp, const Geo& g) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_in = gin.numel();
  ddf_grad_input_kernel<scalar_t, MUL, CL><<<num_blocks(n_in), kThreads, 0, stream>>>(
      gout.const_data_ptr<scalar_t>(), strides_of(gout), ch.const_data_ptr<scalar_t>(),
      sp.const_data_ptr<scalar_t>(), strides_of(sp), gin.mutable_data_ptr<scalar_t>(), strides_of(gin), g, n_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_sp = gsp.numel();
  ddf_grad_spatial_kernel<scalar_t, MUL, CL><<<num_blocks(n_sp), kThreads, 0, stream>>>(
      gout.const_data_ptr<scalar_t>(), strides_of(gout), input.const_data_ptr<scalar_t>(), strides_of(input),
      ch.const_data_ptr<scalar_t>(), gsp.mutable_data_ptr<scalar_t>(), strides_of(gsp), g, n_sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_bc = g.B * g.C;
  if (n_bc > 0) {
    ddf_grad_channel_kernel<scalar_t, MUL><<<static_cast<unsigned int>(n_bc), kThreads, 0, stream>>>(
        gout.const_data_ptr<scalar_t>(), strides_of(gout), input.const_data_ptr<scalar_t>(), strides_of(input),
        sp.const_data_ptr<scalar_t>(), strides_of(sp), gch.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Tensor ddf_forward_cuda(const Tensor& input, const Tensor& channel_filter, const Tensor& spatial_filter,
                        int64_t kernel_size, int64_t dilation, int64_t stride, int64_t head, int64_t combine) {
  check_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine);
  TORCH_CHECK(input.is_cuda(), "ddf_forward_cuda: input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = use_channels_last(input);
  const Geo g = make_geo(input, kernel_size, dilation, stride, head);
  Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options().memory_format(memory_format_of(input)));
  if (out.numel() == 0) return out;
  TORCH_CHECK(g.B * g.C <= int64_t(std::numeric_limits<int>::max()), "ddf: B*C too large");
  const Tensor ch = channel_filter.contiguous();  // (B, C, k, k): small
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ddf_forward_cuda", [&] {
    if (combine == kCombineMul) {
      if (cl) launch_forward<scalar_t, true, true>(input, ch, spatial_filter, out, g);
      else launch_forward<scalar_t, true, false>(input, ch, spatial_filter, out, g);
    } else {
      if (cl) launch_forward<scalar_t, false, true>(input, ch, spatial_filter, out, g);
      else launch_forward<scalar_t, false, false>(input, ch, spatial_filter, out, g);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> ddf_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                     const Tensor& channel_filter, const Tensor& spatial_filter,
                                                     int64_t kernel_size, int64_t dilation, int64_t stride,
                                                     int64_t head, int64_t combine) {
  check_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine);
  check_grad_output(grad_output, input, stride);
  TORCH_CHECK(input.is_cuda(), "ddf_backward_cuda: input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = use_channels_last(input);
  const Geo g = make_geo(input, kernel_size, dilation, stride, head);
  Tensor gin = at::empty(input.sizes(), input.options().memory_format(memory_format_of(input)));
  Tensor gch = at::empty(channel_filter.sizes(), channel_filter.options());
  Tensor gsp = at::empty(spatial_filter.sizes(),
                         spatial_filter.options().memory_format(memory_format_of(spatial_filter)));
  if (input.numel() == 0 || grad_output.numel() == 0) {
    gin.zero_(); gch.zero_(); gsp.zero_();
    return {gin, gch, gsp};
  }
  TORCH_CHECK(g.B * g.C <= int64_t(std::numeric_limits<int>::max()), "ddf: B*C too large");
  const Tensor ch = channel_filter.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ddf_backward_cuda", [&] {
    if (combine == kCombineMul) {
      if (cl) launch_backward<scalar_t, true, true>(grad_output, input, ch, spatial_filter, gin, gch, gsp, g);
      else launch_backward<scalar_t, true, false>(grad_output, input, ch, spatial_filter, gin, gch, gsp, g);
    } else {
      if (cl) launch_backward<scalar_t, false, true>(grad_output, input, ch, spatial_filter, gin, gch, gsp, g);
      else launch_backward<scalar_t, false, false>(grad_output, input, ch, spatial_filter, gin, gch, gsp, g);
    }
  });
  return {gin, gch, gsp};
}

}  // namespace
}  // namespace ddf

TORCH_LIBRARY_IMPL(ddf, CUDA, m) {
  m.impl("ddf_forward", &ddf::ddf_forward_cuda);
  m.impl("ddf_backward", &ddf::ddf_backward_cuda);
}
