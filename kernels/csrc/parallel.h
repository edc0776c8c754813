// parallel_chunks: how the products split their output channels between threads (linear.cpp).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace cpu_llm {

constexpr int64_t kChunksPerThread = 8;

// fn(begin, end) over [0, n) in chunks of at least `grain`, about kChunksPerThread per thread.
// Each thread owns an equal run of chunks and reads it front to back, as at::parallel_for's
// static split would; a thread done with its run takes the next chunks of the others' (work
// stealing through one counter per run). Why: on a shared host two equal halves rarely finish
// together (one thread's reads are slowed by a neighbour, or it is descheduled) and the other
// waits at the join, 14 % of both threads' samples in a profile of SmolLM2 WoQ INT8 decode on
// the 2-core VM. Measured there, alternating builds: decode step median 3 % shorter. Handing
// out chunks from one shared counter instead (llama.cpp's way) was 8 % slower: the threads'
// reads interleave and the counter's cache line moves at every chunk. Each output element is
// still computed whole by one thread between the same chunk boundaries, so results do not
// depend on which thread took which chunk.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t chunk = std::max(grain, (n + kChunksPerThread * threads - 1) / (kChunksPerThread * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (threads == 1 || chunks == 1) {
    fn(0, n);
    return;
  }
  const int64_t teams = std::min(threads, chunks);
  // Thread t owns chunks [t * chunks / teams, (t + 1) * chunks / teams) and takes them front to
  // back (one long contiguous read, as a static split); done, it takes the others' next ones.
  struct alignas(64) Counter {  // one cache line each: a thread's own counter stays in its cache
    std::atomic<int64_t> next;
  };
  Counter on_stack[16];  // a decode step makes ~150 of these calls: no heap allocation for up to 16 threads
  std::vector<Counter> on_heap(teams > 16 ? teams : 0);
  Counter* counters = teams > 16 ? on_heap.data() : on_stack;
  for (int64_t t = 0; t < teams; ++t) counters[t].next.store(t * chunks / teams, std::memory_order_relaxed);
  at::parallel_for(0, teams, 1, [&](int64_t first, int64_t) {
    for (int64_t k = 0; k < teams; ++k) {
      const int64_t t = (first + k) % teams, last = (t + 1) * chunks / teams;
      std::atomic<int64_t>& next = counters[t].next;
      for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < last;
           c = next.fetch_add(1, std::memory_order_relaxed)) {
        fn(c * chunk, std::min(n, (c + 1) * chunk));
      }
    }
  });
}

}  // namespace cpu_llm
