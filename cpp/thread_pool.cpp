// Process-wide worker pool behind parallel_for (contract in thread_pool.hpp).
//
// Each parallel_for call becomes a Job: an atomic "next index" counter that the caller and any
// helping workers pull from. Pulling indices one at a time balances uneven tasks; a static split
// into equal ranges was rejected because chunk costs differ (I/O, cache misses). The caller always
// works on its own job, so a call completes even when every worker is busy with other callers'
// jobs or thread creation failed. Workers are detached and the pool is leaked on purpose: joining
// threads at interpreter exit risks hanging on a blocked worker, and destroying a mutex a worker
// still waits on is undefined.
#include "thread_pool.hpp"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

namespace aptckpt {
namespace {

// APTCKPT_THREADS values are clamped here only so the arithmetic cannot overflow; parallel_for
// clamps again to kMaxThreads.
constexpr unsigned long kEnvCap = 1UL << 20;

struct Job {
    Job(std::size_t count, const std::function<void(std::size_t)>& task, unsigned helpers)
        : n(count), fn(task), helpers_wanted(helpers) {}

    const std::size_t n;
    const std::function<void(std::size_t)>& fn;  // the caller's; outlives every fn(i) call
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> finished{0};
    unsigned helpers_wanted;  // workers that may still join; guarded by Pool::mu_
    std::mutex mu;            // guards error; pairs with done
    std::condition_variable done;
    std::exception_ptr error;
};

void run_tasks(Job& job) {
    for (;;) {
        const std::size_t i = job.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= job.n) return;
        try {
            job.fn(i);
        } catch (...) {
            std::lock_guard<std::mutex> lock(job.mu);
            if (!job.error) job.error = std::current_exception();
        }
        if (job.finished.fetch_add(1, std::memory_order_acq_rel) + 1 == job.n) {
            std::lock_guard<std::mutex> lock(job.mu);
            job.done.notify_all();
        }
    }
}

class Pool {
public:
    // Offers `job` to up to `helpers` workers, starting workers if fewer exist.
    void submit(const std::shared_ptr<Job>& job, unsigned helpers) {
        std::lock_guard<std::mutex> lock(mu_);
        grow(helpers);
        queue_.push_back(job);
        cv_.notify_all();
    }

    // Stops offering `job` (its caller has claimed every index already).
    void withdraw(const Job* job) {
        std::lock_guard<std::mutex> lock(mu_);
        const auto it =
            std::find_if(queue_.begin(), queue_.end(),
                         [job](const std::shared_ptr<Job>& j) { return j.get() == job; });
        if (it != queue_.end()) queue_.erase(it);
    }

private:
    void grow(unsigned wanted) {  // mu_ held
        while (workers_ < wanted) {
            try {
                std::thread([this] { work(); }).detach();
            } catch (const std::system_error&) {
                return;  // out of threads: callers still finish their jobs alone
            }
            ++workers_;
        }
    }

    [[noreturn]] void work() {
        for (;;) {
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [this] { return !queue_.empty(); });
                job = queue_.front();
                if (--job->helpers_wanted == 0) queue_.pop_front();
            }
            run_tasks(*job);
        }
    }

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Job>> queue_;
    unsigned workers_ = 0;
};

// The pool of this process. Fork handlers hold g_pool_mu across fork() so the child sees a
// consistent pointer, then drop the parent's pool in the child (its workers were not copied).
std::mutex g_pool_mu;
Pool* g_pool = nullptr;

void before_fork() {
    g_pool_mu.lock();
}
void after_fork_parent() {
    g_pool_mu.unlock();
}
void after_fork_child() {
    g_pool = nullptr;  // leaked: its mutexes may be held by threads that no longer exist
    g_pool_mu.unlock();
}
const int g_atfork_registered = pthread_atfork(before_fork, after_fork_parent, after_fork_child);

Pool& pool() {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (g_pool == nullptr) g_pool = new Pool;
    return *g_pool;
}

// Parses like Python's int() on ASCII text: blanks around, an optional sign, digits with single
// underscores between them. Returns 0 for anything else or a value below 1.
unsigned long parse_positive(const char* raw) {
    std::string s(raw);
    const char* blanks = " \t\n\r\f\v";
    const auto first = s.find_first_not_of(blanks);
    if (first == std::string::npos) return 0;
    s = s.substr(first, s.find_last_not_of(blanks) - first + 1);
    std::size_t i = 0;
    bool negative = false;
    if (s[0] == '+' || s[0] == '-') negative = s[i++] == '-';
    unsigned long value = 0;
    bool digit_before = false;
    for (; i < s.size(); ++i) {
        const char c = s[i];
        if (c == '_' && digit_before && i + 1 < s.size() && s[i + 1] != '_') continue;
        if (c < '0' || c > '9') return 0;
        digit_before = true;
        value = std::min<unsigned long>(kEnvCap, value * 10 + static_cast<unsigned long>(c - '0'));
    }
    return negative || !digit_before ? 0 : value;
}

unsigned usable_cpus() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) {
        return static_cast<unsigned>(CPU_COUNT(&set));
    }
    const unsigned online = std::thread::hardware_concurrency();  // > 1024 CPUs, or not Linux
    return online == 0 ? 1 : online;
}

}  // namespace

unsigned default_threads() {
    const char* raw = std::getenv("APTCKPT_THREADS");
    const unsigned long value = raw == nullptr ? 0 : parse_positive(raw);
    return value >= 1 ? static_cast<unsigned>(value) : usable_cpus();
}

void parallel_for(std::size_t n, unsigned threads, const std::function<void(std::size_t)>& fn) {
    if (n == 0) return;
    if (threads == 0) threads = default_threads();
    const std::size_t width = std::min<std::size_t>({n, threads, kMaxThreads});
    const auto helpers = static_cast<unsigned>(width - 1);
    const auto job = std::make_shared<Job>(n, fn, helpers);
    if (helpers > 0) {
        Pool& p = pool();
        p.submit(job, helpers);
        run_tasks(*job);
        p.withdraw(job.get());
    } else {
        run_tasks(*job);
    }
    std::unique_lock<std::mutex> lock(job->mu);
    job->done.wait(lock, [&] { return job->finished.load(std::memory_order_acquire) == n; });
    if (job->error) std::rethrow_exception(job->error);
}

}  // namespace aptckpt
