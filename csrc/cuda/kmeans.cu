// CUDA Lloyd iterations of n = L * n_init k-means runs at once (the structure of cpu/kmeans.cpp).
//
// One iteration is three launches over all runs still active:
//   assign_kernel    fused distance + arg-min: a block takes 64 points of one run, streams the
//                    centres 16 at a time through shared memory (features 32 at a time), keeps
//                    each point's running minimum in registers: no S x K distance tensor.
//                    Also counts the cluster sizes (integer atomics: exact) and notes whether any
//                    label changed.
//   partial_kernel   per (run, 32 features, split of the points): sums of (x - centre) by cluster
//                    with NO atomics -- each warp owns an accumulator per cluster in shared memory,
//                    each lane one feature, points visited in a fixed order; warps are then summed
//                    in a fixed order.  Deterministic, no contention at any K.
//   finalize_kernel  one block per run: centre + mean offset (splits summed in order), empty
//                    clusters moved to the farthest points, squared shift, centre norms, and the
//                    convergence test (scikit-learn's tolerance rule, or no label changed).
// The host checks once per iteration whether any run is still active.
#include "../rca_fast.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace rca_fast {
namespace {

constexpr int kTilePoints = 64;    // points per assign block
constexpr int kTileCenters = 16;   // centres per chunk (one per lane of a half warp)
constexpr int kTileFeatures = 32;  // features per shared-memory stage
constexpr int kAssignThreads = 256;
constexpr int kPointsPerThread = kTilePoints / (kAssignThreads / kTileCenters);  // 4
static_assert(kTileCenters == 16 && kPointsPerThread * (kAssignThreads / kTileCenters) == kTilePoints,
              "assign_kernel maps a half warp to the centres of a chunk and 4 points to a thread");
constexpr int kFinalizeThreads = 256;
constexpr int kSmemLimit = 48 * 1024;

template <typename T>
__device__ __forceinline__ bool key_less(T d, int64_t k, T best_d, int64_t best_k) {
  return d < best_d || (d == best_d && k < best_k);  // the lower index wins ties
}

template <typename T>
__global__ void assign_kernel(const T* __restrict__ x, const T* __restrict__ xnorm, const T* __restrict__ centers,
                              const T* __restrict__ cnorm, const uint8_t* __restrict__ active,
                              int64_t* __restrict__ labels, const int64_t* __restrict__ prev, T* __restrict__ mind,
                              int* __restrict__ counts, int* __restrict__ changed, int64_t S, int64_t D, int64_t K,
                              int64_t n_init) {
  const int64_t p = blockIdx.x;
  if (active != nullptr && !active[p]) return;
  const T* xp = x + (p / n_init) * S * D;
  const T* cp = centers + p * K * D;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kTilePoints;
  __shared__ T xs[kTileFeatures][kTilePoints + 1];
  __shared__ T cs[kTileFeatures][kTileCenters + 1];
  const int tx = threadIdx.x % kTileCenters;  // centre within the chunk
  const int ty = threadIdx.x / kTileCenters;  // points ty, ty + 16, ty + 32, ty + 48
  T best[kPointsPerThread];
  int64_t arg[kPointsPerThread];
#pragma unroll
  for (int i = 0; i < kPointsPerThread; ++i) best[i] = std::numeric_limits<T>::infinity(), arg[i] = 0;

  for (int64_t k0 = 0; k0 < K; k0 += kTileCenters) {
    T acc[kPointsPerThread] = {};
    for (int64_t d0 = 0; d0 < D; d0 += kTileFeatures) {
      for (int e = threadIdx.x; e < kTilePoints * kTileFeatures; e += kAssignThreads) {
        const int r = e / kTileFeatures, f = e % kTileFeatures;  // coalesced along features
        const int64_t s = s0 + r, d = d0 + f;
        xs[f][r] = (s < S && d < D) ? xp[s * D + d] : T(0);
      }
      for (int e = threadIdx.x; e < kTileCenters * kTileFeatures; e += kAssignThreads) {
        const int r = e / kTileFeatures, f = e % kTileFeatures;
        const int64_t k = k0 + r, d = d0 + f;
        cs[f][r] = (k < K && d < D) ? cp[k * D + d] : T(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int f = 0; f < kTileFeatures; ++f) {
        const T c = cs[f][tx];
#pragma unroll
        for (int i = 0; i < kPointsPerThread; ++i) acc[i] += xs[f][ty + 16 * i] * c;
      }
      __syncthreads();
    }
    const int64_t k = k0 + tx;
#pragma unroll
    for (int i = 0; i < kPointsPerThread; ++i) {
      const int64_t s = s0 + ty + 16 * i;
      T dist = std::numeric_limits<T>::infinity();
      if (k < K) {
        dist = ((s < S ? xnorm[(p / n_init) * S + s] : T(0)) - T(2) * acc[i]) + cnorm[p * K + k];
        dist = dist > T(0) ? dist : T(0);
      }
      int64_t kk = k;
#pragma unroll
      for (int off = kTileCenters / 2; off > 0; off >>= 1) {  // arg-min over the half warp
        const T od = __shfl_xor_sync(0xffffffffu, dist, off, kTileCenters);
        const int64_t ok = __shfl_xor_sync(0xffffffffu, kk, off, kTileCenters);
        if (key_less(od, ok, dist, kk)) dist = od, kk = ok;
      }
      if (dist < best[i]) best[i] = dist, arg[i] = kk;  // an earlier chunk keeps ties
    }
  }
  if (tx != 0) return;
#pragma unroll
  for (int i = 0; i < kPointsPerThread; ++i) {
    const int64_t s = s0 + ty + 16 * i;
    if (s >= S) continue;
    labels[p * S + s] = arg[i];
    if (mind != nullptr) mind[p * S + s] = best[i];
    if (counts != nullptr) atomicAdd(counts + p * K + arg[i], 1);
    if (changed != nullptr && prev[p * S + s] != arg[i]) changed[p] = 1;
  }
}

// Sums of (x - own centre) by cluster for one run, 32 features, one split of the points.
// acc is this block's [warps][K][32] accumulator: shared memory, or global scratch at large K.
template <typename T>
__global__ void partial_kernel(const T* __restrict__ x, const T* __restrict__ centers,
                               const int64_t* __restrict__ labels, const uint8_t* __restrict__ active,
                               T* __restrict__ partial, T* __restrict__ scratch, int64_t S, int64_t D, int64_t K,
                               int64_t n_init, int64_t points_per_split) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t p = blockIdx.x;
  if (!active[p]) return;
  const int lane = threadIdx.x, w = threadIdx.y, warps = blockDim.y;
  const int64_t splits = gridDim.z, split = blockIdx.z;
  const int64_t block = (p * gridDim.y + blockIdx.y) * splits + split;
  T* acc = scratch != nullptr ? scratch + block * warps * K * 32 : reinterpret_cast<T*>(smem_raw);
  for (int64_t k = 0; k < K; ++k) acc[(w * K + k) * 32 + lane] = T(0);  // own slots only
  const int64_t d = static_cast<int64_t>(blockIdx.y) * 32 + lane;
  const bool valid = d < D;
  const T* xp = x + (p / n_init) * S * D;
  const T* cp = centers + p * K * D;
  const int64_t s_end = std::min<int64_t>(S, (split + 1) * points_per_split);
  for (int64_t s = split * points_per_split + w; s < s_end; s += warps) {
    const int64_t k = labels[p * S + s];
    if (valid) acc[(w * K + k) * 32 + lane] += xp[s * D + d] - cp[k * D + d];
  }
  __syncthreads();
  for (int64_t k = w; k < K; k += warps) {
    T sum = T(0);
    for (int ww = 0; ww < warps; ++ww) sum += acc[(ww * K + k) * 32 + lane];
    if (valid) partial[((p * splits + split) * K + k) * D + d] = sum;
  }
}

template <typename T>
__device__ void block_argmax(T& value, int64_t& index, T* sv, int64_t* si) {
  // Largest value, lowest index among equal ones; a fixed tree: deterministic.
  sv[threadIdx.x] = value, si[threadIdx.x] = index;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      const T ov = sv[threadIdx.x + half];
      const int64_t oi = si[threadIdx.x + half];
      if (oi >= 0 && (si[threadIdx.x] < 0 || ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x]))) {
        sv[threadIdx.x] = ov, si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  value = sv[0], index = si[0];
  __syncthreads();
}

template <typename T>
__global__ void finalize_kernel(const T* __restrict__ x, const T* __restrict__ partial, int* __restrict__ counts,
                                const T* __restrict__ mind, T* __restrict__ centers, T* __restrict__ cnorm,
                                uint8_t* __restrict__ active, int* __restrict__ changed,
                                const double* __restrict__ tol_abs, int* __restrict__ empty_rank,
                                int64_t* __restrict__ far, int64_t S, int64_t D, int64_t K, int64_t n_init,
                                int64_t splits) {
  const int64_t p = blockIdx.x;
  if (!active[p]) return;
  __shared__ T sv[kFinalizeThreads];
  __shared__ int64_t si[kFinalizeThreads];
  __shared__ double sd[kFinalizeThreads];
  __shared__ int empties;
  if (threadIdx.x == 0) {
    int e = 0;
    for (int64_t k = 0; k < K; ++k) empty_rank[p * K + k] = counts[p * K + k] == 0 ? e++ : -1;
    empties = e;
  }
  __syncthreads();
  // The r-th empty cluster takes the r-th farthest point from its centre: pass r finds the
  // largest (distance, -index) strictly below the previous pick.
  T prev_v = std::numeric_limits<T>::infinity();
  int64_t prev_i = -1;
  for (int r = 0; r < empties; ++r) {
    T value = -std::numeric_limits<T>::infinity();
    int64_t index = -1;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const T v = mind[p * S + s];
      const bool below = v < prev_v || (v == prev_v && s > prev_i);
      if (below && (index < 0 || v > value)) value = v, index = s;
    }
    block_argmax(value, index, sv, si);
    if (threadIdx.x == 0) far[p * K + r] = index;
    prev_v = value, prev_i = index;
  }
  __syncthreads();
  const T* xp = x + (p / n_init) * S * D;
  double shift = 0;
  for (int64_t e = threadIdx.x; e < K * D; e += blockDim.x) {
    const int64_t k = e / D, d = e % D;
    const int count = counts[p * K + k];
    const T old = centers[p * K * D + e];
    T fresh;
    if (count > 0) {
      T sum = T(0);
      for (int64_t sp = 0; sp < splits; ++sp) sum += partial[((p * splits + sp) * K + k) * D + d];
      fresh = old + sum / static_cast<T>(count);
    } else {
      fresh = xp[far[p * K + empty_rank[p * K + k]] * D + d];
    }
    const double diff = static_cast<double>(fresh) - static_cast<double>(old);
    shift += diff * diff;
    centers[p * K * D + e] = fresh;
  }
  sd[threadIdx.x] = shift;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) sd[threadIdx.x] += sd[threadIdx.x + half];
    __syncthreads();
  }
  shift = sd[0];
  // Norms of the new centres (one warp per centre), for the next assignment.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t k = warp; k < K; k += blockDim.x / 32) {
    double acc = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const double v = centers[(p * K + k) * D + d];
      acc += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) cnorm[p * K + k] = static_cast<T>(acc);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) counts[p * K + k] = 0;
  if (threadIdx.x == 0) {
    const bool done = shift <= tol_abs[p] || changed[p] == 0;
    active[p] = done ? 0 : 1;
    changed[p] = 0;
  }
}

// Squared distance of every point to its centre (one warp per point), in double.
template <typename T>
__global__ void point_error_kernel(const T* __restrict__ x, const T* __restrict__ centers,
                                   const int64_t* __restrict__ labels, double* __restrict__ err, int64_t S,
                                   int64_t D, int64_t K, int64_t n_init) {
  const int64_t p = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.y) * (blockDim.x / 32);  // grid-stride: S may
  for (int64_t s = static_cast<int64_t>(blockIdx.y) * (blockDim.x / 32) + threadIdx.x / 32; s < S;
       s += step) {                                                          // exceed 8 * 65535
    const T* row = x + ((p / n_init) * S + s) * D;
    const T* c = centers + (p * K + labels[p * S + s]) * D;
    double acc = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const double diff = static_cast<double>(row[d]) - static_cast<double>(c[d]);
      acc += diff * diff;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) err[p * S + s] = acc;
  }
}

template <typename T>
__global__ void row_sqnorm_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t R, int64_t D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= R) return;
  double acc = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const double v = x[r * D + d];
    acc += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) out[r] = static_cast<T>(acc);
}

unsigned blocks_for(int64_t count, int64_t per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

}  // namespace

at::Tensor row_sqnorm_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = x.contiguous();
  const int64_t R = rows.size(0), D = rows.size(1);
  at::Tensor out = at::empty({R}, rows.options());
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_sqnorm_cuda", [&] {
    row_sqnorm_kernel<scalar_t><<<blocks_for(R, 8), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

LloydResult lloyd_cuda(const at::Tensor& x, const at::Tensor& xnorm, at::Tensor& centers,
                       const at::Tensor& tol_abs, int64_t n_init, int64_t iters) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = x.size(1), D = x.size(2), n = centers.size(0), K = centers.size(1);
  RCA_CHECK(S / kTilePoints < 65535 && D / 32 < 65535, "kmeans: S or D too large for the CUDA grid");
  const auto opts = x.options();
  const auto ints = opts.dtype(at::kInt);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor cur = at::full({n, S}, -1, opts.dtype(at::kLong));
  at::Tensor prev = at::full({n, S}, -1, opts.dtype(at::kLong));
  at::Tensor mind = at::empty({n, S}, opts);
  at::Tensor counts = at::zeros({n, K}, ints);
  at::Tensor changed = at::zeros({n}, ints);
  at::Tensor active = at::ones({n}, opts.dtype(at::kByte));
  at::Tensor empty_rank = at::empty({n, K}, ints);
  at::Tensor far = at::empty({n, K}, opts.dtype(at::kLong));
  at::Tensor cnorm = row_sqnorm_cuda(centers.view({n * K, D})).view({n, K});
  const at::Tensor tol = tol_abs.to(at::kDouble).contiguous();

  // partial_kernel's shape: warps per block such that their accumulators fit in shared memory
  // (global scratch when even one warp's does not), and enough splits of the points to fill the GPU.
  const int64_t elem = x.element_size();
  int64_t warps = std::max<int64_t>(1, std::min<int64_t>(8, kSmemLimit / (K * 32 * elem)));
  const bool use_scratch = K * 32 * elem > kSmemLimit;
  const int64_t dchunks = (D + 31) / 32;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  int64_t splits = (4 * sms + n * dchunks - 1) / (n * dchunks);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (S + warps * 8 - 1) / (warps * 8), 65535}));
  const int64_t per_split = (S + splits - 1) / splits;
  at::Tensor partial = at::empty({n, splits, K, D}, opts);
  at::Tensor scratch = use_scratch ? at::empty({n * dchunks * splits * warps * K * 32}, opts) : at::Tensor();
  const size_t smem = use_scratch ? 0 : static_cast<size_t>(warps * K * 32 * elem);

  const dim3 assign_grid(static_cast<unsigned>(n), blocks_for(S, kTilePoints));
  const dim3 partial_grid(static_cast<unsigned>(n), static_cast<unsigned>(dchunks), static_cast<unsigned>(splits));
  const dim3 partial_block(32, static_cast<unsigned>(warps));
  at::Tensor labels = at::empty({n, S}, opts.dtype(at::kLong));
  at::Tensor err = at::empty({n, S}, opts.dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lloyd_cuda", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* cp = centers.data_ptr<T>();
    for (int64_t it = 0; it < iters; ++it) {
      assign_kernel<T><<<assign_grid, kAssignThreads, 0, stream>>>(
          xp, xnorm.data_ptr<T>(), cp, cnorm.data_ptr<T>(), active.data_ptr<uint8_t>(), cur.data_ptr<int64_t>(),
          prev.data_ptr<int64_t>(), mind.data_ptr<T>(), counts.data_ptr<int>(), changed.data_ptr<int>(), S, D, K,
          n_init);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      partial_kernel<T><<<partial_grid, partial_block, smem, stream>>>(
          xp, cp, cur.data_ptr<int64_t>(), active.data_ptr<uint8_t>(), partial.data_ptr<T>(),
          use_scratch ? scratch.data_ptr<T>() : nullptr, S, D, K, n_init, per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<T><<<static_cast<unsigned>(n), kFinalizeThreads, 0, stream>>>(
          xp, partial.data_ptr<T>(), counts.data_ptr<int>(), mind.data_ptr<T>(), cp, cnorm.data_ptr<T>(),
          active.data_ptr<uint8_t>(), changed.data_ptr<int>(), tol.data_ptr<double>(), empty_rank.data_ptr<int>(),
          far.data_ptr<int64_t>(), S, D, K, n_init, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(cur, prev);
      if (!active.any().item<bool>()) break;  // one sync per iteration
    }
    assign_kernel<T><<<assign_grid, kAssignThreads, 0, stream>>>(
        xp, xnorm.data_ptr<T>(), cp, cnorm.data_ptr<T>(), nullptr, labels.data_ptr<int64_t>(), nullptr, nullptr,
        nullptr, nullptr, S, D, K, n_init);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    point_error_kernel<T><<<dim3(static_cast<unsigned>(n), std::min(blocks_for(S, 8), 65535u)), 256, 0, stream>>>(
        xp, cp, labels.data_ptr<int64_t>(), err.data_ptr<double>(), S, D, K, n_init);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {labels, err.sum(1).to(x.scalar_type())};
}

}  // namespace rca_fast
