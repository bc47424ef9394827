// rca_fast._C: the in-place EMA bank update and batched k-means (DESIGN §3), shared declarations.
//
// Layout of the sources:
//   ops.cpp          op front-ends: argument checks, dtype/layout normalisation, the k-means
//                    initialisation (device-generic ATen code), the torch.library registration
//   cpu/ema.cpp      CPU twin of the EMA update        cuda/ema.cu      CUDA EMA update
//   cpu/kmeans.cpp   CPU twin of the Lloyd iterations  cuda/kmeans.cu   CUDA Lloyd iterations
//   module.cpp       the Python module (pybind11) -- only in the setuptools build
// The CPU and CUDA files implement the same algorithm with the same decisions (slot plan, tie
// breaks, empty-cluster re-seeding, convergence test), so CI checks the logic on the CPU twin.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define RCA_HD __host__ __device__ __forceinline__
#else
#define RCA_HD inline
#endif

#define RCA_CHECK(cond, ...) TORCH_CHECK(cond, "rca_fast._C: ", __VA_ARGS__)
#define RCA_CHECK_CONTIGUOUS(t) RCA_CHECK((t).is_contiguous(), #t " must be contiguous")
#define RCA_CHECK_DTYPE(t, dt) \
  RCA_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())

namespace rca_fast {

// ---------------------------------------------------------------------------------------------
// EMA arithmetic (the contract of rca_fast.ref.ema): with cd = float32 (float64 for a float64
// bank), new = (a * cd(old)) + (b * cd(row)) as two rounded products and one rounded sum -- no
// fused multiply-add -- then one rounding to the bank's dtype.  a = cd(gamma) and
// b = cd(1 - gamma) with 1 - gamma taken in double.  The CPU sources are compiled with
// -ffp-contract=off; the CUDA code spells the roundings out with __fmul_rn/__fadd_rn.
template <typename cd_t>
RCA_HD cd_t ema_mix(cd_t a, cd_t old, cd_t b, cd_t row);

template <>
RCA_HD float ema_mix<float>(float a, float old, float b, float row) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, old), __fmul_rn(b, row));
#else
  const float p = a * old;
  const float q = b * row;
  return p + q;
#endif
}

template <>
RCA_HD double ema_mix<double>(double a, double old, double b, double row) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(a, old), __dmul_rn(b, row));
#else
  const double p = a * old;
  const double q = b * row;
  return p + q;
#endif
}

// Slot of the row that is the r-th row of its class in this call (DESIGN §3): ring pointer plus
// rank, modulo the slot count.  Rows with equal (class, slot) form a chain applied in row order.
RCA_HD int64_t ema_slot(int64_t ptr, int64_t rank, int64_t slots) { return (ptr + rank) % slots; }

// ---------------------------------------------------------------------------------------------
// Device back-ends.  Arguments arrive checked and normalised by ops.cpp:
//   bank (L, S, D) contiguous, any float dtype; ptr (L,) int64; emb (N, D) contiguous in the
//   compute dtype (float64 for a float64 bank, float32 otherwise); target (N,) int64.
void ema_update_cpu(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                    double gamma);
void ema_update_cuda(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                     double gamma);

// Lloyd iterations of n = L * n_init problems; problem p reads the points x[p / n_init].
//   x (L, S, D) and xnorm (L, S) in the compute dtype (float32 or float64), contiguous;
//   centers (n, K, D) the initial centres, overwritten with the final ones;
//   tol_abs (n,) the absolute tolerance of each problem (scikit-learn's rule).
// Returns labels (n, S) int64 and inertia (n,) of the final centres.
struct LloydResult {
  at::Tensor labels;
  at::Tensor inertia;
};
// The random numbers of greedy k-means++ for n runs, drawn on the host in rca_fast.ref's order:
// first (n,) int64 the first centre of each run; uniform (k-1, n, T) float64 the draws of each
// later step, T = 2 + floor(ln k) candidates.
struct PlusPlusDraws {
  at::Tensor first;
  at::Tensor uniform;
};
int64_t plusplus_trials(int64_t k);
PlusPlusDraws draw_plusplus(int64_t n, int64_t S, int64_t k, at::Generator& gen);
// With `plusplus` given, the CPU twin seeds the runs itself (k-means++ inside its per-problem
// tasks) and `centers` is only written; otherwise `centers` holds the initial centres.
LloydResult lloyd_cpu(const at::Tensor& x, const at::Tensor& xnorm, at::Tensor& centers,
                      const at::Tensor& tol_abs, int64_t n_init, int64_t iters, const PlusPlusDraws* plusplus);
LloydResult lloyd_cuda(const at::Tensor& x, const at::Tensor& xnorm, at::Tensor& centers,
                       const at::Tensor& tol_abs, int64_t n_init, int64_t iters);

// Squared L2 norm of every row of the (R, D) matrix x -> (R,), in x's dtype.
at::Tensor row_sqnorm_cpu(const at::Tensor& x);
at::Tensor row_sqnorm_cuda(const at::Tensor& x);
// Mean over the D features of the biased variance over the S points: (L, S, D) -> (L,).
at::Tensor feature_variance_cpu(const at::Tensor& x);

// The ops themselves (registered as rca_fast::ema_update_ and rca_fast::kmeans).
void ema_update_op(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                   double gamma);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_op(const at::Tensor& points, int64_t k, int64_t iters,
                                                         double tol, int64_t seed, bool random_init,
                                                         int64_t n_init);

bool built_with_cuda();

}  // namespace rca_fast
