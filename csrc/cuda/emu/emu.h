// A CPU emulator for the small subset of CUDA that csrc/cuda's kernels use, for testing them on machines
// without a GPU (tests/test_cuda.py with LINATTN_TEST_EMULATE=1). Not part of the built extension.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches a
// barrier (__syncthreads, a warp-collective shuffle or mma); the scheduler then resumes the others, in a
// random order per pass, so a missing __syncthreads shows up as a wrong or run-to-run varying result.
// Divergent barriers (some threads never arrive) are detected and reported as an error. Shared memory is
// filled with NaN bytes before each block, so reads of unwritten shared memory poison the outputs.
// Warp collectives follow the PTX ISA: shfl.sync and mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <vector_types.h>  // dim3, uint3 (the CUDA toolkit's host-compilable definitions)

namespace emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  long generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  bool done = false;
  const Barrier* waiting_on = nullptr;  // the barrier this fiber waits at (nullptr: runnable)
  long waiting_generation = 0;
};

struct Block {
  dim3 grid, block;
  uint3 bid;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // [2 buffers][warp][lane][8 words]
  std::vector<long> warp_epoch;      // per warp: collectives done (selects the buffer)
  std::vector<unsigned char> smem;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  long progress = 0;
  std::function<void()>* body = nullptr;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline std::mt19937& rng() {
  static std::mt19937 gen(12345);
  return gen;
}

inline std::vector<std::vector<char>>& stacks() {
  static std::vector<std::vector<char>> pool;
  return pool;
}

constexpr size_t kStackBytes = 256 * 1024;

inline void yield() {
  Block* b = current_block();
  swapcontext(&b->current->ctx, &b->scheduler);
}

inline void fiber_entry() {
  Block* b = current_block();
  (*b->body)();
  b->current->done = true;
  b->progress++;
  // returning resumes uc_link (the scheduler)
}

inline void barrier_wait(Barrier& bar) {
  Block* b = current_block();
  const long gen = bar.generation;
  b->progress++;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    bar.generation++;
    yield();  // let the scheduler pick who runs first after the barrier
    return;
  }
  Fiber* f = b->current;
  f->waiting_on = &bar;
  f->waiting_generation = gen;
  while (bar.generation == gen) yield();
  f->waiting_on = nullptr;
}

inline void syncthreads() { barrier_wait(current_block()->block_barrier); }

inline int linear_tid() { return current_block()->current->linear; }

inline void syncwarp() {
  Block* b = current_block();
  barrier_wait(b->warp_barriers[linear_tid() / 32]);
}

// Warp collectives exchange values through per-lane slots, double-buffered by the warp's collective count:
// a lane can only start collective n + 2 after every lane arrived at n + 1, i.e. finished reading n.
inline uint64_t* warp_slot(int warp, int lane, long epoch) {
  Block* b = current_block();
  const size_t nwarps = b->warp_barriers.size();
  return b->warp_slots.data() + ((static_cast<size_t>(epoch & 1) * nwarps + warp) * 32 + lane) * 8;
}

// Deposits this lane's words, waits for the whole warp, returns the epoch whose slots to read.
inline long warp_exchange(const uint64_t* words, int n) {
  Block* b = current_block();
  const int tid = linear_tid(), warp = tid / 32, lane = tid % 32;
  const long epoch = b->warp_epoch[tid]++;
  uint64_t* slot = warp_slot(warp, lane, epoch);
  for (int i = 0; i < n; ++i) slot[i] = words[i];
  barrier_wait(b->warp_barriers[warp]);
  return epoch;
}

template <class T>
T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shfl of values up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const long epoch = warp_exchange(&bits, 1);
  const uint64_t got = warp_slot(linear_tid() / 32, src_lane & 31, epoch)[0];
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

template <class T>
T shfl_xor(T v, int lane_mask) {
  return shfl(v, (linear_tid() % 32) ^ lane_mask);
}

inline float tf32_value(uint32_t bits) {  // the tensor core ignores the 13 low mantissa bits
  bits &= 0xffffe000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d = a * b + d, fragment layout from the PTX ISA:
// groupID g = lane / 4, threadID_in_group t = lane % 4;
// A (16x8): a_r holds (row g + 8*(r%2), col t + 4*(r/2)); B (8x8): b_r holds (row t + 4*r, col g);
// C/D (16x8): c_r holds (row g + 8*(r/2), col 2*t + r%2).
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int tid = linear_tid(), warp = tid / 32, lane = tid % 32;
  const uint64_t words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const long epoch = warp_exchange(words, 6);
  const int g = lane / 4, t = lane % 4;
  float res[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    double acc = d[r];
    for (int kk = 0; kk < 8; ++kk) {
      const int a_lane = (row % 8) * 4 + kk % 4, a_reg = (row / 8) + 2 * (kk / 4);
      const int b_lane = col * 4 + kk % 4, b_reg = kk / 4;
      const float av = tf32_value(static_cast<uint32_t>(warp_slot(warp, a_lane, epoch)[a_reg]));
      const float bv = tf32_value(static_cast<uint32_t>(warp_slot(warp, b_lane, epoch)[4 + b_reg]));
      acc += static_cast<double>(av) * static_cast<double>(bv);
    }
    res[r] = static_cast<float>(acc);
  }
  for (int r = 0; r < 4; ++r) d[r] = res[r];
}

inline void* shared_memory() { return current_block()->smem.data(); }

// Runs body() as every thread of every block of the grid, one block at a time.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (grid.x * grid.y * grid.z == 0 || nthreads == 0) return;
  if (nthreads % 32 != 0) throw std::runtime_error("emu: block size must be a multiple of 32");
  auto& pool = stacks();
  while (static_cast<int>(pool.size()) < nthreads) pool.emplace_back(kStackBytes);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.grid = grid;
        b.block = block;
        b.bid = uint3{bx, by, bz};
        b.nthreads = nthreads;
        b.body = &body;
        b.block_barrier.expected = nthreads;
        b.warp_barriers.resize(nthreads / 32);
        for (auto& w : b.warp_barriers) w.expected = 32;
        b.warp_slots.assign(static_cast<size_t>(nthreads) * 8 * 2, 0);
        b.warp_epoch.assign(nthreads, 0);
        b.smem.assign(smem_bytes + 16, 0xff);  // 0xff bytes: NaN as float and double
        b.fibers.resize(nthreads);
        current_block() = &b;
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = b.fibers[i];
          f.linear = i;
          f.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                        static_cast<unsigned>(i / (block.x * block.y))};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = pool[i].data();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        std::vector<int> order(nthreads);
        std::iota(order.begin(), order.end(), 0);
        // Warps run at different random speeds (a warp is resumed in a pass with probability speed[w]), so
        // that a missing __syncthreads between warps that write and read the same shared memory shows up.
        const int nwarps = nthreads / 32;
        std::vector<double> speed(nwarps);
        static const double kSpeeds[] = {1.0, 0.5, 0.25};
        for (auto& s : speed) s = kSpeeds[rng()() % 3];
        std::uniform_real_distribution<double> coin(0.0, 1.0);
        std::vector<char> run_warp(nwarps);
        std::string error;
        for (;;) {
          std::shuffle(order.begin(), order.end(), rng());
          bool skipped = false;
          for (int w = 0; w < nwarps; ++w) {
            run_warp[w] = coin(rng()) < speed[w];
            skipped |= !run_warp[w];
          }
          const long before = b.progress;
          bool alive = false;
          for (int i : order) {
            Fiber& f = b.fibers[i];
            if (f.done) continue;
            alive = true;
            if (!run_warp[i / 32]) continue;
            if (f.waiting_on != nullptr && f.waiting_on->generation == f.waiting_generation) continue;  // blocked
            b.current = &f;
            swapcontext(&b.scheduler, &f.ctx);
          }
          if (!alive) break;
          if (b.progress == before && !skipped) {
            int finished = 0;
            for (auto& f : b.fibers) finished += f.done;
            error = "emu: deadlock in block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                    std::to_string(bz) + "): threads wait at a barrier that " + std::to_string(finished) +
                    " finished threads never reach (divergent __syncthreads or warp collective)";
            break;
          }
        }
        current_block() = nullptr;
        if (!error.empty()) throw std::runtime_error(error);
      }
}

}  // namespace emu

// The CUDA built-in variables of the running fiber.
#define threadIdx (::emu::current_block()->current->tid)
#define blockIdx (::emu::current_block()->bid)
#define blockDim (::emu::current_block()->block)
#define gridDim (::emu::current_block()->grid)
