// The fused solver round on the CPU (C++ with OpenMP), and the op's registration with
// the PyTorch dispatcher (TORCH_LIBRARY), so torch.compile and CUDA graphs see it.
//
// Contract (deqir_fast/ops/fused_round.py normalises every input to it and checks it;
// this file checks it again with TORCH_CHECK):
//   table  [W, NS] float64     per-step scalars (step_table rows of the window)
//   E, U   [W, B, n] T         ē at U, and U = the inputs of the window's steps
//   x_last [B, n] T            the old state after the window's last step
//   scale  [W] float64         residual scale per step
//   s      [n] T               singular values (sampler != DDIM)
//   ybar   [1 or B, n] T       ȳ (DDRM, DDNM)
//   noise  [W, B, n] T         the steps' noise draws, or absent
//   slopes [W, 1 or B, K] T    J per (step, item, class), K = 1 or the chain's classes
// Returns (states [W, B, n] T, residuals [W] float64): r_i = max|u_{i+1} - X_old_i|·scale_i
// with X_old_i = U_{i+1} for i < W-1 and x_last for the last step.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include <algorithm>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fused_round.h"

namespace deqir {

// Elements per CPU work item. A chunk keeps its running state and its per-element
// constants (s, 1/s, ȳ) in 4 arrays of CHUNK values (32 KiB in float64: L1-sized) while
// it walks the W steps; it never straddles two batch items, so J's row is one scalar
// per class for the whole chunk.
constexpr int64_t CHUNK = 1024;
static_assert(MAX_CLASSES == 3, "round_cpu reads one J slope per class as j0, j1, j2");

template <int SAMPLER, bool HAS_J, bool HAS_Y, bool HAS_Z, typename T>
static void round_cpu(const double* table, const T* E, const T* U, const T* XL, const T* s,
                      const T* yb, int64_t yb_b, const T* Z, const T* J, int64_t j_s,
                      int64_t j_b, int64_t K, T* OUT, T* partial, int64_t W, int64_t B,
                      int64_t n) {
  const int64_t per_item = (n + CHUNK - 1) / CHUNK;
  const int64_t nchunks = B * per_item;
  const int64_t N = B * n;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c / per_item;
    const int64_t k0 = (c % per_item) * CHUNK;
    const int64_t len = std::min(CHUNK, n - k0);
    const int64_t base = b * n + k0;
    alignas(64) T u[CHUNK];
    alignas(64) T sv[CHUNK];
    alignas(64) T iv[CHUNK];
    alignas(64) T yv[CHUNK];
    for (int64_t k = 0; k < len; ++k) {
      u[k] = U[base + k];
      const T sk = SAMPLER == kDDIM ? T(0) : s[k0 + k];
      sv[k] = sk;
      iv[k] = sk > T(0) ? T(1) / sk : T(0);
      yv[k] = HAS_Y ? yb[b * yb_b + k0 + k] : T(0);
    }
    for (int64_t i = 0; i < W; ++i) {
      const StepRow<T> st = load_row<T>(table, i);
      T j0 = T(0), j1 = T(0), j2 = T(0);
      if (HAS_J) {
        const T* jr = J + i * j_s + b * j_b;
        j0 = jr[0];
        j1 = K > 1 ? jr[1] : j0;
        j2 = K > 2 ? jr[2] : j0;
      }
      const T* e = E + i * N + base;
      const T* uin = U + i * N + base;
      const T* xo = (i + 1 < W ? U + (i + 1) * N : XL) + base;
      const T* z = HAS_Z ? Z + i * N + base : nullptr;
      T* o = OUT + i * N + base;
      T m = T(0);
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t k = 0; k < len; ++k) {
        const Coef<T> cf = element_coef<SAMPLER, T>(st, sv[k], iv[k]);
        const T j = cf.cls == 0 ? j0 : (cf.cls == 1 ? j1 : j2);
        const T un = step_update<SAMPLER, HAS_J, HAS_Y, HAS_Z, T>(
            cf, u[k], e[k], HAS_J ? uin[k] : T(0), j, yv[k], HAS_Z ? z[k] : T(0));
        o[k] = un;
        u[k] = un;
        const T d = dq_abs(un - xo[k]);
        nan |= (d != d);
        m = d > m ? d : m;
      }
      partial[c * W + i] = nan ? std::numeric_limits<T>::quiet_NaN() : m;
    }
  }
}

template <typename F>
static void with_bool(bool v, F&& f) {
  if (v) f(std::true_type{}); else f(std::false_type{});
}

template <typename F>
static void with_sampler(int64_t sampler, F&& f) {
  switch (sampler) {
    case kDDIM: f(std::integral_constant<int, kDDIM>{}); break;
    case kDDRM: f(std::integral_constant<int, kDDRM>{}); break;
    case kDDNM: f(std::integral_constant<int, kDDNM>{}); break;
    default: TORCH_CHECK(false, "fused_round: sampler must be ", int(kDDIM), " (DDIM), ", int(kDDRM),
                         " (DDRM) or ", int(kDDNM), " (DDNM), got ", sampler);
  }
}

// Shape and dtype checks shared by the CPU and CUDA implementations.
void check_round_inputs(int64_t sampler, const at::Tensor& table, const at::Tensor& E,
                        const at::Tensor& U, const at::Tensor& x_last, const at::Tensor& scale,
                        const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& ybar,
                        const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& slopes) {
  TORCH_CHECK(E.dim() == 3, "fused_round: E must be [W, B, n], got ", E.sizes());
  const auto W = E.size(0), B = E.size(1), n = E.size(2);
  TORCH_CHECK(W >= 1 && B >= 1 && n >= 1, "fused_round: E must be non-empty, got ", E.sizes());
  TORCH_CHECK(E.scalar_type() == at::kFloat || E.scalar_type() == at::kDouble,
              "fused_round: E must be float32 or float64, got ", E.scalar_type());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == E.scalar_type() && t.device() == E.device(), "fused_round: ",
                name, " must be ", E.scalar_type(), " on ", E.device(), ", got ", t.scalar_type(),
                " on ", t.device());
    TORCH_CHECK(t.is_contiguous(), "fused_round: ", name, " must be contiguous");
  };
  same(E, "E");
  same(U, "U");
  TORCH_CHECK(U.sizes() == E.sizes(), "fused_round: U must have E's shape ", E.sizes(), ", got ", U.sizes());
  same(x_last, "x_last");
  TORCH_CHECK(x_last.dim() == 2 && x_last.size(0) == B && x_last.size(1) == n,
              "fused_round: x_last must be [B, n] = [", B, ", ", n, "], got ", x_last.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.device() == E.device() && table.is_contiguous() &&
                  table.dim() == 2 && table.size(0) == W && table.size(1) == NS,
              "fused_round: table must be contiguous float64 [W, ", NS, "] on ", E.device());
  TORCH_CHECK(scale.scalar_type() == at::kDouble && scale.device() == E.device() && scale.is_contiguous() &&
                  scale.dim() == 1 && scale.size(0) == W,
              "fused_round: scale must be contiguous float64 [W] on ", E.device());
  if (sampler != kDDIM) {
    TORCH_CHECK(s.has_value(), "fused_round: s (singular values) is required for DDRM and DDNM");
    same(*s, "s");
    TORCH_CHECK(s->dim() == 1 && s->size(0) == n, "fused_round: s must be [n] = [", n, "], got ", s->sizes());
  }
  if (ybar.has_value()) {
    TORCH_CHECK(sampler != kDDIM, "fused_round: DDIM takes no ybar");
    same(*ybar, "ybar");
    TORCH_CHECK(ybar->dim() == 2 && (ybar->size(0) == 1 || ybar->size(0) == B) && ybar->size(1) == n,
                "fused_round: ybar must be [1 or B, n], got ", ybar->sizes());
  }
  if (noise.has_value()) {
    same(*noise, "noise");
    TORCH_CHECK(noise->sizes() == E.sizes(), "fused_round: noise must have E's shape, got ", noise->sizes());
  }
  if (slopes.has_value()) {
    same(*slopes, "slopes");
    TORCH_CHECK(slopes->dim() == 3 && slopes->size(0) == W && (slopes->size(1) == 1 || slopes->size(1) == B) &&
                    slopes->size(2) >= 1 && slopes->size(2) <= MAX_CLASSES,
                "fused_round: slopes must be [W, 1 or B, K<=", MAX_CLASSES, "], got ", slopes->sizes());
  }
}

template <typename T>
static void reduce_partials(const T* partial, int64_t rows, int64_t W, const double* scale,
                            double* res) {
  for (int64_t i = 0; i < W; ++i) {
    T m = T(0);
    bool nan = false;
    for (int64_t c = 0; c < rows; ++c) {
      const T v = partial[c * W + i];
      nan |= (v != v);
      m = v > m ? v : m;
    }
    res[i] = nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m) * scale[i];
  }
}

std::tuple<at::Tensor, at::Tensor> fused_round_cpu(
    int64_t sampler, const at::Tensor& table, const at::Tensor& E, const at::Tensor& U,
    const at::Tensor& x_last, const at::Tensor& scale, const std::optional<at::Tensor>& s,
    const std::optional<at::Tensor>& ybar, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& slopes) {
  TORCH_CHECK(E.device().is_cpu(), "fused_round (CPU): E must be on the CPU");
  check_round_inputs(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes);
  const int64_t W = E.size(0), B = E.size(1), n = E.size(2);
  auto out = at::empty(E.sizes(), E.options());
  const int64_t rows = B * ((n + CHUNK - 1) / CHUNK);
  auto partial = at::empty({rows, W}, E.options());
  auto res = at::empty({W}, scale.options());
  const bool hj = slopes.has_value(), hy = ybar.has_value(), hz = noise.has_value();
  const int64_t yb_b = hy && ybar->size(0) > 1 ? n : 0;
  const int64_t K = hj ? slopes->size(2) : 1;
  const int64_t j_s = hj ? slopes->size(1) * K : 0;
  const int64_t j_b = hj && slopes->size(1) > 1 ? K : 0;
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "fused_round_cpu", [&] {
    using T = scalar_t;
    const T* sp = sampler == kDDIM ? nullptr : s->data_ptr<T>();
    const T* yp = hy ? ybar->data_ptr<T>() : nullptr;
    const T* zp = hz ? noise->data_ptr<T>() : nullptr;
    const T* jp = hj ? slopes->data_ptr<T>() : nullptr;
    with_sampler(sampler, [&](auto SM) {
      with_bool(hj, [&](auto HJ) {
        with_bool(hy && decltype(SM)::value != kDDIM, [&](auto HY) {
          with_bool(hz, [&](auto HZ) {
            round_cpu<decltype(SM)::value, decltype(HJ)::value, decltype(HY)::value,
                      decltype(HZ)::value, T>(
                table.data_ptr<double>(), E.data_ptr<T>(), U.data_ptr<T>(), x_last.data_ptr<T>(), sp,
                yp, yb_b, zp, jp, j_s, j_b, K, out.data_ptr<T>(), partial.data_ptr<T>(), W, B, n);
          });
        });
      });
    });
    reduce_partials<T>(partial.data_ptr<T>(), rows, W, scale.data_ptr<double>(), res.data_ptr<double>());
  });
  return {out, res};
}

std::string build_info() {
  std::string info = "cpu: C++";
#ifdef _OPENMP
  info += " with OpenMP (" + std::to_string(omp_get_max_threads()) + " threads)";
#else
  info += " without OpenMP";
#endif
#ifdef DEQIR_WITH_CUDA
  info += "; cuda: CUDA C++";
#else
  info += "; cuda: not built";
#endif
  return info;
}

// The layout this library was compiled with ("kDDIM=0 ... C_RSY=13", the values of
// fused_round_layout.h): native.py compares it with deqir_fast/ops/layout.py at load.
std::string layout() {
  std::string out;
#define DEQIR_LAYOUT_ITEM(name) \
  out += (out.empty() ? "" : " ") + std::string(#name) + "=" + std::to_string(int(name));
  DEQIR_LAYOUT_CONSTANTS(DEQIR_LAYOUT_ITEM)
#undef DEQIR_LAYOUT_ITEM
  return out;
}

}  // namespace deqir

TORCH_LIBRARY(deqir_fast, m) {
  m.def("fused_round(int sampler, Tensor table, Tensor E, Tensor U, Tensor x_last, Tensor scale, "
        "Tensor? s, Tensor? ybar, Tensor? noise, Tensor? slopes) -> (Tensor, Tensor)");
  m.def("build_info() -> str");
  m.def("layout() -> str");
  m.def("anderson_gram(Tensor G, int p, int[] slots, int r0, int r1) -> Tensor");
  m.def("anderson_mix(Tensor X, Tensor G, int[] slots, Tensor alpha, int r0, int r1, float damping) -> Tensor");
  m.def("anderson_mix_out(Tensor X, Tensor G, int[] slots, Tensor alpha, int r0, int r1, float damping, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(deqir_fast, CPU, m) {
  m.impl("fused_round", &deqir::fused_round_cpu);
}

TORCH_LIBRARY_IMPL(deqir_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", &deqir::build_info);
  m.impl("layout", &deqir::layout);
}
