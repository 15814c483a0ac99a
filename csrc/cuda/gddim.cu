// CUDA kernel of cld_fast::gddim_step_: one exponential-integrator multistep (gDDIM) step after a
// network evaluation, one launch per NFE. The row r = table[*step] of CLD.gddim_table (float64 or
// float32, any strides) is read on the device once per block (step_kernel), so a sampler loop launches
// with no host synchronisation and can be captured in a CUDA graph. The arithmetic is float64: in the
// first rows Lin u and C_0 cur cancel with terms ~1e6 where a(t) is tiny, which float32 arithmetic
// turns into O(0.1) errors; the kernel stays memory-bound.
//
//   cur = (cx, cv) = E (x, v, y)
//   u   <- Lin u + C_0 cur + sum_{j=1..K} C_j hist[(step - j) mod K]
//   hist[step mod K] <- cur[:H]
//
// With y_uncond (classifier-free guidance, template G) y is y + w (y - y_uncond), combined in float32
// (load_guided); the unguided kernels (G = false) do not carry the second load.
//
// hist (K, B, H, D) float32 ring buffer, K in {0, 1, 2}, H in {1, 2} (hv = 0 when H = 1). A step
// outside the table reads the clamped row and poisons the coefficients with NaN, so u and the ring
// slot written become NaN (the guard of the other step kernels, sampler_steps.cu).
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

// i mod n in [0, n).
__device__ __forceinline__ int64_t ring_slot(int64_t i, int64_t n) {
  const int64_t m = i % n;
  return m < 0 ? m + n : m;
}

// nx += c[0] hx + c[1] hv, nv += c[2] hx + c[3] hv (hv only when H = 2), in the reference's order.
template <int H>
__device__ __forceinline__ void add_history(const volatile double* c, double hx, double hv, double& nx, double& nv) {
  nx = nx + c[0] * hx;
  nv = nv + c[2] * hx;
  if constexpr (H == 2) {
    nx = nx + c[1] * hv;
    nv = nv + c[3] * hv;
  }
}

// Coefficients: E (6) | Lin (4) | C_0 (4) | C_1 .. C_R (4 each): the first 14 + 4 R columns of the row.
template <typename Y, int R, int H, bool G>
struct GddimStepOp {
  static constexpr int KT = 14 + 4 * R;  // the table's columns
  static constexpr int K = KT + kObsCoefs;
  static constexpr int kChunk = 8;  // columns one part loads (8 loads in flight)
  // in different warps, so the parts' loads overlap; the last part is the replacement
  static constexpr int kParts = (KT + kChunk - 1) / kChunk + 1;
  using Coef = double;

  float* u;     // (B, 2, D), in place
  float* hist;  // (R, B, H, D), in place; unused when R = 0
  const Y* y;   // (B, D)
  const Y* yu;  // (B, D) unconditional network output (read when G)
  float w;      // the guidance weight
  TableArg table;
  const int64_t* step;
  ObsArg obs;
  TimeArg ts;  // the run's grid and parameters: read only with obs
  const double* sde;
  int64_t B, D;
  // The block's shared copy of the row, read at each use: 22 float64 values held in registers would spill.
  const volatile double* r;
  int64_t own, prev1, prev2;  // element offsets of the ring slots step, step - 1, step - 2 (mod R)
  int64_t k_step, obs_seed;

  // Columns [kChunk i, kChunk (i + 1)) of the row as float64 (NaN when the step is out of range);
  // the last part: the replacement at ts[step + 1], the exact rule after the denoising row.
  __device__ __forceinline__ void part(int i, double* c) const {
    const int64_t k = *step;
    const bool valid = k >= 0 && k < table.rows;
    if (i == kParts - 1) {
      if (obs.p != nullptr) {
        float rc[kObsCoefs];
        store_replacement(rc, sde, grid_at(ts, k + 1), k + 1 >= ts.size, valid);
#pragma unroll
        for (int j = 0; j < kObsCoefs; ++j) c[KT + j] = rc[j];
      }
      return;
    }
    const int64_t row = clamp_index(k, table.rows) * table.row_stride;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      const int j = i * kChunk + q;
      if (j < KT) {
        const int64_t off = row + j * table.col_stride;
        const double value = table.is_double ? __ldg(static_cast<const double*>(table.data) + off)
                                             : static_cast<double>(__ldg(static_cast<const float*>(table.data) + off));
        c[j] = valid ? value : static_cast<double>(quiet_nan());
      }
    }
  }

  __device__ __forceinline__ void prepare(const double* c) {
    r = c;
    if constexpr (R > 0) {
      const int64_t k = *step;
      const int64_t slab = B * H * D;
      own = ring_slot(k, R) * slab;
      prev1 = ring_slot(k - 1, R) * slab;
      prev2 = ring_slot(k - 2, R) * slab;
    }
    k_step = *step;
    obs_seed = read_obs_seed(obs);
  }

  // Inputs are loaded as float (vectorised), each element's arithmetic is float64 from its inputs to
  // its rounded outputs, so only one element's float64 values are live at a time (no spills).
  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V], h1x[V], h1v[V], h2x[V], h2v[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    if constexpr (G) {
      load_guided<V>(y, yu, w, b * D + d, yy);
    } else {
      load<V>(y + b * D + d, yy);
    }
    const int64_t hrow = b * H * D + d;
    // Every history read of an element precedes its own slot's write (slot step - 2 is slot step when R = 2).
    if constexpr (R > 0) {
      load<V>(hist + prev1 + hrow, h1x);
      if constexpr (H == 2) load<V>(hist + prev1 + hrow + D, h1v);
    }
    if constexpr (R > 1) {
      load<V>(hist + prev2 + hrow, h2x);
      if constexpr (H == 2) load<V>(hist + prev2 + hrow + D, h2v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const double xd = x[k], vd = v[k], yd = yy[k];
      const double cx = r[0] * xd + r[1] * vd + r[2] * yd;
      const double cv = r[3] * xd + r[4] * vd + r[5] * yd;
      double nx = r[6] * xd + r[7] * vd + r[10] * cx + r[11] * cv;
      double nv = r[8] * xd + r[9] * vd + r[12] * cx + r[13] * cv;
      if constexpr (R > 0) add_history<H>(r + 14, h1x[k], H == 2 ? double(h1v[k]) : 0.0, nx, nv);
      if constexpr (R > 1) add_history<H>(r + 18, h2x[k], H == 2 ? double(h2v[k]) : 0.0, nx, nv);
      x[k] = static_cast<float>(nx);
      v[k] = static_cast<float>(nv);
      yy[k] = static_cast<float>(cx);  // the slot's values, stored below
      h1v[k] = static_cast<float>(cv);
    }
    if constexpr (R > 0) {
      store<V>(hist + own + hrow, yy);
      if constexpr (H == 2) store<V>(hist + own + hrow + D, h1v);
    }
    if (obs.p != nullptr) {
      float rc[kObsCoefs];
#pragma unroll
      for (int j = 0; j < kObsCoefs; ++j) rc[j] = static_cast<float>(r[KT + j]);
      replace_obs<V>(obs, rc, obs_seed, b, d, D, k_step, 0, x, v);
    }
    store<V>(px, x);
    store<V>(px + D, v);
  }
};

template <typename Y, int R, int H, bool G>
void launch_ring(float* u, float* hist, const void* y, GuideArg guide, TableArg table, const int64_t* step, ObsArg obs,
                 TimeArg ts, const double* sde, int64_t B, int64_t D, int vec, cudaStream_t stream) {
  const GddimStepOp<Y, R, H, G> op{u,   hist, static_cast<const Y*>(y), static_cast<const Y*>(guide.y_uncond),
                                   guide.weight, table, step, obs, ts, sde, B, D, {}, 0, 0, 0, 0, 0};
  launch_steps(op, vec, B, D, stream);
}

// The ring's (K, H) as template arguments.
template <typename Y, bool G>
void launch_rings(float* u, float* hist, int K, int H, const void* y, GuideArg guide, TableArg table,
                  const int64_t* step, ObsArg obs, TimeArg ts, const double* sde, int64_t B, int64_t D, int vec,
                  cudaStream_t stream) {
  if (K <= 0) {
    launch_ring<Y, 0, 1, G>(u, hist, y, guide, table, step, obs, ts, sde, B, D, vec, stream);  // no ring: H not read
  } else if (K == 1) {
    if (H == 1) {
      launch_ring<Y, 1, 1, G>(u, hist, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    } else {
      launch_ring<Y, 1, 2, G>(u, hist, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    }
  } else {
    if (H == 1) {
      launch_ring<Y, 2, 1, G>(u, hist, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    } else {
      launch_ring<Y, 2, 2, G>(u, hist, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    }
  }
}

}  // namespace

void launch_gddim_step(float* u, float* hist, int K, int H, const void* y, NetType y_type, GuideArg guide,
                       TableArg table, const int64_t* step, ObsArg obs, TimeArg ts, const double* sde, int64_t B,
                       int64_t D, cudaStream_t stream) {
  int vec = pick_vec(D, {{u, 4},
                         {y, net_bytes(y_type)},
                         {guide.y_uncond, net_bytes(y_type)},
                         {K > 0 ? hist : nullptr, 4},
                         {obs.p, 4}});
  if (K >= 2 && H == 2) vec = vec < 2 ? vec : 2;  // four elements' two-slot history spills 8 B on sm_90
  // The guided kernels' second output load: four elements spill 8-32 B on sm_90, two with the two-slot
  // eps_R history 8-16 B; these widths spill nothing (ptxas -v, compiled for sm_90).
  if (guide.y_uncond != nullptr) vec = (K >= 2 && H == 2) ? 1 : (vec < 2 ? vec : 2);
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    if (guide.y_uncond != nullptr) {
      launch_rings<Y, true>(u, hist, K, H, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    } else {
      launch_rings<Y, false>(u, hist, K, H, y, guide, table, step, obs, ts, sde, B, D, vec, stream);
    }
  });
}

}  // namespace cuda
}  // namespace cld
