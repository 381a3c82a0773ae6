// triatt-pool.h: the scorer's small persistent thread pool (no llama.cpp dependency).
//
// run(n_tasks, fn, ctx) calls fn(ctx, task, thread) for every task, on the caller's thread (thread 0)
// and the pool's workers, and returns when all are done. Workers persist between runs, so a round
// of scoring starts no threads. Not thread-safe: one caller at a time.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

typedef void (*triatt_task_fn)(void * ctx, int64_t task, int thread);

class triatt_pool {
public:
    ~triatt_pool() { stop(); }

    int n_threads() const { return (int) workers.size() + 1; }

    void resize(int n_threads) {
        n_threads = std::max(1, n_threads);
        if (n_threads == this->n_threads()) {
            return;
        }
        stop();
        quit = false;
        // new workers wait for the next job: starting from generation 0 they would run the
        // finished last one again (stale job, and a second decrement of n_active)
        const uint64_t seen = generation;
        for (int i = 1; i < n_threads; ++i) {
            workers.emplace_back([this, i, seen] { loop(i, seen); });
        }
    }

    void run(int64_t n_tasks, triatt_task_fn fn, void * ctx) {
        if (workers.empty() || n_tasks <= 1) {
            for (int64_t t = 0; t < n_tasks; ++t) {
                fn(ctx, t, 0);
            }
            return;
        }
        {
            std::lock_guard<std::mutex> lk(m);
            job_fn   = fn;
            job_ctx  = ctx;
            job_n    = n_tasks;
            next.store(0, std::memory_order_relaxed);
            n_active = (int) workers.size();
            ++generation;
        }
        cv.notify_all();
        work(0);
        std::unique_lock<std::mutex> lk(m);
        done_cv.wait(lk, [this] { return n_active == 0; });
    }

private:
    void stop() {
        {
            std::lock_guard<std::mutex> lk(m);
            quit = true;
        }
        cv.notify_all();
        for (auto & w : workers) {
            w.join();
        }
        workers.clear();
    }

    void work(int thread) {
        for (;;) {
            const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
            if (t >= job_n) {
                break;
            }
            job_fn(job_ctx, t, thread);
        }
    }

    void loop(int thread, uint64_t seen) {
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(m);
                cv.wait(lk, [&] { return quit || generation != seen; });
                if (quit) {
                    return;
                }
                seen = generation;
            }
            work(thread);
            {
                std::lock_guard<std::mutex> lk(m);
                if (--n_active == 0) {
                    done_cv.notify_one();
                }
            }
        }
    }

    std::vector<std::thread> workers;
    std::mutex               m;
    std::condition_variable  cv;
    std::condition_variable  done_cv;
    bool                     quit       = false;
    uint64_t                 generation = 0;
    int                      n_active   = 0;
    triatt_task_fn           job_fn     = nullptr;
    void *                   job_ctx    = nullptr;
    int64_t                  job_n      = 0;
    std::atomic<int64_t>     next{0};
};
