// Thin CUDA binding for slora::pack / slora::unpack: gathers the segment pointers and row counts
// into one small int64 table on the device and calls the launchers in pack_cuda.cu on the current
// stream. One kernel launch per call, whatever the segment count, and no device-to-host sync.
//
// Little host work per call: a training step packs the same tensors (same addresses and rows)
// every step, so the device copies of recent tables are kept, and a call whose table matches one
// in full reuses it, with no allocation and no copy; a segment that moved makes a new table.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "pack_cuda.h"

namespace slora {
namespace {

// The device copy of a table, through a pinned staging copy so that the transfer stays asynchronous.
at::Tensor copy_to_device(const std::vector<int64_t>& host, const at::Device& device) {
  const auto options = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  auto pinned = at::empty({static_cast<int64_t>(host.size())}, options);
  std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  return pinned.to(device, /*non_blocking=*/true);
}

// Device copies of tables by content, device and stream. A table is reused only on the stream that
// copied it, so no kernel reads it before the copy lands; an evicted table's memory goes back to the
// caching allocator, which reuses it only after the work already queued on that stream.
class TableCache {
 public:
  at::Tensor get(const std::vector<int64_t>& host, const at::Device& device, cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
      return copy_to_device(host, device);  // a CUDA graph keeps its own table: the cache may evict this one
    }
    const size_t key = hash(host, device, stream);
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto matches = tables_.equal_range(key);
    for (auto it = matches.first; it != matches.second; ++it) {
      const Entry& entry = it->second;
      if (entry.device == device && entry.stream == stream && entry.host == host) return entry.table;
    }
    if (cached_ints_ + host.size() > kMaxCachedInts) {  // a plain bound: start over
      tables_.clear();
      cached_ints_ = 0;
    }
    auto table = copy_to_device(host, device);
    tables_.emplace(key, Entry{host, device, stream, table});
    cached_ints_ += host.size();
    return table;
  }

 private:
  static constexpr size_t kMaxCachedInts = size_t{1} << 20;  // 8 MB of tables on the host, 8 MB on devices

  struct Entry {
    std::vector<int64_t> host;
    at::Device device;
    cudaStream_t stream;
    at::Tensor table;
  };

  static size_t hash(const std::vector<int64_t>& host, const at::Device& device, cudaStream_t stream) {
    size_t h = std::hash<const void*>()(stream) ^ static_cast<size_t>(device.index());
    for (const int64_t v : host) h = (h ^ static_cast<size_t>(v)) * 0x100000001b3ULL;  // FNV-1a style
    return h;
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, Entry> tables_;
  size_t cached_ints_ = 0;
};

TableCache& table_cache() {
  static auto* cache = new TableCache();  // never destroyed: its tensors must not be freed after CUDA at exit
  return *cache;
}

// One call's table [pointers (K) | rows (K)], built in a buffer the thread reuses for its next calls,
// and the bitwise OR of the segment addresses (it picks the copy width).
class SegmentTable {
 public:
  explicit SegmentTable(size_t k) : k_(k) { values().resize(2 * k); }

  // segment must be contiguous, and stay allocated until the kernel reading the table is queued.
  void set(size_t i, const at::Tensor& segment) {
    const auto address = reinterpret_cast<uintptr_t>(segment.data_ptr());
    values()[i] = static_cast<int64_t>(address);
    values()[k_ + i] = segment.size(0);
    if (segment.numel() > 0) address_bits_ |= address;
  }

  at::Tensor on_device(const at::Device& device, cudaStream_t stream) const {
    return table_cache().get(values(), device, stream);
  }

  uintptr_t address_bits() const { return address_bits_; }

 private:
  static std::vector<int64_t>& values() {
    thread_local std::vector<int64_t> buffer;  // no allocation once it has grown
    return buffer;
  }

  size_t k_;
  uintptr_t address_bits_ = 0;
};

at::Tensor pack_cuda(at::TensorList tensors, const at::Tensor& offsets, int64_t total_rows) {
  TORCH_CHECK(!tensors.empty(), "pack: tensors must not be empty");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.numel() == static_cast<int64_t>(tensors.size()) + 1,
              "pack: offsets must be a 1-D int64 tensor of K+1 entries");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const int64_t k = static_cast<int64_t>(tensors.size());
  SegmentTable table(tensors.size());
  std::vector<at::Tensor> copies;  // of non-contiguous segments, alive until the launch: usually none
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.is_cuda() && t.device() == tensors[0].device(), "pack: segments must share one CUDA device");
    TORCH_CHECK(t.dim() == 2 && t.size(1) == tensors[0].size(1) && t.scalar_type() == tensors[0].scalar_type(),
                "pack: every segment must be 2-D with the same column count and dtype");
    if (t.is_contiguous()) {
      table.set(i, t);
    } else {
      copies.push_back(t.contiguous());
      table.set(i, copies.back());
    }
  }
  auto buffer = at::empty({total_rows, tensors[0].size(1)}, tensors[0].options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto device_table = table.on_device(buffer.device(), stream);
  const auto offs = offsets.to(buffer.device(), /*non_blocking=*/true).contiguous();
  const auto err = pack_rows_cuda(device_table.data_ptr<int64_t>(), device_table.data_ptr<int64_t>() + k,
                                  offs.data_ptr<int64_t>(), k, buffer.data_ptr(), total_rows,
                                  buffer.size(1) * buffer.element_size(), table.address_bits(), stream);
  TORCH_CHECK(err == cudaSuccess, "pack: CUDA launch failed: ", cudaGetErrorString(err));
  return buffer;
}

std::vector<at::Tensor> unpack_cuda(const at::Tensor& buffer, const at::Tensor& offsets, at::IntArrayRef rows) {
  TORCH_CHECK(buffer.is_cuda() && buffer.dim() == 2, "unpack: buffer must be a 2-D CUDA tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.numel() == static_cast<int64_t>(rows.size()) + 1,
              "unpack: offsets must be a 1-D int64 tensor of K+1 entries");
  const c10::cuda::CUDAGuard guard(buffer.device());
  const auto buf = buffer.contiguous();
  const int64_t k = static_cast<int64_t>(rows.size());
  SegmentTable table(rows.size());
  std::vector<at::Tensor> outputs;
  outputs.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    outputs.push_back(at::empty({rows[i], buf.size(1)}, buf.options()));
    table.set(i, outputs.back());
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto device_table = table.on_device(buf.device(), stream);
  const auto offs = offsets.to(buf.device(), /*non_blocking=*/true).contiguous();
  const auto err = unpack_rows_cuda(device_table.data_ptr<int64_t>(), device_table.data_ptr<int64_t>() + k,
                                    offs.data_ptr<int64_t>(), k, buf.data_ptr(), buf.size(0),
                                    buf.size(1) * buf.element_size(), table.address_bits(), stream);
  TORCH_CHECK(err == cudaSuccess, "unpack: CUDA launch failed: ", cudaGetErrorString(err));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(slora, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace slora
