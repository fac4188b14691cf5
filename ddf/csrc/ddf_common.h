// Shared argument checks and helpers of the DDF op C++ kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace ddf {

// combine codes used in the op schema
constexpr int64_t kCombineMul = 0;
constexpr int64_t kCombineAdd = 1;
// eps of FilterNorm (paper Eq. 3), as ddf/_checks.py:FILTER_NORM_EPS
constexpr double kFilterNormEps = 1e-10;

// Output size of a strided dimension; an empty dimension stays empty (same rule as ddf/_checks.py:out_size).
inline int64_t out_size(int64_t n, int64_t stride) { return n == 0 ? 0 : (n - 1) / stride + 1; }

// True when `t` should be processed (and returned) in channels_last layout.
// The same rule is used by ddf/_checks.py (fake kernels, reference, Triton launchers).
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "ddf: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, "ddf: ", name, " must be 4-D, got ", t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), "ddf: ", name,
              " must be a floating point tensor (float32, float64, float16 or bfloat16), got ", t.scalar_type());
}

// Checks of ddf_forward / ddf_backward arguments (direct torch.ops.ddf.* calls must never crash).
inline void check_args(const at::Tensor& input, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                       int64_t kernel_size, int64_t dilation, int64_t stride, int64_t head, int64_t combine,
                       bool spatial_norm) {
  check_tensor(input, "input");
  check_tensor(channel_filter, "channel_filter");
  check_tensor(spatial_filter, "spatial_filter");
  TORCH_CHECK(channel_filter.scalar_type() == input.scalar_type(), "ddf: channel_filter has dtype ",
              channel_filter.scalar_type(), " but input has dtype ", input.scalar_type(), "; they must match");
  TORCH_CHECK(spatial_filter.scalar_type() == input.scalar_type(), "ddf: spatial_filter has dtype ",
              spatial_filter.scalar_type(), " but input has dtype ", input.scalar_type(), "; they must match");
  TORCH_CHECK(channel_filter.device() == input.device(), "ddf: channel_filter is on ", channel_filter.device(),
              " but input is on ", input.device(), "; they must be on one device");
  TORCH_CHECK(spatial_filter.device() == input.device(), "ddf: spatial_filter is on ", spatial_filter.device(),
              " but input is on ", input.device(), "; they must be on one device");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "ddf: kernel_size must be an odd integer >= 1, got ",
              kernel_size);
  TORCH_CHECK(dilation >= 1, "ddf: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(stride >= 1, "ddf: stride must be >= 1, got ", stride);
  TORCH_CHECK(head >= 1, "ddf: head must be >= 1, got ", head);
  TORCH_CHECK(combine == kCombineMul || combine == kCombineAdd,
              "ddf: combine must be 0 ('mul') or 1 ('add'), got ", combine);
  TORCH_CHECK(!spatial_norm || kernel_size >= 3,
              "ddf: spatial_norm=True needs kernel_size >= 3 (the std over a single tap is undefined), got ",
              kernel_size);
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(C % head == 0, "ddf: head=", head, " must divide the number of input channels C=", C);
  const int64_t k = kernel_size;
  TORCH_CHECK(channel_filter.size(0) == B && channel_filter.size(1) == C && channel_filter.size(2) == k &&
                  channel_filter.size(3) == k,
              "ddf: channel_filter must have shape (B, C, k, k) = (", B, ", ", C, ", ", k, ", ", k, "), got ",
              channel_filter.sizes());
  const int64_t Ho = out_size(H, stride), Wo = out_size(W, stride);
  TORCH_CHECK(spatial_filter.size(0) == B && spatial_filter.size(1) == head * k * k && spatial_filter.size(2) == Ho &&
                  spatial_filter.size(3) == Wo,
              "ddf: spatial_filter must have shape (B, head*k*k, ceil(H/stride), ceil(W/stride)) = (", B, ", ",
              head * k * k, ", ", Ho, ", ", Wo, "), got ", spatial_filter.sizes());
  // 32-bit index safety of the kernels' per-plane arithmetic is not needed (int64 everywhere), but
  // guard against absurd kernel footprints.
  TORCH_CHECK((k - 1) * dilation / 2 < (int64_t(1) << 30), "ddf: kernel_size*dilation too large");
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, int64_t stride) {
  check_tensor(grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "ddf: grad_output has dtype ",
              grad_output.scalar_type(), " but input has dtype ", input.scalar_type(), "; they must match");
  TORCH_CHECK(grad_output.device() == input.device(), "ddf: grad_output is on ", grad_output.device(),
              " but input is on ", input.device(), "; they must be on one device");
  const int64_t B = input.size(0), C = input.size(1);
  const int64_t Ho = out_size(input.size(2), stride), Wo = out_size(input.size(3), stride);
  TORCH_CHECK(grad_output.size(0) == B && grad_output.size(1) == C && grad_output.size(2) == Ho &&
                  grad_output.size(3) == Wo,
              "ddf: grad_output must have shape (B, C, Ho, Wo) = (", B, ", ", C, ", ", Ho, ", ", Wo, "), got ",
              grad_output.sizes());
}

inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return use_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace ddf
