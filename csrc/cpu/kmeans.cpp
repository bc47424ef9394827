// CPU twin of the batched Lloyd iterations (the structure of cuda/kmeans.cu).
//
// Each run (one problem, one of its n_init restarts) iterates on its own thread until it
// converges, so a run that converges early costs nothing more.  Per iteration:
//   assign   distances by ||x||^2 - 2 x.c + ||c||^2 (one small GEMM per chunk of points, into a
//            chunk x K buffer) fused with the arg-min: no S x K distance matrix is kept;
//   update   centre + mean offset of its points (no atomics: one thread owns the run);
//            empty clusters move to the farthest points from their centres (distinct points);
//   converge squared centre shift <= tol * mean feature variance, or no label changed.
#include "../rca_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace rca_fast {
namespace {

constexpr int64_t kChunk = 1024;  // points per GEMM in the assignment

template <typename T>
struct Run {
  const T* x;      // (S, D) points of the run's problem
  const T* xnorm;  // (S,)
  T* centers;      // (K, D) in/out
  int64_t* labels; // (S,) out
  int64_t S, D, K;
};

template <typename T>
class LloydRun {
 public:
  explicit LloydRun(const Run<T>& run)
      : r_(run), opts_(at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)),
        xt_(at::from_blob(const_cast<T*>(run.x), {run.S, run.D}, opts_)),
        gbuf_(at::empty({std::min(run.S, kChunk), run.K}, opts_)), cnorm_(run.K), mind_(run.S),
        prev_(run.S, -1), fresh_(run.K * run.D), sums_(run.K * run.D), counts_(run.K) {}

  // Labels and squared distance of every point to its nearest centre.
  void assign(int64_t* labels) {
    const int64_t S = r_.S, D = r_.D, K = r_.K;
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(r_.centers[k * D + d]) * r_.centers[k * D + d];
      cnorm_[k] = static_cast<T>(acc);
    }
    const at::Tensor ct = at::from_blob(r_.centers, {K, D}, opts_).t();
    for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
      const int64_t rows = std::min(kChunk, S - s0);
      at::Tensor g = gbuf_.narrow(0, 0, rows);
      at::mm_out(g, xt_.narrow(0, s0, rows), ct);
      const T* gp = g.data_ptr<T>();
      for (int64_t i = 0; i < rows; ++i) {
        const T xn = r_.xnorm[s0 + i];
        T best = std::numeric_limits<T>::infinity();
        int64_t arg = 0;
        for (int64_t k = 0; k < K; ++k) {  // the same expression and tie-break as the CUDA kernel
          T dist = (xn - T(2) * gp[i * K + k]) + cnorm_[k];
          dist = dist > T(0) ? dist : T(0);
          if (dist < best) best = dist, arg = k;
        }
        labels[s0 + i] = arg;
        mind_[s0 + i] = best;
      }
    }
  }

  // New centres into fresh_; returns the squared shift from the current ones.
  double update(const int64_t* labels) {
    const int64_t S = r_.S, D = r_.D, K = r_.K;
    std::fill(sums_.begin(), sums_.end(), T(0));
    std::fill(counts_.begin(), counts_.end(), int64_t{0});
    for (int64_t s = 0; s < S; ++s) {  // offsets from the current centre lose less to rounding
      const int64_t k = labels[s];
      ++counts_[k];
      const T* row = r_.x + s * D;
      const T* c = r_.centers + k * D;
      T* acc = sums_.data() + k * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += row[d] - c[d];
    }
    int64_t empties = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (counts_[k] == 0) { ++empties; continue; }
      const T count = static_cast<T>(counts_[k]);
      for (int64_t d = 0; d < D; ++d) fresh_[k * D + d] = r_.centers[k * D + d] + sums_[k * D + d] / count;
    }
    if (empties > 0) reseed_empty(empties);
    double shift = 0;
    for (int64_t e = 0; e < K * D; ++e) {
      const double diff = static_cast<double>(fresh_[e]) - r_.centers[e];
      shift += diff * diff;
    }
    return shift;
  }

  void run(int64_t iters, double tol_abs, T* inertia) {
    const int64_t S = r_.S, D = r_.D;
    for (int64_t it = 0; it < iters; ++it) {
      assign(r_.labels);
      const bool changed = !std::equal(r_.labels, r_.labels + S, prev_.begin());
      const double shift = update(r_.labels);
      std::copy(fresh_.begin(), fresh_.end(), r_.centers);
      std::copy(r_.labels, r_.labels + S, prev_.begin());
      if (shift <= tol_abs || (it > 0 && !changed)) break;
    }
    assign(r_.labels);
    double total = 0;  // inertia from the differences themselves, not the expanded distances
    for (int64_t s = 0; s < S; ++s) {
      const T* row = r_.x + s * D;
      const T* c = r_.centers + r_.labels[s] * D;
      for (int64_t d = 0; d < D; ++d) {
        const double diff = static_cast<double>(row[d]) - c[d];
        total += diff * diff;
      }
    }
    *inertia = static_cast<T>(total);
  }

 private:
  // The r-th empty cluster (in cluster order) takes the r-th farthest point from its centre
  // (ties: the lower index first), as rca_fast.ref.kmeans and the CUDA kernel do.
  void reseed_empty(int64_t empties) {
    const int64_t S = r_.S, D = r_.D, K = r_.K;
    std::vector<int64_t> order(S);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + empties, order.end(), [&](int64_t i, int64_t j) {
      return mind_[i] > mind_[j] || (mind_[i] == mind_[j] && i < j);
    });
    int64_t rank = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (counts_[k] != 0) continue;
      std::copy(r_.x + order[rank] * D, r_.x + (order[rank] + 1) * D, fresh_.begin() + k * D);
      ++rank;
    }
  }

  Run<T> r_;
  at::TensorOptions opts_;
  at::Tensor xt_, gbuf_;
  std::vector<T> cnorm_, mind_;
  std::vector<int64_t> prev_;
  std::vector<T> fresh_, sums_;
  std::vector<int64_t> counts_;
};

}  // namespace

at::Tensor row_sqnorm_cpu(const at::Tensor& x) {
  const at::Tensor rows = x.contiguous();
  const int64_t R = rows.size(0), D = rows.size(1);
  at::Tensor out = at::empty({R}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_sqnorm_cpu", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(src[r * D + d]) * src[r * D + d];
        dst[r] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

namespace {

template <typename T>
void lloyd_all(const T* x, const T* xnorm, T* centers, int64_t* labels, T* inertia, const double* tol_abs,
               int64_t n, int64_t n_init, int64_t S, int64_t D, int64_t K, int64_t iters) {
  // One run per task, handed out dynamically (runs converge after different iteration counts).
  // GEMMs called from inside this region run single-threaded (ATen and MKL see the region).
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t p = 0; p < n; ++p) {
    const int64_t l = p / n_init;
    LloydRun<T> run(Run<T>{x + l * S * D, xnorm + l * S, centers + p * K * D, labels + p * S, S, D, K});
    run.run(iters, tol_abs[p], inertia + p);
  }
}

}  // namespace

LloydResult lloyd_cpu(const at::Tensor& x, const at::Tensor& xnorm, at::Tensor& centers,
                      const at::Tensor& tol_abs, int64_t n_init, int64_t iters) {
  const int64_t S = x.size(1), D = x.size(2), n = centers.size(0), K = centers.size(1);
  at::Tensor labels = at::empty({n, S}, x.options().dtype(at::kLong));
  at::Tensor inertia = at::empty({n}, x.options());
  const at::Tensor tol = tol_abs.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lloyd_cpu", [&] {
    lloyd_all<scalar_t>(x.data_ptr<scalar_t>(), xnorm.data_ptr<scalar_t>(), centers.data_ptr<scalar_t>(),
                        labels.data_ptr<int64_t>(), inertia.data_ptr<scalar_t>(), tol.data_ptr<double>(),
                        n, n_init, S, D, K, iters);
  });
  return {labels, inertia};
}

}  // namespace rca_fast
