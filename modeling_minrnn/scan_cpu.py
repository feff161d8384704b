"""Native CPU backend for the linear recurrence ``h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)``.

A small C++ kernel, compiled on first use with ``torch.utils.cpp_extension.load_inline`` into a folder of its own
under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), named by a hash of the source, the flags,
the torch build and installation, and the compiler: several virtualenvs and torch versions keep their own builds
and never rebuild each other's. A build is announced in one log line before and one after; a cached build loads
silently with ``torch.ops.load_library``. ``python -m modeling_minrnn.build_kernel`` builds it ahead. The source
lives in this file as a string so that the package stays flat ``.py`` files, which transformers copies as remote code.

The kernels are ``torch.library`` custom operators (fake kernels for shapes, registered autograd), so
``torch.compile(fullgraph=True)`` keeps them in its graph.

Forward and backward are each one fused pass over time, parallel over
(batch x blocks of channels), with ``exp`` computed inline in a loop the compiler
vectorises, so the cost stays near that of a few elementwise passes (memory bound).

Public surface: :func:`cpu_scan_available`, :func:`cpu_scan` and :func:`cpu_cell_scan` (a whole minGRU/minLSTM
cell fused: gates computed inline from the input projections, forward and backward), :func:`load_kernel`,
:func:`unavailable_reason` and :func:`library_path`. Set ``MINRNN_DISABLE_CPU_EXT=1`` to force the PyTorch backends.
"""

import hashlib
import logging as pylogging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings

import torch
from torch import Tensor
from transformers.utils import logging

from .cells import CELLS

logger = logging.get_logger(__name__)

_DISABLE_ENV = "MINRNN_DISABLE_CPU_EXT"

# `{namespace}` is replaced by a name unique to this source, flags and torch version, so
# that two versions of this file (the package and a remote-code copy) never collide.
_CPP_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <string_view>
#include <tuple>

namespace {

// One build per instruction set; the dynamic loader picks the widest the CPU has, so a
// cached build stays valid on any x86-64 machine that shares the cache directory.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    (!defined(__clang__) || __clang_major__ >= 14)
#define MINRNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MINRNN_CLONES
#endif

// Channels per task, at most: whole rows are read as contiguous streams (a slice of each
// row measured 2x slower), and the backward's carried state (4 KiB) stays in L1.
constexpr int64_t kMaxWidth = 1024;
// A task never shares a cache line it writes with another task (16 floats = 64 bytes).
constexpr int64_t kLine = 16;

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) in fp32 written so the loop around it vectorises (std::exp is an opaque libm
// call). Cody-Waite reduction to r in [-ln2/2, ln2/2] and the Cephes degree-6
// polynomial: ~1 ulp, like libm. Clamping to [-104, 89] keeps 2^n finite; the scale is
// applied in two halves so that subnormal results and overflow to inf round as IEEE
// would, exp(-inf) (padding) is exactly 0, and NaN propagates through the polynomial.
__attribute__((always_inline)) inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound rounds x to an integer
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const int32_t ni = float_to_bits(shifted) - float_to_bits(kRound);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t half = ni >> 1;
  return p * bits_to_float((half + 127) << 23) * bits_to_float((ni - half + 127) << 23);
}

// noinline keeps each time step its own loop: GCC otherwise unrolls-and-jams the time
// loop into the channel loop, which measured 2x slower.
#define MINRNN_STEP MINRNN_CLONES __attribute__((noinline))

// h = exp(log_a) * h_prev + exp(log_b) over one time step of `width` channels.
MINRNN_STEP
void forward_step(const float* __restrict log_a, const float* __restrict log_b,
                  const float* __restrict h_prev, float* __restrict h, int64_t width) {
  for (int64_t d = 0; d < width; ++d) {
    h[d] = exp_f32(log_a[d]) * h_prev[d] + exp_f32(log_b[d]);
  }
}

// One step of the adjoint recurrence dh_t = g_t + a_{t+1} dh_{t+1}: `carry` holds
// a_{t+1} dh_{t+1} on entry and a_t dh_t on exit.
MINRNN_STEP
void backward_step(const float* __restrict log_a, const float* __restrict log_b,
                   const float* __restrict h_prev, const float* __restrict grad_h,
                   float* __restrict carry, float* __restrict grad_log_a,
                   float* __restrict grad_log_b, int64_t width) {
  // Cache lines in descending order, like the time loop around this: each tensor is then
  // one backward stream for the prefetcher (ascending lines measured up to 3x slower).
  for (int64_t d0 = (width - 1) / kLine * kLine; d0 >= 0; d0 -= kLine) {
    const int64_t d1 = std::min(d0 + kLine, width);
    for (int64_t d = d0; d < d1; ++d) {
      const float dh = grad_h[d] + carry[d];
      const float a = exp_f32(log_a[d]);
      grad_log_a[d] = dh * a * h_prev[d];
      grad_log_b[d] = dh * exp_f32(log_b[d]);
      carry[d] = a * dh;
    }
  }
}

// A sequence start (reset[t], reset may be null) reads a zero state instead of h_{t-1}:
// h_t = a_t * 0 + b_t, exactly as the reference's a = 0, and the step kernels stay as they are.
struct Resets {
  const bool* reset;  // (seq,) of this row, or null
  float zeros[kMaxWidth];
  explicit Resets(const bool* r, int64_t width) : reset(r) {
    if (reset != nullptr) std::fill(zeros, zeros + width, 0.0f);
  }
  bool at(int64_t t) const { return reset != nullptr && reset[t]; }
  const float* prev(int64_t t, const float* h, const float* h0, int64_t dim) const {
    return at(t) ? zeros : t > 0 ? h + (t - 1) * dim : h0;
  }
};

// One (batch, channel block) task. Pointers are at (t = 0, first channel of the block);
// rows are `dim` apart.
void forward_block(const float* log_a, const float* log_b, const bool* reset, const float* h0,
                   float* h, int64_t seq, int64_t dim, int64_t width) {
  const Resets resets(reset, width);
  for (int64_t t = 0; t < seq; ++t) {
    const int64_t o = t * dim;
    forward_step(log_a + o, log_b + o, resets.prev(t, h, h0, dim), h + o, width);
  }
}

// After a sequence start nothing flows further back: the carry (a_t dh_t) restarts at 0.
void backward_block(const float* log_a, const float* log_b, const bool* reset, const float* h0,
                    const float* h, const float* grad_h, float* grad_log_a, float* grad_log_b,
                    float* grad_h0, int64_t seq, int64_t dim, int64_t width) {
  const Resets resets(reset, width);
  float carry[kMaxWidth];
  std::fill(carry, carry + width, 0.0f);
  for (int64_t t = seq - 1; t >= 0; --t) {
    const int64_t o = t * dim;
    backward_step(log_a + o, log_b + o, resets.prev(t, h, h0, dim), grad_h + o, carry,
                  grad_log_a + o, grad_log_b + o, width);
    if (resets.at(t)) std::fill(carry, carry + width, 0.0f);
  }
  std::copy(carry, carry + width, grad_h0);
}

// ---- Fused cells: from the input projections straight to the states. ----
// The gates are recomputed in linear space from a few exp(y) with y <= 0, so nothing
// overflows for any finite projection, and backward recomputes them instead of saving.

// sigmoid(x) and sigmoid(-x) from one exp(-|x|) <= 1: the smaller of the two keeps full
// relative precision (1 - sigmoid would round it to 0 for |x| > ~17).
__attribute__((always_inline)) inline void sigmoid_pair(float x, float& pos, float& neg) {
  const float e = exp_f32(-std::fabs(x));
  const float big = 1.0f / (1.0f + e);
  const float small = e * big;
  pos = x >= 0.0f ? big : small;
  neg = x >= 0.0f ? small : big;
}

// The paper's g(x) = x + 0.5 if x >= 0 else sigmoid(x), and g'(x) in `grad`.
__attribute__((always_inline)) inline float g_f32(float x, float& grad) {
  const float e = exp_f32(-std::fabs(x));  // exp(x) on the branch that uses it
  const float inv = 1.0f / (1.0f + e);
  grad = x >= 0.0f ? 1.0f : e * inv * inv;
  return x >= 0.0f ? x + 0.5f : e * inv;
}

// minLSTM's normalised gates f' = s(f) / (s(f) + s(i)), i' = s(i) / (s(f) + s(i)) (s is
// sigmoid), and s(-f), s(-i) for the backward. Multiplying through by
// (1 + e^-f)(1 + e^-i) e^-m with m = max(0, -f, -i) leaves only exp of non-positive
// numbers, one of them exp(0) = 1 in the denominator, so saturated gates never give 0/0.
struct LstmGates {
  float f, i, sig_neg_f, sig_neg_i;
};

__attribute__((always_inline)) inline LstmGates minlstm_gates(float f, float i) {
  const float m = std::max(0.0f, std::max(-f, -i));
  const float e0 = exp_f32(-m);
  const float ef = exp_f32(-f - m);
  const float ei = exp_f32(-i - m);
  const float inv = 1.0f / (2.0f * e0 + ef + ei);
  return {(e0 + ei) * inv, (e0 + ef) * inv, ef / (e0 + ef), ei / (e0 + ei)};
}

// h = a h_prev + b with minGRU's a = s(-k), b = s(k) g(h~).
MINRNN_STEP
void mingru_forward_step(const float* __restrict k, const float* __restrict h_tilde,
                         const float* __restrict h_prev, float* __restrict h, int64_t width) {
  for (int64_t d = 0; d < width; ++d) {
    float z, a, unused;
    sigmoid_pair(k[d], z, a);
    h[d] = a * h_prev[d] + z * g_f32(h_tilde[d], unused);
  }
}

// h = a h_prev + b with minLSTM's a = f', b = i' g(h~).
MINRNN_STEP
void minlstm_forward_step(const float* __restrict f, const float* __restrict i,
                          const float* __restrict h_tilde, const float* __restrict h_prev,
                          float* __restrict h, int64_t width) {
  for (int64_t d = 0; d < width; ++d) {
    float unused;
    const LstmGates gates = minlstm_gates(f[d], i[d]);
    h[d] = gates.f * h_prev[d] + gates.i * g_f32(h_tilde[d], unused);
  }
}

// Adjoint step (see backward_step) chained through minGRU's gates:
// dk = s(k) s(-k) dh (g - h_prev), dh~ = dh s(k) g'.
MINRNN_STEP
void mingru_backward_step(const float* __restrict k, const float* __restrict h_tilde,
                          const float* __restrict h_prev, const float* __restrict grad_h,
                          float* __restrict carry, float* __restrict grad_k,
                          float* __restrict grad_h_tilde, int64_t width) {
  for (int64_t d0 = (width - 1) / kLine * kLine; d0 >= 0; d0 -= kLine) {
    const int64_t d1 = std::min(d0 + kLine, width);
    for (int64_t d = d0; d < d1; ++d) {
      const float dh = grad_h[d] + carry[d];
      float z, a, dg;
      sigmoid_pair(k[d], z, a);
      const float g = g_f32(h_tilde[d], dg);
      grad_k[d] = z * a * dh * (g - h_prev[d]);
      grad_h_tilde[d] = dh * z * dg;
      carry[d] = a * dh;
    }
  }
}

// Adjoint step chained through minLSTM's gates: with c = f' i' dh (h_prev - g),
// df = c s(-f), di = -c s(-i), dh~ = dh i' g'.
MINRNN_STEP
void minlstm_backward_step(const float* __restrict f, const float* __restrict i,
                           const float* __restrict h_tilde, const float* __restrict h_prev,
                           const float* __restrict grad_h, float* __restrict carry,
                           float* __restrict grad_f, float* __restrict grad_i,
                           float* __restrict grad_h_tilde, int64_t width) {
  for (int64_t d0 = (width - 1) / kLine * kLine; d0 >= 0; d0 -= kLine) {
    const int64_t d1 = std::min(d0 + kLine, width);
    for (int64_t d = d0; d < d1; ++d) {
      const float dh = grad_h[d] + carry[d];
      float dg;
      const LstmGates gates = minlstm_gates(f[d], i[d]);
      const float g = g_f32(h_tilde[d], dg);
      const float c = gates.f * gates.i * dh * (h_prev[d] - g);
      grad_f[d] = c * gates.sig_neg_f;
      grad_i[d] = -c * gates.sig_neg_i;
      grad_h_tilde[d] = dh * gates.i * dg;
      carry[d] = gates.f * dh;
    }
  }
}

// One (batch, channel block) task of a cell: `step(t, h_prev, h_t)` runs the cell's step
// at a real token (from a zero state at a sequence start); a padded one (keep[t] false)
// passes the state through (a = 1, b = 0), sequence start or not.
template <typename Step>
void cell_forward_block(const bool* keep, const bool* reset, const float* h0, float* h,
                        int64_t seq, int64_t dim, int64_t width, const Step& step) {
  const Resets resets(reset, width);
  for (int64_t t = 0; t < seq; ++t) {
    if (keep == nullptr || keep[t]) {
      step(t, resets.prev(t, h, h0, dim), h + t * dim);
    } else {
      const float* h_prev = t > 0 ? h + (t - 1) * dim : h0;
      std::copy(h_prev, h_prev + width, h + t * dim);
    }
  }
}

// `step(t, h_prev, carry)` runs the cell's adjoint step; `zero_grads(t)` clears the
// projections' gradient at a padded token, where the carry just takes in grad_h.
template <typename Step, typename ZeroGrads>
void cell_backward_block(const bool* keep, const bool* reset, const float* h0, const float* h,
                         const float* grad_h, float* grad_h0, int64_t seq, int64_t dim,
                         int64_t width, const Step& step, const ZeroGrads& zero_grads) {
  const Resets resets(reset, width);
  float carry[kMaxWidth];
  std::fill(carry, carry + width, 0.0f);
  for (int64_t t = seq - 1; t >= 0; --t) {
    if (keep == nullptr || keep[t]) {
      step(t, resets.prev(t, h, h0, dim), carry);
      if (resets.at(t)) std::fill(carry, carry + width, 0.0f);
    } else {
      const float* g = grad_h + t * dim;
      for (int64_t d = 0; d < width; ++d) carry[d] += g[d];
      zero_grads(t);
    }
  }
  std::copy(carry, carry + width, grad_h0);
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// Runs fn(batch_index, first_channel, width) over all (batch, channel block) tasks. Rows
// are split into as few blocks as keep every thread equally busy: the task count is a
// multiple of the thread count, e.g. batch 8 on 2 threads runs whole rows.
template <typename Fn>
void for_each_block(int64_t batch, int64_t dim, const Fn& fn) {
  if (batch == 0 || dim == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t balanced = threads / std::gcd(batch, threads);
  int64_t per_row = std::max((dim + kMaxWidth - 1) / kMaxWidth,
                             std::min(balanced, (dim + kLine - 1) / kLine));
  int64_t width = (dim + per_row - 1) / per_row;
  width = (width + kLine - 1) / kLine * kLine;
  per_row = (dim + width - 1) / width;
  at::parallel_for(0, batch * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t d0 = (i % per_row) * width;
      fn(i / per_row, d0, std::min(width, dim - d0));
    }
  });
}

at::Tensor initial_or_zeros(const std::optional<at::Tensor>& initial_state, int64_t batch,
                            int64_t dim, const at::TensorOptions& options) {
  if (initial_state.has_value()) {
    check_input(*initial_state, "initial_state");
    TORCH_CHECK(initial_state->dim() == 2 && initial_state->size(0) == batch &&
                    initial_state->size(1) == dim,
                "initial_state must have shape (batch, dim)");
    return *initial_state;
  }
  return at::zeros({batch, dim}, options);
}

// A (batch, seq) bool mask as a pointer, or null when absent.
const bool* mask_or_null(const std::optional<at::Tensor>& mask, const at::Tensor& like,
                         const char* name) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool &&
                  mask->is_contiguous() && mask->dim() == 2 && mask->size(0) == like.size(0) &&
                  mask->size(1) == like.size(1),
              name, " must be a contiguous bool CPU tensor of shape (batch, seq)");
  return mask->data_ptr<bool>();
}

at::Tensor scan_forward(const at::Tensor& log_a, const at::Tensor& log_b,
                        const std::optional<at::Tensor>& initial_state,
                        const std::optional<at::Tensor>& reset) {
  check_input(log_a, "log_a");
  check_input(log_b, "log_b");
  TORCH_CHECK(log_a.dim() == 3 && log_a.sizes() == log_b.sizes(),
              "log_a and log_b must have the same shape (batch, seq, dim)");
  const at::Tensor h0 =
      initial_or_zeros(initial_state, log_a.size(0), log_a.size(2), log_a.options());
  const bool* rp = mask_or_null(reset, log_a, "reset");
  at::Tensor h = at::empty_like(log_a);
  const int64_t seq = log_a.size(1), dim = log_a.size(2);
  const float* la = log_a.data_ptr<float>();
  const float* lb = log_b.data_ptr<float>();
  const float* h0p = h0.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  for_each_block(log_a.size(0), dim, [&](int64_t b, int64_t d0, int64_t width) {
    const int64_t o = b * seq * dim + d0;
    forward_block(la + o, lb + o, rp == nullptr ? nullptr : rp + b * seq, h0p + b * dim + d0,
                  hp + o, seq, dim, width);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_backward(
    const at::Tensor& log_a, const at::Tensor& log_b,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset,
    const at::Tensor& h, const at::Tensor& grad_h) {
  check_input(log_a, "log_a");
  check_input(log_b, "log_b");
  check_input(h, "h");
  check_input(grad_h, "grad_h");
  TORCH_CHECK(log_a.dim() == 3 && log_a.sizes() == log_b.sizes() &&
                  log_a.sizes() == h.sizes() && log_a.sizes() == grad_h.sizes(),
              "log_a, log_b, h and grad_h must have the same shape (batch, seq, dim)");
  const at::Tensor h0 =
      initial_or_zeros(initial_state, log_a.size(0), log_a.size(2), log_a.options());
  const bool* rp = mask_or_null(reset, log_a, "reset");
  at::Tensor grad_log_a = at::empty_like(log_a);
  at::Tensor grad_log_b = at::empty_like(log_b);
  at::Tensor grad_h0 = at::empty_like(h0);
  const int64_t seq = log_a.size(1), dim = log_a.size(2);
  const float* la = log_a.data_ptr<float>();
  const float* lb = log_b.data_ptr<float>();
  const float* h0p = h0.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* gp = grad_h.data_ptr<float>();
  float* gla = grad_log_a.data_ptr<float>();
  float* glb = grad_log_b.data_ptr<float>();
  float* gh0 = grad_h0.data_ptr<float>();
  for_each_block(log_a.size(0), dim, [&](int64_t b, int64_t d0, int64_t width) {
    const int64_t o = b * seq * dim + d0;
    const int64_t s = b * dim + d0;
    backward_block(la + o, lb + o, rp == nullptr ? nullptr : rp + b * seq, h0p + s, hp + o,
                   gp + o, gla + o, glb + o, gh0 + s, seq, dim, width);
  });
  return {grad_log_a, grad_log_b, grad_h0};
}

// Number of projections per channel (k, h~ or f, i, h~).
int64_t cell_projections(std::string_view cell_type) {
  TORCH_CHECK(cell_type == "mingru" || cell_type == "minlstm",
              "cell_type must be 'mingru' or 'minlstm', got '", cell_type, "'");
  return cell_type == "mingru" ? 2 : 3;
}

// Checks `projections` (batch, seq, n * dim) and returns dim.
int64_t cell_dim(const at::Tensor& projections, int64_t n) {
  check_input(projections, "projections");
  TORCH_CHECK(projections.dim() == 3 && projections.size(2) % n == 0,
              "projections must have shape (batch, seq, ", n, " * dim)");
  return projections.size(2) / n;
}

at::Tensor cell_forward(std::string_view cell_type, const at::Tensor& projections,
                        const std::optional<at::Tensor>& padding_mask,
                        const std::optional<at::Tensor>& initial_state,
                        const std::optional<at::Tensor>& reset) {
  const int64_t n = cell_projections(cell_type);
  const int64_t dim = cell_dim(projections, n);
  const int64_t batch = projections.size(0), seq = projections.size(1);
  const bool* keep = mask_or_null(padding_mask, projections, "padding_mask");
  const bool* rp = mask_or_null(reset, projections, "reset");
  const at::Tensor h0 = initial_or_zeros(initial_state, batch, dim, projections.options());
  at::Tensor h = at::empty({batch, seq, dim}, projections.options());
  const float* pp = projections.data_ptr<float>();
  const float* h0p = h0.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  for_each_block(batch, dim, [&](int64_t b, int64_t d0, int64_t width) {
    const float* p = pp + b * seq * n * dim + d0;
    const bool* kb = keep == nullptr ? nullptr : keep + b * seq;
    const bool* rb = rp == nullptr ? nullptr : rp + b * seq;
    float* hb = hp + b * seq * dim + d0;
    const float* h0b = h0p + b * dim + d0;
    if (n == 2) {
      cell_forward_block(kb, rb, h0b, hb, seq, dim, width,
                         [&](int64_t t, const float* h_prev, float* h_t) {
                           const float* row = p + t * n * dim;
                           mingru_forward_step(row, row + dim, h_prev, h_t, width);
                         });
    } else {
      cell_forward_block(kb, rb, h0b, hb, seq, dim, width,
                         [&](int64_t t, const float* h_prev, float* h_t) {
                           const float* row = p + t * n * dim;
                           minlstm_forward_step(row, row + dim, row + 2 * dim, h_prev, h_t,
                                                width);
                         });
    }
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> cell_backward(std::string_view cell_type,
                                                 const at::Tensor& projections,
                                                 const std::optional<at::Tensor>& padding_mask,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& reset,
                                                 const at::Tensor& h, const at::Tensor& grad_h) {
  const int64_t n = cell_projections(cell_type);
  const int64_t dim = cell_dim(projections, n);
  const int64_t batch = projections.size(0), seq = projections.size(1);
  check_input(h, "h");
  check_input(grad_h, "grad_h");
  TORCH_CHECK(h.sizes() == grad_h.sizes() && h.dim() == 3 && h.size(0) == batch &&
                  h.size(1) == seq && h.size(2) == dim,
              "h and grad_h must have shape (batch, seq, dim)");
  const bool* keep = mask_or_null(padding_mask, projections, "padding_mask");
  const bool* rp = mask_or_null(reset, projections, "reset");
  const at::Tensor h0 = initial_or_zeros(initial_state, batch, dim, projections.options());
  at::Tensor grad_projections = at::empty_like(projections);
  at::Tensor grad_h0 = at::empty_like(h0);
  const float* pp = projections.data_ptr<float>();
  const float* h0p = h0.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* gp = grad_h.data_ptr<float>();
  float* gpp = grad_projections.data_ptr<float>();
  float* gh0 = grad_h0.data_ptr<float>();
  for_each_block(batch, dim, [&](int64_t b, int64_t d0, int64_t width) {
    const int64_t o = b * seq * dim + d0;
    const float* p = pp + b * seq * n * dim + d0;
    float* gproj = gpp + b * seq * n * dim + d0;
    const bool* kb = keep == nullptr ? nullptr : keep + b * seq;
    const bool* rb = rp == nullptr ? nullptr : rp + b * seq;
    const auto zero_grads = [&](int64_t t) {
      for (int64_t c = 0; c < n; ++c) {
        float* row = gproj + t * n * dim + c * dim;
        std::fill(row, row + width, 0.0f);
      }
    };
    if (n == 2) {
      cell_backward_block(
          kb, rb, h0p + b * dim + d0, hp + o, gp + o, gh0 + b * dim + d0, seq, dim, width,
          [&](int64_t t, const float* h_prev, float* carry) {
            const float* row = p + t * n * dim;
            float* grad_row = gproj + t * n * dim;
            mingru_backward_step(row, row + dim, h_prev, gp + o + t * dim, carry, grad_row,
                                 grad_row + dim, width);
          },
          zero_grads);
    } else {
      cell_backward_block(
          kb, rb, h0p + b * dim + d0, hp + o, gp + o, gh0 + b * dim + d0, seq, dim, width,
          [&](int64_t t, const float* h_prev, float* carry) {
            const float* row = p + t * n * dim;
            float* grad_row = gproj + t * n * dim;
            minlstm_backward_step(row, row + dim, row + 2 * dim, h_prev, gp + o + t * dim,
                                  carry, grad_row, grad_row + dim, grad_row + 2 * dim, width);
          },
          zero_grads);
    }
  });
  return {grad_projections, grad_h0};
}

// Shapes only, so that torch.compile can trace through the autograd.Function.
at::Tensor scan_forward_meta(const at::Tensor& log_a, const at::Tensor& log_b,
                             const std::optional<at::Tensor>& initial_state,
                             const std::optional<at::Tensor>& reset) {
  return at::empty_like(log_a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_backward_meta(
    const at::Tensor& log_a, const at::Tensor& log_b,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& reset,
    const at::Tensor& h, const at::Tensor& grad_h) {
  return {at::empty_like(log_a), at::empty_like(log_b),
          at::empty({log_a.size(0), log_a.size(2)}, log_a.options())};
}

at::Tensor cell_forward_meta(std::string_view cell_type, const at::Tensor& projections,
                             const std::optional<at::Tensor>& padding_mask,
                             const std::optional<at::Tensor>& initial_state,
                             const std::optional<at::Tensor>& reset) {
  const int64_t dim = projections.size(2) / cell_projections(cell_type);
  return at::empty({projections.size(0), projections.size(1), dim}, projections.options());
}

std::tuple<at::Tensor, at::Tensor> cell_backward_meta(
    std::string_view cell_type, const at::Tensor& projections,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& reset, const at::Tensor& h, const at::Tensor& grad_h) {
  const int64_t dim = projections.size(2) / cell_projections(cell_type);
  return {at::empty_like(projections), at::empty({projections.size(0), dim}, projections.options())};
}

}  // namespace

TORCH_LIBRARY({namespace}, m) {
  m.def("forward(Tensor log_a, Tensor log_b, Tensor? initial_state, Tensor? reset) -> Tensor");
  m.def("backward(Tensor log_a, Tensor log_b, Tensor? initial_state, Tensor? reset, Tensor h, "
        "Tensor grad_h) -> (Tensor, Tensor, Tensor)");
  m.def("cell_forward(str cell_type, Tensor projections, Tensor? padding_mask, "
        "Tensor? initial_state, Tensor? reset) -> Tensor");
  m.def("cell_backward(str cell_type, Tensor projections, Tensor? padding_mask, "
        "Tensor? initial_state, Tensor? reset, Tensor h, Tensor grad_h) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL({namespace}, CPU, m) {
  m.impl("forward", &scan_forward);
  m.impl("backward", &scan_backward);
  m.impl("cell_forward", &cell_forward);
  m.impl("cell_backward", &cell_backward);
}

TORCH_LIBRARY_IMPL({namespace}, Meta, m) {
  m.impl("forward", &scan_forward_meta);
  m.impl("backward", &scan_backward_meta);
  m.impl("cell_forward", &cell_forward_meta);
  m.impl("cell_backward", &cell_backward_meta);
}
"""

# at::parallel_for is an inline OpenMP region in torch's headers: without -fopenmp it
# would run on one thread. The extension then shares torch's own libgomp (same soname).
# -fno-trapping-math lets the compiler turn the clamps in exp_f32 into vector selects (it
# only drops the assumption that FP exceptions trap, which torch never enables).
_CFLAGS = ["-O3", "-fno-trapping-math"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
_LDFLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
# torch.utils.cpp_extension's suffix; that module (and the setuptools it imports) is only needed to build.
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"
_CELL_PROJECTIONS = {cell_type: cell.projections for cell_type, cell in CELLS.items()}
_INSTALL_HINT = (
    "install a C++ compiler and ninja (e.g. `apt install g++` and `pip install ninja`) and run "
    f"`python -m modeling_minrnn.build_kernel` to see the full error, or set {_DISABLE_ENV}=1"
)


def _compiler() -> str:
    """The C++ compiler torch's build would run (``CXX``, else ``c++``), as a resolved path when it is on PATH."""
    name = os.environ.get("CXX") or "c++"
    return shutil.which(name) or name


def _extension_name() -> str:
    """The build's cache key: the kernel source and flags, the torch build (version, commit and the installation
    whose headers and libraries it uses) and the compiler. Two virtualenvs with their own torch get a build each and
    never rebuild each other's; virtualenvs sharing one torch installation share one build."""
    key = "\n".join([_CPP_SOURCE, *_CFLAGS, *_LDFLAGS, torch.__version__, str(torch.version.git_version),
                     os.path.dirname(os.path.realpath(torch.__file__)), _compiler()])
    return "minrnn_scan_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_directory(name: str) -> str:
    """``TORCH_EXTENSIONS_DIR`` (as torch's own JIT builds use it), else ``~/.cache/torch_extensions``, then a folder
    per build key."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "torch_extensions"
    )
    return os.path.join(root, name)


def library_path() -> str:
    """Where this source's build for this torch installation and compiler lives (or will)."""
    name = _extension_name()
    return os.path.join(_build_directory(name), name + _LIB_EXT)


class KernelUnavailable(RuntimeError):
    """The native CPU scan cannot run in this process; the message says why and what to change."""


_lock = threading.Lock()
_ops = None  # torch.ops.<build key> once loaded
_unavailable = None  # why the build or load failed in this process, once it has (not retried on every forward)


def _build(name: str, directory: str) -> None:
    """Compile with torch's JIT builder into ``directory`` (its lock file there serialises concurrent builds)."""
    from torch.utils.cpp_extension import load_inline

    os.makedirs(directory, exist_ok=True)
    # torch logs its own multi-line compiler warnings; the lines around this call replace them.
    torch_logger = pylogging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(pylogging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_inline(
                name=name,
                cpp_sources=[_CPP_SOURCE.replace("{namespace}", name)],
                # Copies: load_inline appends torch's libraries to the lists it is given.
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=directory,
                is_python_module=False,
                no_implicit_headers=True,
            )
    finally:
        torch_logger.setLevel(level)


def _failure_reason(error: Exception) -> str:
    """The informative line of a build error (torch's message starts with the whole command)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines[1:]:
        if re.search(r"error|not found|no such file", line, re.IGNORECASE):
            return line[:200]
    return lines[0][:200] if lines else type(error).__name__


def load_kernel():
    """The native kernel's ops (``torch.ops.<build key>``): loaded from the cache silently, or built once.

    A build (first use of this source with this torch installation and compiler, ~10-60 s) says so in one line
    before and one after: it is the only silent minute a new user (or a Hub user with ``trust_remote_code``) would
    otherwise meet on the first forward. Raises :class:`KernelUnavailable` when ``MINRNN_DISABLE_CPU_EXT`` is set or
    the build fails; a failure is logged once, remembered for this process and raised again without a new build.
    """
    global _ops, _unavailable
    disabled = os.environ.get(_DISABLE_ENV, "0")
    if disabled not in ("", "0"):
        raise KernelUnavailable(f"{_DISABLE_ENV}={disabled} disables the native CPU scan")
    with _lock:
        if _ops is None and _unavailable is None:
            name = _extension_name()
            directory = _build_directory(name)
            library = os.path.join(directory, name + _LIB_EXT)
            # A library beside a build's lock file may be half-written by another process: build (wait) instead.
            cached = os.path.isfile(library) and not os.path.exists(os.path.join(directory, "lock"))
            start = time.perf_counter()
            try:
                if cached:
                    torch.ops.load_library(library)
                else:
                    # WARNING: the level transformers users see by default (its logging starts at WARNING).
                    logger.warning(
                        "minrnn: compiling the native CPU scan kernel (first use with this torch and compiler, ~30 s; "
                        f"cached in {directory}; build ahead with `python -m modeling_minrnn.build_kernel`)"
                    )
                    _build(name, directory)
                    logger.warning(f"minrnn: native CPU scan kernel compiled in {time.perf_counter() - start:.1f} s")
                _ops = getattr(torch.ops, name)
            # No compiler (or one that fails), headers, ninja, setuptools, a broken library: the build's errors only.
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
                _unavailable = f"{type(error).__name__}: {_failure_reason(error)}"
                logger.warning(f"minrnn: native CPU scan unavailable ({_unavailable}); using the PyTorch scan. To "
                               f"use it, {_INSTALL_HINT}.")
        if _ops is None:
            raise KernelUnavailable(f"the native CPU scan could not be built ({_unavailable}); {_INSTALL_HINT}")
        return _ops


def unavailable_reason() -> str | None:
    """Why the kernel failed to build or load in this process (then ``"auto"`` runs the PyTorch scan), else None."""
    return _unavailable


# Run for real, not traced, under torch.compile: the answer (and the one build behind it) is a constant of the graph.
@torch.compiler.assume_constant_result
def cpu_scan_available() -> bool:
    """Whether :func:`cpu_scan` can run: builds or loads the kernel once (see :func:`load_kernel`), never raises.

    False when ``MINRNN_DISABLE_CPU_EXT=1`` or when the build failed (logged once, with what to install).
    """
    if _ops is not None and os.environ.get(_DISABLE_ENV, "0") in ("", "0"):
        return True
    try:
        load_kernel()
    except KernelUnavailable:
        return False
    return True


# The kernels as operators, so torch.compile keeps them in its graphs (opaque calls with fake kernels for shapes and
# registered autograd) instead of falling back to the PyTorch scan. The namespace is this module's own: a remote-code
# copy of this file (another module name) registers its own operators beside the package's, on the same build.
_NAMESPACE = "minrnn_" + hashlib.sha256(__name__.encode()).hexdigest()[:12]


@torch.library.custom_op(f"{_NAMESPACE}::scan", mutates_args=(), device_types="cpu")
def _scan_op(log_a: Tensor, log_b: Tensor, initial_state: Tensor | None, reset: Tensor | None) -> Tensor:
    return load_kernel().forward(log_a.contiguous(), log_b.contiguous(), initial_state, reset)


@_scan_op.register_fake
def _(log_a, log_b, initial_state, reset):
    return torch.empty_like(log_a, dtype=torch.float32, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_NAMESPACE}::scan_backward", mutates_args=(), device_types="cpu")
def _scan_backward_op(log_a: Tensor, log_b: Tensor, initial_state: Tensor | None, reset: Tensor | None, h: Tensor,
                      grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return load_kernel().backward(log_a.contiguous(), log_b.contiguous(), initial_state, reset, h.contiguous(),
                                  grad_h.contiguous())


@_scan_backward_op.register_fake
def _(log_a, log_b, initial_state, reset, h, grad_h):
    batch, _, dim = log_a.shape
    return torch.empty_like(log_a), torch.empty_like(log_b), log_a.new_empty(batch, dim)


def _save_scan(ctx, inputs, output):
    log_a, log_b, initial_state, reset = inputs
    ctx.save_for_backward(log_a, log_b, initial_state, reset, output)


def _scan_grads(ctx, grad_h):
    log_a, log_b, initial_state, reset, h = ctx.saved_tensors
    grad_log_a, grad_log_b, grad_initial = _scan_backward_op(log_a, log_b, initial_state, reset, h, grad_h)
    return grad_log_a, grad_log_b, grad_initial if initial_state is not None else None, None


_scan_op.register_autograd(_scan_grads, setup_context=_save_scan)


@torch.library.custom_op(f"{_NAMESPACE}::cell_scan", mutates_args=(), device_types="cpu")
def _cell_scan_op(cell_type: str, projections: Tensor, padding_mask: Tensor | None, initial_state: Tensor | None,
                  reset: Tensor | None) -> Tensor:
    return load_kernel().cell_forward(cell_type, projections.contiguous(), padding_mask, initial_state, reset)


@_cell_scan_op.register_fake
def _(cell_type, projections, padding_mask, initial_state, reset):
    batch, seq, width = projections.shape
    return projections.new_empty(batch, seq, width // _CELL_PROJECTIONS[cell_type], dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::cell_scan_backward", mutates_args=(), device_types="cpu")
def _cell_scan_backward_op(cell_type: str, projections: Tensor, padding_mask: Tensor | None,
                           initial_state: Tensor | None, reset: Tensor | None, h: Tensor,
                           grad_h: Tensor) -> tuple[Tensor, Tensor]:
    return load_kernel().cell_backward(cell_type, projections.contiguous(), padding_mask, initial_state, reset,
                                       h.contiguous(), grad_h.contiguous())


@_cell_scan_backward_op.register_fake
def _(cell_type, projections, padding_mask, initial_state, reset, h, grad_h):
    return torch.empty_like(projections), h.new_empty(h.shape[0], h.shape[2])


def _save_cell_scan(ctx, inputs, output):
    cell_type, projections, padding_mask, initial_state, reset = inputs
    ctx.cell_type = cell_type
    # Only the projections and h: the backward recomputes the gates, which is cheaper than storing them.
    ctx.save_for_backward(projections, padding_mask, initial_state, reset, output)


def _cell_scan_grads(ctx, grad_h):
    projections, padding_mask, initial_state, reset, h = ctx.saved_tensors
    grad_projections, grad_initial = _cell_scan_backward_op(
        ctx.cell_type, projections, padding_mask, initial_state, reset, h, grad_h
    )
    return None, grad_projections, None, grad_initial if initial_state is not None else None, None


_cell_scan_op.register_autograd(_cell_scan_grads, setup_context=_save_cell_scan)


def _require_kernel(caller: str) -> None:
    if not cpu_scan_available():
        try:
            load_kernel()  # raises, saying why
        except KernelUnavailable as error:
            raise KernelUnavailable(f"{caller}: {error}; use scan_backend='auto' or a PyTorch backend") from None


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"`{name}` must be on the CPU for cpu_scan, got device {tensor.device}")
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must have a floating-point dtype, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(tensor.shape)}")


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    """A `(batch, seq)` bool mask as the kernels take it (contiguous, on the CPU), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"`{name}` must be a bool tensor, got {kind}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(mask.shape)}")
    return mask.to("cpu").contiguous()


def cpu_scan(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """All states of ``h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)`` with the native kernel.

    Args:
        log_a: (batch, seq, dim) log decay, any float dtype; computed in fp32.
        log_b: (batch, seq, dim) log input; ``-inf`` (padding) contributes exactly 0.
        initial_state: (batch, dim) state before the first step, or None for zeros.
        reset: (batch, seq) bool, True where a new sequence starts (``h_t = exp(log_b_t)``: the state before it,
            the initial state included, is dropped), or None.

    Returns:
        h: (batch, seq, dim) fp32; the final state is ``h[:, -1]``. Differentiable in
        all three inputs (first order).
    """
    if not isinstance(log_a, torch.Tensor) or log_a.dim() != 3:
        shape = tuple(log_a.shape) if isinstance(log_a, torch.Tensor) else type(log_a).__name__
        raise ValueError(f"`log_a` must be a tensor of shape (batch, seq, dim), got {shape}")
    batch, seq, dim = log_a.shape
    _check_tensor("log_a", log_a, tuple(log_a.shape))
    _check_tensor("log_b", log_b, tuple(log_a.shape))
    reset = _check_mask("reset", reset, (batch, seq))
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (batch, dim))
        initial_state = initial_state.float().contiguous()
    _require_kernel("cpu_scan")
    return _scan_op(log_a.float().contiguous(), log_b.float().contiguous(), initial_state, reset)


def cpu_cell_scan(
    cell_type: str,
    projections: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole minGRU or minLSTM cell in one native pass: gates from the input projections, then the recurrence.

    Computes the same as the cells' log-space gates (`mingru_log_gates`, `minlstm_log_gates` in
    `cells.py`) followed by :func:`cpu_scan`, without materialising the gates: about a third of the
    memory traffic, and the backward recomputes the gates from the projections.

    Args:
        cell_type: ``"mingru"`` (``k, h_tilde = projections.chunk(2, -1)``) or ``"minlstm"``
            (``f, i, h_tilde = projections.chunk(3, -1)``).
        projections: (batch, seq, n * dim) the cell's input projections, any float dtype; computed in fp32, and
            their gradient comes back in their dtype.
        padding_mask: (batch, seq) bool, True at real tokens, or None. At padding the state passes through
            unchanged and the projections get a zero gradient.
        initial_state: (batch, dim) state before the first step, or None for zeros.
        reset: (batch, seq) bool, True where a new sequence starts: that token's step starts from a zero state
            (the state before it, the initial state included, is dropped), or None. A padded token passes the
            state through even where ``reset`` is True.

    Returns:
        h: (batch, seq, dim) fp32; the final state is ``h[:, -1]``. Differentiable in ``projections`` and
        ``initial_state`` (first order).
    """
    if cell_type not in _CELL_PROJECTIONS:
        raise ValueError(f"`cell_type` must be one of {sorted(_CELL_PROJECTIONS)}, got {cell_type!r}")
    n = _CELL_PROJECTIONS[cell_type]
    if not isinstance(projections, torch.Tensor) or projections.dim() != 3 or projections.shape[-1] % n:
        shape = tuple(projections.shape) if isinstance(projections, torch.Tensor) else type(projections).__name__
        raise ValueError(
            f"`projections` must be a tensor of shape (batch, seq, {n} * dim) for cell_type {cell_type!r}, got {shape}"
        )
    batch, seq, width = projections.shape
    _check_tensor("projections", projections, (batch, seq, width))
    padding_mask = _check_mask("padding_mask", padding_mask, (batch, seq))
    reset = _check_mask("reset", reset, (batch, seq))
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (batch, width // n))
        initial_state = initial_state.float().contiguous()
    _require_kernel("cpu_cell_scan")
    return _cell_scan_op(cell_type, projections.float().contiguous(), padding_mask, initial_state, reset)
