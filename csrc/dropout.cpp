// slora::dropout(Tensor x, float p, int seed) -> Tensor: x * keep / (1 - p), CPU kernel.
//
// The keep bit of element i (flat, row-major) is a pure function of (seed, i): element pair
// j = i / 2 gets 64 bits from the SplitMix64 finaliser of seed + (j + 1) * golden, each element one
// 32-bit half, and is kept when the top 24 bits of its half are below floor((1 - p) * 2^24). So the
// mask can be drawn again in the backward for free instead of being stored, every thread computes
// its own range with no shared generator state (torch's CPU bernoulli_ is serial outside Intel
// MKL), and the result does not depend on the thread count. slora_kernels/_hash_dropout.py is the
// same function in plain torch (the fallback and the tests' reference).
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace slora {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t splitmix64_finalise(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dropout: x must be a floating tensor, got ", x.scalar_type());
  const auto in = x.contiguous();
  auto out = at::empty_like(in, at::MemoryFormat::Contiguous);
  const int64_t n = in.numel();
  const auto threshold = static_cast<uint32_t>(std::floor((1.0 - p) * 16777216.0));
  const auto key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "slora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    auto keep_one = [&](int64_t i, uint32_t half) {
      dst[i] = (half >> 8) < threshold ? static_cast<scalar_t>(static_cast<acc_t>(src[i]) * scale) : scalar_t(0);
    };
    at::parallel_for(0, (n + 1) / 2, /*grain_size=*/16384, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const uint64_t bits = splitmix64_finalise(key + static_cast<uint64_t>(j + 1) * kGolden);
        keep_one(2 * j, static_cast<uint32_t>(bits));
        if (2 * j + 1 < n) keep_one(2 * j + 1, static_cast<uint32_t>(bits >> 32));
      }
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(slora, m) {
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(slora, CPU, m) {
  m.impl("dropout", &dropout_cpu);
}

}  // namespace slora
