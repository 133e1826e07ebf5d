// Weight-only int8/int4 matrix products on the bytes compressed-tensors' pack-quantized format
// stores (no repacking): y[t, n] = sum_g scale[n, g] * sum_{k in g} x[t, k] * (u[n, k] - offset),
// u the stored unsigned value (int8: one byte; int4: two to a byte, the even element in the low
// nibble), offset 2^(bits-1), or, asymmetric, the stored zero point of (n, g), read from the
// zero points' packed words as stored. AVX2 + FMA, float32 accumulation; rows split over torch's threads.
// Each row is read once for up to four tokens at a time; it stays in L1 for the next four.
// emm: bf16/fp16 products bit for bit as torch's own CPU kernel computes them, faster (gemm.py).
// pregate_step: a pre-gate's decode step (predictors/pregate.py) in one call, float32.
// amm: bf16 products on Intel AMX, bit for bit as torch's oneDNN computes them on such a CPU, faster
// for a few rows (no weight reorder per call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int TB = 4;  // tokens per pass over a row
constexpr int64_t PREFETCH = 2048;  // bytes ahead in a row that a one-token pass asks for
constexpr int64_t DP_PREFETCH = 8192;  // ...on the AVX512-BF16 path
// the step-wide path asks for each line twice: into L2 WIDE_FAR bytes ahead, into L1 WIDE_NEAR ahead
// (from memory int8 rows run faster this way than with one request into L1 far ahead; int4 rows about even: docs/quantized.md)
constexpr int64_t WIDE_FAR = 8192, WIDE_NEAR = 1024;
constexpr int64_t DP_TOKENS = 15;  // tokens up to which bf16 products take it without tiles (from 16 quant.py dequantizes for torch's GEMM)

// One output row's zero points as stored: packed along the output dimension, so row r's value for
// group g is at bit (r * bits) % 32 of the int32 word [(r * bits) / 32, g]. words == nullptr:
// symmetric (the offset is 2^(bits-1)).
struct ZeroRow {
  const uint8_t* words;  // the row's word row: G little-endian int32
  int shift;
};

inline ZeroRow zero_row(const uint8_t* zeros, int64_t r, int bits, int64_t G) {
  if (zeros == nullptr) return {nullptr, 0};
  return {zeros + (r * bits / 32) * G * 4, static_cast<int>(r * bits % 32)};
}

// Group gi's offset: its stored zero point, or 2^(bits-1) (symmetric).
inline int offset_of(ZeroRow z, int64_t gi, int bits) {
  if (z.words == nullptr) return 1 << (bits - 1);
  uint32_t w;
  std::memcpy(&w, z.words + gi * 4, 4);
  return static_cast<int>((w >> z.shift) & ((1u << bits) - 1));
}

inline __m256i group_offset(ZeroRow z, int64_t gi, int bits, __m256i symmetric) {
  return z.words == nullptr ? symmetric : _mm256_set1_epi32(offset_of(z, gi, bits));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// U independent accumulators per token (a chain of FMAs waits on each one's latency otherwise)
template <int BITS, int NT, int U>
inline void row_tokens(const uint8_t* row, const float* sc, ZeroRow zp, const float* x, int64_t K, int64_t g,
                       int64_t G, float* y, int64_t ystride) {
  constexpr int STEP = BITS == 8 ? 8 : 16;  // inputs per 8-byte load
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i off = _mm256_set1_epi32(1 << (BITS - 1));
  const __m256i nib = _mm256_set1_epi32(15);
  for (int64_t gi = 0; gi < G; ++gi) {
    const __m256i goff = group_offset(zp, gi, BITS, off);
    __m256 ga[NT][U];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < U; ++u) ga[t][u] = _mm256_setzero_ps();
    const int64_t k0 = gi * g, k1 = k0 + g;
    for (int64_t kb = k0; kb < k1; kb += STEP * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t k = kb + u * STEP;
        if (BITS == 8) {
          __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
          __m256 w = _mm256_cvtepi32_ps(_mm256_sub_epi32(i, goff));
          for (int t = 0; t < NT; ++t) ga[t][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * K + k), ga[t][u]);
        } else {  // x is de-interleaved per 16: the 8 even elements, then the 8 odd ones
          __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
          __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(i, nib), goff));
          __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(i, 4), goff));
          for (int t = 0; t < NT; ++t) {
            ga[t][u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + t * K + k), ga[t][u]);
            ga[t][u] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + t * K + k + 8), ga[t][u]);
          }
        }
      }
    }
    const __m256 s = _mm256_set1_ps(sc[gi]);
    for (int t = 0; t < NT; ++t) {
      __m256 sum = ga[t][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, ga[t][u]);
      acc[t] = _mm256_fmadd_ps(s, sum, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) y[t * ystride] = hsum(acc[t]);
}

template <int BITS, int NT>
inline void row_tokens_any(const uint8_t* row, const float* sc, ZeroRow zp, const float* x, int64_t K, int64_t g,
                           int64_t G, float* y, int64_t ystride) {
  constexpr int STEP = BITS == 8 ? 8 : 16;
  constexpr int U = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  if (g % (STEP * U) == 0) row_tokens<BITS, NT, U>(row, sc, zp, x, K, g, G, y, ystride);
  else row_tokens<BITS, NT, 1>(row, sc, zp, x, K, g, G, y, ystride);
}

// One token, two rows at a time: each activation load feeds both rows, and the rows' next cache
// lines are asked for PREFETCH bytes ahead (faster from memory than one row a pass:
// docs/quantized.md).
template <int BITS>
inline void row_pair(const uint8_t* r0, const uint8_t* r1, const float* s0, const float* s1, ZeroRow z0, ZeroRow z1,
                     const float* x, int64_t K, int64_t g, int64_t G, float* y0, float* y1) {
  constexpr int STEP = BITS == 8 ? 8 : 16;
  const __m256i off = _mm256_set1_epi32(1 << (BITS - 1));
  const __m256i nib = _mm256_set1_epi32(15);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    const __m256i o0 = group_offset(z0, gi, BITS, off), o1 = group_offset(z1, gi, BITS, off);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    const int64_t k0 = gi * g, k1 = k0 + g;
    for (int64_t k = k0; k < k1; k += STEP) {
      const int64_t byte = k * BITS / 8;
      if ((byte & 63) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + byte + PREFETCH), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(r1 + byte + PREFETCH), _MM_HINT_T0);
      }
      if (BITS == 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + k))), o0));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r1 + k))), o1));
        if ((k / STEP) & 1) { b0 = _mm256_fmadd_ps(w0, xv, b0); b1 = _mm256_fmadd_ps(w1, xv, b1); }
        else { a0 = _mm256_fmadd_ps(w0, xv, a0); a1 = _mm256_fmadd_ps(w1, xv, a1); }
      } else {
        const __m256 xe = _mm256_loadu_ps(x + k), xo = _mm256_loadu_ps(x + k + 8);
        __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + k / 2)));
        __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r1 + k / 2)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(i0, nib), o0)), xe, a0);
        b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(i0, 4), o0)), xo, b0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(i1, nib), o1)), xe, a1);
        b1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(i1, 4), o1)), xo, b1);
      }
    }
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s0[gi]), _mm256_add_ps(a0, b0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s1[gi]), _mm256_add_ps(a1, b1), acc1);
  }
  *y0 = hsum(acc0);
  *y1 = hsum(acc1);
}

template <int BITS>
void rows(const uint8_t* packed, int64_t rb, const float* scale, const uint8_t* zeros, int64_t col0, const float* x,
          int64_t T, int64_t K, int64_t g, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (T == 1) {
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) {
      const int64_t r = n - col0;
      row_pair<BITS>(packed + r * rb, packed + (r + 1) * rb, scale + r * G, scale + (r + 1) * G,
                     zero_row(zeros, r, BITS, G), zero_row(zeros, r + 1, BITS, G), x, K, g, G, y + n, y + n + 1);
    }
    n0 = n;
  }
  for (int64_t n = n0; n < n1; ++n) {  // output column n is row n - col0 of this weight
    const uint8_t* row = packed + (n - col0) * rb;
    const float* sc = scale + (n - col0) * G;
    const ZeroRow zp = zero_row(zeros, n - col0, BITS, G);
    int64_t t = 0;
    for (; t + TB <= T; t += TB) row_tokens_any<BITS, TB>(row, sc, zp, x + t * K, K, g, G, y + t * N + n, N);
    switch (T - t) {
      case 3: row_tokens_any<BITS, 3>(row, sc, zp, x + t * K, K, g, G, y + t * N + n, N); break;
      case 2: row_tokens_any<BITS, 2>(row, sc, zp, x + t * K, K, g, G, y + t * N + n, N); break;
      case 1: row_tokens_any<BITS, 1>(row, sc, zp, x + t * K, K, g, G, y + t * N + n, N); break;
      default: break;
    }
  }
}

// ---- half-precision values widened to float32: bf16 is the high half of a float32; fp16 through F16C
template <bool F16>
inline __m256 load_half8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (F16) return _mm256_cvtph_ps(v);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float half_scalar(uint16_t h, bool f16) {
  if (f16) return _cvtsh_ss(h);
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- exact half-precision products: torch's own order on AVX2 --------------------------------------
// torch multiplies bf16/fp16 matrices on CPUs without a native half GEMM one dot product per output
// (aten's dot_with_fp32_arith): 8 float32 accumulators of 8 lanes, lane l of accumulator r summing
// inputs 64c + 8r + l over blocks c in turn; the 8 accumulators added pairwise (r and r+4, r and r+2,
// r and r+1), the lanes as its vec_reduce_all (l and l^4, l^2, l^1); then a remainder of 16-input
// steps in one accumulator, then single inputs. A product of two half values is exact in float32, so
// the same additions in the same order give the same bits: emm reproduces them, faster (the weight
// read once per row for a block of tokens; x widened once). The bf16 weights are widened by
// unpacking 16 at a time, which puts inputs 0-3 and 8-11 in one register and 4-7, 12-15 in the
// other: x is stored in that order too, and the lanes are put back before the reduction.
inline float torch_lanes(__m256 v) {  // vec_reduce_all<float> on AVX2: l + l^4, + l^2, + l^1
  v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
  return _mm256_cvtss_f32(v);
}

// w: one weight row; xp: x widened, the first K64 inputs in the unpack order (bf16) or as they are
// (fp16); xs: x widened as it is (the remainder). Returns torch's float32 sum.
template <bool F16>
inline float exact_dot(const uint16_t* w, const float* xp, const float* xs, int64_t K) {
  const int64_t K64 = K & ~int64_t(63);
  __m256 s[8];
  for (int r = 0; r < 8; ++r) s[r] = _mm256_setzero_ps();
  if constexpr (F16) {
    for (int64_t k = 0; k < K64; k += 64)
      for (int r = 0; r < 8; ++r) s[r] = _mm256_fmadd_ps(load_half8<true>(w + k + 8 * r), _mm256_loadu_ps(xp + k + 8 * r), s[r]);
  } else {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k = 0; k < K64; k += 64) {
      for (int q = 0; q < 4; ++q) {  // s[2q]: inputs {0-3, 8-11} of these 16, s[2q+1]: {4-7, 12-15}
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16 * q));
        s[2 * q] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_loadu_ps(xp + k + 16 * q), s[2 * q]);
        s[2 * q + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), _mm256_loadu_ps(xp + k + 16 * q + 8), s[2 * q + 1]);
      }
    }
    for (int q = 0; q < 4; ++q) {  // torch's registers: inputs 0-7 and 8-15 of each 16
      const __m256 a = s[2 * q], b = s[2 * q + 1];
      s[2 * q] = _mm256_permute2f128_ps(a, b, 0x20);
      s[2 * q + 1] = _mm256_permute2f128_ps(a, b, 0x31);
    }
  }
  for (int r = 0; r < 4; ++r) s[r] = _mm256_add_ps(s[r], s[r + 4]);
  for (int r = 0; r < 2; ++r) s[r] = _mm256_add_ps(s[r], s[r + 2]);
  float sum = torch_lanes(_mm256_add_ps(s[0], s[1]));
  const int64_t K16 = K & ~int64_t(15);
  __m256 t = _mm256_setzero_ps();
  for (int64_t k = K64; k < K16; k += 16) {
    t = _mm256_fmadd_ps(load_half8<F16>(w + k), _mm256_loadu_ps(xs + k), t);
    t = _mm256_fmadd_ps(load_half8<F16>(w + k + 8), _mm256_loadu_ps(xs + k + 8), t);
  }
  sum += torch_lanes(t);
  for (int64_t k = K16; k < K; ++k) sum += half_scalar(w[k], F16) * xs[k];
  return sum;
}

constexpr int64_t EXACT_TOKENS = 16;  // tokens per pass over a block of rows (their x stays in L2)

template <bool F16>
void exact_rows(const uint16_t* w, int64_t ws, const float* xp, const float* xs, int64_t T, int64_t K,
                const uint16_t* bias, uint16_t* y, int64_t N, int64_t col0, int64_t n0, int64_t n1) {
  for (int64_t t0 = 0; t0 < T; t0 += EXACT_TOKENS) {
    const int64_t t1 = std::min(T, t0 + EXACT_TOKENS);
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* row = w + (n - col0) * ws;
      for (int64_t t = t0; t < t1; ++t) {
        float v = exact_dot<F16>(row, xp + t * K, xs + t * K, K);
        if (bias != nullptr) v = half_scalar(bias[n], F16) + v;
        if constexpr (F16) y[t * N + n] = c10::Half(v).x;
        else y[t * N + n] = c10::BFloat16(v).x;
      }
    }
  }
}

// float32 dot product of two contiguous vectors, four accumulators (the FMA chain's latency)
inline float dot_f32(const float* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

// y[b, n] = act(dot(w[n], x[b]) + bias[n]) for B rows of x (stride xs), outputs split over torch's threads
void linear_rows(const float* w, const float* bias, const float* x, int64_t xs, int64_t B, int64_t K, int64_t N,
                 float* y, bool relu) {
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < B; ++b) {  // the row stays in L1 for every sequence
        const float v = dot_f32(w + n * K, x + b * xs, K) + bias[n];
        y[b * N + n] = relu ? std::max(v, 0.0f) : v;
      }
  });
}

}  // namespace

// One decode step of PregateNet (predictors/pregate.py) for B sequences, fused: normalise each
// token's embedding, move the window and the moving averages on, and score every layer's experts
// in float32 (the network's own math; sums in another order than torch's, so equal to its path
// within float32 rounding). emb [B, H] any float; history [B, W-1, H] float32, oldest first;
// avg [B, D, H] float32; decays [D] float32; ctx: none, or [B, A] the attention pre-gate's context
// rows (the last inputs of fc1). -> (scores [B, L*E], the new history, the new averages).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pregate_step(
    const at::Tensor& emb, const at::Tensor& history, const at::Tensor& avg, const at::Tensor& decays,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b,
    const at::Tensor& skip_w, const at::Tensor& skip_b, const std::optional<at::Tensor>& ctx) {
  TORCH_CHECK(emb.dim() == 2 && emb.is_floating_point(), "emb: float [B, H]");
  const int64_t B = emb.size(0), H = emb.size(1);
  TORCH_CHECK(history.dim() == 3 && history.size(0) == B && history.size(2) == H && history.scalar_type() == at::kFloat,
              "history: float32 [B, window-1, H]");
  TORCH_CHECK(avg.dim() == 3 && avg.size(0) == B && avg.size(2) == H && avg.scalar_type() == at::kFloat,
              "avg: float32 [B, decays, H]");
  const int64_t Wm = history.size(1), D = avg.size(1);
  TORCH_CHECK(decays.dim() == 1 && decays.size(0) == D && decays.scalar_type() == at::kFloat, "decays: float32 [D]");
  const bool has_ctx = ctx.has_value() && ctx->defined();
  const int64_t A = has_ctx ? ctx->size(1) : 0;
  if (has_ctx) TORCH_CHECK(ctx->dim() == 2 && ctx->size(0) == B && ctx->scalar_type() == at::kFloat, "ctx: float32 [B, A]");
  const int64_t F = (1 + Wm + D) * H + A, Hd = fc1_w.size(0), LE = fc2_w.size(0);
  auto dense = [](const at::Tensor& t, int64_t r, int64_t c) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == (c ? 2 : 1) && t.size(0) == r &&
           (c == 0 || t.size(1) == c);
  };
  TORCH_CHECK(dense(fc1_w, Hd, F) && dense(fc1_b, Hd, 0) && dense(fc2_w, LE, Hd) && dense(fc2_b, LE, 0) &&
              dense(skip_w, LE, H) && dense(skip_b, LE, 0), "weights: contiguous float32 of the network's shapes");
  const at::Tensor e = emb.to(at::kFloat).contiguous(), h = history.contiguous(), a = avg.contiguous();
  const at::Tensor c = has_ctx ? ctx->contiguous() : at::Tensor();
  auto new_history = at::empty({B, Wm, H}, h.options()), new_avg = at::empty({B, D, H}, a.options());
  std::vector<float> feats(B * F), hidden(B * Hd);
  const float* dp = decays.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* x = e.data_ptr<float>() + b * H;
    float* f = feats.data() + b * F;
    float ss = 0.0f;
    for (int64_t k = 0; k < H; ++k) ss += x[k] * x[k];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + 1e-6f);
    for (int64_t k = 0; k < H; ++k) f[k] = x[k] * r;  // this token, normalised
    const float* hb = h.data_ptr<float>() + b * Wm * H;
    for (int64_t j = 0; j < Wm; ++j) std::memcpy(f + (1 + j) * H, hb + (Wm - 1 - j) * H, H * sizeof(float));  // newest first
    float* nh = new_history.data_ptr<float>() + b * Wm * H;
    if (Wm) {
      std::memcpy(nh, hb + H, (Wm - 1) * H * sizeof(float));
      std::memcpy(nh + (Wm - 1) * H, f, H * sizeof(float));
    }
    const float* ab = a.data_ptr<float>() + b * D * H;
    float* na = new_avg.data_ptr<float>() + b * D * H;
    for (int64_t d = 0; d < D; ++d) {
      const float dec = dp[d], keep = 1.0f - dp[d];
      for (int64_t k = 0; k < H; ++k) na[d * H + k] = dec * ab[d * H + k] + keep * f[k];
    }
    std::memcpy(f + (1 + Wm) * H, na, D * H * sizeof(float));
    if (A) std::memcpy(f + (1 + Wm + D) * H, c.data_ptr<float>() + b * A, A * sizeof(float));
  }
  linear_rows(fc1_w.data_ptr<float>(), fc1_b.data_ptr<float>(), feats.data(), F, B, F, Hd, hidden.data(), true);
  auto scores = at::empty({B, LE}, e.options());
  std::vector<float> skip(B * LE);
  linear_rows(skip_w.data_ptr<float>(), skip_b.data_ptr<float>(), feats.data(), F, B, H, LE, skip.data(), false);
  float* sp = scores.data_ptr<float>();
  linear_rows(fc2_w.data_ptr<float>(), fc2_b.data_ptr<float>(), hidden.data(), Hd, B, Hd, LE, sp, false);
  for (int64_t i = 0; i < B * LE; ++i) sp[i] = skip[i] + sp[i];
  return {scores, new_history, new_avg};
}

// x [T, K] bfloat16 or float16; w[i] [N_i, K] of x's dtype, rows contiguous; bias: none or [sum N_i]
// -> [T, sum N_i] in x's dtype, bit for bit what torch's F.linear gives on an AVX2 CPU without a
// native half GEMM (see exact_dot), faster.
at::Tensor emm(const at::Tensor& x, at::TensorList w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x: [T, K]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "x: bfloat16 or float16");
  TORCH_CHECK(!w.empty(), "at least one weight");
  const int64_t T = x.size(0), K = x.size(1);
  std::vector<int64_t> first{0};
  for (const auto& wi : w) {
    TORCH_CHECK(wi.dim() == 2 && wi.size(1) == K && wi.stride(1) == 1 && wi.scalar_type() == dtype,
                "weights: [N, K] of x's dtype, rows contiguous");
    first.push_back(first.back() + wi.size(0));
  }
  const int64_t N = first.back();
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == dtype && bias->stride(0) == 1,
                "bias: [N] of x's dtype, contiguous");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  const bool f16 = dtype == at::kHalf;
  // x widened once: xs as it is; bf16 also xk, each 16 of the first K64 inputs in the order
  // exact_dot reads them (0-3, 8-11, 4-7, 12-15: the unpack order); fp16 reads xs throughout
  const int64_t K64 = K & ~int64_t(63);
  std::vector<float> xs(T * K), xk(f16 ? 0 : T * K);
  for (int64_t t = 0; t < T; ++t) {
    const auto* row = reinterpret_cast<const uint16_t*>(x.data_ptr()) + t * x.stride(0);
    const int64_t cs = x.stride(1);
    float* s = xs.data() + t * K;
    for (int64_t k = 0; k < K; ++k) s[k] = half_scalar(row[k * cs], f16);
    if (f16) continue;
    float* d = xk.data() + t * K;
    for (int64_t k = 0; k < K64; k += 16) {
      std::memcpy(d + k, s + k, 4 * sizeof(float));
      std::memcpy(d + k + 4, s + k + 8, 4 * sizeof(float));
      std::memcpy(d + k + 8, s + k + 4, 4 * sizeof(float));
      std::memcpy(d + k + 12, s + k + 12, 4 * sizeof(float));
    }
    std::memcpy(d + K64, s + K64, (K - K64) * sizeof(float));
  }
  auto y = at::empty({T, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* xsp = xs.data();
  const float* xkp = f16 ? xsp : xk.data();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < w.size(); ++i) {
      const int64_t a = std::max(n0, first[i]), c = std::min(n1, first[i + 1]);
      if (a >= c) continue;
      const auto* p = reinterpret_cast<const uint16_t*>(w[i].data_ptr());
      if (f16) exact_rows<true>(p, w[i].stride(0), xkp, xsp, T, K, bp, yp, N, first[i], a, c);
      else exact_rows<false>(p, w[i].stride(0), xkp, xsp, T, K, bp, yp, N, first[i], a, c);
    }
  });
  return y;
}

// Compilers that know the AVX512-BF16 and AMX intrinsics (used per function, by target attribute:
// the file itself builds for AVX2).
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define EC_AVX512_BF16 1

bool avx512_bf16_ready() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}
#endif

// ---- bf16 products on AMX: oneDNN's own arithmetic ---------------------------------------------------
// On a CPU with AMX, torch's bf16 GEMM is oneDNN's brgemm AMX kernel: float32 accumulator tiles, the
// inputs 32 at a time from k = 0 up (TDPBF16PS: each pair of products added in turn, as the
// instruction defines), a bias added in float32, the sum rounded once to bf16. For a few rows it first
// copies the whole weight into its blocked layout, every call (~7 GB/s on a 12 GB/s core). amm issues
// the same instruction on the same pairs in the same order with the weight as the A operand as it is
// stored ([N, K], rows contiguous: no copy) and x as the B operand (k pairs x tokens), so the sums
// are the same bits (gemm.amx_kernel checks that here before anything uses it), at the memory's rate.
#if defined(EC_AVX512_BF16) && defined(__linux__)
#define EC_AMX 1
#define EC_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

bool amx_ready() {  // AMX-BF16 on the CPU and the kernel's leave to use its tile state (Linux asks)
  static const bool ok = [] {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    if (!avx512_bf16_ready()) return false;  // amx_store's rounding
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

// Tiles: C 0-3 ([16 rows][T] float32), B 4 (x: 16 k pairs x T tokens), A 5 and 6 (16 rows x 32 inputs).
EC_AMX_TARGET void amx_config(int64_t T, int rows) {
  // the 64-byte layout: palette, start row, 14 reserved, 16 x 2 bytes per row, 16 x 1 rows
  alignas(64) uint8_t c[64] = {};
  c[0] = 1;
  const auto set = [&c](int t, int r, int bytes) { c[16 + 2 * t] = static_cast<uint8_t>(bytes); c[48 + t] = static_cast<uint8_t>(r); };
  for (int t = 0; t < 4; ++t) set(t, rows, static_cast<int>(4 * T));
  set(4, 16, static_cast<int>(4 * T));
  set(5, rows, 64);
  set(6, rows, 64);
  __asm__ volatile("" : : "r"(c) : "memory");  // the stores above happen before the tile unit reads them
  _tile_loadconfig(c);
}

// Rows [r0, r0 + 16 nb) of w (nb <= 4 blocks of `rows` rows, as configured) against xv; acc [16 nb][T].
EC_AMX_TARGET void amx_blocks(const uint16_t* w, int64_t ws, int64_t K, const uint16_t* xv, int64_t T, int nb, float* acc) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int64_t wb = 2 * ws;
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, xv + k * T, 4 * T);
    _tile_loadd(5, w + k, wb); _tile_dpbf16ps(0, 5, 4);
    if (nb > 1) { _tile_loadd(6, w + 16 * ws + k, wb); _tile_dpbf16ps(1, 6, 4); }
    if (nb > 2) { _tile_loadd(5, w + 32 * ws + k, wb); _tile_dpbf16ps(2, 5, 4); }
    if (nb > 3) { _tile_loadd(6, w + 48 * ws + k, wb); _tile_dpbf16ps(3, 6, 4); }
  }
  _tile_stored(0, acc, 4 * T);
  if (nb > 1) _tile_stored(1, acc + 16 * T, 4 * T);
  if (nb > 2) _tile_stored(2, acc + 32 * T, 4 * T);
  if (nb > 3) _tile_stored(3, acc + 48 * T, 4 * T);
}

// acc [n][T] (+ bias, float32) rounded to bf16 into y[t][col + n], n < count.
EC_AMX_TARGET void amx_store(const float* acc, int64_t count, int64_t T, const uint16_t* bias, uint16_t* y, int64_t N, int64_t col) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(T)));
  for (int64_t n = 0; n < count; n += 16) {
    const __mmask16 m = count - n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - n)) - 1);
    __m512 b = _mm512_setzero_ps();
    if (bias) b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias + n)), 16));
    for (int64_t t = 0; t < T; ++t) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, acc + n * T + t, 4);
      const __m256bh h = _mm512_cvtneps_pbh(bias ? _mm512_add_ps(v, b) : v);
      _mm256_mask_storeu_epi16(y + t * N + col + n, m, (__m256i)h);
    }
  }
}

// One job: rows [a, c) of one weight (c - a <= 64), output columns from col. `tiles` is the tile
// configuration in force (rows of the A and C tiles; 0: none): a job reconfigures only to change it.
EC_AMX_TARGET void amx_rows(const uint16_t* w, int64_t ws, int64_t K, const uint16_t* xv, int64_t T, const uint16_t* bias,
                            uint16_t* y, int64_t N, int64_t col, int64_t a, int64_t c, int& tiles) {
  alignas(64) float acc[64 * 16];
  const int64_t full = (c - a) / 16, tail = (c - a) % 16;
  if (full) {
    if (tiles != 16) { amx_config(T, 16); tiles = 16; }
    amx_blocks(w + a * ws, ws, K, xv, T, static_cast<int>(full), acc);
    amx_store(acc, 16 * full, T, bias ? bias + a : nullptr, y, N, col + a);
  }
  if (tail) {
    if (tiles != tail) { amx_config(T, static_cast<int>(tail)); tiles = static_cast<int>(tail); }
    amx_blocks(w + (a + 16 * full) * ws, ws, K, xv, T, 1, acc);
    amx_store(acc, tail, T, bias ? bias + a + 16 * full : nullptr, y, N, col + a + 16 * full);
  }
}
EC_AMX_TARGET void amx_done() { _tile_release(); }
#endif

bool amx() {
#ifdef EC_AMX
  return amx_ready();
#else
  return false;
#endif
}

// x [T, K] bf16, T <= 16, K a multiple of 32; w: [N_i, K] bf16, rows contiguous -> [T, sum N_i]: the
// products side by side, bit for bit F.linear's on a CPU whose bf16 GEMM is oneDNN's AMX kernel.
at::Tensor amm(const at::Tensor& x, at::TensorList w, const std::optional<at::Tensor>& bias) {
#ifdef EC_AMX
  TORCH_CHECK(amx_ready(), "amm: no AMX-BF16 here");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: bfloat16 [T, K]");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(T >= 1 && T <= 16 && K % 32 == 0, "amm: 1-16 rows, inputs a multiple of 32");
  TORCH_CHECK(!w.empty(), "at least one weight");
  std::vector<int64_t> first{0};
  for (const auto& wi : w) {
    TORCH_CHECK(wi.dim() == 2 && wi.size(1) == K && wi.stride(1) == 1 && wi.scalar_type() == at::kBFloat16,
                "weights: [N, K] bfloat16, rows contiguous");
    first.push_back(first.back() + wi.size(0));
  }
  const int64_t N = first.back();
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kBFloat16 && bias->stride(0) == 1,
                "bias: [N] bfloat16, contiguous");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  // x as the B operand: row p of a 32-input step holds inputs 2p, 2p + 1 of every token
  const at::Tensor xc = x.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  std::vector<uint16_t> xt;
  if (T > 1) {
    xt.resize(T * K);
    for (int64_t p = 0; p < K / 2; ++p)
      for (int64_t t = 0; t < T; ++t) {
        xt[(p * T + t) * 2] = xp[t * K + 2 * p];
        xt[(p * T + t) * 2 + 1] = xp[t * K + 2 * p + 1];
      }
    xp = xt.data();
  }
  auto y = at::empty({T, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  std::vector<std::tuple<int64_t, int64_t, int64_t>> jobs;  // (weight, first row, end row), 64 rows each
  for (size_t i = 0; i < w.size(); ++i)
    for (int64_t a = 0; a < w[i].size(0); a += 64) jobs.emplace_back(i, a, std::min(a + 64, w[i].size(0)));
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t j0, int64_t j1) {
    int tiles = 0;  // this thread's tile configuration: set by its first job, released after its last
    for (int64_t j = j0; j < j1; ++j) {
      const auto [i, a, c] = jobs[j];
      const auto* p = reinterpret_cast<const uint16_t*>(w[i].data_ptr());
      amx_rows(p, w[i].stride(0), K, xp, T, bp ? bp + first[i] : nullptr, yp, N, first[i], a, c, tiles);
    }
    if (tiles) amx_done();
  });
  return y;
#else
  TORCH_CHECK(false, "amm: built without AMX support");
#endif
}

// ---- a few tokens on AVX512-BF16: 32 products an instruction --------------------------------------------
// A decode step's products (bf16 rows, up to DP_TOKENS) of int4/int8 weights: a stored value u (0-15) with 0x4300
// in the high bits is the bf16 number 128 + u exactly, so VDPBF16PS multiplies 32 of them by x a time
// (int8: its two nibbles, h and l: u = 16 h + l), exact products summed in float32 lanes; per group,
// sum x (u - offset) = sum x (128 + u) - (128 + offset) sum x, with x's per-lane sums made once a call.
// ~4 instructions per 32 weights (int4) against ~9 on the AVX2 path; the float32 sums differ from it
// by rounding only (tests hold both to the dequantized reference's tolerance).
#ifdef EC_AVX512_BF16
#define EC_DP 1
#define EC_DP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// xs[gi][i]: sum of x[k + 2i] + x[k + 2i + 1] over the group's 32-input steps k (lane i's inputs)
EC_DP_TARGET void dp_pair_sums(const uint16_t* x, int64_t K, int64_t group, float* xs) {
  for (int64_t gi = 0; gi < K / group; ++gi) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = gi * group; k < (gi + 1) * group; k += 32) {
      const __m512i v = _mm512_loadu_si512(x + k);
      a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));  // the even input of each pair
      a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
    }
    _mm512_storeu_ps(xs + 16 * gi, a);
  }
}

// R rows (r0 .. r0 + R - 1 of one weight) against NT bf16 tokens (x: NT rows of K, xs: their pair
// sums); SK: the scales' kind (0 float32, 1 bf16, 2 fp16); ZP: zero points stored (else the offset
// is 2^(bits-1)). y[t * ys + r]: token t's output for row r0 + r.
template <int BITS, int R, int NT, int SK, bool ZP>
EC_DP_TARGET void dp_rows(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, int64_t r0,
                          const uint16_t* x, const float* xs, int64_t K, int64_t group, int64_t G, float* y, int64_t ys) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), high = _mm512_set1_epi32(0x43004300);
  // sum x (128 + u) - (128 + offset) sum x; int8: 16 (128 + h) + (128 + l) = u + 2176
  const float base = BITS == 4 ? 128.0f : 2176.0f;
  const __m512 sym = _mm512_set1_ps(base + (1 << (BITS - 1)));
  const uint8_t* row[R];
  ZeroRow zr[R];
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r) {
    row[r] = packed + (r0 + r) * rb;
    if constexpr (ZP) zr[r] = zero_row(zeros, r0 + r, BITS, G);
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 lo[R][NT], hi[R][NT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) lo[r][t] = hi[r][t] = _mm512_setzero_ps();
    for (int64_t k = gi * group; k < (gi + 1) * group; k += 32) {
      __m512bh xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * K + k);
      const int64_t byte = k * BITS / 8;
      if ((byte & 63) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(row[r] + byte + DP_PREFETCH), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        if constexpr (BITS == 4) {  // byte i: inputs 2i (low nibble) and 2i + 1
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + byte)));
          const __m512i t4 = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nib, 0xA8);  // (d | d << 12) & nib
          const __m512bh w = (__m512bh)_mm512_or_si512(t4, high);
          for (int t = 0; t < NT; ++t) lo[r][t] = _mm512_dpbf16_ps(lo[r][t], w, xv[t]);
        } else {  // word j: input k + j
          const __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + byte)));
          const __m512bh wl = (__m512bh)_mm512_ternarylogic_epi32(d, nib, high, 0xEA);  // (d & nib) | high
          const __m512bh wh = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(d, 4), nib, high, 0xEA);
          for (int t = 0; t < NT; ++t) {
            lo[r][t] = _mm512_dpbf16_ps(lo[r][t], wl, xv[t]);
            hi[r][t] = _mm512_dpbf16_ps(hi[r][t], wh, xv[t]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 off = ZP ? _mm512_set1_ps(base + offset_of(zr[r], gi, BITS)) : sym;
      const int64_t si = (r0 + r) * G + gi;
      const __m512 s = _mm512_set1_ps(SK == 0 ? static_cast<const float*>(scale)[si]
                                              : half_scalar(static_cast<const uint16_t*>(scale)[si], SK == 2));
      for (int t = 0; t < NT; ++t) {
        const __m512 sx = _mm512_loadu_ps(xs + (t * G + gi) * 16);
        const __m512 v = _mm512_fnmadd_ps(off, sx, BITS == 4 ? lo[r][t] : _mm512_fmadd_ps(_mm512_set1_ps(16.0f), hi[r][t], lo[r][t]));
        acc[r][t] = _mm512_fmadd_ps(s, v, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ys + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// The scale's kind (0 float32, 1 bf16, 2 fp16) and whether zero points are stored, as template arguments
template <typename F>
inline void with_kinds(int skind, bool zp, F&& f) {
  const auto z = [&](auto sk) { zp ? f(sk, std::true_type{}) : f(sk, std::false_type{}); };
  if (skind == 0) z(std::integral_constant<int, 0>{});
  else if (skind == 1) z(std::integral_constant<int, 1>{});
  else z(std::integral_constant<int, 2>{});
}

// Rows [a, b) two at a time (then one), against T tokens four at a time (then the rest): block(R, NT,
// r, t) with R and NT as integral constants
template <typename Block>
inline void row_pairs(int64_t T, int64_t a, int64_t b, Block&& block) {
  const auto rows = [&](auto R, int64_t r) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) block(R, std::integral_constant<int, 4>{}, r, t);
    switch (T - t) {
      case 3: block(R, std::integral_constant<int, 3>{}, r, t); break;
      case 2: block(R, std::integral_constant<int, 2>{}, r, t); break;
      case 1: block(R, std::integral_constant<int, 1>{}, r, t); break;
      default: break;
    }
  };
  int64_t r = a;
  for (; r + 2 <= b; r += 2) rows(std::integral_constant<int, 2>{}, r);
  for (; r < b; ++r) rows(std::integral_constant<int, 1>{}, r);
}

// Rows [a, b) of one weight against T tokens: two rows at a time, their bytes read from memory
// once and from L1 for each further group of up to four tokens.
template <int BITS, int SK, bool ZP>
EC_DP_TARGET void dp_range_as(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, const uint16_t* x,
                              const float* xs, int64_t T, int64_t K, int64_t group, int64_t G, int64_t a, int64_t b, float* y, int64_t ys) {
  row_pairs(T, a, b, [&](auto R, auto NT, int64_t r, int64_t t) {
    dp_rows<BITS, decltype(R)::value, decltype(NT)::value, SK, ZP>(packed, rb, scale, zeros, r, x + t * K, xs + t * G * 16, K, group, G,
                                                                  y + t * ys + (r - a), ys);
  });
}

// ---- the same products a cache line a step --------------------------------------------------------
// VDPBF16PS takes ~2 cycles here, and the path above spends more than that again widening 16 bytes
// per instruction. A step of 64 stored bytes is widened with two masks, a shift and four byte
// unpacks (each nibble next to 0x43: the bf16 number 128 + u; int8's high nibble next to 0x45:
// 2048 + 16 h, so one sum holds u + 2176), four products in two chains, x stored once per call in
// the order the unpacks put the weights in. 128-bit lane L of each product holds inputs of one
// 32-input (int4) or 16-input (int8) span of the step, so a group of 32 inputs or more is whole in
// its lanes: the scale is one value per lane, taken once per step (groups smaller than a step) or
// once per group (larger), and so are zero points (each lane's group's offset).

// x [K] bf16 -> xq [K] in the unpacks' order: word 8L + j of product q of step s is input
// s * SW + span(L) + j + 8 (q & 1) (+ 2 (...) + (q >> 1) for int4's two nibbles a byte)
template <int BITS>
void wide_order(const uint16_t* x, int64_t K, uint16_t* xq) {
  constexpr int64_t SW = BITS == 4 ? 128 : 64;
  for (int64_t s = 0; s < K / SW; ++s)
    for (int q = 0; q < (BITS == 4 ? 4 : 2); ++q)  // int8: products 2 and 3 take 0's and 1's inputs
      for (int L = 0; L < 4; ++L)
        for (int j = 0; j < 8; ++j) {
          const int64_t byte = 16 * L + j + 8 * (q & 1);
          const int64_t k = BITS == 4 ? 2 * byte + (q >> 1) : byte;
          xq[s * SW + 32 * q + 8 * L + j] = x[s * SW + k];
        }
}

// n bf16 values (a multiple of 32) summed into 16 float32 lanes: lane i holds words 2i and 2i + 1 of
// each 32
EC_DP_TARGET inline __m512 lane_sums(const uint16_t* p, int64_t n) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 32) {
    const __m512i v = _mm512_loadu_si512(p + k);
    a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
  }
  return a;
}

// xs[b][i]: the sum of the inputs lane i multiplies over block b (a group, or a step where groups
// are smaller), in xq's order
EC_DP_TARGET void wide_sums(const uint16_t* xq, int64_t K, int64_t block, float* xs) {
  for (int64_t b = 0; b < K / block; ++b) _mm512_storeu_ps(xs + 16 * b, lane_sums(xq + b * block, block));
}

// xg[g]: the sum of x's inputs over group g (bf16 x, float32 sums)
EC_DP_TARGET void group_sums(const uint16_t* x, int64_t K, int64_t group, float* xg) {
  for (int64_t g = 0; g < K / group; ++g) xg[g] = _mm512_reduce_add_ps(lane_sums(x + g * group, group));
}

// n (<= 16) scales from `at` as float32 lanes 0..n-1, the rest zero
template <int SK>
EC_DP_TARGET inline __m512 scales_f32(const void* scale, int64_t at, int64_t n) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (SK == 0) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(scale) + at);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(scale) + at);
  return SK == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

// Floats a row's G scales take as float32 in whole vectors (zeros after them: whole-vector reads)
inline int64_t scale_pitch(int64_t G) { return ((G + 15) / 16 + 1) * 16; }

// Row r's G scales as float32 into sf[0, scale_pitch(G))
template <int SK>
EC_DP_TARGET inline void row_scales(const void* scale, int64_t r, int64_t G, float* sf) {
  for (int64_t g = 0; g < scale_pitch(G); g += 16)
    _mm512_storeu_ps(sf + g, scales_f32<SK>(scale, r * G + g, std::max<int64_t>(0, std::min<int64_t>(16, G - g))));
}

// Scales of one row as float32 lanes: per = 1: scale g everywhere; else lane i takes scale g + idx[i]
// (the step's groups, masked to the `per` it holds)
template <int SK>
EC_DP_TARGET inline __m512 wide_scale(const void* scale, int64_t at, int per, __m512i idx) {
  if (per == 1)
    return _mm512_set1_ps(SK == 0 ? static_cast<const float*>(scale)[at] : half_scalar(static_cast<const uint16_t*>(scale)[at], SK == 2));
  return _mm512_permutexvar_ps(idx, scales_f32<SK>(scale, at, per));
}

// A weight's step layout, worked out once a range of rows (an integer division costs as much as a
// step's products, and a row pair of 1024 int4 inputs is only 8 steps): a block is one group, or one
// step holding `per` groups; lane i of a step belongs to span i / 4, so to the step's group idx[i]
struct WideShape {
  int per;
  int64_t block, nb, groups;
  __m512i idx;
};

template <int BITS>
EC_DP_TARGET WideShape wide_shape(int64_t K, int64_t group) {
  constexpr int64_t SW = BITS == 4 ? 128 : 64, SPAN = SW / 4;
  WideShape w;
  w.per = group >= SW ? 1 : static_cast<int>(SW / group);
  w.block = group >= SW ? group : SW;
  w.nb = K / w.block;
  w.groups = w.block / group;
  alignas(64) int32_t id[16];
  for (int i = 0; i < 16; ++i) id[i] = w.per > 1 ? static_cast<int32_t>(SPAN * (i / 4) / group) : 0;
  w.idx = _mm512_load_si512(id);
  return w;
}

// R rows from r0 against NT tokens (xq: NT rows of K in wide order; xs: their block sums, nb blocks
// each); y[t * ys + r] as dp_rows. Symmetric schemes (xg: each token's input sum per group, G a token)
// take the offset off once a row (off * sum over groups of scale * group sum) and a row's scales as
// float32 once, so a step ends with one add, one permute and one multiply-add a row.
template <int BITS, int R, int NT, int SK, bool ZP>
EC_DP_TARGET void wide_rows(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, int64_t r0, const uint16_t* xq,
                            const float* xs, const float* xg, int64_t K, int64_t G, const WideShape& shape, float* y, int64_t ys) {
  constexpr int64_t SW = BITS == 4 ? 128 : 64;
  const __m512i nib = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43), chi = _mm512_set1_epi8(BITS == 4 ? 0x43 : 0x45);
  const float base = BITS == 4 ? 128.0f : 2176.0f;  // what the widened values hold beyond u
  const __m512 off = _mm512_set1_ps(base + (1 << (BITS - 1)));  // symmetric: the offset 2^(bits-1) on top
  const int per = shape.per;
  const int64_t block = shape.block, nb = shape.nb, groups = shape.groups;
  const __m512i idx = shape.idx;
  const uint8_t* row[R];
  float* ofs = nullptr;  // zero points: [R][G] offsets, base + each stored zero point
  if constexpr (ZP) ofs = static_cast<float*>(__builtin_alloca(sizeof(float) * R * G));
  const int64_t GP = scale_pitch(G);  // symmetric: each row's scales as float32
  float* sf = nullptr;
  if constexpr (!ZP) sf = static_cast<float*>(__builtin_alloca(sizeof(float) * R * GP));
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r) {
    row[r] = packed + (r0 + r) * rb;
    if constexpr (ZP) {
      const ZeroRow z = zero_row(zeros, r0 + r, BITS, G);
      for (int64_t g = 0; g < G; ++g) ofs[r * G + g] = base + static_cast<float>(offset_of(z, g, BITS));
    } else {
      row_scales<SK>(scale, r0 + r, G, sf + r * GP);
    }
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m512 a[R][NT], c[R][NT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) a[r][t] = c[r][t] = _mm512_setzero_ps();
    for (int64_t k = b * block; k < (b + 1) * block; k += SW) {
      const int64_t byte = k * BITS / 8;
      __m512bh x0[NT], x1[NT], x2[NT], x3[NT];
      for (int t = 0; t < NT; ++t) {
        const uint16_t* xt = xq + t * K + k;
        x0[t] = (__m512bh)_mm512_loadu_si512(xt);
        x1[t] = (__m512bh)_mm512_loadu_si512(xt + 32);
        x2[t] = (__m512bh)_mm512_loadu_si512(xt + 64 * (BITS == 4));  // int8: the high nibbles' inputs are the low ones'
        x3[t] = (__m512bh)_mm512_loadu_si512(xt + 32 + 64 * (BITS == 4));
      }
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + byte + WIDE_FAR), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + byte + WIDE_NEAR), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(row[r] + byte);
        const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, c43), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, c43);
        const __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(hi, chi), w3 = (__m512bh)_mm512_unpackhi_epi8(hi, chi);
        for (int t = 0; t < NT; ++t) {
          a[r][t] = _mm512_dpbf16_ps(a[r][t], w0, x0[t]);
          c[r][t] = _mm512_dpbf16_ps(c[r][t], w1, x1[t]);
          a[r][t] = _mm512_dpbf16_ps(a[r][t], w2, x2[t]);
          c[r][t] = _mm512_dpbf16_ps(c[r][t], w3, x3[t]);
        }
      }
    }
    const int64_t g0 = b * groups;  // the block's first group
    if constexpr (!ZP) {
      for (int r = 0; r < R; ++r) {
        const float* sr = sf + r * GP + g0;
        const __m512 s = per == 1 ? _mm512_set1_ps(*sr) : _mm512_permutexvar_ps(idx, _mm512_loadu_ps(sr));
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(s, _mm512_add_ps(a[r][t], c[r][t]), acc[r][t]);
      }
      continue;
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = wide_scale<SK>(scale, (r0 + r) * G + g0, per, idx);
      __m512 o = off;  // zero points: each lane's group's own, base + the stored zero point (read at the start)
      if constexpr (ZP)
        o = per == 1 ? _mm512_set1_ps(ofs[r * G + g0])
                     : _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << per) - 1), ofs + r * G + g0));
      for (int t = 0; t < NT; ++t) {
        const __m512 v = _mm512_fnmadd_ps(o, _mm512_loadu_ps(xs + (t * nb + b) * 16), _mm512_add_ps(a[r][t], c[r][t]));
        acc[r][t] = _mm512_fmadd_ps(s, v, acc[r][t]);
      }
    }
  }
  if constexpr (!ZP)  // the offset: off * sum_g scale_g * (token's inputs over group g)
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g)) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 so = _mm512_mul_ps(off, _mm512_loadu_ps(sf + r * GP + g));
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fnmadd_ps(so, _mm512_maskz_loadu_ps(m, xg + t * G + g), acc[r][t]);
      }
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ys + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int BITS, int SK, bool ZP>
EC_DP_TARGET void wide_range_as(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, const uint16_t* xq, const float* xs,
                                const float* xg, int64_t nb, int64_t T, int64_t K, int64_t group, int64_t G, int64_t a, int64_t b, float* y,
                                int64_t ys) {
  const WideShape shape = wide_shape<BITS>(K, group);
  row_pairs(T, a, b, [&](auto R, auto NT, int64_t r, int64_t t) {
    wide_rows<BITS, decltype(R)::value, decltype(NT)::value, SK, ZP>(packed, rb, scale, zeros, r, xq + t * K, xs ? xs + t * nb * 16 : nullptr,
                                                                    xg ? xg + t * G : nullptr, K,
                                                                    G, shape, y + t * ys + (r - a), ys);
  });
}

template <int BITS>
void wide_range(const uint8_t* packed, int64_t rb, const void* scale, int skind, const uint8_t* zeros, const uint16_t* xq, const float* xs,
                const float* xg, int64_t nb, int64_t T, int64_t K, int64_t group, int64_t G, int64_t a, int64_t b, float* y, int64_t ys) {
  with_kinds(skind, zeros != nullptr, [&](auto sk, auto zp) {
    wide_range_as<BITS, decltype(sk)::value, decltype(zp)::value>(packed, rb, scale, zeros, xq, xs, xg, nb, T, K, group, G, a, b, y, ys);
  });
}

// Whether a scheme's products take the step-wide path: rows of whole steps, groups whole in lanes
inline bool wide_fits(int64_t bits, int64_t K, int64_t group) {
  const int64_t SW = bits == 4 ? 128 : 64, SPAN = SW / 4;
  return K % SW == 0 && group % SPAN == 0 && (group >= SW ? group % SW == 0 : SW % group == 0);
}

template <int BITS>
void dp_range(const uint8_t* packed, int64_t rb, const void* scale, int skind, const uint8_t* zeros, const uint16_t* x,
              const float* xs, int64_t T, int64_t K, int64_t group, int64_t G, int64_t a, int64_t b, float* y, int64_t ys) {
  with_kinds(skind, zeros != nullptr, [&](auto sk, auto zp) {
    dp_range_as<BITS, decltype(sk)::value, decltype(zp)::value>(packed, rb, scale, zeros, x, xs, T, K, group, G, a, b, y, ys);
  });
}

// ---- one token as int8 slices (VPDPBUSD) ------------------------------------------------------------
// VDPBF16PS multiplies 32 pairs an instruction and the step-wide path widens every stored byte before
// it; VPDPBUSD multiplies 64 unsigned bytes by 64 signed ones into 16 int32 lanes, at a higher rate
// (docs/quantized.md). So the stored values u multiply as they are (int4: a step's low nibbles, then
// its high ones) and x is split into three signed 7-bit slices: each group of inputs takes a power-of-two step S0
// with |x| < 128 S0; h = trunc(x / S0), m and l the same of the rest at S1 = S0 / 128 and S2 = S1 / 128
// (each exact in float32), so x = S0 h + S1 m + S2 l but for inputs under 2^-13 of the group's largest
// (bf16 holds 8 bits), which lose less than S2, 2^-20 of that largest. Each lane's sums of u times a
// slice are exact integers; the offset times the lane's slice sum comes off in int32; a block's lanes
// convert to float32 once and take S0, S1, S2 and the row's scale there. More exact than the bf16
// paths' "128 + u" sums (their float32 sums cancel 7 bits).
// Lanes are the step-wide path's (a 128-bit lane a span of 32 int4 / 16 int8 inputs), so WideShape
// maps them to groups.
#define EC_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
constexpr int XSLICES = 3;

bool vnni_ready() {  // (with AVX512-BF16: the step-wide path's CPUs)
  static const bool ok = avx512_bf16_ready() && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// One token's x as slices, in the order VPDPBUSD meets the stored bytes
struct Slices {
  std::vector<int8_t> s;      // [steps][XSLICES][64 (int8) | 128 (int4: the step's even inputs, then its odd ones)]
  std::vector<float> step;    // [nb][XSLICES][16]: each lane's S_j
  std::vector<int32_t> sum;   // [nb][XSLICES][16]: each lane's slice sum over the block
  std::vector<int32_t> off;   // [nb][XSLICES + 1][16]: the symmetric offset times each sum, then times their
                              // combination (2^14 h + 2^7 m + l: int4's blocks of up to COMBINED inputs)
};

// int4 blocks of up to this many inputs combine a lane's three sums in int32 (|sum| <= 8 x 15 x 127 a
// step, times 2^14 and 8 steps: under 2^31) and take one conversion, at S2
constexpr int64_t COMBINED = 1024;

// x [K] bf16 -> Slices for groups of `group` inputs (in WideShape's blocks); false where an input is not
// finite (its float arithmetic is the other paths')
template <int BITS>
EC_VNNI_TARGET bool slice_inputs(const uint16_t* x, int64_t K, int64_t group, Slices& out) {
  const WideShape w = wide_shape<BITS>(K, group);
  constexpr int64_t SW = BITS == 4 ? 128 : 64;  // inputs a step (and slice bytes a step)
  const int64_t steps = K / SW;
  out.s.resize(steps * XSLICES * SW);
  out.step.resize(w.nb * XSLICES * 16);
  out.sum.resize(w.nb * XSLICES * 16);
  out.off.resize(w.nb * (XSLICES + 1) * 16);
  std::fill(out.sum.begin(), out.sum.end(), 0);
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), ones = _mm512_set1_epi8(1);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80008000u));
  alignas(64) float gs[XSLICES][64];  // the steps of the groups in the step being sliced (<= 4 a step)
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = s * SW, b = k0 / w.block;
    // the steps of the groups beginning in this step (one spanning steps keeps those of its first)
    for (int64_t g0 = (k0 + group - 1) / group * group; g0 < k0 + SW; g0 += group) {
      const uint16_t* xg = x + g0;
      __m512i top = _mm512_setzero_si512();
      for (int64_t k = 0; k < group; k += 32) top = _mm512_max_epu16(top, _mm512_andnot_si512(sign, _mm512_loadu_si512(xg + k)));
      const int e16 = static_cast<int>(
          _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_srli_epi32(top, 16), _mm512_and_si512(top, _mm512_set1_epi32(0xFFFF)))));
      int e = e16 >> 7;  // the largest's float32 exponent field: |x| < 2^(e - 126)
      if (e == 255) return false;
      e = std::max(e, 40);  // (steps stay normal float32; smaller inputs only round to 0 past S2)
      const int gi = static_cast<int>((g0 - k0) / group);  // the group's place in the step (0 for groups >= a step)
      for (int j = 0; j < XSLICES; ++j) {
        const uint32_t u = static_cast<uint32_t>(e - 133 - 7 * j + 127) << 23;
        std::memcpy(&gs[j][gi], &u, 4);
      }
    }
    const int per = w.per;
    __m512 inv[XSLICES][4], stp[XSLICES][4];  // by the group of each 16 inputs of the step
    for (int j = 0; j < XSLICES; ++j)
      for (int q = 0; q < per; ++q) {
        stp[j][q] = _mm512_set1_ps(gs[j][q]);
        inv[j][q] = _mm512_set1_ps(1.0f / gs[j][q]);
      }
    int8_t* d = out.s.data() + s * XSLICES * SW;
    // 16 inputs at a time: int8 inputs k0 + 16 v ..; int4 even (v < 4) or odd (v >= 4) inputs of 32
    for (int v = 0; v < (BITS == 4 ? 8 : 4); ++v) {
      __m512 f;
      int64_t first;  // the first input's place in the step (its group)
      if constexpr (BITS == 8) {
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k0 + 16 * v))), 16));
        first = 16 * v;
      } else {
        const __m512i dw = _mm512_loadu_si512(x + k0 + 32 * (v & 3));
        f = _mm512_castsi512_ps(v < 4 ? _mm512_slli_epi32(dw, 16) : _mm512_and_si512(dw, hi16));
        first = 32 * (v & 3);
      }
      const int q = per == 1 ? 0 : static_cast<int>(first / group);
      __m512 r = f;
      for (int j = 0; j < XSLICES; ++j) {
        const __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(r, inv[j][q]), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        if (j + 1 < XSLICES) r = _mm512_fnmadd_ps(t, stp[j][q], r);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * SW + 16 * v), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
      }
    }
    for (int j = 0; j < XSLICES; ++j) {  // each lane's slice sums (int4: the even and the odd bytes of its span)
      __m512i lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(d + j * SW));
      if constexpr (BITS == 4) lanes = _mm512_dpbusd_epi32(lanes, ones, _mm512_loadu_si512(d + j * SW + 64));
      int32_t* sm = out.sum.data() + (b * XSLICES + j) * 16;
      _mm512_storeu_si512(sm, _mm512_add_epi32(_mm512_loadu_si512(sm), lanes));
    }
    if (k0 % w.block == 0)  // each lane's S_j: its group's
      for (int j = 0; j < XSLICES; ++j)
        _mm512_storeu_ps(out.step.data() + (b * XSLICES + j) * 16,
                         per == 1 ? _mm512_set1_ps(gs[j][0]) : _mm512_permutexvar_ps(w.idx, _mm512_loadu_ps(gs[j])));
  }
  const int o = 1 << (BITS - 1);
  for (int64_t b = 0; b < w.nb; ++b) {
    const int32_t* sm = out.sum.data() + b * XSLICES * 16;
    int32_t* of = out.off.data() + b * (XSLICES + 1) * 16;
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < XSLICES; ++j) of[j * 16 + i] = o * sm[j * 16 + i];
      of[XSLICES * 16 + i] = o * ((sm[i] << 14) + (sm[16 + i] << 7) + sm[32 + i]);
    }
  }
  return true;
}

// R rows from r0 against one token's slices -> y[r]
template <int BITS, int R, int SK, bool ZP>
EC_VNNI_TARGET void slice_rows(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, int64_t r0, const Slices& xs,
                               int64_t G, const WideShape& shape, float* y) {
  constexpr int64_t SW = BITS == 4 ? 128 : 64;  // inputs a step (and slice bytes a step)
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int per = shape.per;
  const int64_t block = shape.block, nb = shape.nb, groups = shape.groups;
  const __m512i idx = shape.idx;
  const uint8_t* row[R];
  const int64_t GP = scale_pitch(G);  // each row's scales as float32 (and zero points)
  float* sf = static_cast<float*>(__builtin_alloca(sizeof(float) * R * GP));
  int32_t* zo = ZP ? static_cast<int32_t*>(__builtin_alloca(sizeof(int32_t) * R * GP)) : nullptr;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    row[r] = packed + (r0 + r) * rb;
    row_scales<SK>(scale, r0 + r, G, sf + r * GP);
    if constexpr (ZP) {
      const ZeroRow z = zero_row(zeros, r0 + r, BITS, G);
      for (int64_t g = 0; g < GP; ++g) zo[r * GP + g] = g < G ? offset_of(z, g, BITS) : 0;
    }
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m512i c[R][XSLICES];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < XSLICES; ++j) c[r][j] = _mm512_setzero_si512();
    for (int64_t k = b * block; k < (b + 1) * block; k += SW) {
      const int64_t byte = k * BITS / 8;
      const int8_t* xq = xs.s.data() + (k / SW) * XSLICES * SW;
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + byte + WIDE_FAR), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + byte + WIDE_NEAR), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(row[r] + byte);
        if constexpr (BITS == 4) {
          const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          for (int j = 0; j < XSLICES; ++j) {
            c[r][j] = _mm512_dpbusd_epi32(c[r][j], lo, _mm512_loadu_si512(xq + j * SW));
            c[r][j] = _mm512_dpbusd_epi32(c[r][j], hi, _mm512_loadu_si512(xq + j * SW + 64));
          }
        } else {
          for (int j = 0; j < XSLICES; ++j) c[r][j] = _mm512_dpbusd_epi32(c[r][j], v, _mm512_loadu_si512(xq + j * SW));
        }
      }
    }
    const int64_t g0 = b * groups;  // the block's first group
    const float* st = xs.step.data() + b * XSLICES * 16;
    const int32_t* sm = xs.sum.data() + b * XSLICES * 16;
    const int32_t* of = xs.off.data() + b * (XSLICES + 1) * 16;
    for (int r = 0; r < R; ++r) {
      const float* sr = sf + r * GP + g0;
      const __m512 s = per == 1 ? _mm512_set1_ps(*sr) : _mm512_permutexvar_ps(idx, _mm512_loadu_ps(sr));
      if (BITS == 4 && !ZP && block <= COMBINED) {  // one conversion: (2^14 h + 2^7 m + l) sums, less the offset's, at S2
        const __m512i d = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(c[r][0], 14), _mm512_slli_epi32(c[r][1], 7)), c[r][2]),
            _mm512_loadu_si512(of + XSLICES * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_loadu_ps(st + 2 * 16)), _mm512_cvtepi32_ps(d), acc[r]);
        continue;
      }
      __m512i o = _mm512_setzero_si512();  // zero points: each lane's group's (symmetric schemes' offsets are in `of`)
      if constexpr (ZP) o = per == 1 ? _mm512_set1_epi32(zo[r * GP + g0]) : _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(zo + r * GP + g0));
      __m512 v = _mm512_setzero_ps();
      for (int j = XSLICES - 1; j >= 0; --j) {
        const __m512i d = _mm512_sub_epi32(c[r][j], ZP ? _mm512_mullo_epi32(o, _mm512_loadu_si512(sm + j * 16)) : _mm512_loadu_si512(of + j * 16));
        v = _mm512_fmadd_ps(_mm512_loadu_ps(st + j * 16), _mm512_cvtepi32_ps(d), v);
      }
      acc[r] = _mm512_fmadd_ps(s, v, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int BITS, int SK, bool ZP>
EC_VNNI_TARGET void slice_range_as(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, const Slices& xs, int64_t K,
                                   int64_t group, int64_t G, int64_t a, int64_t b, float* y) {
  const WideShape shape = wide_shape<BITS>(K, group);
  int64_t r = a;
  for (; r + 2 <= b; r += 2) slice_rows<BITS, 2, SK, ZP>(packed, rb, scale, zeros, r, xs, G, shape, y + (r - a));
  for (; r < b; ++r) slice_rows<BITS, 1, SK, ZP>(packed, rb, scale, zeros, r, xs, G, shape, y + (r - a));
}

template <int BITS>
void slice_range(const uint8_t* packed, int64_t rb, const void* scale, int skind, const uint8_t* zeros, const Slices& xs, int64_t K,
                 int64_t group, int64_t G, int64_t a, int64_t b, float* y) {
  with_kinds(skind, zeros != nullptr, [&](auto sk, auto zp) {
    slice_range_as<BITS, decltype(sk)::value, decltype(zp)::value>(packed, rb, scale, zeros, xs, K, group, G, a, b, y);
  });
}
#endif

// ---- several tokens on AMX tiles -------------------------------------------------------------------
// The paths above cost per token: VDPBF16PS multiplies one token's inputs. A tile product
// (TDPBF16PS) costs the same for 1 and 16 tokens, so from three tokens to 32 (two passes; a server's
// share of an expert, a prompt's chunk) the stored values are widened as above (bf16 128 + u; int8's high
// nibble 2048 + 16 h) into two 16-row A tiles a 32-byte chunk, x is the B operand (pairs of inputs
// x tokens, in the order the widening leaves the weights in), and a group's sums come out of the
// accumulator tile to be scaled per row and token in float32; the offset is taken off per group with
// each token's input sum, as above (zero points: each row's own per group). Groups of 32 inputs or more
// (a chunk: 32 stored bytes a row, 16 for int4 groups of 32); blocks of 16 rows (the remaining rows take
// the VDPBF16PS path).
constexpr int64_t TILE_TOKENS = 16;  // tokens a tile pass takes (the B and C tiles' columns)
#ifdef EC_AMX
int64_t tile_min_tokens = 3;  // qmm_tiles(n): tokens from which products take the tiles (0: never; at 2 the two ways measured even)

// Tiles: C 0 ([16 rows][T] float32), B 4 and 7 ([CB / 2 pairs][T]), A 5 and 6 ([16 rows][CB]); CB: the
// chunk's stored bytes a row, 32, or 16 for int4 groups of 32 (a 32-byte chunk's 64 inputs would span two)
EC_AMX_TARGET void qtile_config(int64_t T, int CB) {
  alignas(64) uint8_t c[64] = {};
  c[0] = 1;
  const auto set = [&c](int t, int r, int bytes) { c[16 + 2 * t] = static_cast<uint8_t>(bytes); c[48 + t] = static_cast<uint8_t>(r); };
  set(0, 16, static_cast<int>(4 * T));
  set(4, CB / 2, static_cast<int>(4 * T));
  set(7, CB / 2, static_cast<int>(4 * T));
  set(5, 16, 2 * CB);
  set(6, 16, 2 * CB);
  __asm__ volatile("" : : "r"(c) : "memory");
  _tile_loadconfig(c);
}

// x [T, K] bf16 -> xb: per CB-byte chunk c, B tiles of [CB / 2 pairs][T tokens][2]: int4 the even then
// the odd inputs of its 2 CB (lo, hi), int8 one tile of its CB in order; xs [G][16]: each group's input
// sum per token (lanes past T zero)
template <int BITS, int CB>
void tile_inputs(const uint16_t* x, int64_t T, int64_t K, int64_t group, uint16_t* xb, float* xs) {
  constexpr int64_t CW = BITS == 4 ? 2 * CB : CB, TILES = BITS == 4 ? 2 : 1, P = CB / 2;
  for (int64_t c = 0; c < K / CW; ++c)
    for (int64_t h = 0; h < TILES; ++h)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t k = BITS == 4 ? c * CW + 4 * p + 2 * e + h : c * CW + 2 * p + e;
            xb[(((c * TILES + h) * P + p) * T + t) * 2 + e] = x[t * K + k];
          }
  const int64_t G = K / group;
  std::fill(xs, xs + G * 16, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t u = static_cast<uint32_t>(x[t * K + k]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      xs[(k / group) * 16 + t] += f;
    }
}

// Rows [r0, r0 + 16) of one weight against T tokens -> y[t * ys + r]
template <int BITS, int SK, int CB, bool ZP>
EC_AMX_TARGET void tile_rows(const uint8_t* packed, int64_t rb, const void* scale, const uint8_t* zeros, int64_t r0, const uint16_t* xb,
                             const float* xs, int64_t T, int64_t K, int64_t group, int64_t G, float* y, int64_t ys) {
  constexpr int64_t CW = BITS == 4 ? 2 * CB : CB, TILES = BITS == 4 ? 2 : 1, P = CB / 2;
  const __m512i nib = _mm512_set1_epi16(0x000F), lo_hi = _mm512_set1_epi16(0x4300), hi_hi = _mm512_set1_epi16(BITS == 4 ? 0x4300 : 0x4500);
  const float base_off = BITS == 4 ? 128.0f : 2176.0f;  // what the widened values hold beyond u
  const __m512 off = _mm512_set1_ps(base_off + (1 << (BITS - 1)));  // symmetric: the offset 2^(bits-1) on top
  alignas(64) uint16_t a[2][2][16][32];  // two chunks' A tiles (lo, hi)
  alignas(64) float c[16 * 16];
  constexpr int64_t FLAT_TOKENS = 4;
  const __mmask16 m = static_cast<__mmask16>((1u << T) - 1);
  __m512 acc[16];  // T <= FLAT_TOKENS: acc[v] lane l is (row, token) pair 16 v + l, row-major; else acc[row] lane t
  __m512i rows_of[FLAT_TOKENS], toks_of[FLAT_TOKENS];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t v = 0; v < T && v < FLAT_TOKENS; ++v) {
    alignas(64) int32_t ri[16], ti[16];
    for (int l = 0; l < 16; ++l) {
      ri[l] = static_cast<int32_t>((16 * v + l) / T);
      ti[l] = static_cast<int32_t>((16 * v + l) % T);
    }
    rows_of[v] = _mm512_load_si512(ri);
    toks_of[v] = _mm512_load_si512(ti);
  }
  const uint8_t* base = packed + r0 * rb;
  const int64_t chunks = group / CW, all = K / CW;
  int64_t cc = 0, group_index = 0;  // the chunk being multiplied: its place in its group, and the group
  // chunk ci is widened while chunk ci - 1 goes through the tiles (its stores have left for L1 by then)
  for (int64_t ci = 0; ci <= all; ++ci) {
    if (ci < all) {
      uint16_t(*ab)[16][32] = a[ci & 1];
      for (int r = 0; r < 16; ++r) {  // int4: byte j holds inputs 2j (low nibble), 2j + 1; int8: byte j input j
        const uint8_t* q = base + r * rb + ci * CB;
        _mm_prefetch(reinterpret_cast<const char*>(q + 16 * rb), _MM_HINT_T0);
        if constexpr (CB == 32) {
          const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
          _mm512_store_si512(ab[0][r], _mm512_ternarylogic_epi32(w, nib, lo_hi, 0xEA));
          _mm512_store_si512(ab[1][r], _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, hi_hi, 0xEA));
        } else {  // 16 bytes: the first half of each A row (the tiles read CB * 2 bytes of a 64-byte stride)
          const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
          _mm256_store_si256(reinterpret_cast<__m256i*>(ab[0][r]),
                             _mm256_ternarylogic_epi32(w, _mm512_castsi512_si256(nib), _mm512_castsi512_si256(lo_hi), 0xEA));
          _mm256_store_si256(reinterpret_cast<__m256i*>(ab[1][r]),
                             _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), _mm512_castsi512_si256(nib), _mm512_castsi512_si256(hi_hi), 0xEA));
        }
      }
    }
    if (ci == 0) continue;
    const int64_t cj = ci - 1;
    if (cc == 0) _tile_zero(0);
    const uint16_t* b = xb + cj * TILES * P * T * 2;
    _tile_loadd(4, b, 4 * T);
    _tile_loadd(7, b + (TILES - 1) * P * T * 2, 4 * T);
    _tile_loadd(5, a[cj & 1][0], 64);
    _tile_loadd(6, a[cj & 1][1], 64);
    _tile_dpbf16ps(0, 5, 4);
    _tile_dpbf16ps(0, 6, 7);
    if (++cc < chunks) continue;  // (counted, not divided: a division a chunk costs as much as its products)
    cc = 0;
    const int64_t gi = group_index++;
    _tile_stored(0, c, 4 * T);
    alignas(64) float sg[16];  // the group's scale for each of the 16 rows
    for (int r = 0; r < 16; ++r) {
      const int64_t si = (r0 + r) * G + gi;
      sg[r] = SK == 0 ? static_cast<const float*>(scale)[si] : half_scalar(static_cast<const uint16_t*>(scale)[si], SK == 2);
    }
    alignas(64) float og[16];  // zero points: each row's offset for the group (base + its stored zero point)
    if constexpr (ZP)
      for (int r = 0; r < 16; ++r) og[r] = base_off + static_cast<float>(offset_of(zero_row(zeros, r0 + r, BITS, G), gi, BITS));
    const __m512 xsum = _mm512_loadu_ps(xs + gi * 16), sx = _mm512_mul_ps(off, xsum);
    if (T <= FLAT_TOKENS) {  // c as T vectors of 16 (row, token) pairs, row-major
      const __m512 srow = _mm512_load_ps(sg);
      for (int64_t v = 0; v < T; ++v) {
        const __m512 o = ZP ? _mm512_mul_ps(_mm512_permutexvar_ps(rows_of[v], _mm512_load_ps(og)), _mm512_permutexvar_ps(toks_of[v], xsum))
                            : _mm512_permutexvar_ps(toks_of[v], sx);
        acc[v] = _mm512_fmadd_ps(_mm512_permutexvar_ps(rows_of[v], srow), _mm512_sub_ps(_mm512_load_ps(c + 16 * v), o), acc[v]);
      }
    } else {  // a row's T tokens a vector
      for (int r = 0; r < 16; ++r) {
        const __m512 o = ZP ? _mm512_mul_ps(_mm512_set1_ps(og[r]), xsum) : sx;
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sg[r]), _mm512_sub_ps(_mm512_maskz_loadu_ps(m, c + r * T), o), acc[r]);
      }
    }
  }
  if (T <= FLAT_TOKENS)
    for (int64_t v = 0; v < T; ++v) _mm512_store_ps(c + 16 * v, acc[v]);
  else
    for (int r = 0; r < 16; ++r) _mm512_mask_storeu_ps(c + r * T, m, acc[r]);
  for (int64_t t = 0; t < T; ++t)
    for (int r = 0; r < 16; ++r) y[t * ys + r] = c[r * T + t];
}

template <int BITS, int CB>
void tile_range(const uint8_t* packed, int64_t rb, const void* scale, int skind, const uint8_t* zeros, const uint16_t* xb, const float* xs,
                int64_t T, int64_t K, int64_t group, int64_t G, int64_t a, int64_t b, float* y, int64_t ys) {
  with_kinds(skind, zeros != nullptr, [&](auto sk, auto zp) {
    for (int64_t r = a; r < b; r += 16)
      tile_rows<BITS, decltype(sk)::value, CB, decltype(zp)::value>(packed, rb, scale, zeros, r, xb, xs, T, K, group, G, y + (r - a), ys);
  });
}

// The chunk's stored bytes a row: 32, or 16 where an int4 row or group is not whole 64-input chunks
inline int tile_chunk(int64_t bits, int64_t K, int64_t group) {
  return bits == 4 && (K % 64 != 0 || group % 64 != 0) ? 16 : 32;
}

// (any bits and zero points: each row's offset per group is taken off in the group's epilogue)
inline bool tile_fits(int64_t T, int64_t K, int64_t group) {
  return tile_min_tokens > 0 && T >= tile_min_tokens && T <= TILE_TOKENS && K % 32 == 0 && group % 32 == 0 && amx_ready();
}
#endif

int64_t qmm_tiles(int64_t from) {  // -> the previous setting: products of `from` tokens or more take the tiles (0: never)
#ifdef EC_AMX
  const int64_t was = tile_min_tokens;
  tile_min_tokens = from;
  return was;
#else
  return 0;
#endif
}

bool dp_on = true;  // qmm_fast(False) sends those products down the AVX2 path too (tests compare both)
bool slices_on = true;  // qmm_slices(False) sends one-token products to the step-wide path (tests compare both)
bool wide_on = true;  // qmm_wide(False) sends them down the 16-byte path (tests compare all three)

bool qmm_wide(bool on) {  // -> whether few-token products of whole steps now take the step-wide path
  wide_on = on;
#ifdef EC_DP
  return on && dp_on && avx512_bf16_ready();
#else
  return false;
#endif
}

bool qmm_slices(bool on) {  // -> whether one-token products of whole steps now take x's int8 slices (VPDPBUSD)
  slices_on = on;
#ifdef EC_DP
  return on && wide_on && dp_on && vnni_ready();
#else
  return false;
#endif
}

bool qmm_fast(bool on) {  // -> whether bf16 products of a few tokens now take the AVX512-BF16 path
  dp_on = on;
#ifdef EC_DP
  return on && avx512_bf16_ready();
#else
  return false;
#endif
}

// Rows of x qmm takes on the tiles in one call (up to TILE_TOKENS; 32 in two passes of 16: qmm) for a
// symmetric scheme whose groups are whole chunks; 0 where there are no tiles (quant.py asks: more rows
// go to dq and torch's GEMM)
int64_t qmm_tile_rows(int64_t bits, int64_t K, int64_t group) {
#ifdef EC_AMX
  if (!dp_on || !avx512_bf16_ready() || group % 32 != 0 || K % group != 0 || !tile_fits(tile_min_tokens, K, group)) return 0;
  return 2 * TILE_TOKENS;
#else
  return 0;
#endif
}

// qmm's bf16 path for a few tokens (DP_TOKENS at most: a decode step, a batch's share of an expert)
// where the CPU has AVX512-BF16 and groups are whole 32-input steps; false where it does not apply
// (qmm's AVX2 code does the work).
bool qmm_dp(const at::Tensor& x, at::TensorList packed, at::TensorList scale, at::TensorList zeros, int64_t bits,
            int64_t group, const std::vector<int64_t>& first, at::Tensor& y) {
#ifdef EC_DP
  const int64_t T = x.size(0);
  if (!dp_on || T < 1 || x.scalar_type() != at::kBFloat16 || group % 32 != 0 || !avx512_bf16_ready()) return false;
  const int64_t K = x.size(1), G = K / group, N = first.back();
#ifdef EC_AMX
  const bool tiles = tile_fits(T, K, group);
#else
  const bool tiles = false;
#endif
  if (T > (tiles ? TILE_TOKENS : DP_TOKENS)) return false;
  const at::Tensor xc = x.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const bool wide = wide_on && wide_fits(bits, K, group);
  std::vector<uint16_t> xb;
  std::vector<float> xg;
#ifdef EC_AMX
  const int cb = tile_chunk(bits, K, group);
  if (tiles) {
    xb.resize(T * K);
    xg.resize(G * 16);
    if (bits == 8) tile_inputs<8, 32>(xp, T, K, group, xb.data(), xg.data());
    else if (cb == 32) tile_inputs<4, 32>(xp, T, K, group, xb.data(), xg.data());
    else tile_inputs<4, 16>(xp, T, K, group, xb.data(), xg.data());
  }
#endif
  // jobs of up to 64 rows of one weight; on the tiles, whole 16-row blocks counted from the weight's
  // first row and its last rows apart, so a row's path (and bits) never depends on the thread count
  // or on the weights beside it
  struct Job { size_t i; int64_t a, b; bool tile; };
  std::vector<Job> jobs;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t n = first[i + 1] - first[i], whole = tiles ? n / 16 * 16 : 0;
    for (int64_t a = 0; a < whole; a += 64) jobs.push_back({i, a, std::min(a + 64, whole), true});
    for (int64_t a = whole; a < n; a += 64) jobs.push_back({i, a, std::min(a + 64, n), false});
  }
  const bool rest = std::any_of(jobs.begin(), jobs.end(), [](const Job& j) { return !j.tile; });
  const int64_t SW = bits == 4 ? 128 : 64, block = group >= SW ? group : SW, nb = K / block;
  Slices sliced;  // one token: x as int8 slices, where the CPU has VPDPBUSD (empty: not taken)
  if (rest && wide && T == 1 && slices_on && vnni_ready())
    if (!(bits == 4 ? slice_inputs<4>(xp, K, group, sliced) : slice_inputs<8>(xp, K, group, sliced))) sliced.s.clear();
  std::vector<uint16_t> xq;  // x as the VDPBF16PS paths read it: only where some rows take them
  std::vector<float> xs, gsum;  // per lane and block (zero points), or per group (symmetric: gsum)
  if (rest && wide && sliced.s.empty()) {
    xq.resize(T * K);
    (zeros.empty() ? gsum : xs).resize(zeros.empty() ? T * G : T * nb * 16);
    for (int64_t t = 0; t < T; ++t) {
      if (bits == 4) wide_order<4>(xp + t * K, K, xq.data() + t * K);
      else wide_order<8>(xp + t * K, K, xq.data() + t * K);
      if (zeros.empty()) group_sums(xp + t * K, K, group, gsum.data() + t * G);
      else wide_sums(xq.data() + t * K, K, block, xs.data() + t * nb * 16);
    }
  } else if (rest) {
    xs.resize(T * G * 16);
    for (int64_t t = 0; t < T; ++t) dp_pair_sums(xp + t * K, K, group, xs.data() + t * G * 16);
  }
  std::vector<at::Tensor> scales;
  std::vector<int> kinds;
  for (const auto& s : scale) {
    const auto st = s.scalar_type();
    const bool kept = (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) && s.is_contiguous();
    scales.push_back(kept ? s : s.to(at::kFloat).contiguous());
    kinds.push_back(!kept || st == at::kFloat ? 0 : st == at::kBFloat16 ? 1 : 2);
  }
  y = at::empty({T, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const float* xsp = xs.data();
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t j0, int64_t j1) {
#ifdef EC_AMX
    bool configured = false;
#endif
    for (int64_t j = j0; j < j1; ++j) {
      const auto [i, r0, r1, tile] = jobs[j];
      const uint8_t* p = packed[i].data_ptr<uint8_t>();
      const uint8_t* z = zeros.empty() ? nullptr : zeros[i].data_ptr<uint8_t>();
      const int64_t rb = packed[i].stride(0);
      float* yr = yp + first[i] + r0;
#ifdef EC_AMX
      if (tile) {
        if (!configured) { qtile_config(T, cb); configured = true; }
        if (bits == 8) tile_range<8, 32>(p, rb, scales[i].data_ptr(), kinds[i], z, xb.data(), xg.data(), T, K, group, G, r0, r1, yr, N);
        else if (cb == 32) tile_range<4, 32>(p, rb, scales[i].data_ptr(), kinds[i], z, xb.data(), xg.data(), T, K, group, G, r0, r1, yr, N);
        else tile_range<4, 16>(p, rb, scales[i].data_ptr(), kinds[i], z, xb.data(), xg.data(), T, K, group, G, r0, r1, yr, N);
        continue;
      }
#endif
      if (!sliced.s.empty() && bits == 8) slice_range<8>(p, rb, scales[i].data_ptr(), kinds[i], z, sliced, K, group, G, r0, r1, yr);
      else if (!sliced.s.empty()) slice_range<4>(p, rb, scales[i].data_ptr(), kinds[i], z, sliced, K, group, G, r0, r1, yr);
      else if (wide && bits == 8) wide_range<8>(p, rb, scales[i].data_ptr(), kinds[i], z, xq.data(), xsp, gsum.data(), nb, T, K, group, G, r0, r1, yr, N);
      else if (wide) wide_range<4>(p, rb, scales[i].data_ptr(), kinds[i], z, xq.data(), xsp, gsum.data(), nb, T, K, group, G, r0, r1, yr, N);
      else if (bits == 8) dp_range<8>(p, rb, scales[i].data_ptr(), kinds[i], z, xp, xsp, T, K, group, G, r0, r1, yr, N);
      else dp_range<4>(p, rb, scales[i].data_ptr(), kinds[i], z, xp, xsp, T, K, group, G, r0, r1, yr, N);
    }
#ifdef EC_AMX
    if (configured) amx_done();
#endif
  });
  y = y.to(at::kBFloat16);
  return true;
#else
  return false;
#endif
}

// x [T, K] (any float dtype); packed[i] [N_i, row bytes] uint8; scale[i] [N_i, G] (any float dtype);
// group: inputs per scale. -> [T, sum N_i] in x's dtype: the products side by side (gate and up in
// one call share the converted x).
at::Tensor qmm(const at::Tensor& x, at::TensorList packed, at::TensorList scale, at::TensorList zeros, int64_t bits,
               int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x: float [T, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(!packed.empty() && packed.size() == scale.size(), "one scale per packed weight");
  TORCH_CHECK(zeros.empty() || zeros.size() == packed.size(), "zero points: none, or one per packed weight");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && group % (bits == 8 ? 8 : 16) == 0, "group must divide K, a multiple of 8 (int8) or 16 (int4)");
  const int64_t G = K / group;
  std::vector<at::Tensor> scales;
  std::vector<int64_t> first{0};  // first output column of each weight
  for (size_t i = 0; i < packed.size(); ++i) {
    const at::Tensor& p = packed[i];
    TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kByte && p.stride(1) == 1 && p.size(1) * 8 >= K * bits,
                "packed: uint8 [N, K*bits/8]");
    TORCH_CHECK(scale[i].dim() == 2 && scale[i].size(0) == p.size(0) && scale[i].size(1) == G, "scale: [N, K/group]");
    if (!zeros.empty()) {
      TORCH_CHECK(zeros[i].scalar_type() == at::kByte && zeros[i].is_contiguous() && zeros[i].dim() == 2 &&
                  zeros[i].size(0) == (p.size(0) * bits + 31) / 32 && zeros[i].size(1) == G * 4,
                  "zero points: the stored int32 [N*bits/32, K/group] as contiguous bytes [words, 4*K/group]");
    }
    first.push_back(first.back() + p.size(0));
  }
  const int64_t N = first.back();
  at::Tensor fast;
  if (qmm_dp(x, packed, scale, zeros, bits, group, first, fast)) return fast;
  if (T > TILE_TOKENS && T <= 2 * TILE_TOKENS && x.scalar_type() == at::kBFloat16) {  // two passes on the tiles, if they take them
    at::Tensor a, b;
    const at::Tensor top = x.narrow(0, 0, TILE_TOKENS), rest = x.narrow(0, TILE_TOKENS, T - TILE_TOKENS);
    if (qmm_dp(top, packed, scale, zeros, bits, group, first, a) && qmm_dp(rest, packed, scale, zeros, bits, group, first, b))
      return at::cat({a, b}, 0);
  }
  for (const auto& s : scale) scales.push_back(s.to(at::kFloat).contiguous());
  at::Tensor xin = x.to(at::kFloat).contiguous();
  if (bits == 4) {  // per 16 inputs: evens then odds, the order the nibbles come out in
    xin = xin.view({T, K / 16, 8, 2}).transpose(2, 3).contiguous().view({T, K});
  }
  auto y = at::empty({T, N}, xin.options());
  const float* xp = xin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < packed.size(); ++i) {
      const int64_t a = std::max(n0, first[i]), b = std::min(n1, first[i + 1]);
      if (a >= b) continue;
      const uint8_t* p = packed[i].data_ptr<uint8_t>();
      const float* s = scales[i].data_ptr<float>();
      const uint8_t* z = zeros.empty() ? nullptr : zeros[i].data_ptr<uint8_t>();
      if (bits == 8) rows<8>(p, packed[i].stride(0), s, z, first[i], xp, T, K, group, G, yp, N, a, b);
      else rows<4>(p, packed[i].stride(0), s, z, first[i], xp, T, K, group, G, yp, N, a, b);
    }
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// Eight float32 values out as OUT: float as they are; bf16 (kind 1) rounded to nearest even;
// fp16 (kind 2) by F16C, to nearest even.
template <typename OUT>
inline void emit8(OUT* out, __m256 v, int kind) {
  if constexpr (std::is_same_v<OUT, float>) {
    _mm256_storeu_ps(out, v);
  } else if (kind == 1) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes 0-3, 4-7 side by side
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// One row of dq: values (u - offset) * scale[g] for k in [0, K), written as OUT (float, or the
// 16-bit bits of bf16 / fp16). The product of a small integer and a half-precision scale is exact
// in float32, so rounding it once gives what torch's half-precision multiply gives. Groups are a
// multiple of 8 (int8) or 16 (int4) inputs (kernel_for), whole vectors.
template <int BITS, typename OUT>
inline void dq_row(const uint8_t* row, const float* sc, ZeroRow zp, int64_t K, int64_t group, OUT* out, int kind) {
  const int64_t G = K / group;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t gi = 0; gi < G; ++gi) {
    const __m256i off = _mm256_set1_epi32(offset_of(zp, gi, BITS));
    const __m256 s = _mm256_set1_ps(sc[gi]);
    const int64_t k0 = gi * group, k1 = k0 + group;
    if constexpr (BITS == 8) {
      for (int64_t k = k0; k < k1; k += 8) {
        const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
        emit8(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, off)), s), kind);
      }
    } else {
      for (int64_t k = k0; k < k1; k += 16) {  // 8 bytes: element 2j in byte j's low nibble, 2j+1 in its high one
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i e = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
        const __m256i u0 = _mm256_cvtepu8_epi32(e), u1 = _mm256_cvtepu8_epi32(_mm_srli_si128(e, 8));
        emit8(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u0, off)), s), kind);
        emit8(out + k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u1, off)), s), kind);
      }
    }
  }
}

// packed [N, row bytes] uint8; scale [N, K/group] float32, bfloat16 or float16; zeros as qmm's
// -> the weight [N, K] in the scale's dtype: (value - zero point) * scale, as compressed-tensors
// dequantizes (so a product with it is the reference's own). For products of many rows on CPUs
// whose half-precision GEMM is faster than qmm (quant.py).
at::Tensor dq(const at::Tensor& packed, const at::Tensor& scale, at::TensorList zeros, int64_t bits, int64_t group, int64_t K,
             const std::optional<at::Tensor>& out) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(group > 0 && K % group == 0 && group % (bits == 8 ? 8 : 16) == 0,
              "group must divide K, a multiple of 8 (int8) or 16 (int4)");
  const int64_t N = packed.size(0), G = K / group;
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.stride(1) == 1 && packed.size(1) * 8 >= K * bits,
              "packed: uint8 [N, K*bits/8]");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G, "scale: [N, K/group]");
  TORCH_CHECK(zeros.size() <= 1, "zero points: none or one");
  const auto dtype = scale.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "scale: float32, bfloat16 or float16");
  const uint8_t* z = nullptr;
  if (!zeros.empty()) {
    TORCH_CHECK(zeros[0].scalar_type() == at::kByte && zeros[0].is_contiguous() && zeros[0].dim() == 2 &&
                zeros[0].size(0) == (N * bits + 31) / 32 && zeros[0].size(1) == G * 4, "zero points: as qmm's");
    z = zeros[0].data_ptr<uint8_t>();
  }
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor w;
  if (out.has_value() && out->defined()) {  // a workspace the caller keeps: no 17 MB allocation (and its page faults) a call
    TORCH_CHECK(out->scalar_type() == dtype && out->is_contiguous() && out->dim() == 2 && out->size(0) == N && out->size(1) == K,
                "out: contiguous [N, K] of the scale's dtype");
    w = *out;
  } else {
    w = at::empty({N, K}, scale.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = sf.data_ptr<float>();
  const int64_t rb = packed.stride(0);
  const int kind = dtype == at::kBFloat16 ? 1 : 2;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const ZeroRow zr = zero_row(z, n, static_cast<int>(bits), G);
      if (dtype == at::kFloat) {
        float* o = w.data_ptr<float>() + n * K;
        if (bits == 8) dq_row<8, float>(p + n * rb, s + n * G, zr, K, group, o, 0);
        else dq_row<4, float>(p + n * rb, s + n * G, zr, K, group, o, 0);
      } else {
        uint16_t* o = reinterpret_cast<uint16_t*>(w.data_ptr()) + n * K;
        if (bits == 8) dq_row<8, uint16_t>(p + n * rb, s + n * G, zr, K, group, o, kind);
        else dq_row<4, uint16_t>(p + n * rb, s + n * G, zr, K, group, o, kind);
      }
    }
  });
  return w;
}

// ---- a decode step's elementwise tails in one call each, with torch's roundings --------------------
// Each reproduces a short chain of torch operations on bf16 tensors element by element: every bf16
// product or sum computed in float32 and rounded to bf16 (round to nearest even) where torch rounds
// it, float32 steps in float32. No reductions, so no order to match; no contraction into FMAs
// (fp-contract off), since torch rounds each product. tests/core/test_lean.py compares them with
// the chains they replace.
#define EC_EXACT_FLOAT __attribute__((optimize("fp-contract=off")))

inline uint16_t bf16_round(float f) {  // c10::BFloat16's round to nearest even
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFF) >> 16);
}
inline float bf16_float(uint16_t h) { return half_scalar(h, false); }

void check_bf16(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous(), what, ": a contiguous bfloat16 tensor");
}

// transformers' RMSNorm after its mean: weight * (h * rsqrt(var + eps)).to(bf16), with h [n, H] and
// var [n, 1] float32 (h.to(float32) and h.pow(2).mean(-1, keepdim=True), torch's own), weight [H].
EC_EXACT_FLOAT at::Tensor rms_tail(const at::Tensor& h, const at::Tensor& var, const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous(), "h: contiguous float32 [n, H]");
  TORCH_CHECK(var.scalar_type() == at::kFloat && var.numel() == h.size(0) && var.is_contiguous(), "var: float32 [n, 1]");
  check_bf16(weight, "weight");
  const int64_t n = h.size(0), H = h.size(1);
  TORCH_CHECK(weight.numel() == H, "weight: [H]");
  auto out = at::empty({n, H}, weight.options());
  const float* hp = h.data_ptr<float>();
  const float* vp = var.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t r = 0; r < n; ++r) {
    const float sum = vp[r] + static_cast<float>(eps);
    const float inv = 1.0f / std::sqrt(sum);  // torch's rsqrt: a division by a correctly rounded root
    for (int64_t i = 0; i < H; ++i) {
      const float y = bf16_float(bf16_round(hp[r * H + i] * inv));
      op[r * H + i] = bf16_round(bf16_float(wp[i]) * y);
    }
  }
  return out;
}

// apply_rotary_pos_emb on heads side by side: (x * cos) + (rotate_half(x) * sin), x [.., d] bf16,
// cos and sin [d] bf16 (one position); rotate_half(x) = cat(-x[d/2:], x[:d/2]).
EC_EXACT_FLOAT at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_bf16(x, "x");
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  const int64_t d = x.size(-1), rows = x.numel() / d, half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.numel() == d && sin.numel() == d, "rotary: cos and sin of the head size, an even one");
  auto out = at::empty_like(x);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr());
  const auto* sp = reinterpret_cast<const uint16_t*>(sin.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* v = xp + r * d;
    for (int64_t i = 0; i < d; ++i) {
      const float rot = i < half ? -bf16_float(v[i + half]) : bf16_float(v[i - half]);  // negation is exact
      const float a = bf16_float(bf16_round(bf16_float(v[i]) * bf16_float(cp[i])));
      const float b = bf16_float(bf16_round(rot * bf16_float(sp[i])));
      op[r * d + i] = bf16_round(a + b);
    }
  }
  return out;
}

// A token's experts combined: sum over slots s in order of float32(y_s) * w[s] (each product rounded
// to float32, the sum left to right), rounded to bf16; y_s [1, H] bf16, w [1, k] float32. With bf16
// weights, each product is rounded to bf16 first (the runtime's [1, k, H] buffer of weighted outputs)
// and the buffer's sum over k taken in float32, rounded once (torch's sum of that buffer; checked).
EC_EXACT_FLOAT at::Tensor combine(at::TensorList ys, const at::Tensor& w) {
  const bool half = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!ys.empty() && (w.scalar_type() == at::kFloat || half) && w.numel() == static_cast<int64_t>(ys.size()) && w.is_contiguous(),
              "combine: one float32 or bf16 weight per output");
  const int64_t H = ys[0].numel();
  for (const auto& y : ys) {
    check_bf16(y, "y");
    TORCH_CHECK(y.numel() == H, "combine: outputs of one size");
  }
  auto out = at::empty({1, H}, ys[0].options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  std::vector<float> wf(ys.size());
  for (size_t s = 0; s < ys.size(); ++s)
    wf[s] = half ? bf16_float(reinterpret_cast<const uint16_t*>(w.data_ptr())[s]) : w.data_ptr<float>()[s];
  std::vector<const uint16_t*> yp;
  for (const auto& y : ys) yp.push_back(reinterpret_cast<const uint16_t*>(y.data_ptr()));
  for (int64_t i = 0; i < H; ++i) {
    float total = bf16_float(yp[0][i]) * wf[0];
    if (half) total = bf16_float(bf16_round(total));
    for (size_t s = 1; s < yp.size(); ++s) {
      float term = bf16_float(yp[s][i]) * wf[s];
      if (half) term = bf16_float(bf16_round(term));
      total = total + term;
    }
    op[i] = bf16_round(total);
  }
  return out;
}

// ---- a decode step's attention half in one call ---------------------------------------------------
// lean.py's one-token step between the MoE blocks, for a layer whose norms are RMSNorm chains, whose
// rotary embedding is whole, and whose projections take amm (bits 16: bf16 weights [, biases]) or
// qmm (bits 4 / 8: QuantLinear operands): the same ATen operations and kernels in the same order and
// dtypes as its Python, so the same bits, without ~20 Python-level calls a layer.

// gemm.rms_norm's bf16 path: torch's own mean of squares, then rms_tail
at::Tensor rms_norm_bf16(const at::Tensor& h, const at::Tensor& w, double eps) {
  const at::Tensor hs = h.to(at::kFloat);
  const at::Tensor var = hs.pow(2).mean({-1}, true);
  return rms_tail(hs.view({-1, hs.size(-1)}), var, w, eps).view(h.sizes());
}

at::Tensor project(const at::Tensor& x, at::TensorList w, at::TensorList s, at::TensorList z, int64_t bits, int64_t group,
                   const std::optional<at::Tensor>& bias) {
  if (bits == 16) return amm(x, w, bias);
  TORCH_CHECK(!bias.has_value() || !bias->defined(), "lean_layer: quantized projections without biases");
  return qmm(x, w, s, z, bits, group);
}

// h [1, H] bf16 -> (h + attention(norm1(h)), norm2 of that, the layer's keys and values with this
// position's appended (DynamicLayer.update's cat; with key_room and value_room, buffers whose first
// positions keys and values are, written into them in place: the same values), router logits, top
// weights, top ids (undefined without a router: router_kind 0; 1 Mixtral's, 2 Qwen's softmax and top-k))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lean_layer(
    const at::Tensor& h, const at::Tensor& norm1, double eps1, at::TensorList qkv_w, at::TensorList qkv_s, at::TensorList qkv_z,
    int64_t qkv_bits, int64_t qkv_group, const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& q_norm,
    const std::optional<at::Tensor>& k_norm, double qk_eps, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
    const at::Tensor& values, const std::optional<at::Tensor>& key_room, const std::optional<at::Tensor>& value_room, int64_t nq,
    int64_t nkv, double scaling, bool gqa, at::TensorList o_w, at::TensorList o_s,
    at::TensorList o_z, int64_t o_bits, int64_t o_group, const at::Tensor& norm2, double eps2,
    const std::optional<at::Tensor>& router, int64_t router_kind, int64_t top_k, bool renorm) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) == 1, "lean_layer: one row [1, H]");
  const at::Tensor x = rms_norm_bf16(h, norm1, eps1);
  const at::Tensor qkv = project(x, qkv_w, qkv_s, qkv_z, qkv_bits, qkv_group, qkv_bias);
  const int64_t d = keys.size(-1);
  const at::Tensor heads = qkv.view({1, -1, d});  // [1, Hq + 2 Hkv, d]
  at::Tensor qk = heads.narrow(1, 0, nq + nkv);
  if (q_norm.has_value() && q_norm->defined())  // Qwen3: per head, then side by side
    qk = at::cat({rms_norm_bf16(heads.narrow(1, 0, nq), *q_norm, qk_eps), rms_norm_bf16(heads.narrow(1, nq, nkv), *k_norm, qk_eps)}, 1);
  qk = rotary(qk, cos, sin);
  const at::Tensor q = qk.narrow(1, 0, nq).unsqueeze(2), k = qk.narrow(1, nq, nkv).unsqueeze(2);  // [1, heads, 1, d]
  const at::Tensor v = heads.narrow(1, nq + nkv, nkv).unsqueeze(2);
  at::Tensor all_k, all_v;
  if (key_room.has_value() && key_room->defined()) {  // keys and values: the first S positions of these; S is written in place
    const int64_t S = keys.size(-2);
    TORCH_CHECK(key_room->size(-2) > S && value_room->size(-2) > S, "lean_layer: no room for another position");
    key_room->narrow(-2, S, 1).copy_(k);
    value_room->narrow(-2, S, 1).copy_(v);
    all_k = key_room->narrow(-2, 0, S + 1);
    all_v = value_room->narrow(-2, 0, S + 1);
  } else {
    all_k = at::cat({keys, k}, -2);
    all_v = at::cat({values, v}, -2);
  }
  const at::Tensor out = at::scaled_dot_product_attention(q, all_k, all_v, std::nullopt, 0.0, false, scaling, gqa);
  const at::Tensor h2 = at::add(h, project(out.reshape({1, -1}), o_w, o_s, o_z, o_bits, o_group, std::nullopt));
  const at::Tensor x2 = rms_norm_bf16(h2, norm2, eps2);
  at::Tensor logits, top, ids;
  if (router_kind != 0) {
    logits = amm(x2, {*router}, std::nullopt);
    std::tie(top, ids) = at::topk(router_kind == 1 ? at::softmax(logits.to(at::kFloat), -1) : at::softmax(logits, -1, at::kFloat), top_k, -1);
    if (renorm) top.div_(top.sum({-1}, true));
    if (router_kind == 2) top = top.to(logits.scalar_type());
  }
  return {h2, x2, all_k, all_v, logits, top, ids};
}

// One expert of the common kind (transformers' default gate with a plain SiLU, no biases) on a few
// rows: silu(x gate) * (x up), then down, in one call. bits 16: bf16 weights (gate, up, down) through
// amm; 4 or 8: (packed, scale[, zero points]) for each of the three through qmm (group 0: a row's
// inputs). The same operations in the same order and dtypes as experts.py's path for one expert, so
// the same bits, without its Python between them (a decode step computes 2-8 experts a layer).
at::Tensor glu_expert(const at::Tensor& x, at::TensorList parts, int64_t bits, int64_t group) {
  at::Tensor gu;
  size_t per = 1;
  if (bits == 16) {
    TORCH_CHECK(parts.size() == 3, "glu_expert: bf16 (gate, up, down)");
    gu = amm(x, {parts[0], parts[1]}, std::nullopt);
  } else {
    per = parts.size() / 3;
    TORCH_CHECK((per == 2 || per == 3) && parts.size() == 3 * per, "glu_expert: (packed, scale[, zero points]) for gate, up, down");
    std::vector<at::Tensor> z;
    if (per == 3) z = {parts[2], parts[5]};
    gu = qmm(x, {parts[0], parts[per]}, {parts[1], parts[per + 1]}, z, bits, group > 0 ? group : x.size(1));
  }
  const int64_t I = gu.size(1) / 2;
  const at::Tensor h = at::mul(at::silu(gu.narrow(1, 0, I)), gu.narrow(1, I, I));
  if (bits == 16) return amm(h, {parts[2]}, std::nullopt);
  std::vector<at::Tensor> z;
  if (per == 3) z = {parts[8]};
  return qmm(h, {parts[2 * per]}, {parts[2 * per + 1]}, z, bits, group > 0 ? group : I);
}

// A token's k experts and their combine in one call: parts holds each expert's glu_expert parts in slot
// order (parts.size() / k each), w [1, k] the router's weights; glu_expert each, then combine (the same
// bits as those calls made one by one)
at::Tensor glu_experts(const at::Tensor& x, at::TensorList parts, int64_t bits, int64_t group, const at::Tensor& w) {
  const int64_t k = w.size(-1);
  TORCH_CHECK(k > 0 && parts.size() % static_cast<size_t>(k) == 0, "glu_experts: each of the k experts' parts");
  const size_t each = parts.size() / static_cast<size_t>(k);
  std::vector<at::Tensor> ys;
  ys.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) ys.push_back(glu_expert(x, parts.slice(static_cast<size_t>(i) * each, each), bits, group));
  return combine(ys, w);
}

TORCH_LIBRARY(expertcache, m) {
  m.def("rms_tail(Tensor h, Tensor var, Tensor weight, float eps) -> Tensor", rms_tail);
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor", rotary);
  m.def("combine(Tensor[] ys, Tensor w) -> Tensor", combine);
  m.def("dq(Tensor packed, Tensor scale, Tensor[] zeros, int bits, int group, int K, Tensor? out=None) -> Tensor", dq);
  m.def("qmm(Tensor x, Tensor[] packed, Tensor[] scale, Tensor[] zeros, int bits, int group) -> Tensor", qmm);
  m.def("emm(Tensor x, Tensor[] w, Tensor? bias=None) -> Tensor", emm);
  m.def("amm(Tensor x, Tensor[] w, Tensor? bias=None) -> Tensor", amm);
  m.def("glu_expert(Tensor x, Tensor[] parts, int bits, int group) -> Tensor", glu_expert);
  m.def("glu_experts(Tensor x, Tensor[] parts, int bits, int group, Tensor w) -> Tensor", glu_experts);
  m.def("lean_layer(Tensor h, Tensor norm1, float eps1, Tensor[] qkv_w, Tensor[] qkv_s, Tensor[] qkv_z, int qkv_bits, int qkv_group, "
        "Tensor? qkv_bias, Tensor? q_norm, Tensor? k_norm, float qk_eps, Tensor cos, Tensor sin, Tensor keys, Tensor values, "
        "Tensor? key_room, Tensor? value_room, int nq, "
        "int nkv, float scaling, bool gqa, Tensor[] o_w, Tensor[] o_s, Tensor[] o_z, int o_bits, int o_group, Tensor norm2, float eps2, "
        "Tensor? router, int router_kind, int top_k, bool renorm) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", lean_layer);
  m.def("amx() -> bool", amx);
  m.def("qmm_fast(bool on) -> bool", qmm_fast);
  m.def("qmm_slices(bool on) -> bool", qmm_slices);
  m.def("qmm_wide(bool on) -> bool", qmm_wide);
  m.def("qmm_tiles(int start) -> int", qmm_tiles);
  m.def("qmm_tile_rows(int bits, int K, int group) -> int", qmm_tile_rows);
  m.def("pregate_step(Tensor emb, Tensor history, Tensor avg, Tensor decays, Tensor fc1_w, Tensor fc1_b, Tensor fc2_w, "
        "Tensor fc2_b, Tensor skip_w, Tensor skip_b, Tensor? ctx=None) -> (Tensor, Tensor, Tensor)", pregate_step);
}
