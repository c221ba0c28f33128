// Anderson mixing over the ring buffer of history (deqir_fast/ops/anderson.py,
// AndersonRing) on the CPU, C++ with OpenMP. Two ops, registered in
// fused_round_cpu.cpp's TORCH_LIBRARY:
//
//   anderson_gram(G, p, slots, r0, r1) -> [r1-r0, B, len(slots)] float64
//       the Gram row of the newest entry p: Σ_n G[p, r, b, n] · G[j, r, b, n] for every
//       slot j, rows r0..r1-1, products and sums in float64 (exact products of float32
//       values, like the reference's float64 einsum); one pass over each entry's rows.
//   anderson_mix(X, G, slots, alpha, r0, r1, damping) -> [r1-r0, B, n] like X
//   (anderson_mix_out writes it into a given contiguous buffer instead)
//       Σ_j alpha[r, b, j] (X[j, r, b, :] + damping G[j, r, b, :]) in one pass; an entry
//       whose weight is exactly 0 (excluded for that step) is skipped, so stale rows of
//       the ring (which may hold anything) never reach the result.
// X, G: [m, rows, B, n] contiguous (the ring's buffers).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace deqir {

static void check_ring(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), "anderson: ", name,
              " must be a contiguous [m, rows, B, n] ring buffer, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "anderson: ", name,
              " must be float32 or float64");
}

static void check_rows(const at::Tensor& G, int64_t p, at::IntArrayRef slots, int64_t r0, int64_t r1) {
  const int64_t m = G.size(0), rows = G.size(1);
  TORCH_CHECK(0 <= p && p < m, "anderson: slot p=", p, " outside [0, ", m, ")");
  TORCH_CHECK(0 <= r0 && r0 < r1 && r1 <= rows, "anderson: rows [", r0, ", ", r1, ") outside [0, ", rows, ")");
  TORCH_CHECK(!slots.empty() && static_cast<int64_t>(slots.size()) <= m, "anderson: 1..m slots");
  for (auto j : slots) TORCH_CHECK(0 <= j && j < m, "anderson: slot ", j, " outside [0, ", m, ")");
}

template <typename T>
static void gram_impl(const T* g, double* o, const std::vector<int64_t>& sl, int64_t p,
                      int64_t rows, int64_t r0, int64_t R, int64_t B, int64_t n) {
  const int64_t h = static_cast<int64_t>(sl.size());
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t b = 0; b < B; ++b) {
      const T* gp = g + ((p * rows + r0 + r) * B + b) * n;
      for (int64_t q = 0; q < h; ++q) {
        const T* gj = g + ((sl[q] * rows + r0 + r) * B + b) * n;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < n; ++k) acc += static_cast<double>(gp[k]) * static_cast<double>(gj[k]);
        o[(r * B + b) * h + q] = acc;
      }
    }
  }
}

template <typename T>
static void mix_impl(const T* x, const T* g, const T* a, T* o, const std::vector<int64_t>& sl,
                     T d, int64_t rows, int64_t r0, int64_t R, int64_t B, int64_t n) {
  const int64_t h = static_cast<int64_t>(sl.size());
  constexpr int64_t CH = 2048;                       // elements per work item (L1-sized)
  const int64_t per = (n + CH - 1) / CH;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < R * B * per; ++c) {
    const int64_t rb = c / per, k0 = (c % per) * CH, len = std::min(CH, n - k0);
    const int64_t r = rb / B, b = rb % B;
    T* oc = o + rb * n + k0;
    for (int64_t k = 0; k < len; ++k) oc[k] = T(0);
    for (int64_t q = 0; q < h; ++q) {
      const T w = a[rb * h + q];
      if (w == T(0)) continue;                        // excluded: never read the stale row
      const int64_t off = ((sl[q] * rows + r0 + r) * B + b) * n + k0;
      const T* xj = x + off;
      const T* gj = g + off;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) oc[k] = oc[k] + (xj[k] + d * gj[k]) * w;
    }
  }
}

at::Tensor anderson_gram_cpu(const at::Tensor& G, int64_t p, at::IntArrayRef slots, int64_t r0, int64_t r1) {
  check_ring(G, "G");
  TORCH_CHECK(G.device().is_cpu(), "anderson_gram (CPU): G must be on the CPU");
  check_rows(G, p, slots, r0, r1);
  const int64_t rows = G.size(1), B = G.size(2), n = G.size(3), h = slots.size();
  const int64_t R = r1 - r0;
  auto out = at::empty({R, B, h}, G.options().dtype(at::kDouble));
  std::vector<int64_t> sl(slots.begin(), slots.end());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "anderson_gram_cpu", [&] {
    gram_impl<scalar_t>(G.data_ptr<scalar_t>(), out.data_ptr<double>(), sl, p, rows, r0, R, B, n);
  });
  return out;
}

static void mix_into(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                     const at::Tensor& alpha, int64_t r0, int64_t r1, double damping,
                     const at::Tensor& out) {
  check_ring(X, "X");
  check_ring(G, "G");
  TORCH_CHECK(X.sizes() == G.sizes() && X.scalar_type() == G.scalar_type(), "anderson_mix: X and G must match");
  TORCH_CHECK(X.device().is_cpu() && G.device().is_cpu() && alpha.device().is_cpu() && out.device().is_cpu(),
              "anderson_mix (CPU): tensors must be on the CPU");
  check_rows(G, 0, slots, r0, r1);
  const int64_t rows = X.size(1), B = X.size(2), n = X.size(3), h = slots.size();
  const int64_t R = r1 - r0;
  TORCH_CHECK(alpha.scalar_type() == X.scalar_type() && alpha.is_contiguous() && alpha.dim() == 3 &&
                  alpha.size(0) == R && alpha.size(1) == B && alpha.size(2) == h,
              "anderson_mix: alpha must be contiguous [", R, ", ", B, ", ", h, "] in X's dtype, got ",
              alpha.sizes());
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == X.scalar_type() && out.numel() == R * B * n,
              "anderson_mix: out must be a contiguous [", R, ", ", B, ", ", n, "] tensor in X's dtype");
  std::vector<int64_t> sl(slots.begin(), slots.end());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "anderson_mix_cpu", [&] {
    mix_impl<scalar_t>(X.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), sl, static_cast<scalar_t>(damping), rows, r0, R, B, n);
  });
}

at::Tensor anderson_mix_cpu(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                            const at::Tensor& alpha, int64_t r0, int64_t r1, double damping) {
  auto out = at::empty({r1 - r0, X.size(2), X.size(3)}, X.options());
  mix_into(X, G, slots, alpha, r0, r1, damping, out);
  return out;
}

// The same, written into the caller's buffer (the solver's own X[lo:hi]: no temporary).
void anderson_mix_out_cpu(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                          const at::Tensor& alpha, int64_t r0, int64_t r1, double damping,
                          const at::Tensor& out) {
  mix_into(X, G, slots, alpha, r0, r1, damping, out);
}

}  // namespace deqir

TORCH_LIBRARY_IMPL(deqir_fast, CPU, m) {
  m.impl("anderson_gram", &deqir::anderson_gram_cpu);
  m.impl("anderson_mix", &deqir::anderson_mix_cpu);
  m.impl("anderson_mix_out", &deqir::anderson_mix_out_cpu);
}
