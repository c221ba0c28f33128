// The fused solver round on CUDA (see fused_round_cpu.cpp for the op's contract).
//
// One thread per (batch item, element), walking the W steps with its running state in
// a register: per step it reads E, the next input U (also the old state the residual is
// measured against), the noise draw and one J slope per class, computes the
// coefficients in-kernel (fused_round.h, the sampler a template parameter) and writes
// the new state once. The residual's per-step maximum is reduced per warp with
// shuffles on the values' bit patterns (non-negative floats order like their bits, and
// +NaN sorts above +inf, so NaN is sticky as in the reference) into a [W, warps]
// partial table, then one amax. No atomics, deterministic, no host synchronisation:
// the op is capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "fused_round.h"

namespace deqir {

void check_round_inputs(int64_t sampler, const at::Tensor& table, const at::Tensor& E,
                        const at::Tensor& U, const at::Tensor& x_last, const at::Tensor& scale,
                        const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& ybar,
                        const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& slopes);

constexpr int THREADS = 256;

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using type = unsigned int;
  __device__ static type of(float v) { return __float_as_uint(v); }
  __device__ static float from(type b) { return __uint_as_float(b); }
};
template <>
struct Bits<double> {
  using type = unsigned long long;
  __device__ static type of(double v) { return static_cast<type>(__double_as_longlong(v)); }
  __device__ static double from(type b) { return __longlong_as_double(static_cast<long long>(b)); }
};

template <int SAMPLER, bool HAS_J, bool HAS_Y, bool HAS_Z, typename T>
__global__ void __launch_bounds__(THREADS)
round_kernel(const double* __restrict__ table, const T* __restrict__ E, const T* __restrict__ U,
             const T* __restrict__ XL, const T* __restrict__ s, const T* __restrict__ yb,
             int64_t yb_b, const T* __restrict__ Z, const T* __restrict__ J, int64_t j_s,
             int64_t j_b, int64_t K, T* __restrict__ OUT, T* __restrict__ partial, int64_t W,
             int64_t N, int64_t n, int64_t nwarps) {
  using B = Bits<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  const bool active = idx < N;
  const int64_t b = active ? idx / n : 0;
  const int64_t k = active ? idx % n : 0;
  T sv = T(0), iv = T(0), yv = T(0);
  if (active && SAMPLER != kDDIM) {
    sv = s[k];
    iv = sv > T(0) ? T(1) / sv : T(0);
  }
  if (active && HAS_Y) yv = yb[b * yb_b + k];
  T u = active ? U[idx] : T(0);
  T uin = u;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) / 32;
  for (int64_t i = 0; i < W; ++i) {
    const StepRow<T> st = load_row<T>(table, i);   // one row for all threads: L1 broadcast
    typename B::type bits = 0;
    T nxt = T(0);
    if (active) {
      const Coef<T> cf = element_coef<SAMPLER, T>(st, sv, iv);
      T j = T(0);
      if (HAS_J) {
        const T* jr = J + i * j_s + b * j_b;
        j = K == 1 ? jr[0] : jr[cf.cls];
      }
      const int64_t at = i * N + idx;
      const T un = step_update<SAMPLER, HAS_J, HAS_Y, HAS_Z, T>(cf, u, E[at], uin, j, yv,
                                                               HAS_Z ? Z[at] : T(0));
      OUT[at] = un;
      nxt = i + 1 < W ? U[at + N] : XL[idx];
      bits = B::of(fabs(un - nxt));
      u = un;
      uin = nxt;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const typename B::type other = __shfl_xor_sync(0xffffffffu, bits, off);
      bits = other > bits ? other : bits;
    }
    if ((threadIdx.x & 31) == 0) partial[i * nwarps + warp] = B::from(bits);
  }
}

template <typename F>
static void with_bool(bool v, F&& f) {
  if (v) f(std::true_type{}); else f(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor> fused_round_cuda(
    int64_t sampler, const at::Tensor& table, const at::Tensor& E, const at::Tensor& U,
    const at::Tensor& x_last, const at::Tensor& scale, const std::optional<at::Tensor>& s,
    const std::optional<at::Tensor>& ybar, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& slopes) {
  TORCH_CHECK(E.device().is_cuda(), "fused_round (CUDA): E must be a CUDA tensor");
  check_round_inputs(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes);
  const c10::cuda::CUDAGuard guard(E.device());
  const int64_t W = E.size(0), Bt = E.size(1), n = E.size(2);
  const int64_t N = Bt * n;
  const int64_t blocks = (N + THREADS - 1) / THREADS;
  const int64_t nwarps = blocks * (THREADS / 32);
  auto out = at::empty(E.sizes(), E.options());
  auto partial = at::empty({W, nwarps}, E.options());
  const bool hj = slopes.has_value(), hy = ybar.has_value(), hz = noise.has_value();
  const int64_t yb_b = hy && ybar->size(0) > 1 ? n : 0;
  const int64_t K = hj ? slopes->size(2) : 1;
  const int64_t j_s = hj ? slopes->size(1) * K : 0;
  const int64_t j_b = hj && slopes->size(1) > 1 ? K : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "fused_round_cuda", [&] {
    using T = scalar_t;
    const T* sp = sampler == kDDIM ? nullptr : s->data_ptr<T>();
    const T* yp = hy ? ybar->data_ptr<T>() : nullptr;
    const T* zp = hz ? noise->data_ptr<T>() : nullptr;
    const T* jp = hj ? slopes->data_ptr<T>() : nullptr;
    auto launch = [&](auto SM) {
      with_bool(hj, [&](auto HJ) {
        with_bool(hy && decltype(SM)::value != kDDIM, [&](auto HY) {
          with_bool(hz, [&](auto HZ) {
            round_kernel<decltype(SM)::value, decltype(HJ)::value, decltype(HY)::value,
                         decltype(HZ)::value, T><<<blocks, THREADS, 0, stream>>>(
                table.data_ptr<double>(), E.data_ptr<T>(), U.data_ptr<T>(), x_last.data_ptr<T>(),
                sp, yp, yb_b, zp, jp, j_s, j_b, K, out.data_ptr<T>(), partial.data_ptr<T>(), W, N,
                n, nwarps);
          });
        });
      });
    };
    switch (sampler) {
      case kDDIM: launch(std::integral_constant<int, kDDIM>{}); break;
      case kDDRM: launch(std::integral_constant<int, kDDRM>{}); break;
      case kDDNM: launch(std::integral_constant<int, kDDNM>{}); break;
      default: TORCH_CHECK(false, "fused_round: unknown sampler ", sampler);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // amax propagates NaN, like the reference's per-step max.
  auto res = at::amax(partial, {1}).to(at::kDouble).mul_(scale);
  return {out, res};
}

// -- Anderson over the ring buffer (see anderson_cpu.cpp for the contract) -------------
constexpr int MAX_SLOTS = 16;          // history sizes up to 16 (ops/anderson.py checks)

struct Slots {
  int64_t v[MAX_SLOTS];
  int h;
};

static Slots to_slots(at::IntArrayRef slots, int64_t m) {
  TORCH_CHECK(!slots.empty() && slots.size() <= MAX_SLOTS, "anderson (CUDA): 1..", MAX_SLOTS, " slots");
  Slots s{};
  s.h = static_cast<int>(slots.size());
  for (int i = 0; i < s.h; ++i) {
    TORCH_CHECK(0 <= slots[i] && slots[i] < m, "anderson: slot ", slots[i], " outside [0, ", m, ")");
    s.v[i] = slots[i];
  }
  return s;
}

// One block per (row, item, slot): Σ_n g_p g_j in float64, block-reduced.
template <typename T>
__global__ void gram_kernel(const T* __restrict__ g, double* __restrict__ o, Slots sl, int64_t p,
                            int64_t rows, int64_t r0, int64_t B, int64_t n) {
  const int64_t rb = blockIdx.x;
  const int q = blockIdx.y;
  const int64_t r = rb / B, b = rb % B;
  const T* gp = g + ((p * rows + r0 + r) * B + b) * n;
  const T* gj = g + ((sl.v[q] * rows + r0 + r) * B + b) * n;
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) acc += static_cast<double>(gp[k]) * static_cast<double>(gj[k]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  __shared__ double part[THREADS / 32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < THREADS / 32; ++w) total += part[w];
    o[rb * sl.h + q] = total;
  }
}

// One thread per output element: Σ_j α_j (X_j + d G_j), skipping zero weights.
template <typename T>
__global__ void mix_kernel(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ a,
                           T* __restrict__ o, Slots sl, T d, int64_t rows, int64_t r0, int64_t B,
                           int64_t n, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (idx >= total) return;
  const int64_t rb = idx / n, k = idx % n;
  const int64_t r = rb / B, b = rb % B;
  T acc = T(0);
  for (int q = 0; q < sl.h; ++q) {
    const T w = a[rb * sl.h + q];
    if (w == T(0)) continue;                          // excluded: never read the stale row
    const int64_t off = ((sl.v[q] * rows + r0 + r) * B + b) * n + k;
    acc = acc + (x[off] + d * g[off]) * w;
  }
  o[idx] = acc;
}

static void check_ring_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4 && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "anderson (CUDA): ", name, " must be a contiguous float32/float64 [m, rows, B, n] CUDA tensor");
}

at::Tensor anderson_gram_cuda(const at::Tensor& G, int64_t p, at::IntArrayRef slots, int64_t r0, int64_t r1) {
  check_ring_cuda(G, "G");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t m = G.size(0), rows = G.size(1), B = G.size(2), n = G.size(3);
  TORCH_CHECK(0 <= p && p < m && 0 <= r0 && r0 < r1 && r1 <= rows, "anderson_gram: bad slot or rows");
  const Slots sl = to_slots(slots, m);
  const int64_t R = r1 - r0;
  auto out = at::empty({R, B, sl.h}, G.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "anderson_gram_cuda", [&] {
    gram_kernel<scalar_t><<<dim3(R * B, sl.h), THREADS, 0, stream>>>(
        G.data_ptr<scalar_t>(), out.data_ptr<double>(), sl, p, rows, r0, B, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

static void mix_into_cuda(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                          const at::Tensor& alpha, int64_t r0, int64_t r1, double damping,
                          const at::Tensor& out) {
  check_ring_cuda(X, "X");
  check_ring_cuda(G, "G");
  TORCH_CHECK(X.sizes() == G.sizes() && X.scalar_type() == G.scalar_type(), "anderson_mix: X and G must match");
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t m = X.size(0), rows = X.size(1), B = X.size(2), n = X.size(3);
  TORCH_CHECK(0 <= r0 && r0 < r1 && r1 <= rows, "anderson_mix: bad rows");
  const Slots sl = to_slots(slots, m);
  const int64_t R = r1 - r0;
  TORCH_CHECK(alpha.is_cuda() && alpha.scalar_type() == X.scalar_type() && alpha.is_contiguous() &&
                  alpha.numel() == R * B * sl.h,
              "anderson_mix: alpha must be contiguous [R, B, h] on the GPU in X's dtype");
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == X.scalar_type() &&
                  out.numel() == R * B * n,
              "anderson_mix: out must be a contiguous [R, B, n] CUDA tensor in X's dtype");
  const int64_t total = R * B * n;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "anderson_mix_cuda", [&] {
    mix_kernel<scalar_t><<<(total + THREADS - 1) / THREADS, THREADS, 0, stream>>>(
        X.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        sl, static_cast<scalar_t>(damping), rows, r0, B, n, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor anderson_mix_cuda(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                             const at::Tensor& alpha, int64_t r0, int64_t r1, double damping) {
  auto out = at::empty({r1 - r0, X.size(2), X.size(3)}, X.options());
  mix_into_cuda(X, G, slots, alpha, r0, r1, damping, out);
  return out;
}

void anderson_mix_out_cuda(const at::Tensor& X, const at::Tensor& G, at::IntArrayRef slots,
                           const at::Tensor& alpha, int64_t r0, int64_t r1, double damping,
                           const at::Tensor& out) {
  mix_into_cuda(X, G, slots, alpha, r0, r1, damping, out);
}

}  // namespace deqir

TORCH_LIBRARY_IMPL(deqir_fast, CUDA, m) {
  m.impl("fused_round", &deqir::fused_round_cuda);
  m.impl("anderson_gram", &deqir::anderson_gram_cuda);
  m.impl("anderson_mix", &deqir::anderson_mix_cuda);
  m.impl("anderson_mix_out", &deqir::anderson_mix_out_cuda);
}
