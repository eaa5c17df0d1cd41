// Work table shared by every CPU op: the whole tensor list becomes one flat list of pieces
// (a piece is a slice of one tensor, at most kPieceElems long), and consecutive pieces are
// packed into work items of about kPieceElems elements. One OpenMP loop over work items
// then covers the whole model: big tensors are split across threads, and the hundreds of
// small tensors of a UNet (biases, norms) share items instead of costing one task each.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace freezeguard {

// 64K elements: 256 KB of fp32 per operand, large enough to amortise scheduling, small
// enough that 686 tensors of a scaled SD-1.5 UNet still give hundreds of items to balance.
constexpr int64_t kPieceElems = 1 << 16;

struct Piece {
  int64_t tensor;  // index into the op's tensor list
  int64_t begin;   // first element of the slice
  int64_t size;    // number of elements
};

struct WorkTable {
  std::vector<Piece> pieces;
  std::vector<int64_t> item_begin;  // item k covers pieces [item_begin[k], item_begin[k+1])
  int64_t total = 0;

  int64_t items() const { return static_cast<int64_t>(item_begin.size()) - 1; }
};

inline WorkTable make_work_table(const std::vector<at::Tensor>& tensors) {
  WorkTable t;
  t.item_begin.push_back(0);
  int64_t filled = 0;  // elements in the item being packed
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t b = 0; b < n; b += kPieceElems) {
      const int64_t size = std::min(kPieceElems, n - b);
      if (filled > 0 && filled + size > kPieceElems) {
        t.item_begin.push_back(static_cast<int64_t>(t.pieces.size()));
        filled = 0;
      }
      t.pieces.push_back({i, b, size});
      filled += size;
      t.total += size;
    }
  }
  if (filled > 0) t.item_begin.push_back(static_cast<int64_t>(t.pieces.size()));
  return t;
}

// Runs fn(piece_index, piece) for every piece, items spread over torch's intra-op thread
// count (torch.set_num_threads applies). Below ~one item of work, threads cost more than
// they save, so it runs inline.
template <typename Fn>
void for_each_piece(const WorkTable& t, const Fn& fn) {
  const int64_t items = t.items();
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(items, 1)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && t.total > kPieceElems)
  for (int64_t k = 0; k < items; ++k) {
    for (int64_t j = t.item_begin[k]; j < t.item_begin[k + 1]; ++j) fn(j, t.pieces[j]);
  }
}

// Calls fn(T{}) with T the C++ storage type of `dtype` (float, c10::BFloat16, c10::Half).
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "freezeguard._C: unsupported dtype ", dtype, " (fp32, bf16, fp16 only)");
  }
}

// Cheap guards: freezeguard/ops/validation.py validates thoroughly, but the extension may be called directly.
inline void check_list(const char* op, const std::vector<at::Tensor>& ref, const std::vector<at::Tensor>& other,
                       const char* name) {
  TORCH_CHECK(ref.size() == other.size(), op, ": ", name, " has ", other.size(), " tensors, expected ", ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const auto& a = ref[i];
    const auto& b = other[i];
    TORCH_CHECK(b.device().is_cpu() && a.device().is_cpu(), op, ": tensors must be on the CPU");
    // A tensor subclass (e.g. FSDP2's DTensor) has no plain storage behind data_ptr(): refuse it
    // here rather than let the kernel read through a wrapper (a crash, not an error).
    TORCH_CHECK(!a.unsafeGetTensorImpl()->is_python_dispatch() && !b.unsafeGetTensorImpl()->is_python_dispatch() &&
                    a.has_storage() && b.has_storage(),
                op, ": ", name, "[", i, "] is a tensor subclass (e.g. a DTensor); pass plain local tensors");
    TORCH_CHECK(b.is_contiguous() && a.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", name, "[", i, "] is ", b.scalar_type(), " but expected ",
                a.scalar_type());
    TORCH_CHECK(b.numel() == a.numel(), op, ": ", name, "[", i, "] has ", b.numel(), " elements, expected ", a.numel());
    // Checked here, not in dispatch_dtype alone: an exception thrown inside the OpenMP
    // loop would terminate the process instead of reaching Python.
    const auto dt = b.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name, "[", i, "] has dtype ",
                dt, "; supported: fp32, bf16, fp16");
  }
}

inline const float* check_scalars(const char* op, const at::Tensor& s, size_t n, const char* name) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 1 &&
                  static_cast<size_t>(s.numel()) == n,
              op, ": ", name, " must be a contiguous fp32 CPU tensor with one value per tensor (", n, ")");
  return s.data_ptr<float>();
}

}  // namespace freezeguard
