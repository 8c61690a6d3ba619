// aptckpt._native: the Python face of the C++ core, and the only file that includes pybind11.
//
// Contract: exactly the functions listed in aptckpt/_accel.py, with byte-identical results and the
// same exceptions as the pure-Python twin aptckpt/_pyimpl.py. Every argument is converted and
// validated while the GIL is held (buffers through the buffer protocol, C-contiguous, writable
// where written); then the GIL is released for all hashing, shuffling and I/O. I/O failures raise
// OSError carrying errno (Python picks the subclass, e.g. FileNotFoundError); a read past the end
// of a file raises EOFError.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel_io.hpp"
#include "read_verify.hpp"
#include "shuffle.hpp"
#include "thread_pool.hpp"
#include "xxh3.hpp"

namespace py = pybind11;

namespace {

using aptckpt::kMaxThreads;

constexpr std::size_t kDigestSize = 16;

std::string type_name(py::handle obj) {
    return Py_TYPE(obj.ptr())->tp_name;
}

// A Py_buffer held for the duration of one call: C-contiguous bytes, optionally writable.
// Acquired and released with the GIL held; only data()/size() are used without it.
class Buffer {
public:
    Buffer(py::handle obj, const std::string& name, bool writable) {
        if (!PyObject_CheckBuffer(obj.ptr())) {
            throw py::type_error(name +
                                 " must support the buffer protocol (bytes, bytearray, "
                                 "memoryview, numpy array), not " +
                                 type_name(obj));
        }
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_STRIDES) != 0)
            throw py::error_already_set();
        held_ = true;
        if (!PyBuffer_IsContiguous(&view_, 'C')) {
            release();
            throw py::value_error(name +
                                  " must be C-contiguous; pass a contiguous copy "
                                  "(e.g. numpy.ascontiguousarray)");
        }
        if (writable && view_.readonly) {
            release();
            throw py::value_error(name + " must be writable, but the " + type_name(obj) +
                                  " given is read-only; pass a bytearray or a writable array");
        }
    }
    Buffer(Buffer&& other) noexcept
        : view_(other.view_), held_(std::exchange(other.held_, false)) {}
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer& operator=(Buffer&&) = delete;
    ~Buffer() { release(); }

    const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(view_.buf); }
    std::uint8_t* mutable_data() const { return static_cast<std::uint8_t*>(view_.buf); }
    std::size_t size() const { return static_cast<std::size_t>(view_.len); }

private:
    void release() {
        if (held_) PyBuffer_Release(&view_);
        held_ = false;
    }

    Py_buffer view_{};
    bool held_ = false;
};

std::vector<Buffer> buffers_of(py::handle seq, const char* name, bool writable) {
    std::vector<Buffer> out;
    const py::list items(py::reinterpret_borrow<py::object>(seq));
    out.reserve(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
        out.emplace_back(items[i], std::string(name) + "[" + std::to_string(i) + "]", writable);
    }
    return out;
}

bool overlap(const Buffer& x, const Buffer& y) {
    return x.size() > 0 && y.size() > 0 && x.data() < y.data() + y.size() &&
           y.data() < x.data() + x.size();
}

void require_same_size(const Buffer& x, const char* xname, const Buffer& y, const char* yname) {
    if (x.size() != y.size()) {
        throw py::value_error(std::string(xname) + " has " + std::to_string(x.size()) +
                              " bytes but " + yname + " has " + std::to_string(y.size()) +
                              "; they must be equal");
    }
}

unsigned resolve_threads(long long threads) {
    if (threads < 0) {
        throw py::value_error("threads must be >= 0 (0 means the default), got " +
                              std::to_string(threads));
    }
    if (threads == 0) return aptckpt::default_threads();
    return static_cast<unsigned>(std::min<long long>(threads, kMaxThreads));
}

std::size_t resolve_chunk_size(long long chunk_size) {
    if (chunk_size < 1)
        throw py::value_error("chunk_size must be >= 1, got " + std::to_string(chunk_size));
    return static_cast<std::size_t>(chunk_size);
}

// A bytes object of `size` bytes to be filled in place (before anyone else can see it).
py::bytes new_bytes(std::size_t size, char** data) {
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
    if (obj == nullptr) throw py::error_already_set();
    *data = PyBytes_AS_STRING(obj);
    return py::reinterpret_steal<py::bytes>(obj);
}

std::size_t chunk_count(std::size_t size, std::size_t chunk) {
    return size / chunk + (size % chunk != 0);
}

void hash_chunk(const Buffer& buf, std::size_t chunk, std::size_t i, char* out) {
    const std::size_t start = i * chunk;
    aptckpt::xxh3_128_canonical(buf.data() + start, std::min(chunk, buf.size() - start),
                                reinterpret_cast<std::uint8_t*>(out) + kDigestSize * i);
}

// ---- hashing ----

// Bytes out[begin, end) of an unshuffle, as xxh3_128_produced asks for them.
struct UnshuffleRange {
    const std::uint8_t* src;
    std::size_t size;
    std::size_t itemsize;
    std::uint8_t* out;
};

void unshuffle_ready(void* context, std::size_t begin, std::size_t end) {
    const auto* job = static_cast<const UnshuffleRange*>(context);
    const std::size_t n = job->size / job->itemsize;
    // Whole elements up to `end`, and the trailing bytes once the range reaches them.
    const std::size_t first = std::min(n, (begin + job->itemsize - 1) / job->itemsize);
    const std::size_t last = end == job->size ? n : std::min(n, (end + job->itemsize - 1) / job->itemsize);
    if (last > first || end == job->size) {
        aptckpt::unshuffle_elements(job->src, job->size, job->itemsize, job->out, first, last);
    }
}

py::bytes xxh3_128(py::handle data) {
    const Buffer buf(data, "data", false);
    std::uint8_t digest[kDigestSize];
    {
        py::gil_scoped_release nogil;
        aptckpt::xxh3_128_canonical(buf.data(), buf.size(), digest);
    }
    return py::bytes(reinterpret_cast<const char*>(digest), kDigestSize);
}

py::bytes hash_chunks(py::handle data, long long chunk_size, long long threads) {
    const Buffer buf(data, "data", false);
    const std::size_t chunk = resolve_chunk_size(chunk_size);
    const unsigned nthreads = resolve_threads(threads);
    const std::size_t n = chunk_count(buf.size(), chunk);
    char* out = nullptr;
    py::bytes result = new_bytes(kDigestSize * n, &out);
    {
        py::gil_scoped_release nogil;
        aptckpt::parallel_for(n, nthreads, [&](std::size_t i) { hash_chunk(buf, chunk, i, out); });
    }
    return result;
}

py::list hash_chunks_many(py::handle buffers, long long chunk_size, long long threads) {
    const std::vector<Buffer> bufs = buffers_of(buffers, "buffers", false);
    const std::size_t chunk = resolve_chunk_size(chunk_size);
    const unsigned nthreads = resolve_threads(threads);
    py::list results;
    std::vector<char*> outs(bufs.size());
    std::vector<std::pair<std::size_t, std::size_t>> tasks;  // (buffer, chunk) over all buffers
    for (std::size_t b = 0; b < bufs.size(); ++b) {
        const std::size_t n = chunk_count(bufs[b].size(), chunk);
        results.append(new_bytes(kDigestSize * n, &outs[b]));
        for (std::size_t i = 0; i < n; ++i) tasks.emplace_back(b, i);
    }
    {
        py::gil_scoped_release nogil;
        aptckpt::parallel_for(tasks.size(), nthreads, [&](std::size_t t) {
            const auto [b, i] = tasks[t];
            hash_chunk(bufs[b], chunk, i, outs[b]);
        });
    }
    return results;
}

// ---- byte transforms ----

void check_shuffle_args(const Buffer& src, long long itemsize, const Buffer& out) {
    if (itemsize < 1)
        throw py::value_error("itemsize must be >= 1, got " + std::to_string(itemsize));
    require_same_size(out, "out", src, "src");
    if (overlap(src, out))
        throw py::value_error("out must not overlap src; pass a separate buffer");
}

void shuffle(py::handle src, long long itemsize, py::handle out) {
    const Buffer in(src, "src", false);
    const Buffer dst(out, "out", true);
    check_shuffle_args(in, itemsize, dst);
    py::gil_scoped_release nogil;
    aptckpt::shuffle(in.data(), in.size(), static_cast<std::size_t>(itemsize), dst.mutable_data());
}

void unshuffle(py::handle src, long long itemsize, py::handle out) {
    const Buffer in(src, "src", false);
    const Buffer dst(out, "out", true);
    check_shuffle_args(in, itemsize, dst);
    py::gil_scoped_release nogil;
    aptckpt::unshuffle(in.data(), in.size(), static_cast<std::size_t>(itemsize),
                       dst.mutable_data());
}

// Bytes of output unshuffled per step before the hash reads them (they are still in L1/L2).
constexpr std::size_t kUnshuffleHashSegment = 32 << 10;

py::bytes unshuffle_hash(py::handle src, long long itemsize, py::handle out) {
    const Buffer in(src, "src", false);
    const Buffer dst(out, "out", true);
    check_shuffle_args(in, itemsize, dst);
    std::uint8_t digest[kDigestSize];
    {
        py::gil_scoped_release nogil;
        UnshuffleRange job{in.data(), in.size(), static_cast<std::size_t>(itemsize),
                           dst.mutable_data()};
        aptckpt::xxh3_128_store(aptckpt::xxh3_128_produced(dst.mutable_data(), dst.size(),
                                                           kUnshuffleHashSegment,
                                                           unshuffle_ready, &job),
                                digest);
    }
    return py::bytes(reinterpret_cast<const char*>(digest), kDigestSize);
}

void xor_(py::handle a, py::handle b, py::handle out) {
    const Buffer x(a, "a", false);
    const Buffer y(b, "b", false);
    const Buffer dst(out, "out", true);
    require_same_size(x, "a", y, "b");
    require_same_size(dst, "out", x, "a");
    for (const Buffer* in : {&x, &y}) {
        if (overlap(*in, dst) && in->data() != dst.data()) {
            throw py::value_error("out must be a, b, or a buffer overlapping neither");
        }
    }
    py::gil_scoped_release nogil;
    aptckpt::xor_bytes(x.data(), y.data(), x.size(), dst.mutable_data());
}

// ---- positional I/O ----

std::vector<std::uint64_t> offsets_of(py::handle offsets, const std::vector<Buffer>& bufs) {
    const py::list items(py::reinterpret_borrow<py::object>(offsets));
    if (items.size() != bufs.size()) {
        throw py::value_error("got " + std::to_string(bufs.size()) + " buffers but " +
                              std::to_string(items.size()) +
                              " offsets; pass one offset per buffer");
    }
    std::vector<std::uint64_t> out;
    for (std::size_t i = 0; i < items.size(); ++i) {
        const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(items[i].ptr()));
        if (!index) throw py::error_already_set();
        int overflow = 0;
        const long long off = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
        if (off == -1 && PyErr_Occurred()) throw py::error_already_set();
        const auto limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
        if (overflow != 0 || off < 0 || bufs[i].size() > limit - static_cast<std::uint64_t>(off)) {
            throw py::value_error("offsets[" + std::to_string(i) +
                                  "]=" + py::str(items[i]).cast<std::string>() +
                                  " is out of range: offset and offset + len(buffer) must be in "
                                  "[0, 2**63 - 1]");
        }
        out.push_back(static_cast<std::uint64_t>(off));
    }
    return out;
}

std::string span_text(std::size_t index, std::size_t size, std::uint64_t offset) {
    return "buffer " + std::to_string(index) + " (" + std::to_string(size) + " bytes at offset " +
           std::to_string(offset) + ")";
}

// OSError(errno, message); Python maps errno to the subclass (FileNotFoundError, ...).
[[noreturn]] void raise_io_error(const char* func, const aptckpt::IoStatus& st, std::size_t size,
                                 std::uint64_t offset) {
    const std::string msg = std::string(func) + ": " + span_text(st.index, size, offset) +
                            " failed after " + std::to_string(st.done) +
                            " bytes: " + std::strerror(st.error);
    const py::object exc = py::reinterpret_borrow<py::object>(PyExc_OSError)(st.error, msg);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    throw py::error_already_set();
}

long long pwrite_many(int fd, py::handle buffers, py::handle offsets, long long threads) {
    const std::vector<Buffer> bufs = buffers_of(buffers, "buffers", false);
    const std::vector<std::uint64_t> offs = offsets_of(offsets, bufs);
    const unsigned nthreads = resolve_threads(threads);
    std::vector<aptckpt::WriteSpan> spans;
    long long total = 0;
    for (std::size_t i = 0; i < bufs.size(); ++i) {
        spans.push_back({bufs[i].data(), bufs[i].size(), offs[i]});
        total += static_cast<long long>(bufs[i].size());
    }
    aptckpt::IoStatus st;
    {
        py::gil_scoped_release nogil;
        st = aptckpt::pwrite_all(fd, spans, nthreads);
    }
    if (!st.ok()) raise_io_error("pwrite_many", st, spans[st.index].size, spans[st.index].offset);
    return total;
}

void pread_many(int fd, py::handle buffers, py::handle offsets, long long threads) {
    const std::vector<Buffer> bufs = buffers_of(buffers, "buffers", true);
    const std::vector<std::uint64_t> offs = offsets_of(offsets, bufs);
    const unsigned nthreads = resolve_threads(threads);
    std::vector<aptckpt::ReadSpan> spans;
    for (std::size_t i = 0; i < bufs.size(); ++i)
        spans.push_back({bufs[i].mutable_data(), bufs[i].size(), offs[i]});
    aptckpt::IoStatus st;
    {
        py::gil_scoped_release nogil;
        st = aptckpt::pread_all(fd, spans, nthreads);
    }
    if (st.ok()) return;
    const aptckpt::ReadSpan& s = spans[st.index];
    if (st.eof) {
        PyErr_SetString(PyExc_EOFError, ("pread_many: " + span_text(st.index, s.size, s.offset) +
                                         " runs past the end of the file, which ends after " +
                                         std::to_string(st.done) + " of its bytes")
                                            .c_str());
        throw py::error_already_set();
    }
    raise_io_error("pread_many", st, s.size, s.offset);
}

py::list read_verify_many(py::handle fds, py::handle buffers, py::handle offsets,
                          py::handle digests, long long threads) {
    const std::vector<Buffer> bufs = buffers_of(buffers, "buffers", true);
    const std::vector<std::uint64_t> offs = offsets_of(offsets, bufs);
    const py::list fd_items(py::reinterpret_borrow<py::object>(fds));
    if (fd_items.size() != bufs.size()) {
        throw py::value_error("got " + std::to_string(bufs.size()) + " buffers but " +
                              std::to_string(fd_items.size()) +
                              " file descriptors; pass one per buffer");
    }
    const std::uint8_t* expected = nullptr;
    std::unique_ptr<Buffer> digest_buf;
    if (!digests.is_none()) {
        digest_buf = std::make_unique<Buffer>(digests, "digests", false);
        if (digest_buf->size() != kDigestSize * bufs.size()) {
            throw py::value_error("digests has " + std::to_string(digest_buf->size()) +
                                  " bytes; it must hold 16 per buffer (" +
                                  std::to_string(kDigestSize * bufs.size()) + ")");
        }
        expected = digest_buf->data();
    }
    const unsigned nthreads = resolve_threads(threads);
    std::vector<aptckpt::CheckedSpan> spans;
    spans.reserve(bufs.size());
    for (std::size_t i = 0; i < bufs.size(); ++i) {
        const int fd = fd_items[i].cast<int>();
        spans.push_back({fd, bufs[i].mutable_data(), bufs[i].size(), offs[i],
                         expected ? expected + kDigestSize * i : nullptr});
    }
    std::vector<aptckpt::SpanProblem> problems;
    aptckpt::IoStatus st;
    {
        py::gil_scoped_release nogil;
        st = aptckpt::read_verify_all(spans, nthreads, &problems);
    }
    if (!st.ok()) {
        raise_io_error("read_verify_many", st, spans[st.index].size, spans[st.index].offset);
    }
    py::list out;
    for (const aptckpt::SpanProblem& p : problems) {
        out.append(py::make_tuple(p.index, p.kind == aptckpt::SpanProblem::eof ? "eof" : "digest"));
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() =
        "Compiled core of aptckpt (XXH3-128, shuffle, xor, parallel pwrite/pread). "
        "Use it through aptckpt._accel; aptckpt._pyimpl is its pure-Python twin.";
    m.def("xxh3_128", &xxh3_128, py::arg("data"),
          "16-byte XXH3-128 digest (seed 0), canonical big-endian, as xxhash.xxh3_128_digest.");
    m.def("hash_chunks", &hash_chunks, py::arg("data"), py::arg("chunk_size"),
          py::arg("threads") = 0,
          "Concatenated XXH3-128 digests of each chunk_size slice of data (last may be shorter).");
    m.def("hash_chunks_many", &hash_chunks_many, py::arg("buffers"), py::arg("chunk_size"),
          py::arg("threads") = 0, "hash_chunks of each buffer, all chunks hashed in parallel.");
    m.def("shuffle", &shuffle, py::arg("src"), py::arg("itemsize"), py::arg("out"),
          "Byte shuffle: out[b*n + i] = src[i*itemsize + b]; trailing bytes copied unchanged.");
    m.def("unshuffle", &unshuffle, py::arg("src"), py::arg("itemsize"), py::arg("out"),
          "Inverse of shuffle.");
    m.def("unshuffle_hash", &unshuffle_hash, py::arg("src"), py::arg("itemsize"), py::arg("out"),
          "unshuffle(src, itemsize, out), then return xxh3_128(out), in one pass over out.");
    m.def("xor", &xor_, py::arg("a"), py::arg("b"), py::arg("out"),
          "out[i] = a[i] ^ b[i]; equal lengths; out may be a or b.");
    m.def("pwrite_many", &pwrite_many, py::arg("fd"), py::arg("buffers"), py::arg("offsets"),
          py::arg("threads") = 0,
          "Write each buffer at its offset in parallel; return the byte count.");
    m.def("pread_many", &pread_many, py::arg("fd"), py::arg("buffers"), py::arg("offsets"),
          py::arg("threads") = 0, "Fill each writable buffer from its offset in parallel.");
    m.def("read_verify_many", &read_verify_many, py::arg("fds"), py::arg("buffers"),
          py::arg("offsets"), py::arg("digests") = py::none(), py::arg("threads") = 0,
          "Fill each buffer from its offset of fds[i] in parallel (adjacent spans share one "
          "preadv) and check it against its 16 bytes of digests; return [(index, 'eof' | "
          "'digest')] for the spans cut short or not matching.");
    m.def("default_threads", &aptckpt::default_threads,
          "Default worker count: $APTCKPT_THREADS if >= 1, else the usable CPUs.");
    m.def("simd", &aptckpt::xxh3_simd,
          "Instruction set of the hash loop: 'avx2', 'sse2' or 'scalar'.");
}
