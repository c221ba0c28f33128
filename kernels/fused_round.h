// The fused solver round (docs/design.md §3a, §5): the per-element coefficient rules of
// DDIM, DDRM and DDNM and one step of the linearised scan, shared by the C++/OpenMP
// kernel (fused_round_cpu.cpp) and the CUDA kernel (fused_round_cuda.cu).
//
// This is a transcription of deqir_fast/ops/fused_round.py (element_coefficients); the
// per-step scalars come precomputed in float64 (step_table, [S, NS]) and are cast to
// the state type T once per step, so only the parts that depend on the element's
// singular value s are computed here, in T.
#pragma once

#include <cstdint>

#include "fused_round_layout.h"  // sampler ids, NS and the C_* columns (from ops/layout.py)

#if defined(__CUDACC__)
#define DQ_HD __host__ __device__ __forceinline__
#include <cuda_runtime.h>
#else
#define DQ_HD inline
#include <cmath>
#endif

namespace deqir {

template <typename T>
struct StepRow {
  T c[NS];
};

template <typename T>
DQ_HD StepRow<T> load_row(const double* table, int64_t i) {
  StepRow<T> r;
#pragma unroll
  for (int k = 0; k < NS; ++k) r.c[k] = static_cast<T>(table[i * NS + k]);
  return r;
}

template <typename T>
DQ_HD T dq_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
DQ_HD T dq_abs(T x) {
#if defined(__CUDA_ARCH__)
  return fabs(x);
#else
  return std::fabs(x);
#endif
}

template <typename T>
struct Coef {
  T P, Q, kY, kZ;
  int cls;
};

// P, Q, kY, kZ and the Jacobian class of one element with singular value s (inv_s = 1/s,
// 0 where s = 0) at the step whose scalars are `st`. Branch-free (selects), so the CPU
// loop vectorises and CUDA warps do not diverge.
template <int SAMPLER, typename T>
DQ_HD Coef<T> element_coef(const StepRow<T>& st, T s, T inv_s) {
  Coef<T> o;
  if (SAMPLER == kDDIM) {
    o.P = st.c[C_P0];
    o.Q = st.c[C_Q0];
    o.kY = T(0);
    o.kZ = st.c[C_Z0];
    o.cls = 0;
  } else if (SAMPLER == kDDRM) {
    const bool pos = s > T(0);
    const T ss = s * st.c[C_SN];
    const bool before = pos && ss > st.c[C_SY];   // noisier than y: class 2
    const bool after = pos && ss < st.c[C_SY];    // less noisy than y: class 1
    const T c0a = T(1) - st.c[C_KSNSY] * s;
    o.P = before ? st.c[C_P2] : (after ? st.c[C_PA] * c0a : st.c[C_P0]);
    o.Q = before ? st.c[C_Q2] : (after ? -(st.c[C_QA] * c0a) : st.c[C_Q0]);
    o.kY = before ? st.c[C_REB] * inv_s : (after ? st.c[C_KYA] : T(0));
    const T w = st.c[C_SYEB] * inv_s;
    T sp = st.c[C_SN2] - w * w;
    sp = sp > T(0) ? sp : T(0);
    o.kZ = before ? st.c[C_R] * dq_sqrt(sp) : st.c[C_Z0];
    o.cls = before ? 2 : (after ? 1 : 0);
  } else {  // kDDNM
    const bool pos = s > T(0);
    const T sn = st.c[C_SN];
    const T rsy = st.c[C_RSY];
    const T yn = rsy * inv_s;                      // noise std of sqrt(a') A⁺y
    const bool full = pos && sn >= yn;             // λ = 1: class 1
    const bool part = pos && !full;                // λ < 1 (DDNM+): class 2
    const T lam = (sn * s) / (rsy != T(0) ? rsy : T(1));
    const T c0 = T(1) - lam;
    T g = st.c[C_SN2] - yn * yn;
    g = dq_sqrt(g > T(0) ? g : T(0));
    o.P = full ? T(0) : (part ? st.c[C_PA] * c0 : st.c[C_P0]);
    o.Q = full ? g * st.c[C_KEEP] : (part ? -(st.c[C_QA] * c0) : st.c[C_Q0]);
    o.kY = full ? st.c[C_R] * inv_s : (part ? (st.c[C_R] * lam) * inv_s : T(0));
    o.kZ = full ? g * st.c[C_ETA] : (part ? T(0) : st.c[C_Z0]);
    o.cls = full ? 1 : (part ? 2 : 0);
  }
  return o;
}

// One step of the linearised scan for one element:
//   u' = P u + Q (e + j (u - uin)) + (kY ȳ + kZ z)
// in the reference's order of operations (P u + Q e first, then R).
template <int SAMPLER, bool HAS_J, bool HAS_Y, bool HAS_Z, typename T>
DQ_HD T step_update(const Coef<T>& c, T u, T e, T uin, T j, T yb, T z) {
  if (HAS_J) e = e + j * (u - uin);
  T un = c.P * u + c.Q * e;
  if (HAS_Y && HAS_Z) {
    un = un + (c.kY * yb + c.kZ * z);
  } else if (HAS_Y) {
    un = un + c.kY * yb;
  } else if (HAS_Z) {
    un = un + c.kZ * z;
  }
  return un;
}

}  // namespace deqir
