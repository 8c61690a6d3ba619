// Reading many chunks into their destinations and checking each against its digest, in one
// parallel pass: the read and the hash of a chunk happen in the same task, so the hash runs on
// bytes still in the cache (verification overlapped with the reads of other chunks).
//
// Contract: every span is filled from `offset` of its file with preadv (retrying EINTR and short
// reads). Runs of spans that are adjacent in the same file (a table of small tensors) are read
// with one preadv of up to kMaxIovecs buffers and about kGroupBytes, so ten thousand 10 KB
// tensors cost a few hundred system calls, not ten thousand. When `digest` is non-null, the
// XXH3-128 (canonical) of the bytes read is compared with those 16 bytes. Results: a span that
// the end of its file cut short is Problem::eof, one whose bytes do not match is Problem::digest;
// problems are returned in span order. Any other failure is returned as an IoStatus naming the
// lowest-numbered failing span (as pread_all does) and the problems are then incomplete.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "parallel_io.hpp"

namespace aptckpt {

struct CheckedSpan {
    int fd;
    void* data;
    std::size_t size;
    std::uint64_t offset;
    const std::uint8_t* digest;  // 16 bytes, or nullptr to skip the check
};

struct SpanProblem {
    enum Kind { eof, digest };
    std::size_t index;
    Kind kind;
};

IoStatus read_verify_all(const std::vector<CheckedSpan>& spans, unsigned threads,
                         std::vector<SpanProblem>* problems);

}  // namespace aptckpt
