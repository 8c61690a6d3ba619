// pwrite/pread of many spans on the thread pool (contract in parallel_io.hpp).
//
// Spans are cut into slices of at most kSliceBytes and the slices are the pool's tasks. Errors
// are ranked by slice number, and a slice is skipped only when a lower-numbered slice has already
// failed, so the reported failure (and its byte count) is the same whatever the scheduling was;
// stopping every thread at the first error seen was rejected because the lowest failing span
// could then be skipped and a different error reported from run to run.
#include "parallel_io.hpp"

#include <errno.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>

#include "thread_pool.hpp"

namespace aptckpt {
namespace {

// Big enough that syscall cost vanishes, small enough that a single large tensor keeps several
// threads busy.
constexpr std::size_t kSliceBytes = std::size_t{16} << 20;

struct Slice {
    std::size_t span;   // index into the spans
    std::size_t start;  // first byte of the span in this slice
    std::size_t size;
};

template <class Span>
std::vector<Slice> cut(const std::vector<Span>& spans) {
    std::vector<Slice> slices;
    for (std::size_t i = 0; i < spans.size(); ++i) {
        for (std::size_t start = 0; start < spans[i].size; start += kSliceBytes) {
            slices.push_back({i, start, std::min(kSliceBytes, spans[i].size - start)});
        }
    }
    return slices;
}

// Result of one slice: errno (or 0) and whether it stopped at end of file.
struct SliceResult {
    int error = 0;
    bool eof = false;
    std::size_t done = 0;
};

SliceResult write_slice(int fd, const WriteSpan& span, const Slice& s) {
    const char* p = static_cast<const char*>(span.data) + s.start;
    SliceResult r;
    while (r.done < s.size) {
        const ssize_t n = ::pwrite(fd, p + r.done, s.size - r.done,
                                   static_cast<off_t>(span.offset + s.start + r.done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            r.error = n < 0 ? errno : EIO;  // 0 bytes written for a non-empty request: no progress
            return r;
        }
        r.done += static_cast<std::size_t>(n);
    }
    return r;
}

SliceResult read_slice(int fd, const ReadSpan& span, const Slice& s) {
    char* p = static_cast<char*>(span.data) + s.start;
    SliceResult r;
    while (r.done < s.size) {
        const ssize_t n = ::pread(fd, p + r.done, s.size - r.done,
                                  static_cast<off_t>(span.offset + s.start + r.done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            r.error = errno;
            return r;
        }
        if (n == 0) {
            r.eof = true;
            return r;
        }
        r.done += static_cast<std::size_t>(n);
    }
    return r;
}

template <class Span, class Transfer>
IoStatus run_all(int fd, const std::vector<Span>& spans, unsigned threads, Transfer transfer) {
    const std::vector<Slice> slices = cut(spans);
    constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();
    std::atomic<std::size_t> lowest_failed{kNone};
    std::mutex mu;
    IoStatus status;
    parallel_for(slices.size(), threads, [&](std::size_t k) {
        if (k > lowest_failed.load(std::memory_order_relaxed)) return;
        const Slice& s = slices[k];
        const SliceResult r = transfer(fd, spans[s.span], s);
        if (r.error == 0 && !r.eof) return;
        std::lock_guard<std::mutex> lock(mu);
        if (k < lowest_failed.load(std::memory_order_relaxed)) {
            lowest_failed.store(k, std::memory_order_relaxed);
            status = {r.error, r.eof, s.span, s.start + r.done};
        }
    });
    return status;
}

}  // namespace

IoStatus pwrite_all(int fd, const std::vector<WriteSpan>& spans, unsigned threads) {
    return run_all(fd, spans, threads, write_slice);
}

IoStatus pread_all(int fd, const std::vector<ReadSpan>& spans, unsigned threads) {
    return run_all(fd, spans, threads, read_slice);
}

}  // namespace aptckpt
