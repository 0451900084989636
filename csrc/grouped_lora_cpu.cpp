// slora::grouped_lora_cpu: a shared-input group of LoRA linears, forward and backward in C++ (CPU).
//
//   grouped_lora_cpu(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] lora_a, Tensor[] lora_b,
//                    float[] scales, float dropout_p, int seed, ScalarType? cast_to,
//                    bool column_major_half) -> Tensor[]
//
// Output i = x W_i^T + b_i + scales[i] * drop(x) A_i^T B_i^T, shaped like x with d_out_i last, in x's
// dtype; the LoRA branch runs in the factors' dtype on x cast to it (PEFT's rule). With no weights (and no
// biases) the outputs are the LoRA terms alone, in the factors' dtype: the caller adds them to base outputs it
// computes itself (a quantized layer's). The same computation
// as slora_kernels/ops/_grouped_cpu.py, which stays the fallback without the extension and the body of
// the torch.compile ops; here one call from Python runs the whole forward, and the backward runs as one
// C++ autograd node: no Python per op, which is most of a LoRA layer's cost when the tensors are small.
//
// Forward: S = drop(x) A_cat^T (one GEMM over the packed A), y_i = x W_i^T + b_i, y_i += s_i S_i B_i^T
// in place. Backward: dS_i = s_i dY_i B_i and dB_i = s_i dY_i^T S_i (the scale rides on the GEMM's
// alpha), dA_cat = dS^T drop(x), dx = drop(dS A_cat) + sum_i dY_i W_i. Saved through autograd's saved
// variables (so saved-tensor hooks, checkpointing and offloading see them, and in-place edits raise where
// F.linear's would): x (or its autocast copy), S, and the factors and weights as F.linear saves them
// (`save_operands`); A_cat is packed again in the backward and the dropout mask drawn again from `seed`, never
// stored. cast_to: torch.autocast's dtype, every floating input (float64 excepted) cast to it first (A once,
// packed; x before the node, as a recorded op) and each gradient returned in its input's dtype. A backward with
// grad mode on (create_graph) takes a differentiable path instead (`differentiable_backward`). A layer whose output
// the loss does not use gets no gradient (undefined, not zeros), as its own PEFT layer would (`drop_unused`).
// Under autocast with base weights that autocast would copy anyway (float32 weights, bf16 autocast), the copies
// go into one stacked buffer [W_1; ..; W_G; A_cat] and B becomes one block-diagonal matrix with the scales folded
// in (`stacks`): fewer, larger GEMMs (forward 2 instead of 2G + 1, backward 4 instead of 3G + 2, one more
// each with dropout), the same sums with autocast's roundings in other places (within bf16 rounding of PEFT's).
// weights and biases come one per layer (a bias may be None), or none at all (the LoRA terms alone, see above).
// column_major_half: feed half-precision right operands column-major (a copy), for CPUs whose
// half-precision GEMM is slow on row-major ones (decided by a measurement in Python). The autograd node
// takes x, the factors and (only when one trains) the base tensors as inputs; the rest of the call's state
// is one object, so the per-call bookkeeping stays small (a PreparedGroup's tensors are shared, not copied).
#include <torch/extension.h>

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <vector>

#include "dropout.h"

namespace slora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Layout {
  std::vector<int64_t> ranks, d_outs;
  std::vector<double> scales;
  double dropout_p;
  int64_t seed;
  bool column_major_half;
};

at::Tensor flat(const at::Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

at::Tensor drop(const at::Tensor& t, const Layout& layout) {
  return layout.dropout_p == 0.0 ? t : dropout_cpu(t, layout.dropout_p, layout.seed);
}

bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

// m as a GEMM's right operand: column-major for half precision where the caller asked for it.
at::Tensor right_operand(const at::Tensor& m, const Layout& layout) {
  if (!layout.column_major_half || !is_half(m) || m.stride(0) == 1) return m;
  return m.t().contiguous().t();
}

bool castable(const at::Tensor& t, std::optional<at::ScalarType> dtype) {
  return dtype && t.defined() && at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kDouble &&
         t.scalar_type() != *dtype;
}

at::Tensor cast(const at::Tensor& t, std::optional<at::ScalarType> dtype) {
  return castable(t, dtype) ? t.to(*dtype) : t;
}

std::vector<at::Tensor> cast_all(at::TensorList ts, std::optional<at::ScalarType> dtype) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(cast(t, dtype));
  return out;
}

at::Tensor as_factor(const at::Tensor& t, at::ScalarType factor) {
  return t.scalar_type() == factor ? t : t.to(factor);
}

// The tensors one call reads besides x, in the dtypes it computes in (autocast's when cast_to is set).
struct Operands {
  std::vector<at::Tensor> weights, lora_b;
  at::Tensor a_cat;  // the A factors packed [R, d_in]
  std::vector<std::optional<at::Tensor>> biases;
  // The stacked form (instead of weights, a_cat and lora_b): wa = [W_1; ...; W_G; A_cat] [sum d_out + R, d_in]
  // and b_bd [sum d_out, R], block-diagonal with block i = s_i B_i.
  at::Tensor wa, b_bd;
};

// Whether a call stacks its operands: under autocast, when every base weight needs autocast's copy anyway (e.g.
// float32 weights under bf16 autocast) and the factors compute in the same dtype. The copies then go into one
// buffer for free, and a group of G layers runs 2 GEMMs forward (3 with dropout) and 4 backward (5) instead of
// 2G + 1 and 3G + 2: on small layers a half-precision GEMM's fixed cost is most of the time.
bool stacks(at::TensorList weights, at::TensorList lora_a, at::TensorList lora_b,
            std::optional<at::ScalarType> cast_to) {
  if (!cast_to || weights.empty()) return false;
  for (const auto& w : weights) {
    if (!castable(w, cast_to)) return false;
  }
  for (auto list : {lora_a, lora_b}) {
    for (const auto& t : list) {
      if (t.scalar_type() != *cast_to && !castable(t, cast_to)) return false;
    }
  }
  return true;
}

// rows of `parts` one after the other into a new [sum rows, cols] tensor of `dtype` (each copy casts).
at::Tensor stack_rows(const std::vector<at::Tensor>& parts, int64_t rows, at::ScalarType dtype) {
  auto out = at::empty({rows, parts[0].size(1)}, parts[0].options().dtype(dtype));
  int64_t row = 0;
  for (const auto& part : parts) {
    out.narrow(0, row, part.size(0)).copy_(part);
    row += part.size(0);
  }
  return out;
}

void stack_operands(Operands& ops, at::TensorList weights, at::TensorList lora_a, at::TensorList lora_b,
                    at::ArrayRef<double> scales, at::ScalarType dtype) {
  int64_t n_out = 0, rank = 0;
  for (size_t i = 0; i < lora_b.size(); ++i) {
    n_out += lora_b[i].size(0);
    rank += lora_b[i].size(1);
  }
  std::vector<at::Tensor> parts = weights.vec();
  parts.insert(parts.end(), lora_a.begin(), lora_a.end());
  ops.wa = stack_rows(parts, n_out + rank, dtype);
  ops.b_bd = at::zeros({n_out, rank}, lora_b[0].options().dtype(dtype));
  int64_t row = 0, col = 0;
  for (size_t i = 0; i < lora_b.size(); ++i) {
    auto block = ops.b_bd.narrow(0, row, lora_b[i].size(0)).narrow(1, col, lora_b[i].size(1));
    // s_i B_i in B's own dtype, rounded once into the block.
    block.copy_(scales[i] == 1.0 ? lora_b[i] : at::mul(lora_b[i], scales[i]));
    row += lora_b[i].size(0);
    col += lora_b[i].size(1);
  }
}

// The biases as given (none where absent), each cast as autocast would.
std::vector<std::optional<at::Tensor>> cast_biases(const c10::List<std::optional<at::Tensor>>& biases,
                                                   std::optional<at::ScalarType> cast_to) {
  std::vector<std::optional<at::Tensor>> out;
  for (const auto& b : biases) {
    std::optional<at::Tensor> bias = b;
    out.push_back(bias && bias->defined() ? std::optional<at::Tensor>(cast(*bias, cast_to)) : std::nullopt);
  }
  return out;
}

Operands operands_of(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                     at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scales,
                     std::optional<at::ScalarType> cast_to) {
  Operands ops;
  ops.biases = cast_biases(biases, cast_to);
  if (stacks(weights, lora_a, lora_b, cast_to)) {
    stack_operands(ops, weights, lora_a, lora_b, scales, *cast_to);
    return ops;
  }
  ops.a_cat = cast(lora_a.size() == 1 ? lora_a[0] : at::cat(lora_a), cast_to);
  ops.weights = cast_all(weights, cast_to);
  ops.lora_b = cast_all(lora_b, cast_to);
  return ops;
}

Layout make_layout(at::TensorList lora_b, at::ArrayRef<double> scales, double dropout_p,
                   int64_t seed, bool column_major_half) {
  Layout layout{{}, {}, scales.vec(), dropout_p, seed, column_major_half};
  for (const auto& b : lora_b) {
    layout.d_outs.push_back(b.size(0));
    layout.ranks.push_back(b.size(1));
  }
  return layout;
}

struct Forward {
  std::vector<at::Tensor> outputs;
  at::Tensor s;
};

// Stacked operands: [base | S] = x wa^T in one GEMM (the shrink on drop(x) apart with dropout), the expands as one
// GEMM over the block-diagonal B, then y_i = base_i + term_i (+ b_i), each a tensor of its own.
Forward forward_stacked(const at::Tensor& x, const Operands& ops, const Layout& layout) {
  const auto x2 = flat(x);
  const int64_t n_out = ops.b_bd.size(0), rank = ops.b_bd.size(1);
  Forward result;
  at::Tensor base;
  if (layout.dropout_p == 0.0) {
    const auto z = at::mm(x2, ops.wa.t());
    base = z.narrow(1, 0, n_out);
    result.s = z.narrow(1, n_out, rank).contiguous();
  } else {
    base = at::mm(x2, ops.wa.narrow(0, 0, n_out).t());
    result.s = at::mm(drop(x2, layout), ops.wa.narrow(0, n_out, rank).t());
  }
  const auto term = at::mm(result.s, ops.b_bd.t());
  auto shape = x.sizes().vec();
  int64_t col = 0;
  for (size_t i = 0; i < layout.d_outs.size(); ++i) {
    const int64_t d_out = layout.d_outs[i];
    auto y = at::add(base.narrow(1, col, d_out), term.narrow(1, col, d_out)).contiguous();
    if (ops.biases[i]) y.add_(*ops.biases[i]);
    col += d_out;
    shape.back() = d_out;
    result.outputs.push_back(x.dim() == 2 ? y : at::_unsafe_view(y, shape));
  }
  return result;
}

// Whether a call multiplies by its base weights stacked, W_cat [sum d_out, d_in], made by this call from the weights
// as they are now (nothing is kept between calls, so no write can leave it stale): one GEMM instead of G forward and
// for dx, where a half-precision GEMM's fixed cost (~20 us at small shapes on CPU) outweighs copying the weights,
// i.e. for groups of half-precision weights of at most kStackBytes.
constexpr int64_t kStackBytes = 1 << 20;
bool stacks_base(const std::vector<at::Tensor>& weights) {
  if (weights.size() < 2 || !is_half(weights[0])) return false;
  int64_t bytes = 0;
  for (const auto& w : weights) bytes += w.numel() * w.element_size();
  return bytes <= kStackBytes;
}

// The biases side by side [sum d_out] (zeros for a layer without one), or undefined when no layer has one.
at::Tensor stacked_biases(const std::vector<std::optional<at::Tensor>>& biases, const Layout& layout,
                          const at::TensorOptions& options) {
  if (std::none_of(biases.begin(), biases.end(), [](const auto& b) { return b.has_value(); })) return {};
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < biases.size(); ++i) {
    parts.push_back(biases[i] ? *biases[i] : at::zeros({layout.d_outs[i]}, options));
  }
  return at::cat(parts);
}

// The output shaped like x with d_out last: not a view of y (a view returned by an autograd node could not be
// modified in place by the caller).
at::Tensor shaped(const at::Tensor& y, std::vector<int64_t>& shape, bool flat_x) {
  if (flat_x) return y;
  shape.back() = y.size(1);
  return at::_unsafe_view(y, shape);
}

Forward forward_impl(const at::Tensor& x, const Operands& ops, const Layout& layout) {
  if (ops.wa.defined()) return forward_stacked(x, ops, layout);
  const auto factor = ops.a_cat.scalar_type();
  const auto x2 = flat(x);
  Forward result;
  result.s = at::mm(drop(as_factor(x2, factor), layout), ops.a_cat.t());
  const auto s_parts = ops.lora_b.size() == 1 ? std::vector<at::Tensor>{result.s}
                                              : result.s.split_with_sizes(layout.ranks, 1);
  auto shape = x.sizes().vec();
  for (size_t i = 0; i < ops.lora_b.size() && ops.weights.empty(); ++i) {  // the LoRA terms alone
    auto y = at::mm(s_parts[i], ops.lora_b[i].t());
    if (layout.scales[i] != 1.0) y.mul_(layout.scales[i]);
    result.outputs.push_back(shaped(y, shape, x.dim() == 2));
  }
  at::Tensor base;  // the group's base outputs side by side, bias included, when the weights are stacked
  if (stacks_base(ops.weights)) {
    const auto w_cat = at::cat(ops.weights);
    const auto b_cat = stacked_biases(ops.biases, layout, w_cat.options());
    base = b_cat.defined() ? at::addmm(b_cat, x2, w_cat.t()) : at::mm(x2, w_cat.t());
  }
  int64_t col = 0;
  for (size_t i = 0; i < ops.weights.size(); ++i) {
    at::Tensor y;
    if (base.defined()) {  // its columns, in a tensor of its own
      y = base.narrow(1, col, layout.d_outs[i]).contiguous();
      col += layout.d_outs[i];
    } else {
      const auto w_t = ops.weights[i].t();
      y = ops.biases[i] ? at::addmm(*ops.biases[i], x2, w_t) : at::mm(x2, w_t);
    }
    if (y.scalar_type() == factor) {
      y.addmm_(s_parts[i], ops.lora_b[i].t(), 1.0, layout.scales[i]);
    } else {  // PEFT's mixed-dtype sum: computed in the wider dtype, rounded once into y's
      y.add_(at::mm(s_parts[i], ops.lora_b[i].t()), layout.scales[i]);
    }
    result.outputs.push_back(shaped(y, shape, x.dim() == 2));
  }
  return result;
}

struct Backward {
  at::Tensor grad_x;
  std::vector<at::Tensor> grad_a, grad_b, grad_w, grad_bias;  // grad_bias: the present biases only
};

// dA_cat in the A factors' own dtype (cast once, before it is split), one gradient per layer.
std::vector<at::Tensor> split_grad_a(at::Tensor grad_a, at::ScalarType a_dtype, const Layout& layout) {
  if (grad_a.scalar_type() != a_dtype) grad_a = grad_a.to(a_dtype);
  return layout.ranks.size() == 1 ? std::vector<at::Tensor>{grad_a} : grad_a.split_with_sizes(layout.ranks);
}

// The base weights' and biases' gradients, when one of them trains.
void add_base_grads(Backward& result, const std::vector<at::Tensor>& dys, const at::Tensor& x2, const Operands& ops) {
  for (size_t i = 0; i < dys.size(); ++i) {
    result.grad_w.push_back(at::mm(dys[i].t(), x2));
    if (ops.biases[i]) result.grad_bias.push_back(dys[i].sum(0));
  }
}

// Which gradients a backward computes: dx, dS (for dA or dx: B is saved only then), the base tensors'.
struct Needs {
  bool x, ds, base;
};

// Stacked operands: the output gradients copied side by side into G = [dY | dS] (dY_cat, then dS beside it), dS =
// dY_cat B_bd and dB (the diagonal blocks of dY_cat^T S) one GEMM each, dx = G wa in one GEMM (two with dropout).
Backward backward_stacked(const variable_list& grads, const at::Tensor& x, const at::Tensor& s, const Operands& ops,
                          const Layout& layout, Needs need, at::ScalarType a_dtype) {
  const auto x2 = flat(x);
  const int64_t rank = s.size(1);
  const size_t groups = layout.d_outs.size();
  int64_t n_out = 0;
  for (const auto d : layout.d_outs) n_out += d;
  auto g = at::empty({x2.size(0), n_out + rank}, x2.options());
  // dS's columns zeroed first: a CPU bf16 GEMM over the view dY (row stride n_out + rank) reads the columns past it,
  // and an uninitialised NaN there came out in dS (~7% of calls at some shapes, torch 2.13).
  g.narrow(1, n_out, rank).zero_();
  std::vector<at::Tensor> dys;
  int64_t col = 0;
  for (size_t i = 0; i < groups; ++i) {
    dys.push_back(flat(grads[i]));
    g.narrow(1, col, layout.d_outs[i]).copy_(dys[i]);
    col += layout.d_outs[i];
  }
  const auto dy = g.narrow(1, 0, n_out);
  const auto db = at::mm(dy.t(), s);
  Backward result;
  int64_t row = 0;
  col = 0;
  for (size_t i = 0; i < groups; ++i) {
    result.grad_b.push_back(at::mul(db.narrow(0, row, layout.d_outs[i]).narrow(1, col, layout.ranks[i]),
                                    layout.scales[i]));
    row += layout.d_outs[i];
    col += layout.ranks[i];
  }
  if (need.ds) {
    const auto ds = at::mm(dy, right_operand(ops.b_bd, layout));
    result.grad_a = split_grad_a(at::mm(ds.t(), drop(x2, layout)), a_dtype, layout);
    if (need.x) {
      at::Tensor grad_x;
      if (layout.dropout_p == 0.0) {
        g.narrow(1, n_out, rank).copy_(ds);
        grad_x = at::mm(g, right_operand(ops.wa, layout));
      } else {
        grad_x = drop(at::mm(ds, right_operand(ops.wa.narrow(0, n_out, rank), layout)), layout);
        grad_x.addmm_(dy, right_operand(ops.wa.narrow(0, 0, n_out), layout));
      }
      result.grad_x = grad_x.view(x.sizes());
    }
  }
  if (need.base) add_base_grads(result, dys, x2, ops);
  return result;
}

// a_dtype: the A factors' own dtype (autocast computes in another). stacked: the operands' stacked form (wa, b_bd).
Backward backward_impl(const variable_list& grads, const at::Tensor& x, const at::Tensor& s, const Operands& ops,
                       const Layout& layout, Needs need, at::ScalarType a_dtype, bool stacked) {
  if (stacked) return backward_stacked(grads, x, s, ops, layout, need, a_dtype);
  const auto factor = s.scalar_type();
  const auto x2 = flat(x);
  const size_t groups = layout.ranks.size();
  const auto s_parts = groups == 1 ? std::vector<at::Tensor>{s} : s.split_with_sizes(layout.ranks, 1);
  std::vector<at::Tensor> dys, ds_parts;
  Backward result;
  for (size_t i = 0; i < groups; ++i) {
    dys.push_back(flat(grads[i]));
    const auto dy = as_factor(dys[i], factor);
    const double scale = layout.scales[i];
    // beta = 0: the GEMM writes alpha * (a @ b) and ignores its addend (a tensor of the result's shape).
    if (need.ds) ds_parts.push_back(at::addmm(s_parts[i], dy, right_operand(ops.lora_b[i], layout), 0.0, scale));
    result.grad_b.push_back(need.ds ? at::addmm(ops.lora_b[i], dy.t(), s_parts[i], 0.0, scale)
                                    : at::mm(dy.t(), s_parts[i]).mul_(scale));
  }
  if (need.ds) {
    const auto ds = groups == 1 ? ds_parts[0] : at::cat(ds_parts, 1);
    result.grad_a = split_grad_a(at::mm(ds.t(), drop(as_factor(x2, factor), layout)), a_dtype, layout);
    if (need.x) {
      auto grad_x = drop(at::mm(ds, right_operand(ops.a_cat, layout)), layout);
      if (grad_x.scalar_type() != x.scalar_type()) grad_x = grad_x.to(x.scalar_type());
      if (stacks_base(ops.weights)) {  // as the forward: the output gradients side by side, one GEMM over W_cat
        grad_x.addmm_(at::cat(dys, 1), right_operand(at::cat(ops.weights), layout));
      } else {
        for (size_t i = 0; i < ops.weights.size(); ++i) grad_x.addmm_(dys[i], right_operand(ops.weights[i], layout));
      }
      result.grad_x = grad_x.view(x.sizes());
    }
  }
  if (need.base) add_base_grads(result, dys, x2, ops);
  return result;
}

void check_args(const at::Tensor& x, at::TensorList weights, size_t n_biases, at::TensorList lora_a,
                at::TensorList lora_b, at::ArrayRef<double> scales) {
  const size_t groups = lora_a.size();
  TORCH_CHECK(groups > 0, "grouped_lora_cpu: lora_a must hold at least one factor");
  TORCH_CHECK(lora_b.size() == groups && scales.size() == groups,
              "grouped_lora_cpu: lora_b and scales must have one entry per factor of lora_a");
  TORCH_CHECK((weights.size() == groups && n_biases == groups) || (weights.empty() && n_biases == 0),
              "grouped_lora_cpu: weights and biases must have one entry per layer, or none (the LoRA terms alone)");
  TORCH_CHECK(x.device().is_cpu(), "grouped_lora_cpu: x must be a CPU tensor");
}

// A call's tensors as given. A PreparedGroup's are one object its calls' nodes share (nothing copied per call).
struct Given {
  std::vector<at::Tensor> weights, lora_a, lora_b;
  c10::List<std::optional<at::Tensor>> biases;
};

// The call's state besides its saved tensors: the layout, and where the saved tensors lie.
struct State : torch::CustomClassHolder {
  std::shared_ptr<const Given> given;  // read by the forward and the differentiable backward (the fast one: which
                                       // biases are present)
  at::ScalarType a_dtype;
  Layout layout;
  std::optional<at::ScalarType> cast_to;
  std::vector<at::ScalarType> dtypes;  // each autograd input's dtype (gradients return in it)
  bool base_inputs = false;            // the base weights and biases are inputs (one of them trains)
  bool stacked = false;                // the operands are in the stacked form (wa, b_bd)
  size_t n_biases = 0;                 // present biases
  size_t n_a = 0, n_b = 0, n_w = 0;    // saved after x and S, in this order: A (or wa), B (or b_bd), W
  std::shared_ptr<std::atomic<int64_t>> backward_calls;  // the PreparedGroup's count of its nodes' backwards
};

// Without autograd (no_grad, inference_mode): the forward alone.
std::vector<at::Tensor> grouped_lora_cpu(const at::Tensor& x, at::TensorList weights,
                                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList lora_a,
                                         at::TensorList lora_b, at::ArrayRef<double> scales, double dropout_p,
                                         int64_t seed, std::optional<at::ScalarType> cast_to, bool column_major_half) {
  check_args(x, weights, biases.size(), lora_a, lora_b, scales);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto ops = operands_of(weights, biases, lora_a, lora_b, scales, cast_to);
  return forward_impl(cast(x, cast_to), ops, make_layout(lora_b, scales, dropout_p, seed, column_major_half)).outputs;
}

// The tensors the backward reads besides x and S, saved as F.linear saves them, so autograd's version checks raise
// where stock PEFT's would: the weights and A only when x needs a gradient, B when x or an A does; autocast's
// copies of what autocast casts, the tensors themselves otherwise (A_cat then packed again in the backward).
void save_operands(variable_list& saved, State& state, const Operands& ops, at::TensorList lora_a,
                   at::TensorList lora_b, bool need_x) {
  bool need_a = false;
  for (const auto& a : lora_a) need_a = need_a || a.requires_grad();
  const auto save = [&saved](at::TensorList ts) {
    saved.insert(saved.end(), ts.begin(), ts.end());
    return ts.size();
  };
  if (state.stacked) {  // the copies in their stacked form, then factors already in autocast's dtype: their
    // versions checked as stock's, their values never read
    if (need_x) state.n_a = save(ops.wa);
    if (need_x || need_a) state.n_b = save(ops.b_bd);
    for (const auto& a : lora_a) {
      if (need_x && !castable(a, state.cast_to)) saved.push_back(a);
    }
    for (const auto& b : lora_b) {
      if ((need_x || need_a) && !castable(b, state.cast_to)) saved.push_back(b);
    }
    return;
  }
  if (need_x) state.n_a = castable(lora_a[0], state.cast_to) ? save(ops.a_cat) : save(lora_a);
  if (need_x || need_a) state.n_b = save(ops.lora_b);
  if (need_x) state.n_w = save(ops.weights);
}

// The base tensors as the node's inputs: the weights, then the present biases.
std::vector<at::Tensor> base_tensors(const Given& given) {
  std::vector<at::Tensor> base = given.weights;
  for (const auto& b : cast_biases(given.biases, std::nullopt)) {
    if (b) base.push_back(*b);
  }
  return base;
}

// The backward with grad mode on (create_graph: gradient penalties, Hessian-vector products): the forward again in
// recorded ops from tensors connected to the graph (x as saved, the given factors, weights and biases; autocast's
// casts as .to(), dropout as a multiply by its mask), differentiated by autograd, so that the gradients are
// differentiable in turn. PEFT's per-layer formula: the fast path's sums in other orders, the same values.
variable_list differentiable_backward(AutogradContext* ctx, const State& state, const at::Tensor& x,
                                      const variable_list& grads) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto& given = *state.given;
  const auto& layout = state.layout;
  const auto lora_a = cast_all(given.lora_a, state.cast_to), lora_b = cast_all(given.lora_b, state.cast_to);
  const auto weights = cast_all(given.weights, state.cast_to);
  const auto biases = cast_biases(given.biases, state.cast_to);
  const auto x2 = flat(x);
  auto xd = as_factor(x2, lora_a[0].scalar_type());
  if (layout.dropout_p != 0.0) xd = xd * dropout_cpu(at::ones_like(xd), layout.dropout_p, layout.seed);
  variable_list ys, dys;
  for (size_t i = 0; i < lora_b.size(); ++i) {
    // An output the loss does not use (undefined gradient) is left out: its layer's inputs come back undefined
    // (allow_unused), no gradient as for its own PEFT layer.
    if (!grads[i].defined()) continue;
    auto y = at::mm(at::mm(xd, lora_a[i].t()), lora_b[i].t()).mul(layout.scales[i]);
    if (!weights.empty()) {
      auto base = at::mm(x2, weights[i].t());
      if (biases[i]) base = base + *biases[i];
      y = base.scalar_type() == y.scalar_type() ? base + y : (base + y).to(base.scalar_type());
    }
    if (y.requires_grad()) {
      ys.push_back(y);
      dys.push_back(flat(grads[i]));
    }
  }
  variable_list inputs{x};  // the node's, in edge order
  inputs.insert(inputs.end(), given.lora_a.begin(), given.lora_a.end());
  inputs.insert(inputs.end(), given.lora_b.begin(), given.lora_b.end());
  if (state.base_inputs) {
    const auto base = base_tensors(given);
    inputs.insert(inputs.end(), base.begin(), base.end());
  }
  variable_list wanted, out(inputs.size() + 1);  // + the state argument: no gradient
  std::vector<size_t> slots;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (ctx->needs_input_grad(i)) {
      wanted.push_back(inputs[i]);
      slots.push_back(i);
    }
  }
  if (ys.empty() || wanted.empty()) return out;
  const auto got = torch::autograd::grad(ys, wanted, dys, /*retain_graph=*/true, /*create_graph=*/true,
                                         /*allow_unused=*/true);
  for (size_t k = 0; k < slots.size(); ++k) out[slots[k]] = got[k];
  return out;
}

// The outputs the loss does not use come to the backward undefined (set_materialize_grads(false)): zeros of their
// shapes and dtypes stand in for them (the outputs are shaped like x with d_out_i last; in x's dtype, or the factors'
// (S's) when the call computes the LoRA terms alone). Returns which outputs those were.
std::vector<size_t> fill_unused(variable_list& grads, const at::Tensor& x, const at::Tensor& s, const State& state) {
  std::vector<size_t> unused;
  for (size_t i = 0; i < state.layout.d_outs.size(); ++i) {
    if (grads[i].defined()) continue;
    auto shape = x.sizes().vec();
    shape.back() = state.layout.d_outs[i];
    grads[i] = at::zeros(shape, x.options().dtype(state.given->weights.empty() ? s.scalar_type() : x.scalar_type()));
    unused.push_back(i);
  }
  return unused;
}

// No gradient (undefined, not zeros) for the layers whose outputs the loss does not use, as their own PEFT layers
// would get: their factors, and their weight and bias where the base tensors are inputs. out: the node's input
// gradients in edge order (x, A..., B..., W..., present biases...).
void drop_unused(variable_list& out, const std::vector<size_t>& unused, const State& state) {
  const size_t groups = state.layout.ranks.size();
  for (const size_t i : unused) {
    out[1 + i] = at::Tensor();
    out[1 + groups + i] = at::Tensor();
  }
  if (!state.base_inputs) return;
  const auto& biases = state.given->biases;
  size_t bias_slot = 1 + 2 * groups + state.given->weights.size();
  for (size_t i = 0, next = 0; i < groups; ++i) {
    const std::optional<at::Tensor> bias = biases.get(i);
    const bool present = bias && bias->defined();
    if (next < unused.size() && unused[next] == i) {
      out[1 + 2 * groups + i] = at::Tensor();
      if (present) out[bias_slot] = at::Tensor();
      ++next;
    }
    bias_slot += present;
  }
}

class GroupedLoraFunction : public torch::autograd::Function<GroupedLoraFunction> {
 public:
  // Autograd inputs, in edge order: x, lora_a..., lora_b..., then (if one trains) weights..., present biases...
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::TensorList base, c10::intrusive_ptr<State> state) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no recording, no view tracking: plain kernels
    const auto& given = *state->given;
    const auto ops = operands_of(given.weights, given.biases, lora_a, lora_b, state->layout.scales, state->cast_to);
    state->stacked = ops.wa.defined();
    auto result = forward_impl(x, ops, state->layout);
    variable_list saved{x, result.s};
    save_operands(saved, *state, ops, lora_a, lora_b, x.requires_grad());
    ctx->save_for_backward(saved);
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: its layer gets none
    return result.outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto state = c10::static_intrusive_pointer_cast<State>(ctx->saved_data["state"].toCapsule());
    if (state->backward_calls) state->backward_calls->fetch_add(1, std::memory_order_relaxed);
    const auto saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) return differentiable_backward(ctx, *state, saved[0], grads);
    const size_t groups = state->layout.ranks.size();
    const bool need_x = ctx->needs_input_grad(0);
    Needs need{need_x, need_x, false};
    for (size_t i = 1; i <= groups; ++i) need.ds = need.ds || ctx->needs_input_grad(i);
    for (size_t i = 1 + 2 * groups; state->base_inputs && i < state->dtypes.size(); ++i) {
      need.base = need.base || ctx->needs_input_grad(i);
    }
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto unused = fill_unused(grads, saved[0], saved[1], *state);
    Operands ops;
    auto next = saved.begin() + 2;
    const auto part = [&next](size_t n) {
      next += n;
      return std::vector<at::Tensor>(next - n, next);
    };
    const auto a = part(state->n_a);
    if (state->stacked) {
      if (!a.empty()) ops.wa = a[0];
      if (state->n_b) ops.b_bd = *next;
    } else {
      if (!a.empty()) ops.a_cat = a.size() == 1 ? a[0] : at::cat(a);
      ops.lora_b = part(state->n_b);
      ops.weights = part(state->n_w);
    }
    if (need.base) ops.biases = cast_biases(state->given->biases, std::nullopt);  // which are present
    auto result =
        backward_impl(grads, saved[0], saved[1], ops, state->layout, need, state->a_dtype, state->stacked);
    result.grad_a.resize(groups);  // undefined where dS was not needed
    variable_list out{result.grad_x};
    out.insert(out.end(), result.grad_a.begin(), result.grad_a.end());
    out.insert(out.end(), result.grad_b.begin(), result.grad_b.end());
    if (state->base_inputs) {
      for (size_t i = 0; i < state->given->weights.size(); ++i) {
        out.push_back(need.base ? result.grad_w[i] : at::Tensor());
      }
      for (size_t i = 0; i < state->n_biases; ++i) out.push_back(need.base ? result.grad_bias[i] : at::Tensor());
    }
    if (!unused.empty()) drop_unused(out, unused, *state);
    if (state->cast_to) {  // each gradient in its input's dtype, as autocast's cast nodes would give it
      for (size_t i = 0; i < out.size(); ++i) {
        if (out[i].defined() && out[i].scalar_type() != state->dtypes[i]) out[i] = out[i].to(state->dtypes[i]);
      }
    }
    out.emplace_back();  // the state argument: no gradient
    return out;
  }
};

// backward_calls: counted by each node's backward (a PreparedGroup's calls; none for the op's).
std::vector<at::Tensor> autograd_call(const at::Tensor& x, std::shared_ptr<const Given> given,
                                      at::ArrayRef<double> scales, double dropout_p, int64_t seed,
                                      std::optional<at::ScalarType> cast_to, bool column_major_half,
                                      std::shared_ptr<std::atomic<int64_t>> backward_calls) {
  const auto& weights = given->weights;
  const auto& lora_a = given->lora_a;
  const auto& lora_b = given->lora_b;
  check_args(x, weights, given->biases.size(), lora_a, lora_b, scales);
  auto state = c10::make_intrusive<State>();
  state->backward_calls = std::move(backward_calls);
  state->a_dtype = lora_a[0].scalar_type();
  state->layout = make_layout(lora_b, scales, dropout_p, seed, column_major_half);
  state->cast_to = cast_to;
  std::vector<at::Tensor> base;
  for (const auto& w : weights) state->base_inputs = state->base_inputs || w.requires_grad();
  for (const auto& b : given->biases) {  // the given biases: autocast's copies (made under no_grad) never require grad
    std::optional<at::Tensor> bias = b;
    state->base_inputs = state->base_inputs || (bias && bias->defined() && bias->requires_grad());
  }
  if (state->base_inputs) {
    base = base_tensors(*given);
    state->n_biases = base.size() - weights.size();
  }
  // x cast outside the node, a recorded op: the node saves the copy, and autograd's cast node carries x's gradient
  // back (connected to x for a differentiable backward).
  const auto x_in = cast(x, cast_to);
  if (cast_to) {
    state->dtypes.push_back(x_in.scalar_type());
    for (auto list : {at::TensorList(lora_a), at::TensorList(lora_b), at::TensorList(base)}) {
      for (const auto& t : list) state->dtypes.push_back(t.scalar_type());
    }
  } else {
    state->dtypes.resize(1 + lora_a.size() + lora_b.size() + base.size());
  }
  state->given = std::move(given);
  // TensorLists: apply takes the tensors of those (not of a std::vector) as the node's inputs.
  return GroupedLoraFunction::apply(x_in, at::TensorList(lora_a), at::TensorList(lora_b), at::TensorList(base),
                                    std::move(state));
}

std::vector<at::Tensor> grouped_lora_cpu_autograd(const at::Tensor& x, at::TensorList weights,
                                                  const c10::List<std::optional<at::Tensor>>& biases,
                                                  at::TensorList lora_a, at::TensorList lora_b,
                                                  at::ArrayRef<double> scales, double dropout_p, int64_t seed,
                                                  std::optional<at::ScalarType> cast_to, bool column_major_half) {
  return autograd_call(x, std::make_shared<const Given>(Given{weights.vec(), lora_a.vec(), lora_b.vec(), biases}),
                       scales, dropout_p, seed, cast_to, column_major_half, nullptr);
}

// A group's call with everything but x and the dropout seed fixed once, what the fused modules run per forward:
// the op without parsing and dispatching its ten arguments on every call (on a host-bound step that is a
// noticeable part of a call). The same computation as the op (recorded under its name by the profiler): the
// autograd node while grad mode is on, the plain forward under no_grad and inference_mode.
class PreparedGroup {
 public:
  PreparedGroup(std::vector<at::Tensor> weights, const std::vector<std::optional<at::Tensor>>& biases,
                std::vector<at::Tensor> lora_a, std::vector<at::Tensor> lora_b, std::vector<double> scales,
                double dropout_p, std::optional<at::ScalarType> cast_to, bool column_major_half)
      : given_(std::make_shared<const Given>(Given{std::move(weights), std::move(lora_a), std::move(lora_b),
                                                   c10::List<std::optional<at::Tensor>>(biases)})),
        scales_(std::move(scales)),
        dropout_p_(dropout_p),
        cast_to_(cast_to),
        column_major_half_(column_major_half) {}

  std::vector<at::Tensor> operator()(const at::Tensor& x, int64_t seed) const {
    RECORD_FUNCTION("slora::grouped_lora_cpu", std::vector<c10::IValue>{x});
    if (!at::GradMode::is_enabled()) {
      return grouped_lora_cpu(x, given_->weights, given_->biases, given_->lora_a, given_->lora_b, scales_, dropout_p_,
                              seed, cast_to_, column_major_half_);
    }
    return autograd_call(x, given_, scales_, dropout_p_, seed, cast_to_, column_major_half_, backward_calls_);
  }

  // How many backwards the nodes of this group's calls have run: whether a pending output's graph was used.
  int64_t backward_calls() const { return backward_calls_->load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<const Given> given_;
  std::vector<double> scales_;
  double dropout_p_;
  std::optional<at::ScalarType> cast_to_;
  bool column_major_half_;
  std::shared_ptr<std::atomic<int64_t>> backward_calls_ = std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace

void bind_prepared_group(pybind11::module_& m) {
  pybind11::class_<PreparedGroup>(m, "PreparedGroup")
      .def(pybind11::init<std::vector<at::Tensor>, const std::vector<std::optional<at::Tensor>>&,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<double>, double,
                          std::optional<at::ScalarType>, bool>())
      .def("__call__", &PreparedGroup::operator(), pybind11::arg("x"), pybind11::arg("seed"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("backward_calls", &PreparedGroup::backward_calls);
}

TORCH_LIBRARY_FRAGMENT(slora, m) {
  m.def("grouped_lora_cpu(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] lora_a, Tensor[] lora_b, "
        "float[] scales, float dropout_p, int seed, ScalarType? cast_to, bool column_major_half) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(slora, CPU, m) {
  m.impl("grouped_lora_cpu", &grouped_lora_cpu);
}

TORCH_LIBRARY_IMPL(slora, AutogradCPU, m) {
  m.impl("grouped_lora_cpu", &grouped_lora_cpu_autograd);
}

}  // namespace slora
