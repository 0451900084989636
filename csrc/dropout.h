// The counter-based dropout of dropout.cpp, for the other CPU kernels of the extension.
#pragma once

#include <torch/extension.h>

namespace slora {

// x * keep / (1 - p) as a new contiguous tensor, the keep bit of element i a hash of (seed, i).
at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed);

}  // namespace slora
