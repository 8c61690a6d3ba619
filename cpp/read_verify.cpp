// Grouped, verified parallel reads (contract in read_verify.hpp).
#include "read_verify.hpp"

#include <errno.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "thread_pool.hpp"
#include "xxh3.hpp"

namespace aptckpt {
namespace {

// A group stops growing once it holds this many bytes: big enough that small chunks share a
// system call, small enough that one large tensor's chunks still spread over the threads.
constexpr std::size_t kGroupBytes = std::size_t{1} << 20;
constexpr std::size_t kMaxIovecs = 1024;  // IOV_MAX on Linux

struct Group {
    std::size_t first;
    std::size_t count;
};

std::vector<Group> group(const std::vector<CheckedSpan>& spans) {
    std::vector<Group> groups;
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < spans.size(); ++i) {
        if (!groups.empty()) {
            Group& g = groups.back();
            const CheckedSpan& prev = spans[g.first + g.count - 1];
            if (bytes < kGroupBytes && g.count < kMaxIovecs && spans[i].fd == prev.fd &&
                spans[i].offset == prev.offset + prev.size) {
                ++g.count;
                bytes += spans[i].size;
                continue;
            }
        }
        groups.push_back({i, 1});
        bytes = spans[i].size;
    }
    return groups;
}

struct GroupResult {
    int error = 0;
    std::size_t error_span = 0;
    std::size_t error_done = 0;
    std::size_t filled = 0;  // spans of the group read in full (the rest hit the end of the file)
};

// Fault in the whole pages of a destination in one system call before the read writes it (a read
// into fresh memory otherwise takes a fault per 4 KiB page inside the copy). A hint: refused on
// kernels before 5.14, and then the pages fault in during the read as before.
void populate(void* data, std::size_t size) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    constexpr std::size_t kPage = 4096;
    constexpr std::size_t kPopulateFrom = std::size_t{64} << 10;
    if (size < kPopulateFrom) return;
    const auto address = reinterpret_cast<std::uintptr_t>(data);
    const std::uintptr_t start = (address + kPage - 1) / kPage * kPage;
    const std::uintptr_t stop = (address + size) / kPage * kPage;
    if (stop > start) {
        const int saved = errno;
        ::madvise(reinterpret_cast<void*>(start), stop - start, MADV_POPULATE_WRITE);
        errno = saved;
    }
#else
    (void)data, (void)size;
#endif
}

GroupResult read_group(const std::vector<CheckedSpan>& spans, const Group& g) {
    std::vector<iovec> iov(g.count);
    for (std::size_t k = 0; k < g.count; ++k) {
        iov[k] = {spans[g.first + k].data, spans[g.first + k].size};
        populate(spans[g.first + k].data, spans[g.first + k].size);
    }
    GroupResult r;
    std::size_t k = 0;  // first iovec not yet full
    std::uint64_t offset = spans[g.first].offset;
    std::size_t done_in_k = 0;
    while (k < g.count) {
        if (iov[k].iov_len == 0) {  // an empty span (an empty tensor) is full already
            ++k;
            continue;
        }
        const int n_iov = static_cast<int>(std::min<std::size_t>(g.count - k, kMaxIovecs));
        const ssize_t n = ::preadv(spans[g.first].fd, &iov[k], n_iov, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            r.error = errno;
            r.error_span = g.first + k;
            r.error_done = done_in_k;
            r.filled = k;
            return r;
        }
        if (n == 0) break;  // end of file: spans k.. are short
        offset += static_cast<std::uint64_t>(n);
        std::size_t left = static_cast<std::size_t>(n);
        while (left > 0 && k < g.count) {
            const std::size_t take = std::min(left, iov[k].iov_len);
            iov[k].iov_base = static_cast<char*>(iov[k].iov_base) + take;
            iov[k].iov_len -= take;
            done_in_k += take;
            left -= take;
            if (iov[k].iov_len == 0) {
                ++k;
                done_in_k = 0;
            }
        }
    }
    r.filled = k;
    return r;
}

}  // namespace

IoStatus read_verify_all(const std::vector<CheckedSpan>& spans, unsigned threads,
                         std::vector<SpanProblem>* problems) {
    const std::vector<Group> groups = group(spans);
    std::vector<GroupResult> results(groups.size());
    // One flag per span: 0 fine, 1 eof, 2 digest mismatch (written by the span's task only).
    std::vector<unsigned char> flags(spans.size(), 0);
    parallel_for(groups.size(), threads, [&](std::size_t t) {
        const Group& g = groups[t];
        GroupResult r = read_group(spans, g);
        for (std::size_t k = 0; k < g.count; ++k) {
            const std::size_t i = g.first + k;
            if (k >= r.filled && spans[i].size > 0) {  // an empty span is never cut short
                if (r.error == 0) flags[i] = 1;
                continue;
            }
            if (r.error != 0 && k >= r.filled) continue;
            if (spans[i].digest == nullptr) continue;
            std::uint8_t got[16];
            xxh3_128_canonical(spans[i].data, spans[i].size, got);
            if (std::memcmp(got, spans[i].digest, 16) != 0) flags[i] = 2;
        }
        results[t] = r;
    });
    for (const GroupResult& r : results) {
        if (r.error != 0) return {r.error, false, r.error_span, r.error_done};
    }
    for (std::size_t i = 0; i < spans.size(); ++i) {
        if (flags[i] == 1) problems->push_back({i, SpanProblem::eof});
        if (flags[i] == 2) problems->push_back({i, SpanProblem::digest});
    }
    return {};
}

}  // namespace aptckpt
