// The noise contract of cld_fast (see cld_fast/philox.py), for host (C++) and device (CUDA) code.
//
// For element pair i (flat index b * D + d over the (B, D) view of x) of a call with seed s, step k
// and op tag T:
//
//   key     = (s & 0xffffffff, (s >> 32) & 0xffffffff)
//   counter = (i & 0xffffffff, (i >> 32) & 0xffffffff, k & 0xffffffff, T)
//   r0..r3  = Philox4x32-10(counter, key)            (Salmon et al. 2011; as curand, Random123, Triton)
//   uniform(r) = float32(r as int32, negatives mapped to ~r) * 4.6566127342e-10f   (Triton's rule)
//   (z0, z1) = BoxMuller(uniform(r0), uniform(r1)),  (z2, z3) = BoxMuller(uniform(r2), uniform(r3))
//   BoxMuller(u1, u2) = sqrt(-2 log max(u1, 1e-7)) * (cos 2 pi u2, sin 2 pi u2), all in float32
//
// The uniforms are bit-exact across backends; the normals agree to float32 rounding (~1e-6). Here
// they use the correctly rounded (or 1-ulp) float32 log / sin / cos (the CPU kernels' vector path,
// csrc/cpu/cld_philox_cpu.h, evaluates the same transform its own way): on the device the libdevice
// functions are called by name, so they stay accurate even when the translation unit is built with
// --use_fast_math (which would otherwise turn logf / sincosf into the approximate __logf / __sinf
// intrinsics, off by ~1e-3 near u1 = 1).
//
// Plain C++17 plus CUDA qualifiers: no torch, no curand; included by csrc/cpu and csrc/cuda.
#pragma once

#include "cld_hd.h"

#if defined(__CUDACC__)
// libdevice's accurate implementations (what logf / sincosf call without --use_fast_math).
extern "C" __device__ float __nv_logf(float);
extern "C" __device__ void __nv_sincosf(float, float*, float*);
#endif

namespace cld {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.28318530717958647692f;  // float32(2 pi), as philox.box_muller
constexpr float kBoxMullerMinU = 1.0e-7f;

// Op tags (counter word c3), as cld_fast.philox.TAG_* (the bindings' _layout() lists them).
constexpr uint32_t kTagPerturb = 0;
constexpr uint32_t kTagHalfStep = 1;
constexpr uint32_t kTagSscs = 2;
constexpr uint32_t kTagAffine = 3;
constexpr uint32_t kTagInpaint = 4;

struct Philox4 {
  uint32_t r0, r1, r2, r3;
};

CLD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds: the same rounds and key bumps as Random123, curand and Triton.
CLD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_a, lo_a, hi_b, lo_b;
    mulhilo32(kPhiloxRoundB, c2, hi_b, lo_b);
    mulhilo32(kPhiloxRoundA, c0, hi_a, lo_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// The Philox output for element index i of a call with (seed, step, tag).
CLD_HD Philox4 philox_bits(int64_t seed, int64_t index, int64_t step, uint32_t tag) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t i = static_cast<uint64_t>(index);
  return philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                       static_cast<uint32_t>(static_cast<uint64_t>(step)), tag,
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// Triton's uint32 -> [0, 1) map, bit-exact: int32 view, negatives to ~x, times 2^-31 (in float32).
CLD_HD float uniform_from_bits(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * kUniformScale;
}

CLD_HD float cld_logf(float x) {
#if defined(__CUDA_ARCH__)
  return __nv_logf(x);
#else
  return std::log(x);
#endif
}

CLD_HD float cld_sqrtf(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);  // correctly rounded even under --use_fast_math
#else
  return std::sqrt(x);
#endif
}

CLD_HD void cld_sincosf(float x, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  __nv_sincosf(x, &s, &c);
#else
  s = std::sin(x);
  c = std::cos(x);
#endif
}

// Box-Muller in float32 exactly as cld_fast.philox.box_muller: (r cos th, r sin th).
CLD_HD void box_muller(float u1, float u2, float& z0, float& z1) {
  u1 = u1 < kBoxMullerMinU ? kBoxMullerMinU : u1;
  const float th = u2 * kTwoPi;
  const float r = cld_sqrtf(-2.0f * cld_logf(u1));
  float s, c;
  cld_sincosf(th, s, c);
  z0 = r * c;
  z1 = r * s;
}

// z0 only (the cos half of the first pair), for ops that need one normal per element.
CLD_HD float normal_z0(int64_t seed, int64_t index, int64_t step, uint32_t tag) {
  const Philox4 r = philox_bits(seed, index, step, tag);
  float z0, z1;
  box_muller(uniform_from_bits(r.r0), uniform_from_bits(r.r1), z0, z1);
  return z0;
}

// (z0, z1): the first Box-Muller pair.
CLD_HD void normals2(int64_t seed, int64_t index, int64_t step, uint32_t tag, float& z0, float& z1) {
  const Philox4 r = philox_bits(seed, index, step, tag);
  box_muller(uniform_from_bits(r.r0), uniform_from_bits(r.r1), z0, z1);
}

// (z0, z1, z2, z3): both Box-Muller pairs of one Philox call.
CLD_HD void normals4(int64_t seed, int64_t index, int64_t step, uint32_t tag, float z[4]) {
  const Philox4 r = philox_bits(seed, index, step, tag);
  box_muller(uniform_from_bits(r.r0), uniform_from_bits(r.r1), z[0], z[1]);
  box_muller(uniform_from_bits(r.r2), uniform_from_bits(r.r3), z[2], z[3]);
}

}  // namespace cld
