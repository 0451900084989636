// Launchers for the mixed-rank gather on CUDA. Plain pointers and a stream only, so this header
// and pack_cuda.cu compile with nvcc alone, without torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace slora {

// Copies K row-major segments (segment k: rows[k] rows of row_bytes bytes at src[k]) into one
// buffer of total_rows rows; segment k starts at row offsets[k]; every other row is zero-filled.
// seg_ptrs and seg_rows are device arrays of K entries; offsets is a device array of K+1 entries.
// segment_address_bits is the bitwise OR of all segment addresses (it picks the copy width).
cudaError_t pack_rows_cuda(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets,
                           int64_t num_segments, void* buffer, int64_t total_rows, int64_t row_bytes,
                           uintptr_t segment_address_bits, cudaStream_t stream);

// The inverse: copies rows [offsets[k], offsets[k] + rows[k]) of buffer to the segment at dst[k].
cudaError_t unpack_rows_cuda(const int64_t* seg_ptrs, const int64_t* seg_rows, const int64_t* offsets,
                             int64_t num_segments, const void* buffer, int64_t total_rows,
                             int64_t row_bytes, uintptr_t segment_address_bits, cudaStream_t stream);

}  // namespace slora
