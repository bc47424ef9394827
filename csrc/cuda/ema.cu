// CUDA in-place EMA bank update: one launch for all rows (the structure of cpu/ema.cpp).
//
// Block (i, y) handles row i and the y-th tile of 256 features.  Row i of class c is the r-th row
// of c in this call (r counted by the block itself) and lands on slot (ptr[c] + r) % S.  Only the
// chain heads (r < S) write: each walks the later rows of c with ranks r + S, r + 2S, ... (the rows
// that land on the same slot) and applies them in order, so the result is the sequential loop's,
// bit for bit (__fmul_rn/__fadd_rn: no contraction into an FMA).
//
// The pointers advance in the same launch without a second kernel or scratch memory: every block
// of class c reads ptr[c] with an atomicAdd of 2^32 (the low 32 bits keep the pointer, the high
// bits count the readers), and the last reader -- it knows how many there are -- stores the new
// pointer.  Nothing else reads ptr[c] after that.
#include "../rca_fast.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace rca_fast {
namespace {

constexpr int kThreads = 256;

template <typename bank_t, typename cd_t>
__global__ void ema_update_kernel(bank_t* __restrict__ bank, int64_t* __restrict__ ptr,
                                  const cd_t* __restrict__ rows, const int64_t* __restrict__ target,
                                  int64_t N, int64_t L, int64_t S, int64_t D, cd_t a, cd_t b) {
  const int64_t i = blockIdx.x;
  const int64_t c = target[i];
  CUDA_KERNEL_ASSERT(c >= 0 && c < L);  // rca_fast.ops validates; this guards direct calls
  // Rank of row i among the rows of its class, and the row count of the class.
  int64_t rank = 0, count = 0;
  for (int64_t j0 = 0; j0 < N; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const bool same = j < N && target[j] == c;
    rank += __syncthreads_count(same && j < i);
    count += __syncthreads_count(same);
  }
  __shared__ int64_t base;
  if (threadIdx.x == 0) {
    const unsigned long long reader = 1ull << 32;
    const unsigned long long old = atomicAdd(reinterpret_cast<unsigned long long*>(ptr + c), reader);
    base = static_cast<int64_t>(old & 0xffffffffull);
    const unsigned long long readers = static_cast<unsigned long long>(count) * gridDim.y;
    if ((old >> 32) + 1 == readers) ptr[c] = (base + count) % S;  // the last reader of ptr[c]
  }
  __syncthreads();
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (rank >= S || d >= D) return;  // not a chain head: an earlier row of the chain applies it
  bank_t* dst = bank + (c * S + ema_slot(base, rank, S)) * D + d;
  bank_t value = static_cast<bank_t>(ema_mix<cd_t>(a, static_cast<cd_t>(*dst), b, rows[i * D + d]));
  if (count - rank > S) {  // more than S rows of class c: later rows revisit this slot, in order
    int64_t seen = 0;
    for (int64_t j = i + 1; j < N; ++j) {
      if (target[j] != c) continue;
      if (++seen % S == 0) {
        value = static_cast<bank_t>(ema_mix<cd_t>(a, static_cast<cd_t>(value), b, rows[j * D + d]));
      }
    }
  }
  *dst = value;
}

}  // namespace

void ema_update_cuda(at::Tensor& bank, at::Tensor& ptr, const at::Tensor& emb, const at::Tensor& target,
                     double gamma) {
  const c10::cuda::CUDAGuard guard(bank.device());
  const int64_t L = bank.size(0), S = bank.size(1), D = bank.size(2), N = emb.size(0);
  RCA_CHECK(N < (int64_t{1} << 31), "ema_update_: at most 2^31 - 1 rows per call, got ", N);
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((D + kThreads - 1) / kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "ema_update_cuda", [&] {
    using bank_t = scalar_t;
    using cd_t = std::conditional_t<std::is_same_v<bank_t, double>, double, float>;
    ema_update_kernel<bank_t, cd_t><<<grid, kThreads, 0, stream>>>(
        bank.data_ptr<bank_t>(), ptr.data_ptr<int64_t>(), emb.data_ptr<cd_t>(), target.data_ptr<int64_t>(), N, L,
        S, D, static_cast<cd_t>(gamma), static_cast<cd_t>(1.0 - gamma));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace rca_fast
