// Torch/pybind11 glue of the freezeguard CUDA kernels (module freezeguard._cuda).
//
// Turns lists of tensors into the device-side tables of fused_ops.h (one table per storage
// dtype present in the list), caches those tables keyed on their content (pointers, lengths,
// list positions), and launches on the current stream of the tensors' device. Each Python-visible
// function is bound on the line after its definition (op_registry.h); the module runs them all.
//
// The Python layer (freezeguard/ops/validation.py) validates inputs for users; the checks here repeat the
// ones that keep the kernels memory-safe, because this module can also be called directly.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/ops/empty.h>  // not ATen/ATen.h: parsing every op declaration doubles compile time
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../op_registry.h"
#include "fused_ops.h"

namespace {

namespace py = pybind11;
using TensorList = std::vector<at::Tensor>;

#define FG_CUDA_CHECK(expr, op)                                                                      \
  do {                                                                                               \
    const cudaError_t fg_err_ = (expr);                                                              \
    TORCH_CHECK(fg_err_ == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(fg_err_));      \
  } while (0)

FgDtype fg_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FG_FLOAT32;
    case at::kBFloat16:
      return FG_BFLOAT16;
    case at::kHalf:
      return FG_FLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, "unsupported dtype ", t, " (supported: float32, bfloat16, float16)");
  return FG_FLOAT32;  // unreachable
}

// Rows i of `lists` (e.g. param i, its grad and its states) must be CUDA tensors on one device,
// contiguous, of one supported dtype and one length. Returns the device.
c10::Device check_lists(const char* op, const std::vector<const TensorList*>& lists) {
  const size_t n = lists[0]->size();
  TORCH_CHECK(n > 0, op, ": empty tensor list");
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK(lists[k]->size() == n, op, ": list ", k, " has ", lists[k]->size(), " tensors, list 0 has ", n);
  }
  const c10::Device device = (*lists[0])[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors must be on a CUDA device, got ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& first = (*lists[0])[i];
    fg_dtype(first.scalar_type());
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = (*lists[k])[i];
      TORCH_CHECK(t.device() == device, op, ": tensor ", i, " of list ", k, " is on ", t.device(),
                  ", expected ", device);
      TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), op, ": tensor ", i, " of list ", k,
                  " must be dense and contiguous");
      TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": tensor ", i, " of list ", k, " is ",
                  t.scalar_type(), " but tensor ", i, " of list 0 is ", first.scalar_type());
      TORCH_CHECK(t.numel() == first.numel(), op, ": tensor ", i, " of list ", k, " has ", t.numel(),
                  " elements but tensor ", i, " of list 0 has ", first.numel());
    }
  }
  return device;
}

// Per-tensor scalars: one value per tensor, on the tensors' device, in the given dtype.
at::Tensor per_tensor_scalars(const char* op, const char* name, const at::Tensor& x, int64_t n,
                              c10::Device device, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 1 && x.numel() == n, op, ": ", name, " must have shape [", n, "], got ", x.sizes());
  TORCH_CHECK(x.device() == device, op, ": ", name, " is on ", x.device(), ", expected ", device);
  // A device-side cast (no host sync), so it can also be captured in a CUDA graph.
  return x.to(dtype).contiguous();
}

// Host image of one table: the entries of one dtype group, and their chunks.
struct HostTable {
  FgDtype dtype;
  std::vector<FgTensorEntry> entries;
  int64_t n_chunks = 0;
};

// Splits the rows by storage dtype (first-seen order) and fills in each entry's chunk range.
std::vector<HostTable> build_tables(const std::vector<const TensorList*>& lists) {
  std::vector<HostTable> tables;
  const size_t n = lists[0]->size();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& first = (*lists[0])[i];
    const FgDtype dtype = fg_dtype(first.scalar_type());
    HostTable* table = nullptr;
    for (auto& t : tables) {
      if (t.dtype == dtype) table = &t;
    }
    if (table == nullptr) {
      tables.push_back(HostTable{dtype, {}, 0});
      table = &tables.back();
    }
    FgTensorEntry e;
    std::memset(&e, 0, sizeof(e));  // padding and unused slots are part of the cache key
    for (size_t k = 0; k < lists.size(); ++k) e.ptr[k] = (*lists[k])[i].data_ptr();
    e.numel = first.numel();
    e.index = static_cast<int64_t>(i);
    e.first_chunk = table->n_chunks;
    e.n_chunks = (e.numel + FG_CHUNK_SIZE - 1) / FG_CHUNK_SIZE;
    table->n_chunks += e.n_chunks;
    table->entries.push_back(e);
  }
  return tables;
}

// Owns a timing-free CUDA event.
struct CudaEvent {
  cudaEvent_t event = nullptr;
  CudaEvent() { FG_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "freezeguard"); }
  ~CudaEvent() {
    if (event != nullptr) cudaEventDestroy(event);
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
};

// A table uploaded to the device: [entries | padding | chunks] in one byte tensor.
struct DeviceTable {
  at::Tensor buffer;
  const FgTensorEntry* entries = nullptr;
  const FgChunk* chunks = nullptr;
  int64_t n_entries = 0;
  int64_t n_chunks = 0;
  cudaStream_t alloc_stream = nullptr;
  std::shared_ptr<CudaEvent> uploaded;  // recorded on alloc_stream after the upload
  bool used_in_graph = false;           // a captured graph may replay it: never evict
};

int64_t round_up16(int64_t x) { return (x + 15) / 16 * 16; }

// Uploading a table costs an allocation and a host-to-device copy, so tables are cached. The key
// is the table's content, so a hit is always correct, even if the tensors were freed and others
// took their addresses. Least-recently-used tables beyond kCapacity are dropped (grads that are
// reallocated every step would otherwise grow the cache forever), except tables used while a
// CUDA graph was being captured, which the graph's replays still read.
class TableCache {
 public:
  static constexpr size_t kCapacity = 64;

  DeviceTable get(const HostTable& host, c10::Device device, cudaStream_t stream, bool capturing) {
    std::string key(reinterpret_cast<const char*>(host.entries.data()),
                    host.entries.size() * sizeof(FgTensorEntry));
    key.append(reinterpret_cast<const char*>(&host.dtype), sizeof(host.dtype));
    const int dev = device.index();
    key.append(reinterpret_cast<const char*>(&dev), sizeof(dev));

    std::lock_guard<std::mutex> lock(mutex_);
    auto it = map_.find(key);
    if (it != map_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.second);
      DeviceTable& table = it->second.first;
      if (capturing) table.used_in_graph = true;
      if (stream != table.alloc_stream) {
        // The upload ran on another stream: order this stream after it (a capture needs no wait:
        // torch.cuda.graph synchronizes the device before capturing, and waiting on an event
        // recorded outside the capture would invalidate it).
        if (!capturing) FG_CUDA_CHECK(cudaStreamWaitEvent(stream, table.uploaded->event, 0), "freezeguard");
        // Keep the allocator from reusing the buffer before this stream is done with it.
        c10::cuda::CUDACachingAllocator::recordStream(table.buffer.storage().data_ptr(),
                                                      c10::cuda::getCurrentCUDAStream(dev));
      }
      return table;
    }
    TORCH_CHECK(!capturing,
                "freezeguard cuda backend: this tensor list was not seen before the CUDA graph capture "
                "began; run the op once on the same tensors before capturing (a warm-up step), so its "
                "table is on the device and the graph does not read host memory");
    DeviceTable table = upload(host, device, stream);
    lru_.push_front(key);
    map_.emplace(key, std::make_pair(table, lru_.begin()));
    evict();
    return table;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    map_.clear();
    lru_.clear();
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return map_.size();
  }

 private:
  static DeviceTable upload(const HostTable& host, c10::Device device, cudaStream_t stream) {
    const int64_t entry_bytes = round_up16(static_cast<int64_t>(host.entries.size() * sizeof(FgTensorEntry)));
    const int64_t chunk_bytes = host.n_chunks * static_cast<int64_t>(sizeof(FgChunk));
    // Pinned, so the copy is asynchronous; torch's host allocator keeps the pinned block alive
    // until the copy has run.
    at::Tensor staging = at::empty({entry_bytes + chunk_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* base = staging.data_ptr<uint8_t>();
    std::memset(base, 0, entry_bytes);
    std::memcpy(base, host.entries.data(), host.entries.size() * sizeof(FgTensorEntry));
    FgChunk* chunks = reinterpret_cast<FgChunk*>(base + entry_bytes);
    int64_t c = 0;
    for (size_t e = 0; e < host.entries.size(); ++e) {
      const FgTensorEntry& entry = host.entries[e];
      for (int64_t j = 0; j < entry.n_chunks; ++j) {
        chunks[c].start = j * FG_CHUNK_SIZE;
        chunks[c].entry = static_cast<int64_t>(e);
        ++c;
      }
    }
    TORCH_CHECK(c == host.n_chunks, "freezeguard cuda backend: internal error building the chunk list");
    DeviceTable table;
    table.buffer = staging.to(device, /*non_blocking=*/true);
    const uint8_t* dev_base = table.buffer.data_ptr<uint8_t>();
    table.entries = reinterpret_cast<const FgTensorEntry*>(dev_base);
    table.chunks = host.n_chunks > 0 ? reinterpret_cast<const FgChunk*>(dev_base + entry_bytes) : nullptr;
    table.n_entries = static_cast<int64_t>(host.entries.size());
    table.n_chunks = host.n_chunks;
    table.alloc_stream = stream;
    table.uploaded = std::make_shared<CudaEvent>();
    FG_CUDA_CHECK(cudaEventRecord(table.uploaded->event, stream), "freezeguard");
    return table;
  }

  void evict() {
    auto it = lru_.end();
    while (map_.size() > kCapacity && it != lru_.begin()) {
      --it;
      auto found = map_.find(*it);
      if (found->second.first.used_in_graph) continue;
      map_.erase(found);
      it = lru_.erase(it);
    }
  }

  std::mutex mutex_;
  std::list<std::string> lru_;  // most recent first
  std::unordered_map<std::string, std::pair<DeviceTable, std::list<std::string>::iterator>> map_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // leaked on purpose: no CUDA frees at exit
  return *cache;
}
FG_BINDER(table_cache) {
  m.def("clear_table_cache", []() { table_cache().clear(); },
        "drop cached device tables (only when no captured CUDA graph that used them will replay)");
  m.def("table_cache_size", []() { return table_cache().size(); }, "number of cached device tables");
}

// Persistent grid: enough blocks to fill every SM a few times over (the kernels stream memory;
// more resident blocks keep more loads in flight).
int persistent_grid(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> sms;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = sms.find(device);
  if (it == sms.end()) {
    int count = 0;
    FG_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "freezeguard");
    it = sms.emplace(device, count > 0 ? count : 1).first;
  }
  return it->second * 8;
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  FG_CUDA_CHECK(cudaStreamIsCapturing(stream, &status), "freezeguard");
  return status != cudaStreamCaptureStatusNone;
}

// The host half of the multi-tensor harness: everything a launch needs (the device guard, the
// stream, the persistent grid, the uploaded tables, one per storage dtype), and `each`, which
// calls an op's launcher once per table and turns a CUDA error into one naming the op. A binding
// is then: check the lists, convert its scalars, and one `each`.
struct Launch {
  const char* op;
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int grid;
  std::vector<std::pair<FgDtype, DeviceTable>> tables;

  Launch(const char* op_name, c10::Device device, const std::vector<const TensorList*>& lists)
      : op(op_name), guard(device), stream(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {
    grid = persistent_grid(device.index());
    const bool capturing = is_capturing(stream);
    for (const HostTable& host : build_tables(lists)) {
      tables.emplace_back(host.dtype, table_cache().get(host, device, stream, capturing));
    }
  }

  // fn(dtype, table, grid, stream) -> cudaError_t, for each table.
  template <typename Fn>
  void each(Fn&& fn) {
    for (const auto& [dtype, table] : tables) FG_CUDA_CHECK(fn(dtype, table, grid, stream), op);
  }
};

void masked_adamw_(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                   const TensorList& exp_avg_sqs, const at::Tensor& steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, const std::optional<at::Tensor>& lr_tensor) {
  const char* op = "masked_adamw_";
  // Order matches the kernel: written tensors first.
  const std::vector<const TensorList*> lists{&params, &exp_avgs, &exp_avg_sqs, &grads};
  const c10::Device device = check_lists(op, lists);
  Launch launch(op, device, lists);
  const at::Tensor steps64 = per_tensor_scalars(op, "steps", steps, static_cast<int64_t>(params.size()), device, at::kDouble);
  at::Tensor lr64;
  const double* lr_device = nullptr;
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1, op, ": lr tensor must hold one value, got ", lr_tensor->sizes());
    TORCH_CHECK(lr_tensor->device() == device, op, ": lr tensor is on ", lr_tensor->device(), ", expected ", device);
    lr64 = lr_tensor->to(at::kDouble).contiguous();
    lr_device = lr64.data_ptr<double>();
  }
  launch.each([&](FgDtype dtype, const DeviceTable& t, int grid, cudaStream_t stream) {
    return fg_masked_adamw(dtype, t.entries, t.chunks, t.n_chunks, steps64.data_ptr<double>(), lr_device, lr, beta1,
                           beta2, eps, weight_decay, grid, stream);
  });
}
FG_BIND(masked_adamw_, "AdamW step over lists of CUDA tensors, in place", py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("lr_tensor") = py::none());

at::Tensor segment_dot(const TensorList& a, const TensorList& b) {
  const char* op = "segment_dot";
  const std::vector<const TensorList*> lists{&a, &b};
  const c10::Device device = check_lists(op, lists);
  Launch launch(op, device, lists);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor out = at::empty({static_cast<int64_t>(a.size())}, f32);  // every slot is written once
  launch.each([&](FgDtype dtype, const DeviceTable& t, int grid, cudaStream_t stream) {
    at::Tensor partials = at::empty({t.n_chunks}, f32);
    return fg_segment_dot(dtype, t.entries, t.n_entries, t.chunks, t.n_chunks,
                          t.n_chunks > 0 ? partials.data_ptr<float>() : nullptr, out.data_ptr<float>(), grid, stream);
  });
  return out;
}
FG_BIND(segment_dot, "fp32 [S]: <a_i, b_i> per pair of CUDA tensors", py::arg("a"), py::arg("b"));

void mask_shift_(const TensorList& theta, const TensorList& delta, const at::Tensor& dm) {
  const char* op = "mask_shift_";
  const std::vector<const TensorList*> lists{&theta, &delta};
  const c10::Device device = check_lists(op, lists);
  Launch launch(op, device, lists);
  const at::Tensor dm32 = per_tensor_scalars(op, "dm", dm, static_cast<int64_t>(theta.size()), device, at::kFloat);
  launch.each([&](FgDtype dtype, const DeviceTable& t, int grid, cudaStream_t stream) {
    return fg_mask_shift(dtype, t.entries, t.chunks, t.n_chunks, dm32.data_ptr<float>(), grid, stream);
  });
}
FG_BIND(mask_shift_, "theta_i += delta_i * dm[i], in place", py::arg("theta"), py::arg("delta"), py::arg("dm"));

void user_update_(const TensorList& theta, const TensorList& delta, const TensorList& grad, const at::Tensor& m,
                  double lr) {
  const char* op = "user_update_";
  const std::vector<const TensorList*> lists{&theta, &delta, &grad};
  const c10::Device device = check_lists(op, lists);
  Launch launch(op, device, lists);
  const at::Tensor m32 = per_tensor_scalars(op, "m", m, static_cast<int64_t>(theta.size()), device, at::kFloat);
  launch.each([&](FgDtype dtype, const DeviceTable& t, int grid, cudaStream_t stream) {
    return fg_user_update(dtype, t.entries, t.chunks, t.n_chunks, m32.data_ptr<float>(), lr, grid, stream);
  });
}
FG_BIND(user_update_, "the simulated user's step, in place", py::arg("theta"), py::arg("delta"), py::arg("grad"),
        py::arg("m"), py::arg("lr"));

void masked_sgd_momentum_(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers,
                          double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
  const char* op = "masked_sgd_momentum_";
  const std::vector<const TensorList*> lists{&params, &momentum_buffers, &grads};  // written tensors first
  Launch launch(op, check_lists(op, lists), lists);
  launch.each([&](FgDtype dtype, const DeviceTable& t, int grid, cudaStream_t stream) {
    return fg_masked_sgd_momentum(dtype, t.entries, t.chunks, t.n_chunks, lr, momentum, dampening, weight_decay,
                                  nesterov ? 1 : 0, grid, stream);
  });
}
FG_BIND(masked_sgd_momentum_, "SGD with momentum over lists of CUDA tensors, in place", py::arg("params"),
        py::arg("grads"), py::arg("momentum_buffers"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"));

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "freezeguard CUDA kernels: multi-tensor fused ops (use freezeguard.ops, not this module)";
  freezeguard::run_registered_binders(m);
  m.attr("CHUNK_SIZE") = FG_CHUNK_SIZE;
}
