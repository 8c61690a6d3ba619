// Parallel positional I/O: many (buffer, offset) pairs on one file descriptor.
//
// Contract: every span is transferred in full with pwrite/pread (retrying EINTR and short
// transfers), spans in parallel on up to `threads` threads (0 = default_threads()). Large spans are
// cut into slices so one big tensor also spreads over threads. The status reports the failure of
// the lowest-numbered failing span: its errno, or eof when a read found the end of the file first,
// and how many of its bytes were transferred before that. Spans may not overlap in the file for
// writes (the result would depend on timing). Offsets plus sizes must fit in off_t; callers check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace aptckpt {

struct WriteSpan {
    const void* data;
    std::size_t size;
    std::uint64_t offset;
};

struct ReadSpan {
    void* data;
    std::size_t size;
    std::uint64_t offset;
};

struct IoStatus {
    int error = 0;          // errno of the failure; 0 for success or eof
    bool eof = false;       // a read reached the end of the file before filling its span
    std::size_t index = 0;  // the failing span
    std::size_t done = 0;   // bytes of that span transferred before the failure

    bool ok() const { return error == 0 && !eof; }
};

IoStatus pwrite_all(int fd, const std::vector<WriteSpan>& spans, unsigned threads);
IoStatus pread_all(int fd, const std::vector<ReadSpan>& spans, unsigned threads);

}  // namespace aptckpt
