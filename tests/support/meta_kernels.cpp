#include "tests/support/meta_kernels.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <vector>

namespace ptk::test {
namespace {

at::Tensor meta_empty(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().device(at::kMeta));
}

// Each kernel refuses a tensor argument that is not on meta (a 0-dim CPU scalar aside, which ATen
// allows beside any device): a step that made it on the CPU fails here as it would on a GPU.
void require_meta(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_meta() || (t.is_cpu() && t.dim() == 0), op, ": ", arg, " is on ", t.device(),
              " while the other arguments are on meta (a tensor made on the CPU)");
}

// index_select(self, dim, index): self's shape with dim replaced by index's length.
at::Tensor index_select_meta(const at::Tensor& self, int64_t dim, const at::Tensor& index) {
  require_meta(index, "index_select", "index");
  TORCH_CHECK(index.dim() <= 1, "index_select: index must be 0- or 1-dimensional");
  std::vector<int64_t> shape(self.sizes().begin(), self.sizes().end());
  if (shape.empty()) return meta_empty({}, self);
  dim = at::maybe_wrap_dim(dim, self.dim());
  shape[dim] = index.numel();
  return meta_empty(shape, self);
}

// embedding_dense_backward(grad, indices, num_weights, ...): (num_weights, H), the weight's gradient.
at::Tensor embedding_dense_backward_meta(const at::Tensor& grad, const at::Tensor& indices, c10::SymInt num_weights,
                                         c10::SymInt /*padding_idx*/, bool /*scale_grad_by_freq*/) {
  require_meta(grad, "embedding_dense_backward", "grad");
  require_meta(indices, "embedding_dense_backward", "indices");
  return meta_empty({num_weights.expect_int(), grad.size(-1)}, grad);
}

// where(condition, self, other): the broadcast shape, the promoted dtype.
at::Tensor where_meta(const at::Tensor& cond, const at::Tensor& self, const at::Tensor& other) {
  for (const auto* t : {&cond, &self, &other}) require_meta(*t, "where", "an argument");
  auto shape = at::infer_size(at::infer_size(cond.sizes(), self.sizes()), other.sizes());
  return at::empty(shape, self.options().dtype(at::result_type(self, other)).device(at::kMeta));
}

// where.self_out(condition, self, other, out): out resized to the broadcast shape.
at::Tensor& where_out_meta(const at::Tensor& cond, const at::Tensor& self, const at::Tensor& other, at::Tensor& out) {
  for (const auto* t : {&cond, &self, &other}) require_meta(*t, "where", "an argument");
  out.resize_(at::infer_size(at::infer_size(cond.sizes(), self.sizes()), other.sizes()));
  return out;
}

// logical_not.out(self, out): out resized to self's shape.
at::Tensor& logical_not_out_meta(const at::Tensor& self, at::Tensor& out) {
  require_meta(self, "logical_not", "self");
  out.resize_(self.sizes());
  return out;
}

// searchsorted(sorted_sequence, self, ...): self's shape, int64 (int32 with out_int32).
at::Tensor searchsorted_meta(const at::Tensor& sorted, const at::Tensor& self, bool out_int32, bool /*right*/,
                             std::optional<c10::string_view> /*side*/, const std::optional<at::Tensor>& sorter) {
  require_meta(sorted, "searchsorted", "sorted_sequence");
  if (sorter) require_meta(*sorter, "searchsorted", "sorter");
  return at::empty(self.sizes(), self.options().dtype(out_int32 ? at::kInt : at::kLong).device(at::kMeta));
}

// logical_and.out(self, other, out): out resized to the broadcast shape.
at::Tensor& logical_and_out_meta(const at::Tensor& self, const at::Tensor& other, at::Tensor& out) {
  require_meta(self, "logical_and", "self");
  require_meta(other, "logical_and", "other");
  out.resize_(at::infer_size(self.sizes(), other.sizes()));
  return out;
}

// abs.out(self, out): out resized to self's shape (isfinite and the _foreach_norm fallback of the
// gradient clipping go through it).
at::Tensor& abs_out_meta(const at::Tensor& self, at::Tensor& out) {
  require_meta(self, "abs", "self");
  out.resize_(self.sizes());
  return out;
}

std::once_flag once;
std::unique_ptr<torch::Library> library;

}  // namespace

void register_meta_kernels() {
  std::call_once(once, [] {
    library = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Meta, __FILE__, __LINE__);
    library->impl("index_select", TORCH_FN(index_select_meta));
    library->impl("embedding_dense_backward", TORCH_FN(embedding_dense_backward_meta));
    library->impl("where.self", TORCH_FN(where_meta));
    library->impl("where.self_out", TORCH_FN(where_out_meta));
    library->impl("logical_and.out", TORCH_FN(logical_and_out_meta));
    library->impl("logical_not.out", TORCH_FN(logical_not_out_meta));
    library->impl("searchsorted.Tensor", TORCH_FN(searchsorted_meta));
    library->impl("abs.out", TORCH_FN(abs_out_meta));
  });
}

}  // namespace ptk::test
