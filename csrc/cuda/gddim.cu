// CUDA kernel of cld_fast::gddim_step_: one exponential-integrator multistep (gDDIM) step after a
// network evaluation, one launch per NFE. The row r = table[*step] of CLD.gddim_table (float64 or
// float32, any strides) is read on the device and cast to float32 once per block (step_kernel), so
// a sampler loop launches with no host synchronisation and can be captured in a CUDA graph:
//
//   cur = (cx, cv) = E (x, v, y)
//   u   <- Lin u + C_0 cur + sum_{j=1..K} C_j hist[(step - j) mod K]
//   hist[step mod K] <- cur[:H]
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

// nx += c[0] hx + c[1] hv, nv += c[2] hx + c[3] hv for V elements of one ring slot (hv only when H = 2).
template <int V, int H>
__device__ __forceinline__ void add_history(const float* hp, int64_t D, const float* c, float (&nx)[V],
                                            float (&nv)[V]) {
  float hx[V];
  load<V>(hp, hx);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    nx[k] = nx[k] + c[0] * hx[k];
    nv[k] = nv[k] + c[2] * hx[k];
  }
  if constexpr (H == 2) {
    float hv[V];
    load<V>(hp + D, hv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      nx[k] = nx[k] + c[1] * hv[k];
      nv[k] = nv[k] + c[3] * hv[k];
    }
  }
}

// Coefficients: E (6) | Lin (4) | C_0 (4) | C_1 .. C_R (4 each): the first 14 + 4 R columns of the row.
template <typename Y, int R, int H>
struct GddimStepOp {
  static constexpr int KT = 14 + 4 * R;  // the table's columns
  static constexpr int K = KT + kObsCoefs;
  static constexpr int kChunk = 8;  // columns one part loads (8 loads in flight)
  // in different warps, so the parts' loads overlap; the last part is the replacement
  static constexpr int kParts = (KT + kChunk - 1) / kChunk + 1;

  float* u;     // (B, 2, D), in place
  float* hist;  // (R, B, H, D), in place; unused when R = 0
  const Y* y;   // (B, D)
  TableArg table;
  const int64_t* step;
  ObsArg obs;
  TimeArg ts;  // the run's grid and parameters: read only with obs
  const double* sde;
  int64_t B, D;
  float r[K];
  int64_t own, prev1, prev2;  // element offsets of the ring slots step, step - 1, step - 2 (mod R)
  int64_t k_step, obs_seed;

  // Columns [kChunk i, kChunk (i + 1)) of the row, cast to float32 (NaN when the step is out of range);
  // the last part: the replacement at ts[step + 1], the exact rule after the denoising row.
  __device__ __forceinline__ void part(int i, float* c) const {
    const int64_t k = *step;
    const bool valid = k >= 0 && k < table.rows;
    if (i == kParts - 1) {
      if (obs.p != nullptr) store_replacement(c + KT, sde, grid_at(ts, k + 1), k + 1 >= ts.size, valid);
      return;
    }
    const int64_t row = clamp_index(k, table.rows) * table.row_stride;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      const int j = i * kChunk + q;
      if (j < KT) {
        const int64_t off = row + j * table.col_stride;
        const float value = table.is_double ? static_cast<float>(__ldg(static_cast<const double*>(table.data) + off))
                                            : __ldg(static_cast<const float*>(table.data) + off);
        c[j] = valid ? value : quiet_nan();
      }
    }
  }

  __device__ __forceinline__ void prepare(const float* c) {
#pragma unroll
    for (int j = 0; j < K; ++j) r[j] = c[j];
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

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V], cx[V], cv[V], nx[V], nv[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    load<V>(y + b * D + d, yy);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      cx[k] = r[0] * x[k] + r[1] * v[k] + r[2] * yy[k];
      cv[k] = r[3] * x[k] + r[4] * v[k] + r[5] * yy[k];
      nx[k] = r[6] * x[k] + r[7] * v[k] + r[10] * cx[k] + r[11] * cv[k];
      nv[k] = r[8] * x[k] + r[9] * v[k] + r[12] * cx[k] + r[13] * cv[k];
    }
    if constexpr (R > 0) {
      const int64_t hrow = b * H * D + d;
      // Every history read of an element precedes its own slot's write (slot step - 2 is slot step when R = 2).
      add_history<V, H>(hist + prev1 + hrow, D, r + 14, nx, nv);
      if constexpr (R > 1) add_history<V, H>(hist + prev2 + hrow, D, r + 18, nx, nv);
      store<V>(hist + own + hrow, cx);
      if constexpr (H == 2) store<V>(hist + own + hrow + D, cv);
    }
    replace_obs<V>(obs, r + KT, obs_seed, b, d, D, k_step, 0, nx, nv);
    store<V>(px, nx);
    store<V>(px + D, nv);
  }
};

template <typename Y, int R, int H>
void launch_ring(float* u, float* hist, const void* y, TableArg table, const int64_t* step, ObsArg obs, TimeArg ts,
                 const double* sde, int64_t B, int64_t D, int vec, cudaStream_t stream) {
  const GddimStepOp<Y, R, H> op{u, hist, static_cast<const Y*>(y), table, step, obs, ts, sde, B, D, {}, 0, 0, 0, 0, 0};
  launch_steps(op, vec, B, D, stream);
}

}  // namespace

void launch_gddim_step(float* u, float* hist, int K, int H, const void* y, NetType y_type, TableArg table,
                       const int64_t* step, ObsArg obs, TimeArg ts, const double* sde, int64_t B, int64_t D,
                       cudaStream_t stream) {
  const int vec = pick_vec(D, {{u, 4}, {y, net_bytes(y_type)}, {K > 0 ? hist : nullptr, 4}, {obs.p, 4}});
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    if (K <= 0) {
      launch_ring<Y, 0, 1>(u, hist, y, table, step, obs, ts, sde, B, D, vec, stream);  // no ring: H is not read
    } else if (K == 1) {
      if (H == 1) {
        launch_ring<Y, 1, 1>(u, hist, y, table, step, obs, ts, sde, B, D, vec, stream);
      } else {
        launch_ring<Y, 1, 2>(u, hist, y, table, step, obs, ts, sde, B, D, vec, stream);
      }
    } else {
      if (H == 1) {
        launch_ring<Y, 2, 1>(u, hist, y, table, step, obs, ts, sde, B, D, vec, stream);
      } else {
        launch_ring<Y, 2, 2>(u, hist, y, table, step, obs, ts, sde, B, D, vec, stream);
      }
    }
  });
}

}  // namespace cuda
}  // namespace cld
