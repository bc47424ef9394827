// C++ test of the rca_fast ops library (run by ctest): the ops are called through the torch
// dispatcher, as Python calls them, and checked against loops written here.
//   * ema_update_: bit-for-bit the sequential loop (float32 and bfloat16 banks, repeated classes,
//     wrap-around, more than S rows of one class), pointers advanced;
//   * kmeans: well separated clusters recovered exactly, deterministic for a seed, identical
//     points give finite centroids and zero inertia, k > S rejected.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "rca_fast.h"

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

using KmeansFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, double,
                                                                   int64_t, bool, int64_t);
using EmaFn = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double);

// The contract's loop: new = (a * old) + (b * row) in float32, one rounding to the bank dtype.
void sequential_ema(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                    double gamma) {
  const int64_t S = bank.size(1), D = bank.size(2);
  const float a = static_cast<float>(gamma), b = static_cast<float>(1.0 - gamma);
  at::Tensor wide = bank.to(at::kFloat);
  auto w = wide.accessor<float, 3>();
  auto e = emb.accessor<float, 2>();
  auto t = target.accessor<int64_t, 1>();
  auto p = ptr.accessor<int64_t, 1>();
  for (int64_t i = 0; i < emb.size(0); ++i) {
    const int64_t c = t[i], slot = p[c];
    for (int64_t d = 0; d < D; ++d) {
      const float x = a * w[c][slot][d];
      const float y = b * e[i][d];
      w[c][slot][d] = x + y;
    }
    // one rounding to the bank's dtype per update, as the bank stores it
    wide[c][slot].copy_(wide[c][slot].to(bank.scalar_type()).to(at::kFloat));
    p[c] = (slot + 1) % S;
  }
  bank.copy_(wide);
}

void test_ema(const c10::TypedOperatorHandle<EmaFn>& op, at::ScalarType dtype, const std::string& name) {
  at::manual_seed(7);
  const int64_t L = 3, S = 4, D = 37, N = 15;
  at::Tensor bank = at::randn({L, S, D}).to(dtype);
  at::Tensor ptr = at::tensor(std::vector<int64_t>{3, 1, 0});
  at::Tensor emb = at::randn({N, D});
  // class 0 gets 10 rows (> S: slots revisited), class 2 gets 5, class 1 none
  at::Tensor target = at::tensor(std::vector<int64_t>{0, 2, 0, 0, 2, 0, 0, 2, 0, 0, 2, 0, 2, 0, 0});
  at::Tensor want_bank = bank.clone(), want_ptr = ptr.clone();
  sequential_ema(want_bank, want_ptr, emb, target, 0.9);
  op.call(bank, ptr, emb, target, 0.9);
  check(at::equal(bank, want_bank), "ema_update_ " + name + ": bank bit-for-bit the sequential loop");
  check(at::equal(ptr, want_ptr), "ema_update_ " + name + ": pointers advanced");
}

void test_kmeans(const c10::TypedOperatorHandle<KmeansFn>& op) {
  at::manual_seed(3);
  const int64_t L = 2, K = 3, per = 20, D = 5;
  at::Tensor centres = at::randn({L, K, D}) * 50;
  at::Tensor truth = at::arange(K, at::kLong).repeat_interleave(per);                 // (S,)
  at::Tensor points = centres.index_select(1, truth) + 0.1 * at::randn({L, K * per, D});
  auto [centroids, labels, inertia] = op.call(points, K, 100, 1e-4, 11, false, 2);
  bool same_partition = true;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t s = 0; s < K * per; ++s) {
      for (int64_t t = 0; t < K * per; ++t) {
        const bool together = labels[l][s].item<int64_t>() == labels[l][t].item<int64_t>();
        same_partition &= together == (truth[s].item<int64_t>() == truth[t].item<int64_t>());
      }
    }
  }
  check(same_partition, "kmeans: well separated clusters recovered");
  check(centroids.sizes() == at::IntArrayRef({L, K, D}) && inertia.sizes() == at::IntArrayRef({L}),
        "kmeans: output shapes");
  check(inertia.max().item<double>() < 0.02 * 3 * per * D, "kmeans: inertia of the noise only");
  auto again = op.call(points, K, 100, 1e-4, 11, false, 2);
  check(at::equal(std::get<0>(again), centroids) && at::equal(std::get<1>(again), labels),
        "kmeans: deterministic for a seed");
  auto [c1, l1, i1] = op.call(at::full({1, 6, 4}, 0.25), 3, 100, 1e-4, 0, false, 1);
  check(at::isfinite(c1).all().item<bool>() && i1.item<double>() == 0.0, "kmeans: identical points");
  bool raised = false;
  try {
    op.call(at::randn({1, 4, 2}), 5, 10, 1e-4, 0, false, 1);
  } catch (const c10::Error&) {
    raised = true;
  }
  check(raised, "kmeans: k > S raises");
}

}  // namespace

int main() {
  // Referencing the library keeps it linked (and its ops registered) under --as-needed.
  std::printf("rca_fast ops library, CUDA sources: %s\n", rca_fast::built_with_cuda() ? "yes" : "no");
  auto& dispatcher = c10::Dispatcher::singleton();
  auto ema = dispatcher.findSchemaOrThrow("rca_fast::ema_update_", "").typed<EmaFn>();
  auto kmeans = dispatcher.findSchemaOrThrow("rca_fast::kmeans", "").typed<KmeansFn>();
  test_ema(ema, at::kFloat, "float32");
  test_ema(ema, at::kBFloat16, "bfloat16");
  test_kmeans(kmeans);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
