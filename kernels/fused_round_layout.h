// GENERATED from deqir_fast/ops/layout.py by `python deqir_fast/ops/layout.py --write`.
// Do not edit: change layout.py and regenerate. tests/test_layout.py fails, naming the
// constant, when this file and layout.py disagree; deqir_fast/ops/native.py refuses a
// library compiled with another layout (the layout() op reports the values below).
#pragma once

namespace deqir {

// The fused round's `sampler` argument, and the most Jacobian classes of any sampler.
enum Sampler : int { kDDIM = 0, kDDRM = 1, kDDNM = 2 };
constexpr int MAX_CLASSES = 3;

// Columns of the per-step scalar table (step_table: [S, NS] float64); what each holds is
// written in layout.py.
constexpr int NS = 16;
constexpr int C_P0 = 0;
constexpr int C_Q0 = 1;
constexpr int C_Z0 = 2;
constexpr int C_P2 = 3;
constexpr int C_Q2 = 4;
constexpr int C_REB = 5;
constexpr int C_KYA = 6;
constexpr int C_KSNSY = 7;
constexpr int C_PA = 8;
constexpr int C_QA = 9;
constexpr int C_R = 10;
constexpr int C_SN = 11;
constexpr int C_SN2 = 12;
constexpr int C_SYEB = 13;
constexpr int C_SY = 14;
constexpr int C_KEEP = 3;
constexpr int C_ETA = 4;
constexpr int C_RSY = 13;

// Every constant above: X(name) for each, in layout.constants()'s order.
#define DEQIR_LAYOUT_CONSTANTS(X) \
  X(kDDIM) X(kDDRM) X(kDDNM) X(MAX_CLASSES) X(NS) X(C_P0) X(C_Q0) X(C_Z0) X(C_P2) \
  X(C_Q2) X(C_REB) X(C_KYA) X(C_KSNSY) X(C_PA) X(C_QA) X(C_R) X(C_SN) X(C_SN2) \
  X(C_SYEB) X(C_SY) X(C_KEEP) X(C_ETA) X(C_RSY)

}  // namespace deqir
