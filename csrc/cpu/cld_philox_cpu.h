// Blocks of normals of the noise contract (csrc/include/cld_philox.h) for the CPU kernels, vectorised.
//
// philox_normals<NZ>(seed, i0, n, step, tag, z) writes, for the n consecutive element indices
// i0 .. i0 + n - 1, the first NZ normals of each index (NZ = 1: z0; 2: z0, z1; 4: z0 .. z3) into
// z[0] .. z[NZ - 1]. With AVX-512 (16 lanes) or AVX2 + FMA (8 lanes), detected at run time, the
// Philox4x32-10 rounds run on integer vectors (the uniform bits are those of the scalar code,
// exactly) and Box-Muller runs on float vectors with its own log and (sin, cos)(2 pi u): exact range
// reductions (exponent and mantissa; quarter turns of 4 u, so pi is never rounded into the angle)
// and short polynomials, no table and no division. The normals are then within 2.4e-7 of a float64
// Box-Muller of the same uniforms and within 1.8e-6 of the reference's float32 ones (the reference's
// own error: it rounds u2 * 2 pi to float32; docs/kernels.md). Every index of a block, its tail
// included, goes through the same lanes, so a normal does not depend on how the work is split into
// chunks, and the 8- and 16-lane paths give identical normals. On a CPU without either, the scalar
// functions of cld_philox.h run (std::log / std::sin / std::cos of the rounded angle).
#pragma once

#include <cstdint>

#include "cld_philox.h"

// Functions that must be inlined into their caller: the Box-Muller helpers into the lane loops (a call
// would pass vectors through memory), the CPU kernels' elementwise loops into their wide() variants.
#define CLD_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
#define CLD_PHILOX_X86 1
#include <immintrin.h>
#endif

namespace cld {
namespace cpu {

// Scalar normals of indices [i0 + lo, i0 + n) into z[j][lo ..].
template <int NZ>
inline void philox_normals_scalar(int64_t seed, int64_t i0, int64_t lo, int64_t n, int64_t step, uint32_t tag,
                                  float* const* z) {
  for (int64_t i = lo; i < n; ++i) {
    const Philox4 r = philox_bits(seed, i0 + i, step, tag);
    float a, b;
    box_muller(uniform_from_bits(r.r0), uniform_from_bits(r.r1), a, b);
    z[0][i] = a;
    if constexpr (NZ >= 2) z[1][i] = b;
    if constexpr (NZ == 4) {
      box_muller(uniform_from_bits(r.r2), uniform_from_bits(r.r3), a, b);
      z[2][i] = a;
      z[3][i] = b;
    }
  }
}

#if CLD_PHILOX_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512dq")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_* inside the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"

// The 16- and 8-lane operations the Philox rounds and Box-Muller need, as one interface.
struct Lanes16 {
  static constexpr int N = 16;
  using I = __m512i;
  using F = __m512;
  static I set1(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static I load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  // 64-bit products of the even lanes and of the odd lanes (moved down by a 64-bit shift), then each
  // half put in place by one masked shuffle (no 32-bit multiply-low: it is two uops). Multiplies and
  // shifts issue on one port and shuffles on the other, so a round is 12 vector ops per 16 counters.
  static void mulhilo(I a, I b, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(b, a);
    const I odd = _mm512_mul_epu32(_mm512_srli_epi64(b, 32), a);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
  }
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static F set1f(float a) { return _mm512_set1_ps(a); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // u = 2^e (1 + f) with 1 + f in [0.75, 1.5), exactly (u > 0 and normal).
  static void log_parts(F u, F& e, F& f) {
    const F one = _mm512_set1_ps(1.0f);
    const F m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    e = _mm512_getexp_ps(u);
    e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), e, one);
    f = _mm512_sub_ps(m, one);
  }
  static F uniform(I r) {  // int32 view, negatives to ~x (x ^ (x >> 31)), times 2^-31
    const I x = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
  }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  // w = q + t with q = round(w) (ties to even) as an integer and t = w - q, exact.
  static void split_round(F w, I& q, F& t) {
    const F qf = _mm512_roundscale_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_cvtps_epi32(qf);
    t = _mm512_sub_ps(w, qf);
  }
  // (sin, cos)(pi/2 (q + t)) from S = sin(pi/2 t), C = cos(pi/2 t): swapped for odd q, the sine
  // negated for q mod 4 in {2, 3} (bit 1 of q) and the cosine for q mod 4 in {1, 2} (bit 1 of q + 1).
  static void quadrant(I q, F sn, F cs, F& s, F& c) {
    const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
    const I sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const I s_bit = _mm512_slli_epi32(q, 30), c_bit = _mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(1)), 30);
    s = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(odd, sn, cs)), s_bit, sign, 0x78));
    c = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(odd, cs, sn)), c_bit, sign, 0x78));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm512_storeu_si512(p, v); }
};

struct Lanes8 {
  static constexpr int N = 8;
  using I = __m256i;
  using F = __m256;
  static I set1(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static I load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static void mulhilo(I a, I b, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(b, a);
    const I odd = _mm256_mul_epu32(_mm256_shuffle_epi32(b, 0xF5), a);  // dwords (1, 1, 3, 3)
    hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);  // dwords (0, 0, 2, 2)
  }
  static I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static F set1f(float a) { return _mm256_set1_ps(a); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  // As Lanes16::log_parts, from the bits: a mantissa of 1.5 or more is halved and the exponent bumped.
  static void log_parts(F u, F& e, F& f) {
    const I bits = _mm256_castps_si256(u);
    const I upper = _mm256_srli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x400000)), 22);  // 1 if >= 1.5
    const I mant = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)),
                                   _mm256_sub_epi32(_mm256_set1_epi32(0x3f800000), _mm256_slli_epi32(upper, 23)));
    const I expo = _mm256_add_epi32(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)), upper);
    e = _mm256_cvtepi32_ps(expo);
    f = _mm256_sub_ps(_mm256_castsi256_ps(mant), _mm256_set1_ps(1.0f));
  }
  static F uniform(I r) {
    const I x = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
  }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static void split_round(F w, I& q, F& t) {
    const F qf = _mm256_round_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_cvtps_epi32(qf);
    t = _mm256_sub_ps(w, qf);
  }
  static void quadrant(I q, F sn, F cs, F& s, F& c) {
    const F odd = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));  // blendv reads the top bit
    const I sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const I s_bit = _mm256_and_si256(_mm256_slli_epi32(q, 30), sign);
    const I c_bit = _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 30), sign);
    s = _mm256_xor_ps(_mm256_blendv_ps(sn, cs, odd), _mm256_castsi256_ps(s_bit));
    c = _mm256_xor_ps(_mm256_blendv_ps(cs, sn, odd), _mm256_castsi256_ps(c_bit));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};

// log(u) for normal u > 0 (Box-Muller's u1 in [kBoxMullerMinU, 1]): u = 2^e (1 + f), 1 + f in
// [0.75, 1.5) exactly, then log(u) = e ln2 + f + f^2 R(f), R(f) = (log1p(f) - f) / f^2 by a degree-8
// polynomial fitted on [-0.25, 0.5] (Chebyshev, coefficients rounded to float32). log1p(f) is within
// 1.2 ulp over the interval; the same operations in the same order on 8 or 16 lanes, so both paths
// give the same bits. No division and no table: 15 vector ops.
template <typename L>
CLD_ALWAYS_INLINE typename L::F log_unit(typename L::F u) {
  using F = typename L::F;
  F e, f;
  L::log_parts(u, e, f);
  F r = L::set1f(-0.04794389009475708f);
  r = L::fma(r, f, L::set1f(0.10609551519155502f));
  r = L::fma(r, f, L::set1f(-0.13066790997982025f));
  r = L::fma(r, f, L::set1f(0.14423450827598572f));
  r = L::fma(r, f, L::set1f(-0.16651035845279694f));
  r = L::fma(r, f, L::set1f(0.199947327375412f));
  r = L::fma(r, f, L::set1f(-0.25000107288360596f));
  r = L::fma(r, f, L::set1f(0.3333337903022766f));
  r = L::fma(r, f, L::set1f(-0.5f));
  const F log_m = L::fma(f, L::mul(f, r), f);
  return L::fma(e, L::set1f(0.693147180559945309f), log_m);
}

// (sin, cos)(2 pi u) for u in [0, 1]: w = 4 u = q + t exactly, t in [-0.5, 0.5], so the angle is
// pi/2 q + pi/2 t with no rounding of pi; sin(pi/2 t) = t P(t^2) and cos(pi/2 t) = Q(t^2) by
// polynomials of degree 3 and 4 in t^2 fitted on [0, 0.25] (Chebyshev, float32 coefficients), within
// 9e-8 and 6e-8 of the true values; the quadrant q mod 4 then swaps and negates them.
template <typename L>
CLD_ALWAYS_INLINE void sincos_turn(typename L::F u, typename L::F& s, typename L::F& c) {
  using F = typename L::F;
  typename L::I q;
  F t;
  L::split_round(L::mul(u, L::set1f(4.0f)), q, t);
  const F t2 = L::mul(t, t);
  F ps = L::set1f(-0.004607434384524822f);
  ps = L::fma(ps, t2, L::set1f(0.07968193292617798f));
  ps = L::fma(ps, t2, L::set1f(-0.6459636092185974f));
  ps = L::fma(ps, t2, L::set1f(1.5707963705062866f));
  F pc = L::set1f(0.0009044470498338342f);
  pc = L::fma(pc, t2, L::set1f(-0.02086043916642666f));
  pc = L::fma(pc, t2, L::set1f(0.25366926193237305f));
  pc = L::fma(pc, t2, L::set1f(-1.2337005138397217f));
  pc = L::fma(pc, t2, L::set1f(1.0f));
  L::quadrant(q, L::mul(t, ps), pc, s, c);
}

// Box-Muller on lanes: (z0, z1) = sqrt(-2 log u1) (cos, sin)(2 pi u2), u1 clamped to kBoxMullerMinU.
template <typename L>
CLD_ALWAYS_INLINE void box_muller_lanes(typename L::F u1, typename L::F u2, typename L::F& z0, typename L::F& z1) {
  using F = typename L::F;
  const F r = L::sqrt(L::mul(L::set1f(-2.0f), log_unit<L>(L::max(u1, L::set1f(kBoxMullerMinU)))));
  F s, c;
  sincos_turn<L>(u2, s, c);
  z0 = L::mul(r, c);
  z1 = L::mul(r, s);
}

// 0, 1, 2, ...: the lane offsets of consecutive counters (enough for kPhiloxUnroll vectors of 16).
alignas(64) inline constexpr uint32_t kLaneIota[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
    44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};

// Philox4x32-10 on U * L::N consecutive counters i .. i + U * L::N - 1 (U independent vectors, so
// the multiply latency of one hides behind the others): the rounds and key bumps of philox4x32_10,
// lane by lane. Vector u holds counters i + u * L::N ..; its four output words go to c[u][0..3].
template <typename L, int U>
inline void philox_lanes(uint64_t seed, int64_t i, typename L::I c2_in, typename L::I c3_in, typename L::I (*c)[4]) {
  using I = typename L::I;
  I c0[U], c1[U], c2[U], c3[U];
  const uint64_t first = static_cast<uint64_t>(i);
  const uint32_t lo = static_cast<uint32_t>(first);
  if (static_cast<uint64_t>(lo) + U * L::N - 1 <= 0xffffffffULL) {  // no carry into the high word: lo + lane
    const I base = L::set1(lo), high = L::set1(static_cast<uint32_t>(first >> 32));
    for (int u = 0; u < U; ++u) {
      c0[u] = L::add(base, L::load(kLaneIota + u * L::N));
      c1[u] = high;
    }
  } else {
    alignas(64) uint32_t lo_words[U][L::N], hi_words[U][L::N];
    for (int u = 0; u < U; ++u) {
      for (int l = 0; l < L::N; ++l) {
        const uint64_t idx = first + static_cast<uint64_t>(u * L::N + l);
        lo_words[u][l] = static_cast<uint32_t>(idx);
        hi_words[u][l] = static_cast<uint32_t>(idx >> 32);
      }
      c0[u] = L::load(lo_words[u]);
      c1[u] = L::load(hi_words[u]);
    }
  }
  const I mul_a = L::set1(kPhiloxRoundA), mul_b = L::set1(kPhiloxRoundB);
  for (int u = 0; u < U; ++u) {
    c2[u] = c2_in;
    c3[u] = c3_in;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const I key0 = L::set1(k0), key1 = L::set1(k1);
    for (int u = 0; u < U; ++u) {
      I hi_a, lo_a, hi_b, lo_b;
      L::mulhilo(mul_b, c2[u], hi_b, lo_b);
      L::mulhilo(mul_a, c0[u], hi_a, lo_a);
      c0[u] = L::xor3(hi_b, c1[u], key0);
      c2[u] = L::xor3(hi_a, c3[u], key1);
      c1[u] = lo_b;
      c3[u] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int u = 0; u < U; ++u) {
    c[u][0] = c0[u];
    c[u][1] = c1[u];
    c[u][2] = c2[u];
    c[u][3] = c3[u];
  }
}

// Vectors processed together (independent Philox chains).
constexpr int kPhiloxUnroll = 4;
static_assert(kPhiloxUnroll * 16 <= 64, "kLaneIota covers kPhiloxUnroll vectors of 16 lanes");

// Box-Muller of the words c[0..3] of one vector into z[j] + at (the first NZ normals).
template <typename L, int NZ>
inline void box_muller_store(const typename L::I* c, float* const* z, int64_t at) {
  typename L::F z0, z1;
  box_muller_lanes<L>(L::uniform(c[0]), L::uniform(c[1]), z0, z1);
  L::store(z[0] + at, z0);
  if constexpr (NZ >= 2) L::store(z[1] + at, z1);
  if constexpr (NZ == 4) {
    typename L::F z2, z3;
    box_muller_lanes<L>(L::uniform(c[2]), L::uniform(c[3]), z2, z3);
    L::store(z[2] + at, z2);
    L::store(z[3] + at, z3);
  }
}

// Full vectors of normals for indices [i0, i0 + whole), whole a multiple of L::N.
template <typename L, int NZ>
void philox_normals_lanes(int64_t seed, int64_t i0, int64_t whole, int64_t step, uint32_t tag, float* const* z) {
  using I = typename L::I;
  const uint32_t step_word = static_cast<uint32_t>(static_cast<uint64_t>(step));
  const I c2_in = L::set1(step_word);
  const I c3_in = L::set1(tag);
  constexpr int64_t group = kPhiloxUnroll * L::N;
  int64_t i = 0;
  for (; i + group <= whole; i += group) {
    I c[kPhiloxUnroll][4];
    philox_lanes<L, kPhiloxUnroll>(static_cast<uint64_t>(seed), i0 + i, c2_in, c3_in, c);
    for (int u = 0; u < kPhiloxUnroll; ++u) box_muller_store<L, NZ>(c[u], z, i + u * L::N);
  }
  for (; i < whole; i += L::N) {
    I c[1][4];
    philox_lanes<L, 1>(static_cast<uint64_t>(seed), i0 + i, c2_in, c3_in, c);
    box_muller_store<L, NZ>(c[0], z, i);
  }
}

// The four words of L::N counters from i0 into w[j][0 .. L::N) (for the compiled-contract probe).
template <typename L>
void philox_words_lanes(int64_t seed, int64_t i0, int64_t step, uint32_t tag, uint32_t (*w)[L::N]) {
  const uint32_t step_word = static_cast<uint32_t>(static_cast<uint64_t>(step));
  typename L::I c[1][4];
  philox_lanes<L, 1>(static_cast<uint64_t>(seed), i0, L::set1(step_word), L::set1(tag), c);
  for (int j = 0; j < 4; ++j) L::store_words(w[j], c[0][j]);
}
#pragma GCC diagnostic pop
#pragma GCC pop_options

// 16 (AVX-512), 8 (AVX2 + FMA) or 0 (scalar only): what this CPU runs, checked once.
inline int philox_vector_lanes() {
  static const int lanes = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return 16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 0;
  }();
  return lanes;
}
#endif  // CLD_PHILOX_X86

#if CLD_PHILOX_X86
// Whole vectors, then the tail as one more vector into a scratch block: every index goes through the
// same lanes, so a normal does not depend on where a parallel chunk starts.
template <typename L, int NZ>
void philox_normals_vector(int64_t seed, int64_t i0, int64_t n, int64_t step, uint32_t tag, float* const* z) {
  const int64_t whole = n - n % L::N;
  philox_normals_lanes<L, NZ>(seed, i0, whole, step, tag, z);
  if (whole == n) return;
  alignas(64) float scratch[NZ][L::N];
  float* zs[NZ];
  for (int j = 0; j < NZ; ++j) zs[j] = scratch[j];
  philox_normals_lanes<L, NZ>(seed, i0 + whole, L::N, step, tag, zs);
  for (int j = 0; j < NZ; ++j)
    for (int64_t i = whole; i < n; ++i) z[j][i] = scratch[j][i - whole];
}
#endif

// What this CPU runs: 16 (AVX-512), 8 (AVX2 + FMA) or 0 (scalar).
inline int philox_lanes_available() {
#if CLD_PHILOX_X86
  return philox_vector_lanes();
#else
  return 0;
#endif
}

// lanes: 16, 8 or 0 to force a path the CPU has (tests), -1 for the widest.
template <int NZ>
inline void philox_normals(int64_t seed, int64_t i0, int64_t n, int64_t step, uint32_t tag, float* const* z,
                           int lanes = -1) {
  if (lanes < 0) lanes = philox_lanes_available();
#if CLD_PHILOX_X86
  if (lanes == 16) return philox_normals_vector<Lanes16, NZ>(seed, i0, n, step, tag, z);
  if (lanes == 8) return philox_normals_vector<Lanes8, NZ>(seed, i0, n, step, tag, z);
#endif
  philox_normals_scalar<NZ>(seed, i0, 0, n, step, tag, z);
}

// The four Philox words of indices i0 .. i0 + n - 1 into w[0..3][0 .. n), by the path the kernels
// take (the vector lanes where the CPU has them), for the compiled-contract probe.
inline void philox_words(int64_t seed, int64_t i0, int64_t n, int64_t step, uint32_t tag, uint32_t* const* w) {
  int64_t done = 0;
#if CLD_PHILOX_X86
  const int lanes = philox_vector_lanes();
  alignas(64) uint32_t block[4][16];
  for (; lanes != 0 && done < n; done += lanes) {
    if (lanes == 16) {
      philox_words_lanes<Lanes16>(seed, i0 + done, step, tag, block);
    } else {
      alignas(64) uint32_t block8[4][8];
      philox_words_lanes<Lanes8>(seed, i0 + done, step, tag, block8);
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 8; ++l) block[j][l] = block8[j][l];
    }
    for (int j = 0; j < 4; ++j)
      for (int64_t l = 0; l < lanes && done + l < n; ++l) w[j][done + l] = block[j][l];
  }
#endif
  for (; done < n; ++done) {
    const Philox4 r = philox_bits(seed, i0 + done, step, tag);
    w[0][done] = r.r0;
    w[1][done] = r.r1;
    w[2][done] = r.r2;
    w[3][done] = r.r3;
  }
}

}  // namespace cpu
}  // namespace cld
