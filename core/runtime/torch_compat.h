// LibTorch version differences, kept in one place (Debian's 1.13 vs pip's 2.x).
// Not a general portability layer: add a switch here only when both builds need the same call.
#pragma once
#include <torch/version.h>

#define PTK_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// scaled_dot_product_attention exists from 2.0.
#define PTK_HAVE_SDPA PTK_TORCH_AT_LEAST(2, 0)
