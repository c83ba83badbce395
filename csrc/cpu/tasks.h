// The (sequence, head) tasks of a call and their scheduling over threads, shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

namespace linattn_cuda {
namespace cpu {
namespace {  // internal linkage: every kernel file has its own copy

// The shape of one (sequence, head) task; pointers are to contiguous rows of type T.
struct Shape {
  int64_t batch, heads, lq, lk, d, dv;
};

// ---------------------------------------------------------------------------------------------------------
// The independent problems a call holds: `seqs` sequences (the batch of a [B, H, L, *] call, or the packed
// sequences of a varlen call), each with `heads` query heads and `kv_heads` key/value heads; query head h reads
// key/value head h / (heads / kv_heads) (grouped-query attention, SDPA's convention).
// Buffers are head-major matrices of contiguous rows: the rows (tokens) of sequence n, head h start at row
// start[n] + h * head_stride. Dense [B, H, L, *]: start[b] = b H L, head_stride = L. Packed [T, H, *] tensors are
// transposed to [H, T, *] first: start[n] = cu_seqlens[n], head_stride = T.
// Which algorithm and chunk size a task runs (make_plan in taylor_cpu.cpp chooses).
struct Plan {
  bool quadratic;  // quadratic form over all visible keys (blocks of `chunk` queries), else the linear form
  int chunk;       // tokens per chunk
};

struct Rows {
  std::vector<int64_t> start, len;
  int64_t head_stride = 0;
  int64_t row(int64_t n, int64_t h) const { return start[n] + h * head_stride; }
};

struct Tasks {
  int64_t seqs = 0, heads = 0, kv_heads = 0, d = 0, dv = 0;
  Rows q, k;  // k's rows also index v, dk and dv
  int64_t group() const { return kv_heads > 0 ? heads / kv_heads : 1; }
  Shape shape(int64_t n, int64_t dv_part) const { return {1, 1, q.len[n], k.len[n], d, dv_part}; }
};

inline Rows dense_rows(int64_t batch, int64_t heads, int64_t len) {
  Rows r;
  r.head_stride = len;
  for (int64_t b = 0; b < batch; ++b) {
    r.start.push_back(b * heads * len);
    r.len.push_back(len);
  }
  return r;
}

// q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (checked by describe_problem)
inline Tasks dense_tasks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Tasks p;
  p.seqs = q.size(0), p.heads = q.size(1), p.kv_heads = k.size(1), p.d = q.size(3), p.dv = v.size(3);
  p.q = dense_rows(p.seqs, p.heads, q.size(2));
  p.k = dense_rows(p.seqs, p.kv_heads, k.size(2));
  return p;
}

// The sequences of a packed [total, heads, *] tensor from its cu_seqlens (int32 [N + 1], 0 = cu[0] <= ... <=
// cu[N] = total).
inline Rows packed_rows(const at::Tensor& cu, int64_t total, const char* name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, " must be an int32 tensor, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must have shape [N + 1], got ", cu.sizes());
  TORCH_CHECK(cu.device().is_cpu(), name, " must be a CPU tensor, got ", cu.device());
  const at::Tensor c = cu.contiguous();
  const int32_t* x = c.data_ptr<int32_t>();
  const int64_t count = c.size(0);
  TORCH_CHECK(x[0] == 0, name, " must start at 0, got ", x[0]);
  Rows r;
  r.head_stride = total;
  for (int64_t n = 0; n + 1 < count; ++n) {
    TORCH_CHECK(x[n + 1] >= x[n], name, " must be non-decreasing, got ", x[n], " then ", x[n + 1], " at index ", n + 1);
    r.start.push_back(x[n]);
    r.len.push_back(x[n + 1] - x[n]);
  }
  TORCH_CHECK(x[count - 1] == total, name, " must end at the number of tokens (", total, "), got ", x[count - 1]);
  return r;
}

// q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] (checked) and their cu_seqlens.
inline Tasks packed_tasks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                          const at::Tensor& cu_k, bool causal) {
  Tasks p;
  p.heads = q.size(1), p.kv_heads = k.size(1), p.d = q.size(2), p.dv = v.size(2);
  p.q = packed_rows(cu_q, q.size(0), "cu_seqlens_q");
  p.k = packed_rows(cu_k, k.size(0), "cu_seqlens_k");
  p.seqs = static_cast<int64_t>(p.q.len.size());
  TORCH_CHECK(p.k.len.size() == p.q.len.size(), "cu_seqlens_k must have the length of cu_seqlens_q (",
              cu_q.size(0), "), got ", cu_k.size(0));
  for (int64_t n = 0; causal && n < p.seqs; ++n)
    TORCH_CHECK(p.q.len[n] <= p.k.len[n], "causal attention needs Lq <= Lk (end-aligned) in every sequence; sequence ",
                n, " has ", p.q.len[n], " queries and ", p.k.len[n], " keys");
  return p;
}

// x with dims 0 and 1 swapped, contiguous, in dtype dt (one copy): a packed [T, H, *] tensor as the head-major
// [H, T, *] buffer of the kernels, and back.
inline at::Tensor swap_01(const at::Tensor& x, at::ScalarType dt) {
  std::vector<int64_t> sizes = x.sizes().vec();
  std::swap(sizes[0], sizes[1]);
  at::Tensor y = at::empty(sizes, x.options().dtype(dt));
  y.copy_(x.transpose(0, 1));
  return y;
}
inline at::Tensor head_major(const at::Tensor& x, at::ScalarType acc) { return swap_01(x, acc); }
inline at::Tensor token_major(const at::Tensor& x, at::ScalarType dt) { return swap_01(x, dt); }

// ---------------------------------------------------------------------------------------------------------
// The value columns of a head in `count` blocks of `width` (the last one may be narrower): one block when there
// are at least as many tasks as threads, else enough blocks of >= 16 columns to give every thread work (each
// block recomputes what does not depend on the value columns).
struct ColumnSplit {
  int64_t count, width, dv;
  int64_t start(int64_t block) const { return block * width; }
  int64_t size(int64_t block) const { return std::min(width, dv - block * width); }
};

inline ColumnSplit column_split(int64_t tasks, int64_t dv) {
  const int64_t threads = at::get_num_threads();
  const int64_t count = tasks >= threads || tasks == 0
                            ? 1
                            : std::min<int64_t>((threads + tasks - 1) / tasks, std::max<int64_t>(1, dv / 16));
  return {count, (dv + count - 1) / count, dv};
}

// fn(n, h, block) for every (sequence, head of `heads`, column block) in parallel; block 0 always runs (even when
// Dv = 0). Threads take tasks from a shared counter, longest sequences first, so that packed sequences of unequal
// lengths keep every thread busy to the end.
template <typename F>
void for_each_task(const Tasks& p, int64_t heads, const ColumnSplit& cs, F fn) {
  const int64_t per_seq = heads * cs.count, total = p.seqs * per_seq;
  if (total == 0) return;
  std::vector<int64_t> order(p.seqs);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return p.q.len[a] + p.k.len[a] > p.q.len[b] + p.k.len[b]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), total);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < total; t = next.fetch_add(1)) {
        const int64_t n = order[t / per_seq], rest = t % per_seq, block = rest % cs.count;
        if (block == 0 || cs.size(block) > 0) fn(n, rest / cs.count, block);
      }
    }
  });
}

inline const bool* mask_ptr(const at::Tensor& mask, int64_t b, int64_t lk) {
  return mask.defined() ? mask.data_ptr<bool>() + b * lk : nullptr;
}

}  // namespace
}  // namespace cpu
}  // namespace linattn_cuda
