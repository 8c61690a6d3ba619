// Byte shuffle by element size, its inverse, and xor of two buffers: the reversible transforms the
// chunk codecs apply before compression.
//
// Contract (n = size / itemsize, identical to aptckpt._pyimpl):
//   shuffle:   out[b*n + i] = src[i*itemsize + b] for every element i and byte b; the
//              size % itemsize trailing bytes are copied unchanged to the end of out.
//   unshuffle: the exact inverse of shuffle.
//   xor_bytes: out[i] = a[i] ^ b[i]; out may be a or b, but must not partly overlap them.
// shuffle/unshuffle require out and src not to overlap and itemsize >= 1. No allocation, no
// threads: callers parallelise across chunks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aptckpt {

void shuffle(const std::uint8_t* src, std::size_t size, std::size_t itemsize,
             std::uint8_t* out) noexcept;

void unshuffle(const std::uint8_t* src, std::size_t size, std::size_t itemsize,
               std::uint8_t* out) noexcept;

// unshuffle restricted to the elements [begin, end) of the n = size / itemsize whole elements
// (their bytes out[begin*itemsize, end*itemsize)); the trailing size % itemsize bytes are copied
// when end == n. Calls over ranges that cover [0, n) give exactly unshuffle's output.
void unshuffle_elements(const std::uint8_t* src, std::size_t size, std::size_t itemsize,
                        std::uint8_t* out, std::size_t begin, std::size_t end) noexcept;

void xor_bytes(const std::uint8_t* a, const std::uint8_t* b, std::size_t size,
               std::uint8_t* out) noexcept;

}  // namespace aptckpt
