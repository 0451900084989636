// One-launch mixed-rank gather/scatter. Each block owns one row of the packed buffer, finds its
// segment by binary search over the row offsets, and copies (or zero-fills) the row with the
// widest vector type that the row size and every pointer allow.
#include "pack_cuda.h"

namespace slora {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 30;

__device__ __forceinline__ int64_t find_segment(const int64_t* offsets, int64_t num_segments, int64_t row) {
  // Largest k with offsets[k] <= row (offsets is non-decreasing; empty segments are skipped).
  int64_t lo = 0, hi = num_segments;  // answer in [lo, hi)
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename V>
__global__ void pack_rows_kernel(const int64_t* __restrict__ seg_ptrs, const int64_t* __restrict__ seg_rows,
                                 const int64_t* __restrict__ offsets, int64_t num_segments,
                                 V* __restrict__ buffer, int64_t total_rows, int64_t row_vecs) {
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    V* out = buffer + row * row_vecs;
    const V* src = nullptr;
    if (row < offsets[num_segments]) {
      int64_t k = find_segment(offsets, num_segments, row);
      int64_t local = row - offsets[k];
      if (local < seg_rows[k]) src = reinterpret_cast<const V*>(seg_ptrs[k]) + local * row_vecs;
    }
    if (src != nullptr) {
      for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) out[c] = src[c];
    } else {
      V zero;
      memset(&zero, 0, sizeof(V));
      for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) out[c] = zero;
    }
  }
}

template <typename V>
__global__ void unpack_rows_kernel(const int64_t* __restrict__ seg_ptrs, const int64_t* __restrict__ seg_rows,
                                   const int64_t* __restrict__ offsets, int64_t num_segments,
                                   const V* __restrict__ buffer, int64_t total_rows, int64_t row_vecs) {
  int64_t used_rows = offsets[num_segments] < total_rows ? offsets[num_segments] : total_rows;
  for (int64_t row = blockIdx.x; row < used_rows; row += gridDim.x) {
    int64_t k = find_segment(offsets, num_segments, row);
    int64_t local = row - offsets[k];
    if (local >= seg_rows[k]) continue;
    V* dst = reinterpret_cast<V*>(seg_ptrs[k]) + local * row_vecs;
    const V* in = buffer + row * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) dst[c] = in[c];
  }
}

// Widest power-of-two byte width (<= 16) dividing the row size and every address involved.
int vector_bytes(int64_t row_bytes, uintptr_t addr_bits) {
  int width = 16;
  while (width > 1 && ((row_bytes % width) != 0 || (addr_bits % width) != 0)) width /= 2;
  return width;
}

template <bool kPack, typename V>
cudaError_t launch(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets, int64_t num_segments,
                   void* buffer, int64_t total_rows, int64_t row_bytes, cudaStream_t stream) {
  int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  int threads = row_vecs >= kThreads ? kThreads : (row_vecs >= 32 ? static_cast<int>((row_vecs + 31) / 32 * 32) : 32);
  int64_t blocks = total_rows < kMaxBlocks ? total_rows : kMaxBlocks;
  if (blocks == 0) return cudaSuccess;
  if (kPack) {
    pack_rows_kernel<V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        seg_ptrs, seg_rows, offsets, num_segments, static_cast<V*>(buffer), total_rows, row_vecs);
  } else {
    unpack_rows_kernel<V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        seg_ptrs, seg_rows, offsets, num_segments, static_cast<const V*>(buffer), total_rows, row_vecs);
  }
  return cudaGetLastError();
}

template <bool kPack>
cudaError_t dispatch(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets, int64_t num_segments,
                     void* buffer, int64_t total_rows, int64_t row_bytes, uintptr_t segment_address_bits,
                     cudaStream_t stream) {
  switch (vector_bytes(row_bytes, segment_address_bits | reinterpret_cast<uintptr_t>(buffer))) {
    case 16: return launch<kPack, int4>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes, stream);
    case 8: return launch<kPack, int2>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes, stream);
    case 4: return launch<kPack, int>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes, stream);
    case 2: return launch<kPack, short>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes, stream);
    default: return launch<kPack, char>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes, stream);
  }
}

}  // namespace

cudaError_t pack_rows_cuda(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets,
                           int64_t num_segments, void* buffer, int64_t total_rows, int64_t row_bytes,
                           uintptr_t segment_address_bits, cudaStream_t stream) {
  return dispatch<true>(seg_ptrs, seg_rows, offsets, num_segments, buffer, total_rows, row_bytes,
                        segment_address_bits, stream);
}

cudaError_t unpack_rows_cuda(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets,
                             int64_t num_segments, const void* buffer, int64_t total_rows,
                             int64_t row_bytes, uintptr_t segment_address_bits, cudaStream_t stream) {
  return dispatch<false>(seg_ptrs, seg_rows, offsets, num_segments, const_cast<void*>(buffer), total_rows,
                         row_bytes, segment_address_bits, stream);
}

}  // namespace slora
