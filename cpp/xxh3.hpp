// XXH3-128 with seed 0 and the default secret: the digest aptckpt stores for every chunk.
//
// Contract: xxh3_128_canonical() writes exactly the 16 bytes xxhash.xxh3_128_digest() returns
// (high 64 bits first, each half big-endian) for every input length, on every CPU. The long-input
// loop picks AVX2, SSE2 or portable scalar code once per process; all three give the same bits.
// Written from the public XXH3 algorithm description; no xxHash code is used.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aptckpt {

struct Hash128 {
    std::uint64_t low;
    std::uint64_t high;
};

// The 128-bit digest of `data[0:size)`. Thread-safe, allocation-free.
Hash128 xxh3_128(const void* data, std::size_t size) noexcept;

// The digest in canonical byte order into `out[0:16)`.
void xxh3_128_canonical(const void* data, std::size_t size, std::uint8_t* out) noexcept;

// The digest of `data[0:size)` where the bytes are produced while hashing: before any byte of
// [begin, end) is read, `ready(context, begin, end)` is called, for consecutive ranges that cover
// [0, size) in order, each about `segment` bytes. So a producer (an unshuffle) writes a range
// that the hash then reads while it is still in cache. Same digest as xxh3_128.
using ReadyFn = void (*)(void* context, std::size_t begin, std::size_t end);
Hash128 xxh3_128_produced(std::uint8_t* data, std::size_t size, std::size_t segment, ReadyFn ready,
                          void* context) noexcept;

// A digest in canonical byte order into `out[0:16)`.
void xxh3_128_store(const Hash128& digest, std::uint8_t* out) noexcept;

// Instruction set of the long-input loop this process uses: "avx2", "sse2" or "scalar".
const char* xxh3_simd() noexcept;

}  // namespace aptckpt
