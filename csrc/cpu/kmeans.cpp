// CPU twin of the batched Lloyd iterations (the structure of cuda/kmeans.cu).
//
// One task per problem (parallel over problems), holding its n_init runs; the runs of a problem
// iterate in lockstep and a run leaves as soon as it converges.  Per iteration:
//   assign   distances by ||x||^2 - 2 x.c + ||c||^2: one GEMM per chunk of points against the
//            centres of all of the problem's active runs (n_init * K columns: a much better GEMM
//            than K columns alone) into a chunk-sized buffer, fused with each run's arg-min --
//            no S x K distance matrix is kept;
//   update   centre + mean offset of its points (no atomics: one thread owns the problem);
//            empty clusters move to the farthest points from their centres (distinct points);
//   converge squared centre shift <= tol * mean feature variance, or no label changed.
#include "../rca_fast.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace rca_fast {
namespace {

constexpr int64_t kGemmElems = 1 << 20;  // most elements of one GEMM output chunk

// The hot loops, compiled for AVX-512 and AVX2 as well as the baseline and picked at load time
// (GCC function multi-versioning): the extension is built without -march flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RCA_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RCA_MULTIVERSION
#endif

#define RCA_DEFINE_LOOPS(T)                                                            \
  RCA_MULTIVERSION T squared_norm(const T* a, int64_t D) {                             \
    T acc = T(0);                                                                      \
    _Pragma("omp simd reduction(+ : acc)") for (int64_t d = 0; d < D; ++d) acc += a[d] * a[d]; \
    return acc;                                                                        \
  }                                                                                    \
  RCA_MULTIVERSION T squared_distance(const T* a, const T* b, int64_t D) {             \
    T acc = T(0);                                                                      \
    _Pragma("omp simd reduction(+ : acc)") for (int64_t d = 0; d < D; ++d) acc += (a[d] - b[d]) * (a[d] - b[d]); \
    return acc;                                                                        \
  }                                                                                    \
  RCA_MULTIVERSION void add_offset(T* acc, const T* row, const T* c, int64_t D) {      \
    _Pragma("omp simd") for (int64_t d = 0; d < D; ++d) acc[d] += row[d] - c[d];       \
  }

RCA_DEFINE_LOOPS(float)
RCA_DEFINE_LOOPS(double)

// The R = n_init runs of one problem.
template <typename T>
class Problem {
 public:
  Problem(const T* x, const T* xnorm, T* centers, int64_t* labels, T* inertia, const double* tol, int64_t R,
          int64_t S, int64_t D, int64_t K)
      : x_(x), xnorm_(xnorm), centers_(centers), labels_(labels), inertia_(inertia), tol_(tol), R_(R), S_(S), D_(D),
        K_(K), opts_(at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)),
        xt_(at::from_blob(const_cast<T*>(x), {S, D}, opts_)),
        chunk_(std::max<int64_t>(1, std::min<int64_t>(S, kGemmElems / (R * K)))), cbuf_(R * K * D),
        cnorm_(R * K), gbuf_(chunk_ * R * K), mind_(R * S), prev_(R * S, -1), fresh_(K * D), sums_(K * D),
        counts_(K) {}

  void solve(int64_t iters) {
    std::vector<int64_t> active(R_), all(R_);
    std::iota(all.begin(), all.end(), int64_t{0});
    active = all;
    for (int64_t it = 0; it < iters && !active.empty(); ++it) {
      assign(active);
      std::vector<int64_t> still;
      for (const int64_t r : active) {
        int64_t* labels = labels_ + r * S_;
        int64_t* prev = prev_.data() + r * S_;
        const bool changed = !std::equal(labels, labels + S_, prev);
        const double shift = update(r);
        std::copy(fresh_.begin(), fresh_.end(), centers_ + r * K_ * D_);
        std::copy(labels, labels + S_, prev);
        if (!(shift <= tol_[r] || (it > 0 && !changed))) still.push_back(r);
      }
      active.swap(still);
    }
    assign(all);
    for (int64_t r = 0; r < R_; ++r) {  // inertia from the differences, not the expanded distances
      double total = 0;
      const T* c = centers_ + r * K_ * D_;
      for (int64_t s = 0; s < S_; ++s) total += squared_distance(x_ + s * D_, c + labels_[r * S_ + s] * D_, D_);
      inertia_[r] = static_cast<T>(total);
    }
  }

  // Greedy k-means++ of the R runs (the steps of rca_fast.ref.kmeans, with its random numbers):
  // first (R,) the first centre of each run; uniform(j, r, t) the t-th draw of step j of run r.
  // The candidates of all runs share one GEMM per step (S x R*T).
  template <typename Uniform>
  void seed_plusplus(const int64_t* first, Uniform uniform, int64_t trials) {
    const int64_t R = R_, S = S_, D = D_, K = K_;
    std::vector<T> closest(R * S), cum(S), gram(S * R * trials), cand_rows(R * trials * D), cand_norm(R * trials);
    std::vector<int64_t> cand(R * trials);
    // First centres, and every point's squared distance to its run's one.
    for (int64_t r = 0; r < R; ++r) {
      std::copy(x_ + first[r] * D, x_ + (first[r] + 1) * D, cand_rows.begin() + r * D);
      std::copy(x_ + first[r] * D, x_ + (first[r] + 1) * D, centers_ + r * K * D);
      cand_norm[r] = squared_norm(x_ + first[r] * D, D);
    }
    gemm(cand_rows.data(), R, gram.data());
    for (int64_t r = 0; r < R; ++r)
      for (int64_t s = 0; s < S; ++s) closest[r * S + s] = distance(s, gram[s * R + r], cand_norm[r]);
    const int64_t M = R * trials;
    for (int64_t j = 1; j < K; ++j) {
      for (int64_t r = 0; r < R; ++r) {  // candidates drawn with probability ~ squared distance
        double acc = 0;  // torch's CPU cumsum accumulates float in double, as here
        for (int64_t s = 0; s < S; ++s) acc += closest[r * S + s], cum[s] = static_cast<T>(acc);
        const double pot = static_cast<double>(static_cast<T>(acc));
        for (int64_t t = 0; t < trials; ++t) {
          const T target = static_cast<T>(uniform(j, r, t) * pot);
          const int64_t idx = std::min<int64_t>(std::lower_bound(cum.begin(), cum.end(), target) - cum.begin(), S - 1);
          cand[r * trials + t] = idx;
          std::copy(x_ + idx * D, x_ + (idx + 1) * D, cand_rows.begin() + (r * trials + t) * D);
          cand_norm[r * trials + t] = squared_norm(x_ + idx * D, D);
        }
      }
      gemm(cand_rows.data(), M, gram.data());
      for (int64_t r = 0; r < R; ++r) {  // keep the candidate with the lowest potential
        double best_pot = std::numeric_limits<double>::infinity();
        int64_t best = 0;
        for (int64_t t = 0; t < trials; ++t) {
          const int64_t col = r * trials + t;
          double pot = 0;
          for (int64_t s = 0; s < S; ++s) pot += std::min(closest[r * S + s], distance(s, gram[s * M + col], cand_norm[col]));
          if (pot < best_pot) best_pot = pot, best = t;
        }
        const int64_t col = r * trials + best;
        for (int64_t s = 0; s < S; ++s)
          closest[r * S + s] = std::min(closest[r * S + s], distance(s, gram[s * M + col], cand_norm[col]));
        const T* chosen = x_ + cand[col] * D;
        std::copy(chosen, chosen + D, centers_ + (r * K + j) * D);
      }
    }
  }

 private:
  // ||x_s||^2 - 2 x_s.c + ||c||^2 clamped at 0: the expression (and rounding order) of the reference.
  T distance(int64_t s, T dot, T cnorm) const {
    const T d = (xnorm_[s] - T(2) * dot) + cnorm;
    return d > T(0) ? d : T(0);
  }

  // out (S, m) = points (S, D) . rows (m, D)^T, single-threaded inside the task.
  void gemm(const T* rows, int64_t m, T* out) {
    at::Tensor g = at::from_blob(out, {S_, m}, opts_);
    at::mm_out(g, xt_, at::from_blob(const_cast<T*>(rows), {m, D_}, opts_).t());
  }

  // Labels and squared distance to the nearest centre of every point, for the given runs.
  void assign(const std::vector<int64_t>& runs) {
    const int64_t A = static_cast<int64_t>(runs.size()), S = S_, D = D_, K = K_, cols = A * K;
    for (int64_t j = 0; j < A; ++j) {
      const T* c = centers_ + runs[j] * K * D;
      std::copy(c, c + K * D, cbuf_.begin() + j * K * D);
      for (int64_t k = 0; k < K; ++k) cnorm_[j * K + k] = squared_norm(c + k * D, D);
    }
    const at::Tensor ct = at::from_blob(cbuf_.data(), {cols, D}, opts_).t();
    for (int64_t s0 = 0; s0 < S; s0 += chunk_) {
      const int64_t rows = std::min(chunk_, S - s0);
      at::Tensor g = at::from_blob(gbuf_.data(), {rows, cols}, opts_);
      at::mm_out(g, xt_.narrow(0, s0, rows), ct);
      for (int64_t i = 0; i < rows; ++i) {
        const T* gi = gbuf_.data() + i * cols;
        for (int64_t j = 0; j < A; ++j) {
          T best = std::numeric_limits<T>::infinity();
          int64_t arg = 0;
          for (int64_t k = 0; k < K; ++k) {  // the expression and tie-break of the CUDA kernel
            const T dist = distance(s0 + i, gi[j * K + k], cnorm_[j * K + k]);
            if (dist < best) best = dist, arg = k;
          }
          labels_[runs[j] * S + s0 + i] = arg;
          mind_[runs[j] * S + s0 + i] = best;
        }
      }
    }
  }

  // New centres of run r into fresh_; returns the squared shift from the current ones.
  double update(int64_t r) {
    const int64_t S = S_, D = D_, K = K_;
    const int64_t* labels = labels_ + r * S;
    const T* centers = centers_ + r * K * D;
    std::fill(sums_.begin(), sums_.end(), T(0));
    std::fill(counts_.begin(), counts_.end(), int64_t{0});
    for (int64_t s = 0; s < S; ++s) {  // offsets from the current centre lose less to rounding
      const int64_t k = labels[s];
      ++counts_[k];
      const T* row = x_ + s * D;
      const T* c = centers + k * D;
      add_offset(sums_.data() + k * D, row, c, D);
    }
    int64_t empties = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (counts_[k] == 0) { ++empties; continue; }
      const T count = static_cast<T>(counts_[k]);
      for (int64_t d = 0; d < D; ++d) fresh_[k * D + d] = centers[k * D + d] + sums_[k * D + d] / count;
    }
    if (empties > 0) reseed_empty(r, empties);
    double shift = 0;
    for (int64_t e = 0; e < K * D; ++e) {
      const double diff = static_cast<double>(fresh_[e]) - centers[e];
      shift += diff * diff;
    }
    return shift;
  }

  // The e-th empty cluster (in cluster order) takes the e-th farthest point from its centre
  // (ties: the lower index first), as rca_fast.ref.kmeans and the CUDA kernel do.
  void reseed_empty(int64_t r, int64_t empties) {
    const int64_t S = S_, D = D_, K = K_;
    const T* mind = mind_.data() + r * S;
    std::vector<int64_t> order(S);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + empties, order.end(), [&](int64_t i, int64_t j) {
      return mind[i] > mind[j] || (mind[i] == mind[j] && i < j);
    });
    int64_t rank = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (counts_[k] != 0) continue;
      std::copy(x_ + order[rank] * D, x_ + (order[rank] + 1) * D, fresh_.begin() + k * D);
      ++rank;
    }
  }

  const T* x_;
  const T* xnorm_;
  T* centers_;
  int64_t* labels_;
  T* inertia_;
  const double* tol_;
  int64_t R_, S_, D_, K_;
  at::TensorOptions opts_;
  at::Tensor xt_;
  int64_t chunk_;
  std::vector<T> cbuf_, cnorm_, gbuf_, mind_;
  std::vector<int64_t> prev_;
  std::vector<T> fresh_, sums_;
  std::vector<int64_t> counts_;
};

template <typename T>
void lloyd_all(const T* x, const T* xnorm, T* centers, int64_t* labels, T* inertia, const double* tol_abs,
               int64_t L, int64_t n_init, int64_t S, int64_t D, int64_t K, int64_t iters, const int64_t* first,
               const double* uniform, int64_t trials) {
  // One problem per task -- seeding and Lloyd -- handed out dynamically (problems converge after
  // different iteration counts): a single parallel region for the whole k-means, which matters
  // on a loaded machine where every extra region can wait for a descheduled thread.  GEMMs called
  // from inside the region run single-threaded (ATen and MKL see it).
  const int64_t n = L * n_init;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t l = 0; l < L; ++l) {
    const int64_t p = l * n_init;
    Problem<T> problem(x + l * S * D, xnorm + l * S, centers + p * K * D, labels + p * S, inertia + p, tol_abs + p,
                       n_init, S, D, K);
    if (first != nullptr) {
      problem.seed_plusplus(first + p, [&](int64_t j, int64_t r, int64_t t) {
        return uniform[((j - 1) * n + p + r) * trials + t];
      }, trials);
    }
    problem.solve(iters);
  }
}

template <typename T>
void row_sqnorm_all(const T* x, T* out, int64_t R, int64_t D) {
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) out[r] = squared_norm(x + r * D, D);
  });
}

// Mean over features of the (biased) variance over the S points, per problem: two passes.
template <typename T>
void feature_variance_all(const T* x, T* out, int64_t L, int64_t S, int64_t D) {
  at::parallel_for(0, L, 1, [&](int64_t b, int64_t e) {
    std::vector<double> mean(D), sq(D);
    for (int64_t l = b; l < e; ++l) {
      const T* xl = x + l * S * D;
      std::fill(mean.begin(), mean.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) mean[d] += xl[s * D + d];
      for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<double>(S);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) {
          const double diff = xl[s * D + d] - mean[d];
          sq[d] += diff * diff;
        }
      double total = 0;
      for (int64_t d = 0; d < D; ++d) total += sq[d] / static_cast<double>(S);
      out[l] = static_cast<T>(total / static_cast<double>(D));
    }
  });
}

}  // namespace

at::Tensor row_sqnorm_cpu(const at::Tensor& x) {
  const at::Tensor rows = x.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_sqnorm_cpu", [&] {
    row_sqnorm_all<scalar_t>(rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows.size(0), rows.size(1));
  });
  return out;
}

at::Tensor feature_variance_cpu(const at::Tensor& x) {
  at::Tensor out = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "feature_variance_cpu", [&] {
    feature_variance_all<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                   x.size(2));
  });
  return out;
}

LloydResult lloyd_cpu(const at::Tensor& x, const at::Tensor& xnorm, at::Tensor& centers,
                      const at::Tensor& tol_abs, int64_t n_init, int64_t iters, const PlusPlusDraws* plusplus) {
  const int64_t L = x.size(0), S = x.size(1), D = x.size(2), n = centers.size(0), K = centers.size(1);
  at::Tensor labels = at::empty({n, S}, x.options().dtype(at::kLong));
  at::Tensor inertia = at::empty({n}, x.options());
  const at::Tensor tol = tol_abs.to(at::kDouble).contiguous();
  at::Tensor first, uniform;
  if (plusplus != nullptr) first = plusplus->first.contiguous(), uniform = plusplus->uniform.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lloyd_cpu", [&] {
    lloyd_all<scalar_t>(x.data_ptr<scalar_t>(), xnorm.data_ptr<scalar_t>(), centers.data_ptr<scalar_t>(),
                        labels.data_ptr<int64_t>(), inertia.data_ptr<scalar_t>(), tol.data_ptr<double>(), L,
                        n_init, S, D, K, iters, plusplus ? first.data_ptr<int64_t>() : nullptr,
                        plusplus ? uniform.data_ptr<double>() : nullptr, plusplus_trials(K));
  });
  return {labels, inertia};
}

}  // namespace rca_fast
