// Thin CUDA binding for slora::pack / slora::unpack: gathers the segment pointers and row counts
// into one small int64 table, copies it to the device with the offsets, and calls the launchers in
// pack_cuda.cu on the current stream. One kernel launch per call, whatever the segment count.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "pack_cuda.h"

namespace slora {
namespace {

// [pointers (K) | rows (K)] on the device; the host copy is pinned so the transfer is async.
at::Tensor segment_table(const std::vector<at::Tensor>& segments, const at::Device& device,
                         uintptr_t* address_bits) {
  const int64_t k = static_cast<int64_t>(segments.size());
  auto host = at::empty({2 * k}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* table = host.data_ptr<int64_t>();
  *address_bits = 0;
  for (int64_t i = 0; i < k; ++i) {
    const auto address = reinterpret_cast<uintptr_t>(segments[i].data_ptr());
    table[i] = static_cast<int64_t>(address);
    table[k + i] = segments[i].size(0);
    if (segments[i].numel() > 0) *address_bits |= address;
  }
  return host.to(device, /*non_blocking=*/true);
}

at::Tensor pack_cuda(at::TensorList tensors, const at::Tensor& offsets, int64_t total_rows) {
  TORCH_CHECK(!tensors.empty(), "pack: tensors must not be empty");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.numel() == static_cast<int64_t>(tensors.size()) + 1,
              "pack: offsets must be a 1-D int64 tensor of K+1 entries");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> segments;
  segments.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_cuda() && t.device() == tensors[0].device(), "pack: segments must share one CUDA device");
    TORCH_CHECK(t.dim() == 2 && t.size(1) == tensors[0].size(1) && t.scalar_type() == tensors[0].scalar_type(),
                "pack: every segment must be 2-D with the same column count and dtype");
    segments.push_back(t.contiguous());
  }
  auto buffer = at::empty({total_rows, tensors[0].size(1)}, tensors[0].options());
  uintptr_t address_bits = 0;
  const auto table = segment_table(segments, buffer.device(), &address_bits);
  const auto offs = offsets.to(buffer.device(), /*non_blocking=*/true).contiguous();
  const int64_t k = static_cast<int64_t>(segments.size());
  const auto err = pack_rows_cuda(table.data_ptr<int64_t>(), table.data_ptr<int64_t>() + k, offs.data_ptr<int64_t>(),
                                  k, buffer.data_ptr(), total_rows, buffer.size(1) * buffer.element_size(),
                                  address_bits, c10::cuda::getCurrentCUDAStream());
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
  std::vector<at::Tensor> outputs;
  outputs.reserve(rows.size());
  for (const auto r : rows) outputs.push_back(at::empty({r, buf.size(1)}, buf.options()));
  uintptr_t address_bits = 0;
  const auto table = segment_table(outputs, buf.device(), &address_bits);
  const auto offs = offsets.to(buf.device(), /*non_blocking=*/true).contiguous();
  const int64_t k = static_cast<int64_t>(outputs.size());
  const auto err = unpack_rows_cuda(table.data_ptr<int64_t>(), table.data_ptr<int64_t>() + k,
                                    offs.data_ptr<int64_t>(), k, buf.data_ptr(), buf.size(0),
                                    buf.size(1) * buf.element_size(), address_bits,
                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "unpack: CUDA launch failed: ", cudaGetErrorString(err));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(slora, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace slora
