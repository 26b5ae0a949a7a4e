// pack_multimodal: gather + vision scatter + unpad + RoPE positions in one pass (same contract as
// kernels/pack_multimodal.py). One block per (sample, slice of the row bytes). The block walks the sample's real
// tokens in chunks of kThreads (one token per thread), numbers placeholders with block-wide scans carried across
// chunks (vision row, image index, M-RoPE position shift), then copies the chunk's rows with all threads, in the
// unit the caller chose (16/8/4/2/1 bytes: the widest the row size and pointers allow): the copy is
// dtype-agnostic. All offsets are int64 (row * row_units passes 2^31 at 600k tokens of D = 4096).
// C ABI for ctypes (r4b_fast/_cuda_build.py).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kSliceBytes = 512;  // bytes of each row copied by one block (grid.y = ceil(row_bytes / this))

struct Counts {
  int64_t img;
  int64_t starts;
  int64_t delta;
};

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

struct CountsSum {
  __device__ __forceinline__ Counts operator()(const Counts& a, const Counts& b) const {
    return Counts{a.img + b.img, a.starts + b.starts, a.delta + b.delta};
  }
};

template <typename Unit>
__global__ void pack_multimodal_kernel(const int64_t* __restrict__ ids, const int32_t* __restrict__ first_arr,
                                       const int32_t* __restrict__ lens, const int32_t* __restrict__ out_start,
                                       const int32_t* __restrict__ vis_start, const int32_t* __restrict__ img_start,
                                       const int32_t* __restrict__ img_hh, const int32_t* __restrict__ img_ww,
                                       const int32_t* __restrict__ img_vis_start,
                                       const int32_t* __restrict__ img_shift, const Unit* __restrict__ table,
                                       const Unit* __restrict__ vision, Unit* __restrict__ out,
                                       int64_t* __restrict__ indices, int64_t* __restrict__ src,
                                       int64_t* __restrict__ pos, int64_t* __restrict__ deltas, int64_t L,
                                       int64_t row_units, int64_t slice_units, int64_t T, int64_t image_token_id,
                                       int mrope, int text_embeds) {
  using Scan = cub::BlockScan<Counts, kThreads>;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ int64_t s_src[kThreads];

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const bool writer = blockIdx.y == 0;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * slice_units;
  const int64_t c1 = min(row_units, c0 + slice_units);
  const int64_t width = c1 - c0;
  const int64_t first = first_arr[b];
  const int64_t n = lens[b];
  const int64_t o0 = out_start[b];
  int64_t vis_run = vis_start[b];
  int64_t img_run = img_start[b];
  int64_t shift_run = 0;
  int64_t pmax = -1;

  for (int64_t j0 = 0; j0 < n; j0 += kThreads) {
    const int64_t j = j0 + tid;
    const bool inside = j < n;
    const int64_t flat = b * L + first + j;
    const int64_t tok = inside ? ids[flat] : 0;
    const bool is_img = inside && tok == image_token_id;
    bool start = false, end = false;
    if (mrope && is_img) {
      start = !(j > 0 && ids[flat - 1] == image_token_id);
      end = !(j + 1 < n && ids[flat + 1] == image_token_id);
    }
    Counts in{is_img ? 1 : 0, start ? 1 : 0, 0}, incl, total;
    Scan(scan_tmp).InclusiveScan(in, incl, CountsSum(), total);
    __syncthreads();
    const int64_t v = vis_run + incl.img - 1;
    const int64_t k = img_run + incl.starts - 1;
    const int64_t text_row = text_embeds ? flat : tok;
    const int64_t s = is_img ? -1 - v : text_row;
    s_src[tid] = inside ? s : 0;
    if (writer && inside) {
      indices[o0 + j] = flat;
      src[o0 + j] = s;
    }
    if (mrope) {
      Counts din{0, 0, (is_img && end) ? static_cast<int64_t>(img_shift[k]) : 0}, excl, dtotal;
      Scan(scan_tmp).ExclusiveScan(din, excl, Counts{0, 0, 0}, CountsSum(), dtotal);
      __syncthreads();
      const int64_t text_pos = j + shift_run + excl.delta;
      int64_t pt = text_pos, ph = text_pos, pw = text_pos;
      if (is_img) {
        const int64_t hh = img_hh[k], ww = img_ww[k];
        const int64_t o = v - img_vis_start[k];
        const int64_t base = text_pos - o;
        pt = base + o / (hh * ww);
        ph = base + (o / ww) % hh;
        pw = base + o % ww;
      }
      if (writer && inside) {
        pos[o0 + j] = pt;
        pos[T + o0 + j] = ph;
        pos[2 * T + o0 + j] = pw;
      }
      const int64_t local = inside ? max(pt, max(ph, pw)) : -1;
      const int64_t chunk_max = Reduce(reduce_tmp).Reduce(local, MaxOp());
      if (tid == 0) pmax = max(pmax, chunk_max);  // the reduction's result is valid in thread 0 only
      shift_run += dtotal.delta;
      img_run += total.starts;
    } else if (writer && inside) {
      pos[o0 + j] = j;
    }
    vis_run += total.img;
    __syncthreads();  // s_src complete
    const int64_t count = min(static_cast<int64_t>(kThreads), n - j0);
    for (int64_t idx = tid; idx < count * width; idx += kThreads) {
      const int64_t r = idx / width;
      const int64_t c = c0 + idx % width;
      const int64_t row = s_src[r];
      const Unit* from = row < 0 ? vision + (-1 - row) * row_units : table + row * row_units;
      out[(o0 + j0 + r) * row_units + c] = from[c];
    }
    __syncthreads();  // s_src and the scan storage are reused by the next chunk
  }
  if (mrope && writer && tid == 0) deltas[b] = pmax + 1 - n;
}

template <typename Unit>
int launch(const void* ids, const void* first, const void* lens, const void* out_start, const void* vis_start,
           const void* img_start, const void* img_hh, const void* img_ww, const void* img_vis_start,
           const void* img_shift, const void* table, const void* vision, void* out, void* indices, void* src,
           void* pos, void* deltas, int64_t B, int64_t L, int64_t row_bytes, int64_t T, int64_t image_token_id,
           int mrope, int text_embeds, cudaStream_t stream) {
  const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t slice_units = kSliceBytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t slices = (row_units + slice_units - 1) / slice_units;
  dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(slices > 0 ? slices : 1));
  pack_multimodal_kernel<Unit><<<grid, kThreads, 0, stream>>>(
      static_cast<const int64_t*>(ids), static_cast<const int32_t*>(first), static_cast<const int32_t*>(lens),
      static_cast<const int32_t*>(out_start), static_cast<const int32_t*>(vis_start),
      static_cast<const int32_t*>(img_start), static_cast<const int32_t*>(img_hh),
      static_cast<const int32_t*>(img_ww), static_cast<const int32_t*>(img_vis_start),
      static_cast<const int32_t*>(img_shift), static_cast<const Unit*>(table), static_cast<const Unit*>(vision),
      static_cast<Unit*>(out), static_cast<int64_t*>(indices), static_cast<int64_t*>(src),
      static_cast<int64_t*>(pos), static_cast<int64_t*>(deltas), L, row_units, slice_units, T, image_token_id,
      mrope, text_embeds);
  return static_cast<int>(cudaGetLastError());
}

bool aligned(const void* p, int64_t unit) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % unit == 0; }

}  // namespace

extern "C" {

// Rows are copied as raw units of unit_bytes (16, 8, 4, 2 or 1), chosen by the caller (copy_unit_bytes in
// r4b_fast/ops/pack_multimodal.py: the widest unit dividing row_bytes that aligns table, vision and out), so the
// copy is exact for any dtype. table [V or B*L, row_bytes], vision [N_vis, row_bytes] (may be null when N_vis = 0),
// out [T, row_bytes]; int32 per-sample arrays first/lens/out_start/vis_start/img_start [B]; int32 per-image arrays
// img_* [n_img] (null when n_img = 0). Writes indices/src [T] int64, pos [1 or 3, T] int64, deltas [B] int64
// (mrope). Returns a cudaError_t (cudaErrorInvalidValue for a unit that does not fit the row or the pointers).
int r4b_pack_multimodal(const void* ids, const void* first, const void* lens, const void* out_start,
                        const void* vis_start, const void* img_start, const void* img_hh, const void* img_ww,
                        const void* img_vis_start, const void* img_shift, const void* table, const void* vision,
                        void* out, void* indices, void* src, void* pos, void* deltas, int64_t B, int64_t L,
                        int64_t row_bytes, int64_t T, int64_t image_token_id, int mrope, int text_embeds,
                        int unit_bytes, void* stream) {
  if (B <= 0 || T <= 0) return 0;
  const int64_t unit = unit_bytes;
  if (unit < 1 || unit > 16 || (unit & (unit - 1)) || row_bytes % unit || !aligned(table, unit) ||
      !aligned(vision, unit) || !aligned(out, unit))
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define R4B_PACK_LAUNCH(UNIT)                                                                                    \
  launch<UNIT>(ids, first, lens, out_start, vis_start, img_start, img_hh, img_ww, img_vis_start, img_shift, table, \
               vision, out, indices, src, pos, deltas, B, L, row_bytes, T, image_token_id, mrope, text_embeds, s)
  switch (unit) {
    case 16:
      return R4B_PACK_LAUNCH(uint4);
    case 8:
      return R4B_PACK_LAUNCH(uint2);
    case 4:
      return R4B_PACK_LAUNCH(uint32_t);
    case 2:
      return R4B_PACK_LAUNCH(uint16_t);
    default:
      return R4B_PACK_LAUNCH(uint8_t);
  }
#undef R4B_PACK_LAUNCH
}

const char* r4b_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
