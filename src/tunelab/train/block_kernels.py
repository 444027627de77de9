"""One-pass C++ kernels for the elementwise work of a fused decoder block (``fused_block``,
``fused_mlp``), with PyTorch fallbacks that compute the same.

Each of these is several PyTorch operators, each a pass over a ``[tokens, width]`` tensor with its
own dispatch, allocation and, for mixed dtypes or broadcasts, a slow TensorIterator loop: RMSNorm
forward is six (square, mean, add, rsqrt, two products) plus the cast the projections make, its
backward seven; RoPE's ``x cos + rotate_half(x) sin`` on bf16 heads and fp32 angles is five, each
~100 µs on SmolLM2's ``[352, 9, 64]`` queries (profiled, bench/README.md, "Session 35"); the
MLP's ``silu(gate) · up`` two forward and four backward. Here each is one loop over the rows that
reads its inputs once and writes its outputs once, rounding to bf16 where the PyTorch version
rounds (``silu`` before the product, each gradient once), in fp32 otherwise.

Built for this machine's CPU on first use (``tunelab.native_build``); without a compiler, or for
tensors the kernels do not take (not contiguous, other dtypes), the PyTorch formulas run instead.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from tunelab.native_build import build_extension

_SOURCE = r"""

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> bf16, round to nearest even; NaN stays NaN (what c10::BFloat16 does)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : rounded;
}

inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = to_bf16(v); }
inline float round_as(float, float v) { return v; }
inline float round_as(uint16_t, float v) { return widen(to_bf16(v)); }

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

std::vector<float> as_floats(const at::Tensor& t) {
  auto f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// Each loop is a function whose pointers are __restrict__ parameters, called from the parallel
// lambda: a lambda's captured pointers lose the qualifier, and GCC, unable to rule out that a store
// through one changes what another reads, left the masking loop unvectorized (287 vs 26 µs for a
// bf16 [368, 576] at 2 threads, session 36).

template <typename O>
void norm_row(const float* __restrict__ x, const float* __restrict__ w, float eps, O* __restrict__ o, float* __restrict__ r, int64_t width) {
  float sum = 0.f;
  for (int64_t j = 0; j < width; ++j) sum += x[j] * x[j];
  const float rr = 1.f / std::sqrt(sum / float(width) + eps);
  *r = rr;
  for (int64_t j = 0; j < width; ++j) put(o + j, w[j] * (x[j] * rr));
}

template <typename O>
void norm_rows(const float* x, const float* w, float eps, O* out, float* r, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(x + t * width, w, eps, out + t * width, r + t, width);
  });
}

template <typename D>
void norm_backward_row(const D* __restrict__ d, const float* __restrict__ x, float rr, const float* __restrict__ w,
                       const float* __restrict__ res, float* __restrict__ o, int64_t width) {
  float dot = 0.f;
  for (int64_t j = 0; j < width; ++j) dot += widen(d[j]) * w[j] * (x[j] * rr);
  dot /= float(width);
  for (int64_t j = 0; j < width; ++j) o[j] = res[j] + rr * (widen(d[j]) * w[j] - (x[j] * rr) * dot);
}

template <typename D>
void norm_backward_rows(const D* dy, const float* x, const float* r, const float* w, const float* dres, float* dx, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      norm_backward_row(dy + t * width, x + t * width, r[t], w, dres + t * width, dx + t * width, width);
  });
}

// x cos + rotate_half(x) sin per head; rotate_half(x) = (-x2, x1)
template <typename I>
void rope_token(const I* __restrict__ x, const float* __restrict__ c, const float* __restrict__ s, float* __restrict__ o, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const I* q = x + h * dim;
    float* oh = o + h * dim;
    for (int64_t i = 0; i < half; ++i) oh[i] = widen(q[i]) * c[i] - widen(q[i + half]) * s[i];
    for (int64_t i = half; i < dim; ++i) oh[i] = widen(q[i]) * c[i] + widen(q[i - half]) * s[i];
  }
}

template <typename I>
void rope_rows(const I* x, const float* cos, const float* sin, float* out, int64_t tokens, int64_t heads, int64_t dim) {
  at::parallel_for(0, tokens, 8, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rope_token(x + t * heads * dim, cos + t * dim, sin + t * dim, out + t * heads * dim, heads, dim);
  });
}

// d cos + rotate_half^T(d sin); rotate_half^T(y) = (y2, -y1)
template <typename I, typename O>
void rope_backward_token(const I* __restrict__ d, const float* __restrict__ c, const float* __restrict__ s, O* __restrict__ o, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const I* g = d + h * dim;
    O* oh = o + h * dim;
    for (int64_t i = 0; i < half; ++i) put(oh + i, widen(g[i]) * c[i] + widen(g[i + half]) * s[i + half]);
    for (int64_t i = half; i < dim; ++i) put(oh + i, widen(g[i]) * c[i] - widen(g[i - half]) * s[i - half]);
  }
}

template <typename I, typename O>
void rope_backward_rows(const I* d, const float* cos, const float* sin, O* out, int64_t tokens, int64_t heads, int64_t dim) {
  at::parallel_for(0, tokens, 8, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rope_backward_token(d + t * heads * dim, cos + t * dim, sin + t * dim, out + t * heads * dim, heads, dim);
  });
}

inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

template <typename T>
void silu_mul_span(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = widen(gate[i]);
    float act = round_as(T(), g * sigmoid(g));
    put(h + i, act * widen(up[i]));
  }
}

// h = act·up (recomputed), d_up = d_h·act, d_gate = silu'(gate)·(d_h·up), each rounded once; in blocks of
// three simple loops, which GCC vectorizes (one loop with six streams it does not)
template <typename T>
void silu_mul_backward_span(const T* __restrict__ dh, const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ h,
                            T* __restrict__ dgate, T* __restrict__ dup, int64_t n) {
  constexpr int64_t kBlock = 256;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    float sig[kBlock], act[kBlock];
    const T* __restrict__ g = gate + start;
    for (int64_t i = 0; i < count; ++i) {
      float x = widen(g[i]);
      sig[i] = sigmoid(x);
      act[i] = round_as(T(), x * sig[i]);
    }
    const T* __restrict__ u = up + start;
    const T* __restrict__ d = dh + start;
    T* __restrict__ ho = h + start;
    T* __restrict__ uo = dup + start;
    for (int64_t i = 0; i < count; ++i) {
      put(ho + i, act[i] * widen(u[i]));
      put(uo + i, widen(d[i]) * act[i]);
    }
    T* __restrict__ go = dgate + start;
    for (int64_t i = 0; i < count; ++i) {
      float x = widen(g[i]);
      float du = round_as(T(), widen(d[i]) * widen(u[i]));
      put(go + i, du * sig[i] * (1.f + x * (1.f - sig[i])));
    }
  }
}

template <typename T>
void masked_scale_span(const T* __restrict__ x, const uint8_t* __restrict__ keep, T* __restrict__ out, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) put(out + i, keep[i] ? widen(x[i]) * scale : 0.f);
}

template <typename T>
void masked_add_span(T* __restrict__ out, const T* __restrict__ y, const uint8_t* __restrict__ keep, int64_t n) {
  for (int64_t i = 0; i < n; ++i) put(out + i, widen(out[i]) + (keep[i] ? widen(y[i]) : 0.f));
}

// an elementwise span function over [0, n), in parallel chunks of at least 8192 elements
template <typename F>
void in_spans(int64_t n, F span) {
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) { span(begin, end - begin); });
}

// splitmix64's output function: a bijection of 64-bit words whose outputs for consecutive
// counters pass BigCrush
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

bool low(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

}  // namespace

std::vector<at::Tensor> rms_norm_forward(at::Tensor x, at::Tensor weight, double eps, bool to_bf16_out) {
  auto w = as_floats(weight);
  int64_t rows = x.size(0), width = x.size(1);
  auto out = at::empty({rows, width}, x.options().dtype(to_bf16_out ? at::kBFloat16 : at::kFloat));
  auto r = at::empty({rows, 1}, x.options());
  if (to_bf16_out) norm_rows(ptr<float>(x), w.data(), float(eps), ptr<uint16_t>(out), ptr<float>(r), rows, width);
  else norm_rows(ptr<float>(x), w.data(), float(eps), ptr<float>(out), ptr<float>(r), rows, width);
  return {out, r};
}

at::Tensor rms_norm_backward(at::Tensor d_y, at::Tensor x, at::Tensor r, at::Tensor weight, at::Tensor d_residual) {
  auto w = as_floats(weight);
  int64_t rows = x.size(0), width = x.size(1);
  auto d_x = at::empty_like(x);
  if (low(d_y)) norm_backward_rows(ptr<uint16_t>(d_y), ptr<float>(x), ptr<float>(r), w.data(), ptr<float>(d_residual), ptr<float>(d_x), rows, width);
  else norm_backward_rows(ptr<float>(d_y), ptr<float>(x), ptr<float>(r), w.data(), ptr<float>(d_residual), ptr<float>(d_x), rows, width);
  return d_x;
}

at::Tensor rope_forward(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  auto out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  if (low(x)) rope_rows(ptr<uint16_t>(x), ptr<float>(cos), ptr<float>(sin), ptr<float>(out), x.size(0), x.size(1), x.size(2));
  else rope_rows(ptr<float>(x), ptr<float>(cos), ptr<float>(sin), ptr<float>(out), x.size(0), x.size(1), x.size(2));
  return out;
}

at::Tensor rope_backward(at::Tensor d, at::Tensor cos, at::Tensor sin, bool to_bf16_out) {
  auto out = at::empty(d.sizes(), d.options().dtype(to_bf16_out ? at::kBFloat16 : at::kFloat));
  const int64_t tokens = d.size(0), heads = d.size(1), dim = d.size(2);
  if (low(d) && to_bf16_out) rope_backward_rows(ptr<uint16_t>(d), ptr<float>(cos), ptr<float>(sin), ptr<uint16_t>(out), tokens, heads, dim);
  else if (low(d)) rope_backward_rows(ptr<uint16_t>(d), ptr<float>(cos), ptr<float>(sin), ptr<float>(out), tokens, heads, dim);
  else if (to_bf16_out) rope_backward_rows(ptr<float>(d), ptr<float>(cos), ptr<float>(sin), ptr<uint16_t>(out), tokens, heads, dim);
  else rope_backward_rows(ptr<float>(d), ptr<float>(cos), ptr<float>(sin), ptr<float>(out), tokens, heads, dim);
  return out;
}

// Row-strided 2-D operands (elements of a row contiguous, rows any distance apart): the gate and
// up products may be column blocks of one stacked matmul's output (``stacked_projections``).
template <typename F>
void in_rows(int64_t rows, int64_t width, F row) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(r);
  });
}

at::Tensor silu_mul(at::Tensor gate, at::Tensor up) {
  const int64_t rows = gate.size(0), width = gate.size(1), gs = gate.stride(0), us = up.stride(0);
  auto h = at::empty({rows, width}, gate.options());
  if (low(gate)) {
    auto *g = ptr<uint16_t>(gate), *u = ptr<uint16_t>(up), *o = ptr<uint16_t>(h);
    in_rows(rows, width, [=](int64_t r) { silu_mul_span(g + r * gs, u + r * us, o + r * width, width); });
  } else {
    auto *g = ptr<float>(gate), *u = ptr<float>(up), *o = ptr<float>(h);
    in_rows(rows, width, [=](int64_t r) { silu_mul_span(g + r * gs, u + r * us, o + r * width, width); });
  }
  return h;
}

at::Tensor masked_scale(at::Tensor x, at::Tensor keep, double scale) {
  auto out = at::empty_like(x);
  auto* k = reinterpret_cast<const uint8_t*>(keep.data_ptr());
  const float s = float(scale);
  if (low(x)) {
    auto *xs = ptr<uint16_t>(x), *o = ptr<uint16_t>(out);
    in_spans(x.numel(), [=](int64_t at, int64_t n) { masked_scale_span(xs + at, k + at, o + at, s, n); });
  } else {
    auto *xs = ptr<float>(x), *o = ptr<float>(out);
    in_spans(x.numel(), [=](int64_t at, int64_t n) { masked_scale_span(xs + at, k + at, o + at, s, n); });
  }
  return out;
}

void masked_add_(at::Tensor out, at::Tensor y, at::Tensor keep) {
  auto* k = reinterpret_cast<const uint8_t*>(keep.data_ptr());
  if (low(out)) {
    auto *o = ptr<uint16_t>(out), *ys = ptr<uint16_t>(y);
    in_spans(out.numel(), [=](int64_t at, int64_t n) { masked_add_span(o + at, ys + at, k + at, n); });
  } else {
    auto *o = ptr<float>(out), *ys = ptr<float>(y);
    in_spans(out.numel(), [=](int64_t at, int64_t n) { masked_add_span(o + at, ys + at, k + at, n); });
  }
}

// element i kept where the 16-bit lane i % 4 of mix64(seed + (i / 4) · golden), read as a signed
// integer, is at least dropped - 2^15 (the fallback's comparison; P(keep) = 1 - dropped / 2^16)
at::Tensor keep_bits(int64_t count, int64_t seed, int64_t dropped) {
  auto keep = at::empty({count}, at::TensorOptions().dtype(at::kBool));
  auto* out = reinterpret_cast<uint8_t*>(keep.data_ptr());
  const uint64_t base = uint64_t(seed);
  const int16_t threshold = int16_t(dropped - 32768);
  const int64_t words = count / 4;
  at::parallel_for(0, words, 16384, [=](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint64_t z = mix64(base + uint64_t(w) * kGolden);
      for (int lane = 0; lane < 4; ++lane) out[4 * w + lane] = int16_t(uint16_t(z >> (16 * lane))) >= threshold;
    }
  });
  if (count % 4) {
    const uint64_t z = mix64(base + uint64_t(words) * kGolden);
    for (int64_t i = 4 * words; i < count; ++i) out[i] = int16_t(uint16_t(z >> (16 * (i - 4 * words)))) >= threshold;
  }
  return keep;
}

// h = silu(gate)·up recomputed into ``h``, and the gradients written into ``d_gate``, ``d_up``
// (each row-strided; d_gate and d_up may be column blocks of the stacked gradient matrix)
void silu_mul_backward_into(at::Tensor d_h, at::Tensor gate, at::Tensor up, at::Tensor h, at::Tensor d_gate, at::Tensor d_up) {
  const int64_t rows = gate.size(0), width = gate.size(1);
  const int64_t ds = d_h.stride(0), gs = gate.stride(0), us = up.stride(0), hs = h.stride(0), dgs = d_gate.stride(0), dus = d_up.stride(0);
  if (low(gate)) {
    auto *d = ptr<uint16_t>(d_h), *g = ptr<uint16_t>(gate), *u = ptr<uint16_t>(up), *ho = ptr<uint16_t>(h), *dg = ptr<uint16_t>(d_gate), *du = ptr<uint16_t>(d_up);
    in_rows(rows, width, [=](int64_t r) { silu_mul_backward_span(d + r * ds, g + r * gs, u + r * us, ho + r * hs, dg + r * dgs, du + r * dus, width); });
  } else {
    auto *d = ptr<float>(d_h), *g = ptr<float>(gate), *u = ptr<float>(up), *ho = ptr<float>(h), *dg = ptr<float>(d_gate), *du = ptr<float>(d_up);
    in_rows(rows, width, [=](int64_t r) { silu_mul_backward_span(d + r * ds, g + r * gs, u + r * us, ho + r * hs, dg + r * dgs, du + r * dus, width); });
  }
}

std::vector<at::Tensor> silu_mul_backward(at::Tensor d_h, at::Tensor gate, at::Tensor up) {
  auto h = at::empty({gate.size(0), gate.size(1)}, gate.options()), d_gate = at::empty_like(h), d_up = at::empty_like(h);
  silu_mul_backward_into(d_h, gate, up, h, d_gate, d_up);
  return {h, d_gate, d_up};
}
"""

_FUNCTIONS = ["rms_norm_forward", "rms_norm_backward", "rope_forward", "rope_backward", "silu_mul", "silu_mul_backward",
              "silu_mul_backward_into", "keep_bits", "masked_scale", "masked_add_"]


@functools.cache
def block_kernels() -> ModuleType | None:
    """The compiled kernels (built on first use in this machine's cache), or None if they cannot be built."""
    return build_extension("tunelab_block", _SOURCE, _FUNCTIONS, "fused block kernels",
                           "fused blocks use PyTorch's operators for norms, RoPE and the MLP's activation")


_FLOATS = (torch.float32, torch.bfloat16)


def _takes(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels, when every tensor is a contiguous CPU fp32/bf16 tensor; else None."""
    if not all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _FLOATS for t in tensors):
        return None
    return block_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm of the ``[tokens, width]`` ``x`` (``weight · (x / rms(x))`` in fp32, rounded
    to ``x``'s dtype before the weight), in ``dtype``, and the reciprocal RMS ``[tokens, 1]``."""
    kernels = _takes(x, weight) if x.dtype == torch.float32 and dtype in _FLOATS else None
    if kernels is not None:
        out, r = kernels.rms_norm_forward(x, weight, eps, dtype == torch.bfloat16)
        return out, r
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (xf * r).to(x.dtype)).to(dtype), r


def rms_norm_backward(d_y: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, d_residual: torch.Tensor) -> torch.Tensor:
    """``d_residual`` plus ``rms_norm``'s input gradient ``r (g - x̂ · mean(g x̂))``, ``g = d_y · weight``, ``x̂ = x r``."""
    kernels = _takes(d_y, x, weight, d_residual) if x.dtype == d_residual.dtype == torch.float32 else None
    if kernels is not None:
        return kernels.rms_norm_backward(d_y, x, r, weight, d_residual)
    g = d_y.float() * weight  # in fp32, as autograd multiplies the widened gradient by the weight
    xhat = x.float() * r
    return d_residual + (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` on ``[tokens, heads, dim]`` with ``[tokens, dim]`` fp32 angles, in fp32."""
    kernels = _takes(x, cos, sin) if cos.dtype == sin.dtype == torch.float32 else None
    if kernels is not None:
        return kernels.rope_forward(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def rope_backward(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rope``'s input gradient in ``dtype`` from ``d`` (fp32 or bf16), computed in fp32: ``d cos + rotate_halfᵀ(d sin)``, where ``rotate_halfᵀ(y) = (y₂, -y₁)``."""
    kernels = _takes(d, cos, sin) if cos.dtype == sin.dtype == torch.float32 and dtype in _FLOATS else None
    if kernels is not None:
        return kernels.rope_backward(d, cos, sin, dtype == torch.bfloat16)
    d = d.float()
    first, second = (d * sin.unsqueeze(1)).chunk(2, dim=-1)
    return (d * cos.unsqueeze(1) + torch.cat((second, -first), dim=-1)).to(dtype)


def _takes_rows(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels, when every tensor is a 2-D CPU fp32/bf16 matrix of one dtype whose rows are
    contiguous (rows may lie any distance apart: column blocks of a wider matrix); else None."""
    if not all(t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1 and t.dtype == tensors[0].dtype for t in tensors):
        return None
    return block_kernels() if tensors[0].dtype in _FLOATS and tensors[0].shape == tensors[-1].shape else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up``, the activation rounded to the inputs' dtype before the product (a new
    contiguous tensor; ``[tokens, width]`` inputs may be column blocks of a wider matrix)."""
    kernels = _takes_rows(gate, up)
    if kernels is not None:
        return kernels.silu_mul(gate, up)
    return F.silu(gate) * up


def silu_mul_backward(d_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, d_gate, d_up)`` for ``h = silu(gate) · up`` and its gradient ``d_h``: the product
    recomputed, ``d_up = d_h · silu(gate)``, ``d_gate = silu'(gate) · (d_h · up)``. With ``out``,
    ``d_gate`` and ``d_up`` are written into those two (column blocks of the stacked gradient
    matrix, ``stacked_projections``) and returned."""
    if out is not None:
        kernels = _takes_rows(d_h, gate, up, *out)
        if kernels is not None:
            h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
            kernels.silu_mul_backward_into(d_h, gate, up, h, *out)
            return h, out[0], out[1]
        h, d_gate, d_up = silu_mul_backward(d_h, gate, up)
        return h, out[0].copy_(d_gate), out[1].copy_(d_up)
    kernels = _takes_rows(d_h, gate, up)
    if kernels is not None:
        h, d_gate, d_up = kernels.silu_mul_backward(d_h, gate, up)
        return h, d_gate, d_up
    act = F.silu(gate)
    return act * up, torch.ops.aten.silu_backward(d_h * up, gate), d_h * act


def _signed(word: int) -> int:
    """A 64-bit word as the int64 value with the same bits (PyTorch's integers are signed)."""
    return word - 2**64 if word >= 2**63 else word


_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``z >> bits`` as on unsigned words (PyTorch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keep_bits(count: int, seed: int, dropped: int, device: torch.device) -> torch.Tensor:
    """``count`` booleans, element ``i`` True where the 16-bit lane ``i % 4`` of
    ``mix64(seed + (i // 4) · golden)`` (splitmix64's output function of a counter), read as a
    signed integer, is at least ``dropped - 2¹⁵``: each False with probability ``dropped / 2¹⁶``. One pass in the
    kernel; the fallback computes the same words with wrapping int64 arithmetic."""
    kernels = block_kernels() if device.type == "cpu" else None
    if kernels is not None:
        return kernels.keep_bits(count, seed, dropped)
    z = torch.arange((count + 3) // 4, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(seed)
    for shift, factor in zip((30, 27), _MIX):
        z = (z ^ _shift_right(z, shift)) * factor
    z = z ^ _shift_right(z, 31)
    return z.view(torch.int16)[:count] >= dropped - 2**15  # lanes read as signed: shift the threshold with them


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x · scale`` where ``keep`` (booleans of ``x``'s shape), 0 elsewhere, rounded once: a dropout's
    output (PyTorch's ``where`` took ~195 µs for a bf16 ``[368, 576]``, ~5x a pass over it)."""
    kernels = _takes(x) if keep.dtype == torch.bool and keep.is_contiguous() and keep.shape == x.shape else None
    if kernels is not None:
        return kernels.masked_scale(x, keep, scale)
    out = torch.where(keep, x, 0)
    return out.mul_(scale) if scale != 1.0 else out


def masked_add_(out: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``out += y`` where ``keep``, in place: the input gradient's share from a dropped adapter input."""
    kernels = _takes(out, y) if keep.dtype == torch.bool and keep.is_contiguous() and out.dtype == y.dtype and out.shape == y.shape == keep.shape else None
    if kernels is not None:
        kernels.masked_add_(out, y, keep)
        return out
    return out.add_(torch.where(keep, y, 0))
