#include "tests/support/meta_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <vector>

namespace ptk::test {
namespace {

at::Tensor meta_empty(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().device(at::kMeta));
}

// index_select(self, dim, index): self's shape with dim replaced by index's length.
at::Tensor index_select_meta(const at::Tensor& self, int64_t dim, const at::Tensor& index) {
  TORCH_CHECK(index.dim() <= 1, "index_select: index must be 0- or 1-dimensional");
  std::vector<int64_t> shape(self.sizes().begin(), self.sizes().end());
  if (shape.empty()) return meta_empty({}, self);
  dim = at::maybe_wrap_dim(dim, self.dim());
  shape[dim] = index.numel();
  return meta_empty(shape, self);
}

std::once_flag once;
std::unique_ptr<torch::Library> library;

}  // namespace

void register_meta_kernels() {
  std::call_once(once, [] {
    library = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Meta, __FILE__, __LINE__);
    library->impl("index_select", TORCH_FN(index_select_meta));
  });
}

}  // namespace ptk::test
