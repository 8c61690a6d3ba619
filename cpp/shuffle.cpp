// Byte shuffle / unshuffle / xor (contract in shuffle.hpp).
//
// For power-of-two item sizes 2..16 the SSE2 path works on 16 elements at a time: shuffling a
// block of 16 items of 2^r bytes is exactly r rounds of "split the byte stream into its even and
// its odd bytes" (each round rotates the bit index [element | byte] right by one), and a split is
// two AND/shift + PACKUS pairs. Unshuffle runs the rounds backwards with UNPACK (interleave). This
// beats a per-size hand-written transpose in code size and covers itemsize 16 for free. Other
// sizes, and the last n % 16 elements, use a cache-blocked scalar transpose.
#include "shuffle.hpp"

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace aptckpt {
namespace {

using u8 = std::uint8_t;

// Elements per scalar block: the source block (kBlockBytes) stays in L1 while each of the
// itemsize output rows is written sequentially.
constexpr std::size_t kBlockBytes = 4096;

// memcpy that accepts the null pointers an empty Python buffer may carry.
void copy_bytes(u8* out, const u8* src, std::size_t size) {
    if (size > 0) std::memcpy(out, src, size);
}

void shuffle_scalar(const u8* src, u8* out, std::size_t n, std::size_t k, std::size_t begin) {
    const std::size_t step = std::max<std::size_t>(1, kBlockBytes / k);
    for (std::size_t i0 = begin; i0 < n; i0 += step) {
        const std::size_t i1 = std::min(n, i0 + step);
        for (std::size_t b = 0; b < k; ++b) {
            u8* row = out + b * n;
            for (std::size_t i = i0; i < i1; ++i) row[i] = src[i * k + b];
        }
    }
}

void unshuffle_scalar(const u8* src, u8* out, std::size_t n, std::size_t k, std::size_t begin,
                      std::size_t end) {
    const std::size_t step = std::max<std::size_t>(1, kBlockBytes / k);
    for (std::size_t i0 = begin; i0 < end; i0 += step) {
        const std::size_t i1 = std::min(end, i0 + step);
        for (std::size_t b = 0; b < k; ++b) {
            const u8* row = src + b * n;
            for (std::size_t i = i0; i < i1; ++i) out[i * k + b] = row[i];
        }
    }
}

#if defined(__SSE2__)
constexpr std::size_t kLanes = 16;  // elements per vector block

inline __m128i load(const u8* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline void store(u8* p, __m128i v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
}

// One round over K registers seen as one 16*K byte stream: evens to the first half, odds after.
template <std::size_t K>
inline void split_round(__m128i v[K]) {
    const __m128i low_bytes = _mm_set1_epi16(0x00FF);
    __m128i t[K];
    for (std::size_t j = 0; j < K / 2; ++j) {
        const __m128i x = v[2 * j];
        const __m128i y = v[2 * j + 1];
        t[j] = _mm_packus_epi16(_mm_and_si128(x, low_bytes), _mm_and_si128(y, low_bytes));
        t[K / 2 + j] = _mm_packus_epi16(_mm_srli_epi16(x, 8), _mm_srli_epi16(y, 8));
    }
    for (std::size_t j = 0; j < K; ++j) v[j] = t[j];
}

// The inverse round: interleave the first half of the stream with the second.
template <std::size_t K>
inline void merge_round(__m128i v[K]) {
    __m128i t[K];
    for (std::size_t j = 0; j < K / 2; ++j) {
        t[2 * j] = _mm_unpacklo_epi8(v[j], v[K / 2 + j]);
        t[2 * j + 1] = _mm_unpackhi_epi8(v[j], v[K / 2 + j]);
    }
    for (std::size_t j = 0; j < K; ++j) v[j] = t[j];
}

template <std::size_t K, std::size_t Rounds>
void shuffle_sse2(const u8* src, u8* out, std::size_t n) {
    const std::size_t vec_end = n - n % kLanes;
    for (std::size_t i0 = 0; i0 < vec_end; i0 += kLanes) {
        __m128i v[K];
        for (std::size_t j = 0; j < K; ++j) v[j] = load(src + i0 * K + 16 * j);
        for (std::size_t r = 0; r < Rounds; ++r) split_round<K>(v);
        for (std::size_t b = 0; b < K; ++b) store(out + b * n + i0, v[b]);
    }
    shuffle_scalar(src, out, n, K, vec_end);
}

template <std::size_t K, std::size_t Rounds>
void unshuffle_sse2(const u8* src, u8* out, std::size_t n, std::size_t begin, std::size_t end) {
    const std::size_t vec_end = begin + (end - begin) / kLanes * kLanes;
    for (std::size_t i0 = begin; i0 < vec_end; i0 += kLanes) {
        __m128i v[K];
        for (std::size_t b = 0; b < K; ++b) v[b] = load(src + b * n + i0);
        for (std::size_t r = 0; r < Rounds; ++r) merge_round<K>(v);
        for (std::size_t j = 0; j < K; ++j) store(out + i0 * K + 16 * j, v[j]);
    }
    unshuffle_scalar(src, out, n, K, vec_end, end);
}
#endif  // __SSE2__

// Transposes the n whole elements; returns false when no fast path covers `k`.
bool shuffle_fast(const u8* src, u8* out, std::size_t n, std::size_t k) {
#if defined(__SSE2__)
    switch (k) {
        case 2: shuffle_sse2<2, 1>(src, out, n); return true;
        case 4: shuffle_sse2<4, 2>(src, out, n); return true;
        case 8: shuffle_sse2<8, 3>(src, out, n); return true;
        case 16: shuffle_sse2<16, 4>(src, out, n); return true;
        default: return false;
    }
#else
    (void)src, (void)out, (void)n, (void)k;
    return false;
#endif
}

bool unshuffle_fast(const u8* src, u8* out, std::size_t n, std::size_t k, std::size_t begin,
                    std::size_t end) {
#if defined(__SSE2__)
    switch (k) {
        case 2: unshuffle_sse2<2, 1>(src, out, n, begin, end); return true;
        case 4: unshuffle_sse2<4, 2>(src, out, n, begin, end); return true;
        case 8: unshuffle_sse2<8, 3>(src, out, n, begin, end); return true;
        case 16: unshuffle_sse2<16, 4>(src, out, n, begin, end); return true;
        default: return false;
    }
#else
    (void)src, (void)out, (void)n, (void)k, (void)begin, (void)end;
    return false;
#endif
}

}  // namespace

void shuffle(const u8* src, std::size_t size, std::size_t itemsize, u8* out) noexcept {
    const std::size_t n = size / itemsize;
    const std::size_t body = n * itemsize;
    if (itemsize == 1) {
        copy_bytes(out, src, size);
        return;
    }
    if (!shuffle_fast(src, out, n, itemsize)) shuffle_scalar(src, out, n, itemsize, 0);
    copy_bytes(out + body, src + body, size - body);
}

void unshuffle(const u8* src, std::size_t size, std::size_t itemsize, u8* out) noexcept {
    const std::size_t n = size / itemsize;
    const std::size_t body = n * itemsize;
    if (itemsize == 1) {
        copy_bytes(out, src, size);
        return;
    }
    if (!unshuffle_fast(src, out, n, itemsize, 0, n)) unshuffle_scalar(src, out, n, itemsize, 0, n);
    copy_bytes(out + body, src + body, size - body);
}

void unshuffle_elements(const u8* src, std::size_t size, std::size_t itemsize, u8* out,
                        std::size_t begin, std::size_t end) noexcept {
    const std::size_t n = size / itemsize;
    if (itemsize == 1) {
        copy_bytes(out + begin, src + begin, end - begin);
    } else if (!unshuffle_fast(src, out, n, itemsize, begin, end)) {
        unshuffle_scalar(src, out, n, itemsize, begin, end);
    }
    if (end == n) {
        const std::size_t body = n * itemsize;
        copy_bytes(out + body, src + body, size - body);
    }
}

void xor_bytes(const u8* a, const u8* b, std::size_t size, u8* out) noexcept {
    std::size_t i = 0;
#if defined(__SSE2__)
    // Both loads precede the store, so out == a or out == b is safe; written out by hand because
    // the auto-vectoriser's alias check sends exactly that case to its byte loop.
    for (; i + 16 <= size; i += 16) store(out + i, _mm_xor_si128(load(a + i), load(b + i)));
#endif
    for (; i < size; ++i) out[i] = static_cast<u8>(a[i] ^ b[i]);
}

}  // namespace aptckpt
