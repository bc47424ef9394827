// CPU twin of the in-place EMA bank update (the structure of cuda/ema.cu).
//
// Row i of class c is the r-th row of c in this call and lands on slot (ptr[c] + r) % S.  The rows
// with r < S head a chain: the rows r + S, r + 2S, ... of the same class land on the same slot and
// are applied after it, in order.  Distinct chains touch distinct bank rows, so the chains run in
// parallel; inside a chain the order is the row order, which makes the result equal to the
// sequential loop bit for bit (this file is compiled with -ffp-contract=off).
#include "../rca_fast.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace rca_fast {
namespace {

template <typename bank_t, typename cd_t>
void ema_chains(bank_t* bank, const int64_t* ptr, const cd_t* rows, const std::vector<int64_t>& class_rows,
                const std::vector<int64_t>& class_start, const std::vector<std::pair<int64_t, int64_t>>& heads,
                int64_t S, int64_t D, double gamma) {
  const cd_t a = static_cast<cd_t>(gamma);
  const cd_t b = static_cast<cd_t>(1.0 - gamma);
  // Parallel over chains (each owns one bank row) only for large calls: a thread pool costs
  // more than it saves below about a million elements.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(D, 1));
  at::parallel_for(0, static_cast<int64_t>(heads.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const int64_t c = heads[h].first, r = heads[h].second;
      const int64_t first = class_start[c], count = class_start[c + 1] - first;
      bank_t* dst = bank + (c * S + ema_slot(ptr[c], r, S)) * D;
      for (int64_t m = r; m < count; m += S) {       // the chain, in row order
        const cd_t* src = rows + class_rows[first + m] * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<bank_t>(ema_mix<cd_t>(a, static_cast<cd_t>(dst[d]), b, src[d]));
        }
      }
    }
  });
}

}  // namespace

void ema_update_cpu(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                    double gamma) {
  const int64_t L = bank.size(0), S = bank.size(1), D = bank.size(2), N = emb.size(0);
  const int64_t* cls = target.data_ptr<int64_t>();
  int64_t* p = ptr.data_ptr<int64_t>();
  // Stable counting sort of the rows by class: class_rows[class_start[c] + r] is the r-th row of c.
  std::vector<int64_t> class_start(L + 1, 0), class_rows(N);
  for (int64_t i = 0; i < N; ++i) {
    RCA_CHECK(cls[i] >= 0 && cls[i] < L, "ema_update_: target entries must be in [0, ", L, "), got ", cls[i]);
    ++class_start[cls[i] + 1];
  }
  for (int64_t c = 0; c < L; ++c) class_start[c + 1] += class_start[c];
  {
    std::vector<int64_t> fill(class_start.begin(), class_start.end() - 1);
    for (int64_t i = 0; i < N; ++i) class_rows[fill[cls[i]]++] = i;
  }
  std::vector<std::pair<int64_t, int64_t>> heads;  // (class, rank) of every chain head
  for (int64_t c = 0; c < L; ++c) {
    const int64_t count = class_start[c + 1] - class_start[c];
    for (int64_t r = 0; r < std::min(count, S); ++r) heads.emplace_back(c, r);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "ema_update_cpu", [&] {
    using bank_t = scalar_t;
    if constexpr (std::is_same_v<bank_t, double>) {
      ema_chains<bank_t, double>(bank.data_ptr<bank_t>(), p, emb.data_ptr<double>(), class_rows, class_start,
                                 heads, S, D, gamma);
    } else {
      ema_chains<bank_t, float>(bank.data_ptr<bank_t>(), p, emb.data_ptr<float>(), class_rows, class_start,
                                heads, S, D, gamma);
    }
  });
  for (int64_t c = 0; c < L; ++c) p[c] = (p[c] + (class_start[c + 1] - class_start[c])) % S;
}

}  // namespace rca_fast
