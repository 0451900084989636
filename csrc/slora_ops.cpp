// Op schemas of the `slora` library and their CPU kernels.
//
//   slora::pack(Tensor[] tensors, Tensor offsets, SymInt total_rows) -> Tensor
//   slora::unpack(Tensor buffer, Tensor offsets, SymInt[] rows) -> Tensor[]
//
// pack copies K 2-D segments [r_k, n] into one [total_rows, n] buffer, segment k at row
// offsets[k], every other row zero; unpack is its inverse (and its autograd backward). Kernels copy
// whole rows as bytes, so every dtype works. Python adds argument checks, fake kernels and autograd
// (slora_kernels/ops/pack.py); the CUDA kernels register from pack_cuda_binding.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace slora {
namespace {

void check_common(const at::Tensor& offsets, int64_t num_segments, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, op,
              ": offsets must be a 1-D int64 tensor");
  TORCH_CHECK(offsets.numel() == num_segments + 1, op, ": offsets has ", offsets.numel(),
              " entries, expected ", num_segments + 1);
}

// A fresh multi-MB buffer costs more in page faults than in copying (one fault per 4 KiB page);
// asking for transparent huge pages turns ~500 faults per 2 MiB into one. Advice only: ignored
// where THP is off, and harmless on memory the allocator reuses.
void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes < static_cast<int64_t>(4 * kHuge)) return;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

at::Tensor pack_cpu(at::TensorList tensors, const at::Tensor& offsets, int64_t total_rows) {
  TORCH_CHECK(!tensors.empty(), "pack: tensors must not be empty");
  check_common(offsets, static_cast<int64_t>(tensors.size()), "pack");
  const int64_t n = tensors[0].size(1);
  std::vector<at::Tensor> segments;
  std::vector<int64_t> rows;
  segments.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == n && t.scalar_type() == tensors[0].scalar_type(),
                "pack: every segment must be 2-D with the same column count and dtype");
    segments.push_back(t.contiguous());
    rows.push_back(t.size(0));
  }
  const auto offs_t = offsets.contiguous();
  const int64_t* offs = offs_t.data_ptr<int64_t>();
  for (size_t k = 0; k < rows.size(); ++k) {
    TORCH_CHECK(offs[k] >= 0 && offs[k] + rows[k] <= offs[k + 1], "pack: offsets do not fit segment ", k);
  }
  TORCH_CHECK(offs[rows.size()] <= total_rows, "pack: offsets run past total_rows");

  auto buffer = at::empty({total_rows, n}, tensors[0].options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t row_bytes = n * buffer.element_size();
  char* out = static_cast<char*>(buffer.data_ptr());
  advise_huge_pages(out, total_rows * row_bytes);
  const int64_t num_segments = static_cast<int64_t>(rows.size());
  // Segment k and the padding after it (up to the next offset, or to total_rows for the last one)
  // are two contiguous blocks, so each segment is one memcpy and one memset.
  std::memset(out, 0, offs[0] * row_bytes);
  at::parallel_for(0, num_segments, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t pad_end = k + 1 < num_segments ? offs[k + 1] : total_rows;
      char* dst = out + offs[k] * row_bytes;
      std::memcpy(dst, segments[k].data_ptr(), rows[k] * row_bytes);
      std::memset(dst + rows[k] * row_bytes, 0, (pad_end - offs[k] - rows[k]) * row_bytes);
    }
  });
  return buffer;
}

std::vector<at::Tensor> unpack_cpu(const at::Tensor& buffer, const at::Tensor& offsets, at::IntArrayRef rows) {
  TORCH_CHECK(buffer.dim() == 2, "unpack: buffer must be 2-D");
  check_common(offsets, static_cast<int64_t>(rows.size()), "unpack");
  const auto buf = buffer.contiguous();
  const auto offs_t = offsets.contiguous();
  const int64_t* offs = offs_t.data_ptr<int64_t>();
  std::vector<at::Tensor> outputs;
  outputs.reserve(rows.size());
  for (size_t k = 0; k < rows.size(); ++k) {
    TORCH_CHECK(rows[k] >= 0 && offs[k] >= 0 && offs[k] + rows[k] <= buf.size(0),
                "unpack: segment ", k, " runs past the buffer");
    outputs.push_back(at::empty({rows[k], buf.size(1)}, buf.options()));
  }
  const int64_t row_bytes = buf.size(1) * buf.element_size();
  const char* in = static_cast<const char*>(buf.data_ptr());
  // Parallel over segments: each copy of a segment is one contiguous block of memory.
  at::parallel_for(0, static_cast<int64_t>(rows.size()), /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      std::memcpy(outputs[k].data_ptr(), in + offs[k] * row_bytes, rows[k] * row_bytes);
    }
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY(slora, m) {
  m.def("pack(Tensor[] tensors, Tensor offsets, SymInt total_rows) -> Tensor");
  m.def("unpack(Tensor buffer, Tensor offsets, SymInt[] rows) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(slora, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

void bind_prepared_group(pybind11::module_& m);  // grouped_lora_cpu.cpp

}  // namespace slora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slora_kernels C++/CUDA ops; importing this module registers torch.ops.slora.*";
  slora::bind_prepared_group(m);
  m.attr("with_cuda") =
#ifdef SLORA_WITH_CUDA
      true;
#else
      false;
#endif
}
