// Op front-ends of rca_fast._C and their torch.library registration.
//
// The public Python functions (rca_fast.ops) validate the user's arguments; the checks here only
// guard the C++ entry points against misuse (they raise c10::Error -> RuntimeError in Python).
#include "rca_fast.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace rca_fast {

bool built_with_cuda() {
#if defined(RCA_FAST_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// =============================================================================================
// EMA update
void ema_update_op(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                   double gamma) {
  RCA_CHECK(bank.dim() == 3 && at::isFloatingType(bank.scalar_type()),
            "ema_update_: bank must be a (L, S, D) float tensor, got ", bank.sizes(), " ", bank.scalar_type());
  RCA_CHECK_CONTIGUOUS(bank);
  const int64_t L = bank.size(0), S = bank.size(1), D = bank.size(2);
  RCA_CHECK(ptr.dim() == 1 && ptr.size(0) == L, "ema_update_: ptr must be (", L, ",), got ", ptr.sizes());
  RCA_CHECK_DTYPE(ptr, at::kLong);
  RCA_CHECK(emb.dim() == 2 && emb.size(1) == D && at::isFloatingType(emb.scalar_type()),
            "ema_update_: emb must be a (N, ", D, ") float tensor, got ", emb.sizes());
  RCA_CHECK(target.dim() == 1 && target.size(0) == emb.size(0),
            "ema_update_: target must be (", emb.size(0), ",), got ", target.sizes());
  RCA_CHECK(ptr.device() == bank.device() && emb.device() == bank.device() && target.device() == bank.device(),
            "ema_update_: bank, ptr, emb and target must be on one device");
  RCA_CHECK(S > 0 && S < (int64_t{1} << 31), "ema_update_: the slot count must be in [1, 2^31), got ", S);
  if (emb.size(0) == 0 || D == 0) return;
  const auto cd = bank.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor rows = emb.to(cd).contiguous();         // the contract widens/rounds emb to cd
  const at::Tensor classes = target.to(at::kLong).contiguous();
  at::Tensor ptr_work = ptr.is_contiguous() ? ptr : ptr.contiguous();
  if (bank.is_cuda()) {
#if defined(RCA_FAST_WITH_CUDA)
    ema_update_cuda(bank, ptr_work, rows, classes, gamma);
#else
    RCA_CHECK(false, "ema_update_: rca_fast._C was built without CUDA");
#endif
  } else {
    ema_update_cpu(bank, ptr_work, rows, classes, gamma);
  }
  if (!ptr_work.is_same(ptr)) ptr.copy_(ptr_work);
}

// =============================================================================================
// k-means initialisation: device-generic ATen code shared by the CPU twin and the CUDA path.
// The random numbers come from torch's CPU generator seeded with `seed`, drawn in the same order
// and shapes as rca_fast.ref.kmeans, so every backend picks the same seeds given equal distances.
namespace {

at::Tensor row_sqnorm(const at::Tensor& rows) {
#if defined(RCA_FAST_WITH_CUDA)
  if (rows.is_cuda()) return row_sqnorm_cuda(rows);
#endif
  return row_sqnorm_cpu(rows);
}

// Rows idx (L, M) of each problem's points x (L, S, D) -> (L, M, D).
at::Tensor take_points(const at::Tensor& x, const at::Tensor& idx) {
  const int64_t L = x.size(0), S = x.size(1), D = x.size(2), M = idx.size(1);
  const at::Tensor flat = (idx + at::arange(L, idx.options()).unsqueeze(1) * S).reshape({-1});
  return x.view({L * S, D}).index_select(0, flat).view({L, M, D});
}

// tol * mean per-feature variance of each problem's points (scikit-learn's rule) -> (L,).
at::Tensor absolute_tolerance(const at::Tensor& x, double tol) {
  if (x.is_cuda()) return tol * at::var(x, {1}, /*unbiased=*/false, /*keepdim=*/false).mean(-1);
  return tol * feature_variance_cpu(x);
}

// Squared distances (clamped at 0) of every point x (L, S, D) to M candidates c (L, M, D) of
// its problem -> (L, S, M).  M is small (n_init * trials), so this tensor is small.
at::Tensor sq_distances(const at::Tensor& x, const at::Tensor& xnorm, const at::Tensor& c) {
  const at::Tensor cnorm = row_sqnorm(c.reshape({-1, c.size(2)})).view({c.size(0), 1, c.size(1)});
  return (xnorm.unsqueeze(-1) - 2 * at::bmm(x, c.transpose(1, 2)) + cnorm).clamp_min_(0);
}

// (L, S, n_init * M) distances of the L data problems -> (n, S, M) of the n = L * n_init runs.
at::Tensor per_run(const at::Tensor& d, int64_t n_init, int64_t M) {
  const int64_t L = d.size(0), S = d.size(1);
  return d.view({L, S, n_init, M}).permute({0, 2, 1, 3}).reshape({L * n_init, S, M});
}

}  // namespace

int64_t plusplus_trials(int64_t k) { return 2 + static_cast<int64_t>(std::log(static_cast<double>(k))); }

PlusPlusDraws draw_plusplus(int64_t n, int64_t S, int64_t k, at::Generator& gen) {
  // rca_fast.ref.kmeans draws randint(S, (n,)) first, then rand((n, T), float64) once per step;
  // nothing else uses the generator in between, so drawing them all here gives the same numbers.
  const int64_t trials = plusplus_trials(k);
  PlusPlusDraws out;
  out.first = at::randint(S, {n}, gen, at::TensorOptions().dtype(at::kLong));
  std::vector<at::Tensor> steps;
  for (int64_t j = 1; j < k; ++j) steps.push_back(at::rand({n, trials}, gen, at::TensorOptions().dtype(at::kDouble)));
  out.uniform = steps.empty() ? at::empty({0, n, trials}, at::kDouble) : at::stack(steps, 0);  // (k-1, n, T)
  return out;
}

namespace {

// Greedy k-means++ (2 + ln k candidates per step, the lowest potential wins) of n runs at once,
// in batched ATen ops (the CUDA path; the CPU twin runs the same steps per problem in C++).
at::Tensor kmeans_plusplus(const at::Tensor& x, const at::Tensor& xnorm, int64_t k, int64_t n_init,
                           const PlusPlusDraws& draws) {
  const int64_t L = x.size(0), S = x.size(1), D = x.size(2), n = L * n_init;
  const int64_t trials = plusplus_trials(k);
  const auto dev = x.device();
  const at::Tensor first = draws.first.to(dev);
  const at::Tensor uniform = draws.uniform.to(dev);
  at::Tensor c0 = take_points(x, first.view({L, n_init}));                         // (L, n_init, D)
  std::vector<at::Tensor> centers{c0.reshape({n, D})};
  at::Tensor closest = per_run(sq_distances(x, xnorm, c0), n_init, 1).squeeze(-1);  // (n, S)
  const at::Tensor runs = at::arange(n, first.options());
  for (int64_t j = 1; j < k; ++j) {
    const at::Tensor pot = closest.sum(-1, /*keepdim=*/true);                       // (n, 1)
    const at::Tensor targets = (uniform[j - 1] * pot).to(x.scalar_type()).contiguous();
    const at::Tensor cand = at::searchsorted(closest.cumsum(-1).contiguous(), targets).clamp_max_(S - 1);
    const at::Tensor cand_pts = take_points(x, cand.view({L, n_init * trials}));   // (L, n_init*T, D)
    const at::Tensor d = per_run(sq_distances(x, xnorm, cand_pts), n_init, trials);  // (n, S, T)
    const at::Tensor merged = at::minimum(closest.unsqueeze(-1), d);                // (n, S, T)
    const at::Tensor best = merged.sum(1).argmin(-1);                                // (n,)
    closest = merged.index({runs, at::indexing::Slice(), best});
    centers.push_back(cand_pts.view({n, trials, D}).index({runs, best}));
  }
  return at::stack(centers, 1);                                                     // (n, k, D)
}

// k distinct points per run, uniformly: the first k of a random permutation.
at::Tensor random_init(const at::Tensor& x, int64_t k, int64_t n_init, at::Generator& gen) {
  const int64_t L = x.size(0), S = x.size(1), D = x.size(2);
  const at::Tensor keys = at::rand({L * n_init, S}, gen, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor idx = keys.argsort(/*dim=*/int64_t{-1}).narrow(1, 0, k).to(x.device());           // (n, k)
  return take_points(x, idx.reshape({L, n_init * k})).view({L * n_init, k, D});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_op(const at::Tensor& points, int64_t k, int64_t iters,
                                                         double tol, int64_t seed, bool use_random_init,
                                                         int64_t n_init) {
  RCA_CHECK(points.dim() == 3 && at::isFloatingType(points.scalar_type()),
            "kmeans: points must be a (L, S, D) float tensor, got ", points.sizes(), " ", points.scalar_type());
  const int64_t L = points.size(0), S = points.size(1), D = points.size(2);
  RCA_CHECK(k >= 1 && k <= S, "kmeans: k must be in [1, S = ", S, "], got ", k);
  RCA_CHECK(iters >= 1 && n_init >= 1, "kmeans: iters and n_init must be >= 1, got ", iters, ", ", n_init);
  RCA_CHECK(tol >= 0, "kmeans: tol must be >= 0, got ", tol);
  RCA_CHECK(S < (int64_t{1} << 31) && k < (int64_t{1} << 31), "kmeans: S and k must be < 2^31");
  const auto cd = points.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = points.detach().to(cd).contiguous();                            // (L, S, D)
  const int64_t n = L * n_init;
  if (L == 0) {
    return {at::empty({0, k, D}, points.options()), at::empty({0, S}, x.options().dtype(at::kLong)),
            at::empty({0}, x.options())};
  }
  const at::Tensor xnorm = row_sqnorm(x.view({L * S, D})).view({L, S});
  at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  PlusPlusDraws draws;
  at::Tensor centers;
  if (use_random_init) {
    centers = random_init(x, k, n_init, gen).contiguous();
  } else {
    draws = draw_plusplus(n, S, k, gen);
    // The CPU twin seeds inside its per-problem tasks (one thread pool for the whole k-means).
    centers = x.is_cuda() ? kmeans_plusplus(x, xnorm, k, n_init, draws).contiguous()
                          : at::empty({n, k, D}, x.options());
  }
  // scikit-learn's rule: tol times the mean per-feature variance of the problem's points.
  const at::Tensor tol_abs = absolute_tolerance(x, tol).repeat_interleave(n_init).contiguous();  // (n,)
  LloydResult res;
  if (x.is_cuda()) {
#if defined(RCA_FAST_WITH_CUDA)
    res = lloyd_cuda(x, xnorm, centers, tol_abs, n_init, iters);
#else
    RCA_CHECK(false, "kmeans: rca_fast._C was built without CUDA");
#endif
  } else {
    res = lloyd_cpu(x, xnorm, centers, tol_abs, n_init, iters, use_random_init ? nullptr : &draws);
  }
  at::Tensor labels = res.labels, inertia = res.inertia;
  if (n_init > 1) {  // keep each problem's best run (the first of equal ones)
    const at::Tensor best = inertia.view({L, n_init}).argmin(-1) +
                            at::arange(L, labels.options()) * n_init;
    centers = centers.index_select(0, best);
    labels = labels.index_select(0, best);
    inertia = inertia.index_select(0, best);
  }
  return {centers.to(points.scalar_type()), labels, inertia};
}

}  // namespace rca_fast

// =============================================================================================
// torch.library registration: schemas here, fake (meta) implementations in rca_fast/_ext.py.
TORCH_LIBRARY(rca_fast, m) {
  m.def("ema_update_(Tensor(a!) bank, Tensor(b!) ptr, Tensor emb, Tensor target, float gamma) -> ()");
  m.def("kmeans(Tensor points, int k, int iters, float tol, int seed, bool random_init, int n_init)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rca_fast, CPU, m) {
  m.impl("ema_update_", &rca_fast::ema_update_op);
  m.impl("kmeans", &rca_fast::kmeans_op);
}

#if defined(RCA_FAST_WITH_CUDA)
TORCH_LIBRARY_IMPL(rca_fast, CUDA, m) {
  m.impl("ema_update_", &rca_fast::ema_update_op);
  m.impl("kmeans", &rca_fast::kmeans_op);
}
#endif
