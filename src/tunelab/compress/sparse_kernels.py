"""Fused C++ kernels for batch-1 decoding with sparse activations, built on first use.

Why our own kernel: a one-row product whose input is mostly zeros only saves time if the weight
rows of the zero inputs are never read. PyTorch's nearest tool, ``embedding_bag`` with
per-sample weights, reads only the active rows but pays per row and parallelises over bags
(decoding has one), and the threshold, the ``nonzero`` and the gather are separate operators (each
a Python dispatch, ~210 per SmolLM2 token). Here one call thresholds the input, collects the
active features and accumulates ``Σⱼ xⱼ·Wᵀ[j]`` four rows at a time into an output block that
stays in L1, with the output columns split over PyTorch's threads (``at::parallel_for``). The ReLU-fied MLP is one call too:
the gate densely, the ``up`` dot products of the open channels, and the ``downᵀ`` rows they weight
(in fp32, or all three in the int8 row format below); for a floored ReLU, the open channels' values
less their floors plus the folded ``down·diag(floor)·up`` product, in the same call.

The int8 path reads fbgemm's row-wise format (``embedding_bag_byte_prepack``: ``out`` codes, then
a float scale and offset per row), so layers saved before the kernel existed load unchanged.

Built for this machine's CPU on first use (``tunelab.native_build``); where it cannot be built (no
compiler), :func:`sparse_decode_kernels` returns None once, with a warning, and the layers keep
PyTorch's gather.
"""

from __future__ import annotations

import functools
from types import ModuleType

from tunelab.native_build import build_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Output columns per parallel task: big enough that a task is worth a thread, small enough that
// SmolLM2's 576-wide outputs still split over two threads.
constexpr int64_t kGrain = 128;

struct Active {
  std::vector<int64_t> index;
  std::vector<float> value;
};

// Features whose magnitude is above the threshold (the same test as the dense path: |x| > t), or,
// for a ReLU gate, whose value is positive.
Active collect(const float* x, int64_t n, float threshold, bool positive_only = false) {
  Active a;
  a.index.reserve(n);
  a.value.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    if ((positive_only ? v : std::fabs(v)) > threshold) {
      a.index.push_back(j);
      a.value.push_back(v);
    }
  }
  return a;
}

// out[begin:end] = Σ_a value[a] · rows[index[a]][begin:end], rows of `stride` floats, four rows per pass
// so the output block is loaded and stored a quarter as often as the rows are read.
void accumulate_f32(const float* __restrict__ rows, int64_t stride, const int64_t* index, const float* value,
                    int64_t count, float* __restrict__ out, int64_t begin, int64_t end) {
  std::memset(out + begin, 0, sizeof(float) * (end - begin));
  int64_t a = 0;
  for (; a + 4 <= count; a += 4) {
    const float* __restrict__ r0 = rows + index[a] * stride;
    const float* __restrict__ r1 = rows + index[a + 1] * stride;
    const float* __restrict__ r2 = rows + index[a + 2] * stride;
    const float* __restrict__ r3 = rows + index[a + 3] * stride;
    const float v0 = value[a], v1 = value[a + 1], v2 = value[a + 2], v3 = value[a + 3];
    for (int64_t k = begin; k < end; ++k) out[k] += v0 * r0[k] + v1 * r1[k] + v2 * r2[k] + v3 * r3[k];
  }
  for (; a < count; ++a) {
    const float* __restrict__ r = rows + index[a] * stride;
    const float v = value[a];
    for (int64_t k = begin; k < end; ++k) out[k] += v * r[k];
  }
}

// The same over fbgemm's row-wise uint8 rows: [out codes][float scale][float offset]; a row's
// value is scale·code + offset, so Σ v·(s·q + o) = Σ (v·s)·q + Σ v·o. ``coef`` holds v·s per
// active row and ``constant`` Σ v·o (``row_coefficients``, once per call, not per thread).
void accumulate_u8(const uint8_t* __restrict__ rows, int64_t stride, const int64_t* index, const float* coef, float constant,
                   int64_t count, float* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t k = begin; k < end; ++k) out[k] = constant;
  int64_t a = 0;
  for (; a + 4 <= count; a += 4) {
    const uint8_t* __restrict__ r0 = rows + index[a] * stride;
    const uint8_t* __restrict__ r1 = rows + index[a + 1] * stride;
    const uint8_t* __restrict__ r2 = rows + index[a + 2] * stride;
    const uint8_t* __restrict__ r3 = rows + index[a + 3] * stride;
    const float c0 = coef[a], c1 = coef[a + 1], c2 = coef[a + 2], c3 = coef[a + 3];
    int64_t k = begin;
    // Widening bytes to floats is what costs here; left to itself the compiler picks 64-byte
    // vectors of codes and shuffles them (measured 3x slower than this).
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_set1_ps(c0), v1 = _mm512_set1_ps(c1), v2 = _mm512_set1_ps(c2), v3 = _mm512_set1_ps(c3);
    for (; k + 16 <= end; k += 16) {
      __m512 acc = _mm512_loadu_ps(out + k);
      acc = _mm512_fmadd_ps(v0, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + k)))), acc);
      acc = _mm512_fmadd_ps(v1, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + k)))), acc);
      acc = _mm512_fmadd_ps(v2, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r2 + k)))), acc);
      acc = _mm512_fmadd_ps(v3, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r3 + k)))), acc);
      _mm512_storeu_ps(out + k, acc);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), v3 = _mm256_set1_ps(c3);
    for (; k + 8 <= end; k += 8) {
      __m256 acc = _mm256_loadu_ps(out + k);
      acc = _mm256_fmadd_ps(v0, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + k)))), acc);
      acc = _mm256_fmadd_ps(v1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r1 + k)))), acc);
      acc = _mm256_fmadd_ps(v2, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r2 + k)))), acc);
      acc = _mm256_fmadd_ps(v3, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r3 + k)))), acc);
      _mm256_storeu_ps(out + k, acc);
    }
#endif
    for (; k < end; ++k) out[k] += c0 * float(r0[k]) + c1 * float(r1[k]) + c2 * float(r2[k]) + c3 * float(r3[k]);
  }
  for (; a < count; ++a) {
    const uint8_t* __restrict__ r = rows + index[a] * stride;
    const float c = coef[a];
    for (int64_t k = begin; k < end; ++k) out[k] += c * float(r[k]);
  }
}

float row_coefficients(const uint8_t* rows, int64_t stride, int64_t width, const Active& active, std::vector<float>& coef) {
  float constant = 0.f;
  coef.resize(active.index.size());
  for (size_t a = 0; a < coef.size(); ++a) {
    const uint8_t* row = rows + active.index[a] * stride;
    float scale, offset;
    std::memcpy(&scale, row + width, sizeof(float));
    std::memcpy(&offset, row + width + sizeof(float), sizeof(float));
    coef[a] = active.value[a] * scale;
    constant += active.value[a] * offset;
  }
  return constant;
}

// Σ_k code[k]·x[k] over one row of uint8 codes: the dot product behind a row-wise int8 row's
// s·(q·x) + o·Σx. Four accumulators, so the FMA latency is hidden at SmolLM2's 576 columns.
float dot_u8(const uint8_t* __restrict__ codes, const float* __restrict__ x, int64_t n) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  auto widen = [&](int64_t at) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + at)))); };
  for (; k + 64 <= n; k += 64) {
    a0 = _mm512_fmadd_ps(widen(k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen(k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(widen(k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(widen(k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(widen(k), _mm512_loadu_ps(x + k), a0);
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  auto widen = [&](int64_t at) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + at)))); };
  for (; k + 16 <= n; k += 16) {
    a0 = _mm256_fmadd_ps(widen(k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(widen(k + 8), _mm256_loadu_ps(x + k + 8), a1);
  }
  const __m256 both = _mm256_add_ps(a0, a1);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, both);
  for (float lane : lanes) sum += lane;
#endif
  for (; k < n; ++k) sum += float(codes[k]) * x[k];
  return sum;
}

// One row-wise int8 row (``width`` codes, then its float scale and offset) times x, given Σx.
float row_dot_u8(const uint8_t* row, int64_t width, const float* x, float x_sum) {
  float scale, offset;
  std::memcpy(&scale, row + width, sizeof(float));
  std::memcpy(&offset, row + width + sizeof(float), sizeof(float));
  return scale * dot_u8(row, x, width) + offset * x_sum;
}

void check_row(const torch::Tensor& x, int64_t features) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(0) == features,
              "expected one contiguous float32 row of ", features, " features");
}

}  // namespace

// x [in] · W, with Wᵀ given as rows [in, out]; inputs with |x| <= threshold are skipped.
torch::Tensor sparse_input_f32(const torch::Tensor& x, const torch::Tensor& weight_t, double threshold) {
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.scalar_type() == torch::kFloat && weight_t.is_contiguous(), "weight_t: contiguous float32 [in, out]");
  const int64_t in = weight_t.size(0), out_features = weight_t.size(1);
  check_row(x, in);
  const Active active = collect(x.data_ptr<float>(), in, static_cast<float>(threshold));
  auto out = torch::empty({out_features}, x.options());
  const float* rows = weight_t.data_ptr<float>();
  float* result = out.data_ptr<float>();
  const int64_t count = static_cast<int64_t>(active.index.size());
  at::parallel_for(0, out_features, kGrain, [&](int64_t begin, int64_t end) {
    accumulate_f32(rows, out_features, active.index.data(), active.value.data(), count, result, begin, end);
  });
  return out;
}

// The same with fbgemm's row-wise uint8 rows [in, out + 8].
torch::Tensor sparse_input_u8(const torch::Tensor& x, const torch::Tensor& weight_rows, double threshold) {
  TORCH_CHECK(weight_rows.dim() == 2 && weight_rows.scalar_type() == torch::kByte && weight_rows.is_contiguous(), "weight_rows: contiguous uint8 [in, out + 8]");
  const int64_t in = weight_rows.size(0), stride = weight_rows.size(1), out_features = stride - 8;
  check_row(x, in);
  const Active active = collect(x.data_ptr<float>(), in, static_cast<float>(threshold));
  auto out = torch::empty({out_features}, x.options());
  const uint8_t* rows = weight_rows.data_ptr<uint8_t>();
  float* result = out.data_ptr<float>();
  const int64_t count = static_cast<int64_t>(active.index.size());
  std::vector<float> coef;
  const float constant = row_coefficients(rows, stride, out_features, active, coef);
  at::parallel_for(0, out_features, kGrain, [&](int64_t begin, int64_t end) {
    accumulate_u8(rows, stride, active.index.data(), coef.data(), constant, count, result, begin, end);
  });
  return out;
}

// ``floor`` (empty, or [intermediate]) and ``fold`` (empty, or [hidden, hidden]) describe a floored
// ReLU (method.activation.floor): a closed channel outputs its constant c instead of 0, so
// down((act(g)·[g > 0] + c·[g ≤ 0]) ⊙ up·x) = down((act(g) - c)·[g > 0] ⊙ up·x) + (down·diag(c)·up)·x:
// the open channels' values less their floor, plus one dense hidden×hidden product.
static void check_floor(const torch::Tensor& floor, const torch::Tensor& fold, int64_t intermediate, int64_t hidden, int64_t fold_width) {
  TORCH_CHECK((floor.numel() == 0) == (fold.numel() == 0), "floor and fold come together");
  if (floor.numel() == 0) return;
  TORCH_CHECK(floor.dim() == 1 && floor.scalar_type() == torch::kFloat && floor.is_contiguous() && floor.size(0) == intermediate,
              "floor: contiguous float32 [intermediate]");
  TORCH_CHECK(fold.dim() == 2 && fold.is_contiguous() && fold.size(0) == hidden && fold.size(1) == fold_width,
              "fold: contiguous [hidden, ", fold_width, "]");
}

// down(act(gate·x) ⊙ up·x) for one token of a ReLU-fied MLP: all weights [intermediate, hidden]
// (down given transposed), act = relu (squared: relu²). Only the channels with a positive gate
// read their row of up and of downᵀ. Floored (see check_floor): fold is float32 [hidden, hidden].
torch::Tensor relu_gated_mlp(const torch::Tensor& x, const torch::Tensor& gate_weight, const torch::Tensor& up_weight,
                             const torch::Tensor& down_weight_t, bool squared, const torch::Tensor& floor, const torch::Tensor& fold) {
  const int64_t intermediate = gate_weight.size(0), hidden = gate_weight.size(1);
  check_row(x, hidden);
  for (const auto* w : {&gate_weight, &up_weight, &down_weight_t})
    TORCH_CHECK(w->scalar_type() == torch::kFloat && w->is_contiguous() && w->size(0) == intermediate && w->size(1) == hidden,
                "MLP weights: contiguous float32 [intermediate, hidden]");
  check_floor(floor, fold, intermediate, hidden, hidden);
  TORCH_CHECK(fold.numel() == 0 || fold.scalar_type() == torch::kFloat, "fold: float32");
  const float* floors = floor.numel() ? floor.data_ptr<float>() : nullptr;
  const torch::Tensor gate = at::mv(gate_weight, x);
  const Active open = collect(gate.data_ptr<float>(), intermediate, 0.f, true);  // relu: open where gate > 0
  const int64_t count = static_cast<int64_t>(open.index.size());
  std::vector<float> value(count);
  const float* xs = x.data_ptr<float>();
  const float* up = up_weight.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const float* __restrict__ row = up + open.index[a] * hidden;
      float dot = 0.f;
      for (int64_t k = 0; k < hidden; ++k) dot += row[k] * xs[k];
      const float g = open.value[a];
      value[a] = ((squared ? g * g : g) - (floors ? floors[open.index[a]] : 0.f)) * dot;
    }
  });
  auto out = torch::empty({hidden}, x.options());
  float* result = out.data_ptr<float>();
  const float* down = down_weight_t.data_ptr<float>();
  const float* folded = fold.numel() ? fold.data_ptr<float>() : nullptr;
  at::parallel_for(0, hidden, kGrain, [&](int64_t begin, int64_t end) {
    accumulate_f32(down, hidden, open.index.data(), value.data(), count, result, begin, end);
    if (!folded) return;
    for (int64_t k = begin; k < end; ++k) {
      const float* __restrict__ row = folded + k * hidden;
      float dot = 0.f;
      for (int64_t j = 0; j < hidden; ++j) dot += row[j] * xs[j];
      result[k] += dot;
    }
  });
  return out;
}

// The same MLP with every weight in fbgemm's row-wise uint8 format, [intermediate, hidden + 8]:
// the gate's rows are dotted with x one channel at a time (all of them), then the open channels'
// rows of up and of downᵀ, so a closed channel costs a quarter of its fp32 bytes for the gate only.
// Floored (see check_floor): fold is in the same row-wise format, [hidden, hidden + 8].
torch::Tensor relu_gated_mlp_u8(const torch::Tensor& x, const torch::Tensor& gate_rows, const torch::Tensor& up_rows,
                                const torch::Tensor& down_rows_t, bool squared, const torch::Tensor& floor, const torch::Tensor& fold) {
  const int64_t intermediate = gate_rows.size(0), stride = gate_rows.size(1), hidden = stride - 8;
  check_row(x, hidden);
  for (const auto* w : {&gate_rows, &up_rows, &down_rows_t})
    TORCH_CHECK(w->scalar_type() == torch::kByte && w->is_contiguous() && w->size(0) == intermediate && w->size(1) == stride,
                "MLP weight rows: contiguous uint8 [intermediate, hidden + 8]");
  check_floor(floor, fold, intermediate, hidden, stride);
  TORCH_CHECK(fold.numel() == 0 || fold.scalar_type() == torch::kByte, "fold: uint8 rows");
  const float* floors = floor.numel() ? floor.data_ptr<float>() : nullptr;
  const float* xs = x.data_ptr<float>();
  float x_sum = 0.f;
  for (int64_t k = 0; k < hidden; ++k) x_sum += xs[k];
  std::vector<float> gate(intermediate);
  const uint8_t* gates = gate_rows.data_ptr<uint8_t>();
  at::parallel_for(0, intermediate, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) gate[c] = row_dot_u8(gates + c * stride, hidden, xs, x_sum);
  });
  Active open = collect(gate.data(), intermediate, 0.f, true);  // relu: open where gate > 0
  const int64_t count = static_cast<int64_t>(open.index.size());
  const uint8_t* up = up_rows.data_ptr<uint8_t>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const float g = open.value[a];
      open.value[a] = ((squared ? g * g : g) - (floors ? floors[open.index[a]] : 0.f)) * row_dot_u8(up + open.index[a] * stride, hidden, xs, x_sum);
    }
  });
  const uint8_t* down = down_rows_t.data_ptr<uint8_t>();
  std::vector<float> coef;
  const float constant = row_coefficients(down, stride, hidden, open, coef);
  auto out = torch::empty({hidden}, x.options());
  float* result = out.data_ptr<float>();
  const uint8_t* folded = fold.numel() ? fold.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, hidden, kGrain, [&](int64_t begin, int64_t end) {
    accumulate_u8(down, stride, open.index.data(), coef.data(), constant, count, result, begin, end);
    if (!folded) return;
    for (int64_t k = begin; k < end; ++k) result[k] += row_dot_u8(folded + k * stride, hidden, xs, x_sum);
  });
  return out;
}
"""

_FUNCTIONS = ["sparse_input_f32", "sparse_input_u8", "relu_gated_mlp", "relu_gated_mlp_u8"]


@functools.cache
def sparse_decode_kernels() -> ModuleType | None:
    """The compiled kernels (built on first use in this machine's cache), or None if they cannot be built."""
    return build_extension("tunelab_sparse_decode", _SOURCE, _FUNCTIONS, "sparse decoding kernel",
                           "sparse decoding uses PyTorch's gather, not the fused kernel")
