// Host-side 16-bit float storage types and their conversions, written so that loops over
// them vectorise (branch-free bit manipulation, no library calls).
//
// Rounding is round-to-nearest-even, as torch's .to(torch.bfloat16) / .to(torch.float16),
// so a latent rounded here equals one rounded by torch.
#pragma once

#include <cstdint>
#include <cstring>

namespace dancegrpo {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ------------------------------------------------------------------ bfloat16

inline float to_float(bf16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

inline bf16_t to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16_t{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

// ------------------------------------------------------------------ float16 (IEEE binary16)

inline float to_float(f16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu;
  const uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float
    const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline f16_t to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return f16_t{static_cast<uint16_t>(sign | 0x7E00u)};  // NaN
  if (abs >= 0x477FF000u) return f16_t{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value / 2^-24 rounded to nearest even integer.
    // Adding 0.5f shifts the bits into place and lets the FPU do the rounding.
    const float shifted = bits_to_float(abs) + 0.5f;
    return f16_t{static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3F000000u))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  const uint32_t odd = (abs >> 13) & 1u;
  const uint32_t rounded = (abs + 0xC8000FFFu + odd) >> 13;  // 0xC8000000 = -(112 << 23)
  return f16_t{static_cast<uint16_t>(sign | rounded)};
}

// ------------------------------------------------------------------ generic load / store

template <typename Acc, typename T>
inline Acc load_as(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>) {
    return static_cast<Acc>(to_float(p[i]));
  } else {
    return static_cast<Acc>(p[i]);
  }
}

template <typename T, typename Acc>
inline T convert_to(Acc v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return to_bf16(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return to_f16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace dancegrpo
