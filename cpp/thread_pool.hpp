// One process-wide pool of worker threads for the native core.
//
// Contract: parallel_for(n, threads, fn) calls fn(i) exactly once for every i in [0, n), on at most
// `threads` threads counting the caller, which always takes part; it returns when every call has
// finished and rethrows the first exception any call threw. Any number of threads may call it at
// once: each call is an independent job sharing the same workers. Workers start lazily, grow to
// the largest parallelism asked for (capped at kMaxThreads) and are never joined. A forked child
// starts from an empty pool, because the parent's workers do not exist in it.
#pragma once

#include <cstddef>
#include <functional>

namespace aptckpt {

// Upper bound on the threads one parallel_for uses; larger requests are clamped.
constexpr unsigned kMaxThreads = 256;

// The default parallelism, the same as aptckpt._config.threads(): $APTCKPT_THREADS when it reads
// as an integer >= 1 (as Python's int() reads it), else the CPUs this process may run on.
unsigned default_threads();

// threads == 0 means default_threads().
void parallel_for(std::size_t n, unsigned threads, const std::function<void(std::size_t)>& fn);

}  // namespace aptckpt
