// Sort-free sampling (temperature / top-k / top-p / min-p), one thread block per row.
// Same contract and algorithm as kernels/sampling.py: e = exp((l - M) * inv) with M = max l, inv = 1 / T;
// (1) max, its first index and log sum e, (2) top-k threshold t_k = largest t with count(e >= t) >= k, (3) top-p
// threshold t_p = largest t with sum(e; e >= t, e >= t_k) >= top_p * mass_k, both by a 16-pivot search on the float32
// bit pattern of t (8 passes, exact), (4) inverse CDF in vocabulary order with the row's uniform (block scan, stops at
// the hit).
// (l - M) * inv, with __fsub_rn / __fmul_rn, never l * inv - M * inv: nvcc contracts the latter into an FMA, then the
// argmax's e is not exactly 1 and min_p = 1 keeps nothing. A row with nothing to sample (no finite logit; NaN counts
// as -inf; only with check_values=False) returns the first index of its max (0 if all -inf) and a NaN log-prob.
// Banned ids (nban per row, -1 = none; the strict R-4B modes): removed before the filters, as a logits processor
// setting them to -inf would: e = 0 for them and e is relative to Ma = the max of the allowed tokens (e == 1 at it),
// while M and log Z (the returned log-prob) stay those of the unbanned row. A row whose finite logits are all banned
// returns its first allowed index (log-prob -inf).
// C ABI for ctypes (r4b_fast/_cuda_build.py); returns a cudaError_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cub/block/block_scan.cuh>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPivots = 16;
constexpr int kSteps = 8;  // ceil(30 / log2(kPivots)): bit patterns of [0, 1] span < 2^30
constexpr int32_t kOneBits = 0x3F800000;
constexpr float kFltMax = 3.402823466e38f;   // inv clamped finite: 0 * inv stays 0
constexpr float kFltMin = 1.175494351e-38f;  // and nonzero: -inf * inv stays -inf

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ long long warp_min_ll(long long v) {
  for (int o = 16; o > 0; o >>= 1) {
    long long other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other < v ? other : v;
  }
  return v;
}

// Block-wide reductions through shared memory; every thread gets the result.
__device__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}
__device__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float r = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) r = fmaxf(r, smem[w]);
  return r;
}
__device__ long long block_min_ll(long long v, long long* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_min_ll(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  long long r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = smem[w] < r ? smem[w] : r;
  return r;
}
// Sums kPivots per-thread values across the block; out[j] for every thread.
__device__ void block_sum_array(float (&v)[kPivots], float* smem /* kWarps * kPivots */, float (&out)[kPivots]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kPivots; ++j) v[j] = warp_sum(v[j]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kPivots; ++j) smem[warp * kPivots + j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += smem[w * kPivots + j];
    out[j] = s;
  }
}

template <typename T>
__device__ __forceinline__ float load_x(const T* base, int64_t i) {
  const float x = to_float(base[i]);
  return isnan(x) ? -INFINITY : x;  // NaN (unchecked input) acts as a masked token
}
__device__ __forceinline__ bool is_banned(const int32_t* ban, int nban, int64_t i) {
  bool hit = false;
  for (int j = 0; j < nban; ++j) hit |= static_cast<int64_t>(ban[j]) == i;
  return hit;
}
// Rounded sub then mul, never contracted: exactly exp(0) == 1 at the max in every pass (min_p = 1, greedy).
// Banned ids: 0.
template <typename T>
__device__ __forceinline__ float row_e(const T* base, int64_t i, float inv, float m, const int32_t* ban, int nban) {
  if (is_banned(ban, nban, i)) return 0.f;
  return expf(__fmul_rn(__fsub_rn(load_x(base, i), m), inv));
}

// Largest t in [0, 1] with count(e >= t) >= need (mass = false) or sum(e; e >= t, e >= floor) >= need (mass = true).
template <typename T>
__device__ float threshold_search(const T* base, int64_t V, float inv, float m, float floor_t, float need, bool mass,
                                  const int32_t* ban, int nban, float* smem) {
  long long lo = 0, hi = static_cast<long long>(kOneBits) + 1;
  for (int step = 0; step < kSteps; ++step) {
    float tpiv[kPivots], acc[kPivots], tot[kPivots];
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      tpiv[j] = __int_as_float(static_cast<int32_t>(lo + ((hi - lo) * j) / kPivots));
      acc[j] = 0.f;
    }
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float e = row_e(base, i, inv, m, ban, nban);
      if (e <= 0.f || (mass && e < floor_t)) continue;
      const float add = mass ? e : 1.f;
#pragma unroll
      for (int j = 0; j < kPivots; ++j) acc[j] += e >= tpiv[j] ? add : 0.f;
    }
    block_sum_array(acc, smem, tot);
    long long new_lo = lo, new_hi = hi;
#pragma unroll
    for (int j = 1; j < kPivots; ++j) {  // pivot 0 is lo, which satisfies the predicate
      const long long p = lo + ((hi - lo) * j) / kPivots;
      if (tot[j] >= need) {
        new_lo = p > new_lo ? p : new_lo;
      } else {
        new_hi = p < new_hi ? p : new_hi;
      }
    }
    lo = new_lo;
    hi = new_hi;
  }
  return __int_as_float(static_cast<int32_t>(lo));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int64_t stride, int64_t V, const float* __restrict__ temperature,
                  const int64_t* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                  const float* __restrict__ uniforms, const int32_t* __restrict__ banned, int nban,
                  int64_t* __restrict__ tokens, float* __restrict__ logprobs, float* __restrict__ row_max,
                  float* __restrict__ log_z) {
  __shared__ float smem[kWarps * kPivots];
  __shared__ long long smem_ll[kWarps];
  using BlockScan = cub::BlockScan<float, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;

  const int64_t row = blockIdx.x;
  const T* base = logits + row * stride;  // int64: B * V above 2^31 elements
  const int32_t* ban = banned + row * nban;
  const float temp = temperature[row];
  const bool greedy = !(temp > 0.f);  // 0 (and, unchecked, negative or NaN): the first maximum
  const float inv = fminf(fmaxf(1.f / (greedy ? 1.f : temp), kFltMin), kFltMax);
  const int64_t k = top_k[row];
  const float P = top_p[row];
  float mp = min_p[row];
  mp = mp > 0.f ? fminf(mp, 1.f) : 0.f;  // unchecked NaN: off; > 1: the max only

  float m = -INFINITY, ma = -INFINITY;  // this thread's max of the row, and of its allowed tokens
  long long arg = V;  // first index of this thread's allowed max (its first allowed index while that is -inf)
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = load_x(base, i);
    m = fmaxf(m, x);
    if (!is_banned(ban, nban, i) && (x > ma || arg == V)) {
      ma = x;
      arg = i;
    }
  }
  const float M = block_max(m, smem);
  const float Ma = block_max(ma, smem);  // == M without bans
  long long first_max = block_min_ll(ma == Ma ? arg : static_cast<long long>(V), smem_ll);
  if (first_max >= V) first_max = 0;  // every token banned (V <= nban)
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) s += row_e(base, i, inv, M, ban, 0);  // the unbanned row
  const float logz = logf(block_sum(s, smem));

  float t_k = 0.f;
  if (k > 0 && k < V) t_k = threshold_search(base, V, inv, Ma, 0.f, static_cast<float>(k), false, ban, nban, smem);
  float t_p = 0.f;
  if (P < 1.f) {
    float mk = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float e = row_e(base, i, inv, Ma, ban, nban);
      mk += e >= t_k ? e : 0.f;
    }
    mk = block_sum(mk, smem);
    t_p = threshold_search(base, V, inv, Ma, t_k, P * mk, true, ban, nban, smem);
  }
  // e == 1 exactly at the max: a threshold <= 1 always keeps the argmax; greedy takes its first occurrence
  float thr = fminf(fmaxf(fmaxf(t_k, t_p), mp), 1.f);
  if (greedy) thr = 1.f;

  float wsum = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float e = row_e(base, i, inv, Ma, ban, nban);
    wsum += e >= thr ? e : 0.f;
  }
  wsum = block_sum(wsum, smem);
  const float target = greedy ? 0.f : uniforms[row] * wsum;
  float running = 0.f;
  long long found = V, last = -1;
  for (int64_t off = 0; off < V; off += kThreads) {
    const int64_t i = off + threadIdx.x;
    float w = 0.f;
    if (i < V) {
      const float e = row_e(base, i, inv, Ma, ban, nban);
      w = e >= thr ? e : 0.f;
    }
    float c;
    float tile = 0.f;
    __syncthreads();
    BlockScan(scan_storage).InclusiveSum(w, c, tile);
    c += running;
    const bool hit = c > target && w > 0.f;
    found = block_min_ll(hit ? static_cast<long long>(i) : static_cast<long long>(V), smem_ll);
    const long long my_last = w > 0.f ? static_cast<long long>(i) : static_cast<long long>(V);
    // the last kept index so far: track the max through a min of (V - 1 - i)
    const long long rev = block_min_ll(my_last < V ? V - 1 - my_last : V, smem_ll);
    if (rev < V) last = V - 1 - rev > last ? V - 1 - rev : last;
    running += tile;
    if (found < V) break;  // block-uniform: every thread saw the same reduction
  }
  if (threadIdx.x == 0) {
    long long tok = found < V ? found : last;  // rounding: the target may exceed the last partial sum
    if (tok < 0) tok = first_max;              // nothing kept (no finite allowed logit): never an index below 0
    tokens[row] = tok;
    const bool finite = M > -INFINITY && M < INFINITY;
    logprobs[row] = finite ? __fmul_rn(__fsub_rn(load_x(base, tok), M), inv) - logz : NAN;
    row_max[row] = M;
    log_z[row] = logz;
  }
}

template <typename T>
int launch(const void* logits, int64_t rows, int64_t V, int64_t stride, const void* temperature, const void* top_k,
           const void* top_p, const void* min_p, const void* uniforms, const void* banned, int nban, void* tokens,
           void* logprobs, void* row_max, void* log_z, void* stream) {
  if (rows <= 0) return 0;
  sample_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(logits), stride, V, static_cast<const float*>(temperature),
      static_cast<const int64_t*>(top_k), static_cast<const float*>(top_p), static_cast<const float*>(min_p),
      static_cast<const float*>(uniforms), static_cast<const int32_t*>(banned), nban, static_cast<int64_t*>(tokens),
      static_cast<float*>(logprobs),
      static_cast<float*>(row_max), static_cast<float*>(log_z));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

// logits [rows, V] (row stride `stride` elements) of dtype 0 float32, 1 bfloat16, 2 float16; per-row temperature,
// top_p, min_p, uniforms float32, top_k int64; outputs tokens int64, logprobs float32, row_max float32 (max logit),
// log_z float32 (log sum exp((l - row_max) / T)). banned: [rows, nban] int32 token ids that cannot be sampled (-1:
// none); nban = 0: none (banned is not read).
int r4b_sample(const void* logits, int dtype, int64_t rows, int64_t V, int64_t stride, const void* temperature,
               const void* top_k, const void* top_p, const void* min_p, const void* uniforms, const void* banned,
               int nban, void* tokens, void* logprobs, void* row_max, void* log_z, void* stream) {
  switch (dtype) {
    case 0:
      return launch<float>(logits, rows, V, stride, temperature, top_k, top_p, min_p, uniforms, banned, nban, tokens,
                           logprobs, row_max, log_z, stream);
    case 1:
      return launch<__nv_bfloat16>(logits, rows, V, stride, temperature, top_k, top_p, min_p, uniforms, banned,
                                   nban, tokens, logprobs, row_max, log_z, stream);
    case 2:
      return launch<__half>(logits, rows, V, stride, temperature, top_k, top_p, min_p, uniforms, banned, nban,
                            tokens, logprobs, row_max, log_z, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* r4b_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
