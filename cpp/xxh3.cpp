// XXH3-128 (seed 0, default secret), written from the public algorithm description.
//
// Short inputs (0..240 bytes) follow the description directly with the seed terms folded away.
// Long inputs run the stripe accumulate / block scramble loop through one of three kernels
// (AVX2, SSE2, scalar) chosen once at first use; each keeps the eight 64-bit accumulators in
// vector registers for a whole run of blocks, which is where the speed comes from. AVX2 is
// compiled with a target attribute rather than -mavx2, so the module still loads on any x86-64
// and uses AVX2 only where the CPU has it (never -march=native).
#include "xxh3.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// The AVX2 kernel needs GCC/Clang extensions: target attributes, __builtin_cpu_supports, asm.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define APTCKPT_X86 1
#endif

namespace aptckpt {
namespace {

using u8 = std::uint8_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;
__extension__ using u128 = unsigned __int128;

constexpr u64 kPrime32_1 = 0x9E3779B1U;
constexpr u64 kPrime32_2 = 0x85EBCA77U;
constexpr u64 kPrime32_3 = 0xC2B2AE3DU;
constexpr u64 kPrime64_1 = 0x9E3779B185EBCA87ULL;
constexpr u64 kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr u64 kPrime64_3 = 0x165667B19E3779F9ULL;
constexpr u64 kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr u64 kPrime64_5 = 0x27D4EB2F165667C5ULL;
constexpr u64 kPrimeMx1 = 0x165667919E3779F9ULL;
constexpr u64 kPrimeMx2 = 0x9FB21C651E98DF25ULL;

constexpr std::size_t kSecretSize = 192;
alignas(64) constexpr u8 kSecret[kSecretSize] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

constexpr std::size_t kStripeLen = 64;
constexpr std::size_t kSecretAdvance = 8;  // secret bytes consumed per stripe
constexpr std::size_t kStripesPerBlock = (kSecretSize - kStripeLen) / kSecretAdvance;  // 16
constexpr std::size_t kBlockLen = kStripeLen * kStripesPerBlock;                       // 1024
constexpr std::size_t kScrambleOffset = kSecretSize - kStripeLen;                      // 128
constexpr std::size_t kLastStripeOffset = kSecretSize - kStripeLen - 7;                // 121
constexpr std::size_t kMergeLowOffset = 11;
constexpr std::size_t kMergeHighOffset = kSecretSize - kStripeLen - 11;  // 117

// The 64 secret bytes each stripe of a full block uses (kSecret[8s, 8s + 64)), copied to 64-byte
// aligned rows: the block loops then load the secret without cache-line splits.
struct StripeSecrets {
    alignas(64) u8 rows[kStripesPerBlock][kStripeLen];
};

constexpr StripeSecrets make_stripe_secrets() {
    StripeSecrets t{};
    for (std::size_t s = 0; s < kStripesPerBlock; ++s) {
        for (std::size_t i = 0; i < kStripeLen; ++i) t.rows[s][i] = kSecret[s * kSecretAdvance + i];
    }
    return t;
}

constexpr StripeSecrets kStripeSecrets = make_stripe_secrets();

// ---- scalar primitives (inputs and secret are little-endian by definition) ----

inline u64 read64(const u8* p) {
    u64 v;
    std::memcpy(&v, p, sizeof v);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

inline u32 read32(const u8* p) {
    u32 v;
    std::memcpy(&v, p, sizeof v);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

inline u64 secret64(std::size_t offset) {
    return read64(kSecret + offset);
}

inline u32 rotl32(u32 x, int r) {
    return (x << r) | (x >> (32 - r));
}

inline u128 mul128(u64 a, u64 b) {
    return static_cast<u128>(a) * b;
}

inline u64 mul_fold64(u64 a, u64 b) {
    const u128 p = mul128(a, b);
    return static_cast<u64>(p) ^ static_cast<u64>(p >> 64);
}

inline u64 avalanche(u64 x) {
    x ^= x >> 37;
    x *= kPrimeMx1;
    return x ^ (x >> 32);
}

inline u64 avalanche_xxh64(u64 x) {
    x ^= x >> 33;
    x *= kPrime64_2;
    x ^= x >> 29;
    x *= kPrime64_3;
    return x ^ (x >> 32);
}

// ---- short inputs: 0..16 bytes ----

Hash128 hash_empty() {
    return {avalanche_xxh64(secret64(64) ^ secret64(72)),
            avalanche_xxh64(secret64(80) ^ secret64(88))};
}

Hash128 hash_1to3(const u8* p, std::size_t len) {
    const u32 combined = static_cast<u32>(p[len - 1]) | (static_cast<u32>(len) << 8) |
                         (static_cast<u32>(p[0]) << 16) | (static_cast<u32>(p[len >> 1]) << 24);
    const u64 low = static_cast<u64>(read32(kSecret) ^ read32(kSecret + 4)) ^ combined;
    const u64 high = static_cast<u64>(read32(kSecret + 8) ^ read32(kSecret + 12)) ^
                     rotl32(__builtin_bswap32(combined), 13);
    return {avalanche_xxh64(low), avalanche_xxh64(high)};
}

Hash128 hash_4to8(const u8* p, std::size_t len) {
    const u64 combined = read32(p) | (static_cast<u64>(read32(p + len - 4)) << 32);
    const u64 value = (secret64(16) ^ secret64(24)) ^ combined;
    const u128 m = mul128(value, kPrime64_1 + (static_cast<u64>(len) << 2));
    u64 high = static_cast<u64>(m >> 64);
    u64 low = static_cast<u64>(m);
    high += low << 1;
    low ^= high >> 3;
    low ^= low >> 35;
    low *= kPrimeMx2;
    low ^= low >> 28;
    return {low, avalanche(high)};
}

Hash128 hash_9to16(const u8* p, std::size_t len) {
    const u64 first = read64(p);
    const u64 last = read64(p + len - 8);
    const u64 val1 = (secret64(32) ^ secret64(40)) ^ first ^ last;
    const u64 val2 = (secret64(48) ^ secret64(56)) ^ last;
    const u128 m = mul128(val1, kPrime64_1);
    u64 low = static_cast<u64>(m) + (static_cast<u64>(len - 1) << 54);
    // high64(m) + val2 * PRIME32_2 restricted to the low 32 bits of val2, as the description says.
    const u64 high = static_cast<u64>(m >> 64) + val2 + (val2 & 0xFFFFFFFFULL) * (kPrime32_2 - 1);
    low ^= __builtin_bswap64(high);
    const u128 m2 = mul128(low, kPrime64_2);
    return {avalanche(static_cast<u64>(m2)),
            avalanche(static_cast<u64>(m2 >> 64) + high * kPrime64_2)};
}

// ---- medium inputs: 17..240 bytes ----

inline u64 mix16(const u8* data, const u8* secret) {
    return mul_fold64(read64(data) ^ read64(secret), read64(data + 8) ^ read64(secret + 8));
}

inline void mix_two(u64 acc[2], const u8* a, const u8* b, const u8* secret) {
    acc[0] += mix16(a, secret);
    acc[1] += mix16(b, secret + 16);
    acc[0] ^= read64(b) + read64(b + 8);
    acc[1] ^= read64(a) + read64(a + 8);
}

Hash128 finish_medium(const u64 acc[2], std::size_t len) {
    const u64 low = acc[0] + acc[1];
    const u64 high = acc[0] * kPrime64_1 + acc[1] * kPrime64_4 + static_cast<u64>(len) * kPrime64_2;
    return {avalanche(low), 0 - avalanche(high)};
}

Hash128 hash_17to128(const u8* p, std::size_t len) {
    u64 acc[2] = {static_cast<u64>(len) * kPrime64_1, 0};
    // Pairs of 16-byte chunks from both ends, innermost pair first.
    for (std::size_t i = (len - 1) / 32 + 1; i-- > 0;) {
        mix_two(acc, p + 16 * i, p + len - 16 - 16 * i, kSecret + 32 * i);
    }
    return finish_medium(acc, len);
}

Hash128 hash_129to240(const u8* p, std::size_t len) {
    u64 acc[2] = {static_cast<u64>(len) * kPrime64_1, 0};
    for (std::size_t i = 0; i < 4; ++i) {
        mix_two(acc, p + 32 * i, p + 32 * i + 16, kSecret + 32 * i);
    }
    acc[0] = avalanche(acc[0]);
    acc[1] = avalanche(acc[1]);
    for (std::size_t i = 4; i < len / 32; ++i) {
        mix_two(acc, p + 32 * i, p + 32 * i + 16, kSecret + 3 + 32 * (i - 4));
    }
    mix_two(acc, p + len - 16, p + len - 32, kSecret + 103);
    return finish_medium(acc, len);
}

// ---- long inputs: kernels ----

// A kernel advances the accumulators over `n` stripes starting at `secret` (8 bytes further per
// stripe), and over whole 1 KiB blocks each followed by a scramble.
struct Kernel {
    void (*stripes)(u64* acc, const u8* p, std::size_t n, const u8* secret);
    void (*blocks)(u64* acc, const u8* p, std::size_t nblocks);
    const char* name;
};

inline void accumulate_scalar(u64* acc, const u8* p, const u8* secret) {
    for (std::size_t i = 0; i < 8; ++i) {
        const u64 data = read64(p + 8 * i);
        const u64 keyed = data ^ read64(secret + 8 * i);
        acc[i ^ 1] += data;
        acc[i] += (keyed & 0xFFFFFFFFULL) * (keyed >> 32);
    }
}

void stripes_scalar(u64* acc, const u8* p, std::size_t n, const u8* secret) {
    for (std::size_t s = 0; s < n; ++s) {
        accumulate_scalar(acc, p + s * kStripeLen, secret + s * kSecretAdvance);
    }
}

void blocks_scalar(u64* acc, const u8* p, std::size_t nblocks) {
    for (std::size_t b = 0; b < nblocks; ++b) {
        stripes_scalar(acc, p + b * kBlockLen, kStripesPerBlock, kSecret);
        for (std::size_t i = 0; i < 8; ++i) {
            u64 a = acc[i] ^ (acc[i] >> 47);
            a ^= read64(kSecret + kScrambleOffset + 8 * i);
            acc[i] = a * kPrime32_1;
        }
    }
}

#if defined(__SSE2__)
// Each 128-bit register holds two accumulators; four registers cover one 64-byte stripe.
inline __m128i accumulate_sse2(__m128i acc, const u8* p, const u8* secret) {
    const __m128i data = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i keyed =
        _mm_xor_si128(data, _mm_loadu_si128(reinterpret_cast<const __m128i*>(secret)));
    const __m128i product = _mm_mul_epu32(keyed, _mm_srli_epi64(keyed, 32));
    const __m128i swapped =
        _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));  // acc[i^1] += data[i]
    return _mm_add_epi64(acc, _mm_add_epi64(product, swapped));
}

inline __m128i scramble_sse2(__m128i acc, const u8* secret) {
    const __m128i prime = _mm_set1_epi32(static_cast<int>(kPrime32_1));
    acc = _mm_xor_si128(acc, _mm_srli_epi64(acc, 47));
    acc = _mm_xor_si128(acc, _mm_loadu_si128(reinterpret_cast<const __m128i*>(secret)));
    // 64x32-bit multiply from two 32x32->64 products.
    const __m128i lo = _mm_mul_epu32(acc, prime);
    const __m128i hi = _mm_mul_epu32(_mm_srli_epi64(acc, 32), prime);
    return _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
}

inline void stripes_sse2_regs(__m128i v[4], const u8* p, std::size_t n, const u8* secret,
                              std::size_t secret_step) {
    for (std::size_t s = 0; s < n; ++s) {
        for (std::size_t k = 0; k < 4; ++k) {
            v[k] = accumulate_sse2(v[k], p + s * kStripeLen + 16 * k,
                                   secret + s * secret_step + 16 * k);
        }
    }
}

inline void load_sse2(__m128i v[4], const u64* acc) {
    for (std::size_t k = 0; k < 4; ++k)
        v[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + 2 * k));
}

inline void store_sse2(u64* acc, const __m128i v[4]) {
    for (std::size_t k = 0; k < 4; ++k)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + 2 * k), v[k]);
}

void stripes_sse2(u64* acc, const u8* p, std::size_t n, const u8* secret) {
    __m128i v[4];
    load_sse2(v, acc);
    stripes_sse2_regs(v, p, n, secret, kSecretAdvance);
    store_sse2(acc, v);
}

void blocks_sse2(u64* acc, const u8* p, std::size_t nblocks) {
    __m128i v[4];
    load_sse2(v, acc);
    for (std::size_t b = 0; b < nblocks; ++b) {
        stripes_sse2_regs(v, p + b * kBlockLen, kStripesPerBlock, kStripeSecrets.rows[0],
                          kStripeLen);
        for (std::size_t k = 0; k < 4; ++k)
            v[k] = scramble_sse2(v[k], kSecret + kScrambleOffset + 16 * k);
    }
    store_sse2(acc, v);
}
#endif  // __SSE2__

#if defined(APTCKPT_X86)
#define APTCKPT_AVX2 __attribute__((target("avx2")))

APTCKPT_AVX2 inline __m256i accumulate_avx2(__m256i acc, const u8* p, const u8* secret) {
    __m256i data = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    // An empty asm pins data in a register. Without it GCC folds a second load of p into the
    // shuffle below, and the extra (often cache-line-splitting) load costs ~15% on unaligned input.
    __asm__("" : "+x"(data));
    const __m256i keyed =
        _mm256_xor_si256(data, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret)));
    const __m256i product = _mm256_mul_epu32(keyed, _mm256_srli_epi64(keyed, 32));
    const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
    return _mm256_add_epi64(acc, _mm256_add_epi64(product, swapped));
}

APTCKPT_AVX2 inline __m256i scramble_avx2(__m256i acc, const u8* secret) {
    const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
    acc = _mm256_xor_si256(acc, _mm256_srli_epi64(acc, 47));
    acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret)));
    const __m256i lo = _mm256_mul_epu32(acc, prime);
    const __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(acc, 32), prime);
    return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

APTCKPT_AVX2 inline void stripes_avx2_regs(__m256i& a0, __m256i& a1, const u8* p, std::size_t n,
                                           const u8* secret, std::size_t secret_step) {
    for (std::size_t s = 0; s < n; ++s) {
        a0 = accumulate_avx2(a0, p + s * kStripeLen, secret + s * secret_step);
        a1 = accumulate_avx2(a1, p + s * kStripeLen + 32, secret + s * secret_step + 32);
    }
}

APTCKPT_AVX2 void stripes_avx2(u64* acc, const u8* p, std::size_t n, const u8* secret) {
    __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
    __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4));
    stripes_avx2_regs(a0, a1, p, n, secret, kSecretAdvance);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
}

APTCKPT_AVX2 void blocks_avx2(u64* acc, const u8* p, std::size_t nblocks) {
    __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
    __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4));
    for (std::size_t b = 0; b < nblocks; ++b) {
        stripes_avx2_regs(a0, a1, p + b * kBlockLen, kStripesPerBlock, kStripeSecrets.rows[0],
                          kStripeLen);
        a0 = scramble_avx2(a0, kSecret + kScrambleOffset);
        a1 = scramble_avx2(a1, kSecret + kScrambleOffset + 32);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
}
#endif  // APTCKPT_X86

// Kernels from narrowest to widest; the widest this CPU runs wins. APTCKPT_SIMD=scalar|sse2
// caps the choice, so tests can check that every kernel gives the same digests on a machine that
// would pick a wider one; unset or any other value means no cap. AVX-512 was tried and dropped:
// no faster than AVX2 on the reference AMD EPYC (every 64-byte load of unaligned input splits a
// cache line), and more code to keep right.
int simd_cap() {
    const char* cap = std::getenv("APTCKPT_SIMD");
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return 0;
    if (cap != nullptr && std::strcmp(cap, "sse2") == 0) return 1;
    return 2;
}

Kernel choose_kernel() {
    [[maybe_unused]] const int cap = simd_cap();
#if defined(APTCKPT_X86)
    if (cap >= 2 && __builtin_cpu_supports("avx2")) return {stripes_avx2, blocks_avx2, "avx2"};
#endif
#if defined(__SSE2__)
    if (cap >= 1) return {stripes_sse2, blocks_sse2, "sse2"};
#endif
    return {stripes_scalar, blocks_scalar, "scalar"};
}

const Kernel& kernel() {
    static const Kernel chosen = choose_kernel();  // thread-safe one-time init (C++11 statics)
    return chosen;
}

// ---- long inputs: > 240 bytes ----

u64 merge_accs(const u64 acc[8], std::size_t secret_offset, u64 init) {
    u64 result = init;
    for (std::size_t i = 0; i < 4; ++i) {
        result += mul_fold64(acc[2 * i] ^ secret64(secret_offset + 16 * i),
                             acc[2 * i + 1] ^ secret64(secret_offset + 16 * i + 8));
    }
    return avalanche(result);
}


// Long inputs (> 240 bytes), their blocks accumulated as `ready` makes them available.
Hash128 hash_long_produced(const u8* p, std::size_t len, std::size_t segment, ReadyFn ready,
                           void* context) {
    alignas(32) u64 acc[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                              kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
    const Kernel& k = kernel();
    const std::size_t nblocks = (len - 1) / kBlockLen;
    std::size_t produced = 0;
    std::size_t hashed = 0;  // blocks
    while (produced < len) {
        const std::size_t next = std::min(len, produced + segment);
        ready(context, produced, next);
        produced = next;
        const std::size_t available = std::min(nblocks, produced / kBlockLen);
        k.blocks(acc, p + hashed * kBlockLen, available - hashed);
        hashed = available;
    }
    const std::size_t tail_stripes = ((len - 1) - nblocks * kBlockLen) / kStripeLen;
    k.stripes(acc, p + nblocks * kBlockLen, tail_stripes, kSecret);
    k.stripes(acc, p + len - kStripeLen, 1, kSecret + kLastStripeOffset);
    const u64 n = static_cast<u64>(len);
    return {merge_accs(acc, kMergeLowOffset, n * kPrime64_1),
            merge_accs(acc, kMergeHighOffset, ~(n * kPrime64_2))};
}

void already_there(void*, std::size_t, std::size_t) {}

Hash128 hash_long(const u8* p, std::size_t len) {
    return hash_long_produced(p, len, len, already_there, nullptr);
}

void store_be64(u8* out, u64 v) {
    for (int i = 7; i >= 0; --i) {
        out[i] = static_cast<u8>(v);
        v >>= 8;
    }
}

}  // namespace

Hash128 xxh3_128(const void* data, std::size_t size) noexcept {
    const u8* p = static_cast<const u8*>(data);
    if (size <= 16) {
        if (size > 8) return hash_9to16(p, size);
        if (size >= 4) return hash_4to8(p, size);
        if (size > 0) return hash_1to3(p, size);
        return hash_empty();
    }
    if (size <= 128) return hash_17to128(p, size);
    if (size <= 240) return hash_129to240(p, size);
    return hash_long(p, size);
}

Hash128 xxh3_128_produced(std::uint8_t* data, std::size_t size, std::size_t segment, ReadyFn ready,
                          void* context) noexcept {
    if (size <= 240 || segment == 0) {
        if (size > 0) ready(context, 0, size);
        return xxh3_128(data, size);
    }
    return hash_long_produced(data, size, segment, ready, context);
}

void xxh3_128_store(const Hash128& digest, std::uint8_t* out) noexcept {
    store_be64(out, digest.high);
    store_be64(out + 8, digest.low);
}

void xxh3_128_canonical(const void* data, std::size_t size, std::uint8_t* out) noexcept {
    xxh3_128_store(xxh3_128(data, size), out);
}

const char* xxh3_simd() noexcept {
    return kernel().name;
}

}  // namespace aptckpt
