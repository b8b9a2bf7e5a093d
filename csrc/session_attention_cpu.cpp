// Native CPU session attention, forward and backward (convret issue 3).
//
// The mask is one int32 per key, mask_start[b, j]: query row q sees key j iff j <= q < mask_start[b, j].
// Per key tile, tile_min / tile_max of mask_start (SessionLayout.tile_bounds) classify
// each (query tile, key tile) pair as skipped (never touched), full (no mask arithmetic) or partial.
// A sliding window of w keys (window > 0; 0 = none) also hides key j from row q when q - j >= w: key loops then
// start at the first tile the first query can reach, and the element mask takes the extra bound (a separate
// loop, so that window-free tiles run the loop they always ran).
//
// Work is split per (batch, kv head): the G query heads of a GQA group are stacked into one [G * rows, D]
// GEMM operand, so every K / V tile is read once per group and every GEMM is G times taller.
//   forward:  one work item per (batch, kv head, query tile), online softmax in fp32, LSE kept;
//   cached prefill forward (query rows at given key positions of a KV cache, no backward): the same work
//             items, over query tiles cut at sample boundaries, each visiting only the key tiles its positions
//             can see;
//   backward: fused, one work item per (batch, kv head) that owns dK / dV of its kv head and dQ of its G
//             query heads (one pass, 5 GEMMs per pair); or split, dK / dV items per (batch, kv head, key tile)
//             then dQ items per (batch, kv head, query tile) (7 GEMMs per pair, at least the forward's item
//             count): the caller picks (see backward_impl). No atomics, deterministic either way.
// Tile GEMMs run through tile_gemm.h (MKL, oneDNN brgemm or an fp32 upcast, picked per 16-bit dtype by a
// probe) with fp32 accumulation. Memory: the stacked copies are O(G * L * D) per thread (split backward:
// O(Q + dO) shared), the score tiles O(rows * block_n); nothing is O(L^2).
#include "cpu_capability.h"  // first: picks at::vec's instruction set

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "tile_gemm.h"

namespace convret {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(item, scratch) for item in [0, num_items) on torch's thread pool (torch.get_num_threads() threads).
// Threads pull items from a shared counter, so a thread that drew cheap items takes more of them (causal work
// per item is uneven). Each thread owns one Scratch, freed when the call returns. MKL called inside the OpenMP
// region runs sequentially on its worker's core (its default for nested parallelism).
template <typename Scratch, typename Fn>
void parallel_items(int64_t num_items, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t item = next++; item < num_items; item = next++) fn(item, scratch);
    }
    release_tile_gemm_context();
  });
}

// A fresh output tensor of tens of MiB is a new mmap: every 4 KiB page faults on first write, and with
// several threads the faults serialise in the kernel (at B = 2, L = 4096 the forward output alone is 64 MiB,
// about 16k faults). Asking for transparent huge pages on the not yet touched buffer cuts that to one fault
// per 2 MiB. Advisory only: a buffer that malloc reused, or a kernel without THP, is left as it is.
// The buffer takes the memory layout of `like` when that is dense (so an output of Hugging Face's [B, L, H, D]
// projections is [B, L, H, D] in memory too, and the caller's transpose back needs no copy); contiguous otherwise.
at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like, at::MemoryFormat::Preserve);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t aligned_begin = (begin + kHuge - 1) & ~(kHuge - 1), aligned_end = end & ~(kHuge - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

enum class TileClass { kSkipped, kFull, kPartial };

struct TileBoundsView {
  const int32_t* min_mask_start;  // [num_key_tiles] of one batch row
  const int32_t* max_mask_start;

  // query rows q_first .. q_last against key tile k_tile; window: a sliding window of that many keys, 0 = none
  TileClass classify(int64_t q_first, int64_t q_last, int64_t k_tile, int64_t block_n, int64_t window) const {
    const int64_t k_first = k_tile * block_n, k_last = k_first + block_n - 1;
    if (k_first > q_last || max_mask_start[k_tile] <= q_first) return TileClass::kSkipped;
    if (window > 0 && k_last <= q_first - window) return TileClass::kSkipped;  // too old for every row
    if (k_last <= q_first && min_mask_start[k_tile] > q_last && (window == 0 || k_first > q_last - window)) {
      return TileClass::kFull;
    }
    return TileClass::kPartial;
  }
};

// The first key tile a query at position q_first can reach: 0, or with a window the tile of key q_first - w + 1.
int64_t first_key_tile(int64_t q_first, int64_t window, int64_t block_n) {
  return window > 0 ? std::max<int64_t>(0, q_first - window + 1) / block_n : 0;
}

// A [B, H, L, D] tensor with unit stride along D, read (or, with a non-const element type, written) as rows.
// Outputs are strided too: they take the memory layout of their input (Hugging Face's [B, L, H, D]).
template <typename element_t>
struct RowsView {
  element_t* data;
  int64_t stride_b, stride_h, stride_l;

  explicit RowsView(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<element_t>>()),
        stride_b(t.stride(0)), stride_h(t.stride(1)), stride_l(t.stride(2)) {}
  element_t* row(int64_t b, int64_t h, int64_t l) const { return data + b * stride_b + h * stride_h + l * stride_l; }
};

// Copies the rows [first, first + rows) of the G query heads of kv head `kv_head` into a stacked
// [G * rows, D] block: stacked row g * rows + i is query row first + i of head kv_head * G + g.
template <typename scalar_t>
void stack_group_rows(const RowsView<const scalar_t>& src, int64_t b, int64_t kv_head, int64_t group, int64_t first,
                      int64_t rows, int64_t head_dim, scalar_t* dst) {
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* from = src.row(b, kv_head * group + g, first + i);
      std::copy(from, from + head_dim, dst + (g * rows + i) * head_dim);
    }
  }
}

// Scores of a partial tile that the mask hides become -inf. `rows` query rows, row i standing at key position
// position_of(i), repeated for each of the G stacked heads; keys k_first .. k_first + cols - 1.
template <typename PositionOf>
void mask_scores_at(float* scores, int64_t ld, int64_t group, int64_t rows, const PositionOf& position_of,
                    int64_t k_first, int64_t cols, const int32_t* mask_start, float masked_value, int64_t window) {
  const int32_t* key_mask_start = mask_start + k_first;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t q = position_of(i);
    // key k_first + j is hidden from row q iff j > q - k_first or mask_start <= q (or, with a window, j < q - w + 1
    // - k_first); branch-free, so it vectorises
    const int32_t q32 = static_cast<int32_t>(q), last_visible = static_cast<int32_t>(q - k_first);
    const int32_t width = static_cast<int32_t>(cols);
    if (window > 0) {
      const int32_t first_visible = static_cast<int32_t>(std::max<int64_t>(q - window + 1 - k_first, -1));
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores + (g * rows + i) * ld;
        for (int32_t j = 0; j < width; ++j) {
          const bool hidden = (j > last_visible) | (j < first_visible) | (key_mask_start[j] <= q32);
          row[j] = hidden ? masked_value : row[j];
        }
      }
      continue;
    }
    for (int64_t g = 0; g < group; ++g) {
      float* row = scores + (g * rows + i) * ld;
      for (int32_t j = 0; j < width; ++j) {
        const bool hidden = (j > last_visible) | (key_mask_start[j] <= q32);
        row[j] = hidden ? masked_value : row[j];
      }
    }
  }
}

// The query rows of session attention stand at their own index: rows q_first .. q_first + rows - 1.
void mask_scores(float* scores, int64_t ld, int64_t group, int64_t rows, int64_t q_first, int64_t k_first,
                 int64_t cols, const int32_t* mask_start, float masked_value, int64_t window) {
  mask_scores_at(scores, ld, group, rows, [q_first](int64_t i) { return q_first + i; }, k_first, cols, mask_start,
                 masked_value, window);
}

// Columns [begin, end) of a partial tile that some query row in [q_first, q_last] can see: key j is visible to
// a row of the tile iff j <= q_last and mask_start[j] > max(j, q_first) (and, with a window, j > q_first - w).
// Narrowing the GEMMs to this span removes most of the work a partial tile wastes: keys of the previous sample
// when a sample starts mid-tile, session keys next to the summary for response rows, keys past the causal
// diagonal, keys behind the window. begin == end: nothing.
struct ColumnSpan {
  int64_t begin, end;
};

ColumnSpan visible_columns(const int32_t* mask_start, int64_t q_first, int64_t q_last, int64_t k_first,
                           int64_t cols, int64_t window) {
  const int64_t limit = std::min(cols, q_last - k_first + 1);
  const int64_t start = window > 0 ? std::max<int64_t>(0, q_first - window + 1 - k_first) : 0;
  int64_t begin = limit, end = 0;
  for (int64_t j = start; j < limit; ++j) {
    const int64_t key = k_first + j;
    if (mask_start[key] > std::max(key, q_first)) {
      begin = std::min(begin, j);
      end = j + 1;
    }
  }
  return {begin, std::max(begin, end)};
}

// s[j] = exp(scale * s[j] - shift) in place, one pass; returns the sum of the new values.
float exp_in_place_and_sum(float* s, int64_t n, float scale, float shift) {
  const Vec scale_vec(scale), minus_shift(-shift);
  Vec sum_vec(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec p = at::vec::fmadd(Vec::loadu(s + j), scale_vec, minus_shift).exp_u20();
    p.store(s + j);
    sum_vec = sum_vec + p;
  }
  if (j < n) {  // the tail, as one masked vector: lanes past n stay out of the sum and the store
    const int64_t rest = n - j;
    const Vec p = at::vec::fmadd(Vec::loadu(s + j, rest), scale_vec, minus_shift).exp_u20();
    p.store(s + j, rest);
    sum_vec = sum_vec + Vec::set(Vec(0.f), p, rest);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum_vec);
}

template <typename scalar_t>
void convert_rows(const float* src, int64_t ld_src, scalar_t* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::copy(src + r * ld_src, src + r * ld_src + cols, dst + r * ld_dst);
    } else {
      at::vec::convert(src + r * ld_src, dst + r * ld_dst, cols);
    }
  }
}

// K and V of every (batch, kv head), packed once into the VNNI pairs of the brgemm ukernel's B operand:
//   keys_t / values_t: [D / 2, L', 2] per group, B of S = Q K^T and of dP = dO V^T (pairs along D; L' = L
//                      rounded up to even, the padding key zero; a key span is a column offset);
//   values / keys:     [L' / 2, D, 2] per group, B of O += P V and of dQ += dS K (pairs of consecutive keys, a
//                      span starts at an even key).
// The forward packs keys_t and values, the backward all four. Extra memory: one (two) copies of K and V.
template <typename scalar_t>
struct PackedKeysValues {
  at::Tensor keys_t_buffer, values_t_buffer, keys_buffer, values_buffer;
  int64_t padded_len = 0, head_dim = 0;
  const scalar_t* columns(const at::Tensor& buffer, int64_t group_index, int64_t key_first) const {
    return buffer.data_ptr<scalar_t>() + group_index * padded_len * head_dim + 2 * key_first;
  }
  const scalar_t* rows(const at::Tensor& buffer, int64_t group_index, int64_t key_first) const {
    return buffer.data_ptr<scalar_t>() + group_index * padded_len * head_dim + key_first * head_dim;
  }
  const scalar_t* keys_t(int64_t g, int64_t key_first) const { return columns(keys_t_buffer, g, key_first); }
  const scalar_t* values_t(int64_t g, int64_t key_first) const { return columns(values_t_buffer, g, key_first); }
  const scalar_t* keys(int64_t g, int64_t key_first) const { return rows(keys_buffer, g, key_first); }
  const scalar_t* values(int64_t g, int64_t key_first) const { return rows(values_buffer, g, key_first); }
};

template <typename scalar_t>
PackedKeysValues<scalar_t> pack_keys_values(const at::Tensor& k, const at::Tensor& v, bool for_backward) {
  const int64_t batch = k.size(0), num_kv_heads = k.size(1), seq_len = k.size(2), head_dim = k.size(3);
  PackedKeysValues<scalar_t> packed;
  packed.padded_len = seq_len + seq_len % 2;
  packed.head_dim = head_dim;
  const int64_t group_elems = packed.padded_len * head_dim;
  auto buffer = [&] { return at::empty({batch * num_kv_heads * group_elems}, k.options()); };
  packed.keys_t_buffer = buffer();
  packed.values_buffer = buffer();
  if (for_backward) {
    packed.values_t_buffer = buffer();
    packed.keys_buffer = buffer();
  }
  const RowsView<const scalar_t> k_rows(k), v_rows(v);
  auto pack_columns = [&](const RowsView<const scalar_t>& src, int64_t b, int64_t kv_head, scalar_t* out) {
    pack_transposed_vnni(src.row(b, kv_head, 0), src.stride_l, seq_len, head_dim, out, packed.padded_len);
    if (packed.padded_len != seq_len) {  // the padding key column: zeros
      for (int64_t pair = 0; pair < head_dim / 2; ++pair) {
        std::fill_n(out + pair * 2 * packed.padded_len + 2 * seq_len, 2, scalar_t(0));
      }
    }
  };
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g / num_kv_heads, kv_head = g % num_kv_heads;
      pack_columns(k_rows, b, kv_head, packed.keys_t_buffer.template data_ptr<scalar_t>() + g * group_elems);
      pack_rows_vnni(v_rows.row(b, kv_head, 0), v_rows.stride_l, seq_len, head_dim,
                     packed.values_buffer.template data_ptr<scalar_t>() + g * group_elems, head_dim);
      if (for_backward) {
        pack_columns(v_rows, b, kv_head, packed.values_t_buffer.template data_ptr<scalar_t>() + g * group_elems);
        pack_rows_vnni(k_rows.row(b, kv_head, 0), k_rows.stride_l, seq_len, head_dim,
                       packed.keys_buffer.template data_ptr<scalar_t>() + g * group_elems, head_dim);
      }
    }
  });
  return packed;
}

// ------------------------------------------------------------------------------------------------ forward
// What every forward query tile reads: the inputs, the tile sizes and (packed path) K / V packed once.
// Session attention has L query rows over L keys; the cached prefill Lq query rows over Lk keys.
template <typename scalar_t>
struct ForwardOperands {
  RowsView<const scalar_t> q_rows, k_rows, v_rows;
  RowsView<scalar_t> out_rows;
  const int32_t* mask_start;  // [B, Lk]
  const int32_t* tile_min;    // [B, num_k_tiles]
  const int32_t* tile_max;
  int64_t num_q_heads, num_kv_heads, group, head_dim, q_len, key_len, num_k_tiles, block_m, block_n;
  int64_t window;  // sliding window of that many keys; 0 = none
  float softmax_scale;
  // The packed path (16-bit, where the probe picked it): K^T and V of each (batch, kv head) packed once into
  // VNNI pairs, read by every query tile and head of the group through the brgemm ukernel. A key span then
  // starts at an even key (V pairs keys), so score rows get two spare columns.
  bool packed;
  int64_t score_ld;
  PackedKeysValues<scalar_t> packed_kv;

  ForwardOperands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& mask_start_, const at::Tensor& tile_min_, const at::Tensor& tile_max_,
                  double scale, int64_t block_m_, int64_t block_n_, int64_t window_)
      : q_rows(q), k_rows(k), v_rows(v), out_rows(out), mask_start(mask_start_.data_ptr<int32_t>()),
        tile_min(tile_min_.data_ptr<int32_t>()), tile_max(tile_max_.data_ptr<int32_t>()),
        num_q_heads(q.size(1)), num_kv_heads(k.size(1)), group(q.size(1) / k.size(1)), head_dim(q.size(3)),
        q_len(q.size(2)), key_len(k.size(2)), num_k_tiles(ceil_div(k.size(2), block_n_)), block_m(block_m_),
        block_n(block_n_), window(window_), softmax_scale(static_cast<float>(scale)),
        packed(use_packed_path<scalar_t>() && block_n_ % 2 == 0), score_ld(packed ? block_n_ + 2 : block_n_) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (packed) packed_kv = pack_keys_values<scalar_t>(k, v, false);
    }
  }
};

template <typename scalar_t>
struct ForwardScratch {
  std::vector<scalar_t> q_stack, probs_lowp;
  std::vector<float> scores, acc, row_max, row_sum;
};

// One forward work item: the query rows q_first .. q_first + rows - 1 (at most block_m) of the G query heads of
// kv head `kv_head` in batch row b, stacked into one [G * rows, D] operand; online softmax over the key tiles
// in fp32. Row q_first + i stands at key position position_of(i), every one in [min_pos, max_pos] (session
// attention: its own index): tiles are classified and partial tiles narrowed for that position range, and the
// mask applied per row. Writes the output rows and, when lse is given ([B, Hq, Lq]), their log-sum-exp.
// A row that sees no key gets zeros (and an LSE of +inf, which makes every backward probability zero).
template <typename scalar_t, typename PositionOf>
void forward_query_tile(const ForwardOperands<scalar_t>& op, ForwardScratch<scalar_t>& scratch, int64_t b,
                        int64_t kv_head, int64_t q_first, int64_t rows, int64_t min_pos, int64_t max_pos,
                        const PositionOf& position_of, float* lse) {
  const int64_t group = op.group, head_dim = op.head_dim, block_n = op.block_n, score_ld = op.score_ld;
  const bool packed = op.packed;
  auto& [q_stack, probs_lowp, scores, acc, row_max, row_sum] = scratch;
  const int64_t stacked_rows = group * op.block_m;
  q_stack.resize(stacked_rows * head_dim);
  scores.resize(stacked_rows * score_ld);
  acc.resize(stacked_rows * head_dim);
  row_max.resize(stacked_rows);
  row_sum.resize(stacked_rows);
  if constexpr (!std::is_same_v<scalar_t, float>) probs_lowp.resize(stacked_rows * score_ld);

  const int64_t m = group * rows;
  const int32_t* row_mask_start = op.mask_start + b * op.key_len;
  const TileBoundsView bounds{op.tile_min + b * op.num_k_tiles, op.tile_max + b * op.num_k_tiles};
  const int64_t group_index = b * op.num_kv_heads + kv_head;

  std::fill(row_max.begin(), row_max.begin() + m, kNegInf);
  std::fill(row_sum.begin(), row_sum.begin() + m, 0.f);
  bool started = false;  // Q stacked and acc zeroed: done at the first visited pair (padding tiles have none)

  const int64_t last_k_tile = std::min(op.num_k_tiles - 1, max_pos / block_n);
  for (int64_t k_tile = first_key_tile(min_pos, op.window, block_n); k_tile <= last_k_tile; ++k_tile) {
    const TileClass tile_class = bounds.classify(min_pos, max_pos, k_tile, block_n, op.window);
    if (tile_class == TileClass::kSkipped) continue;
    // the keys this pair works on: key_first .. key_first + width - 1 (a partial tile is narrowed)
    const int64_t k_first = k_tile * block_n;
    int64_t key_first = k_first, width = std::min(block_n, op.key_len - k_first);
    if (tile_class == TileClass::kPartial) {
      const ColumnSpan span = visible_columns(row_mask_start, min_pos, max_pos, k_first, width, op.window);
      if (span.begin == span.end) continue;
      key_first = k_first + span.begin;
      width = span.end - span.begin;
      if (packed && key_first % 2 == 1) {  // V pairs start at even keys; the mask hides the extra key
        --key_first;
        ++width;
      }
    }
    const scalar_t* k_span_data = op.k_rows.row(b, kv_head, key_first);
    const scalar_t* v_span_data = op.v_rows.row(b, kv_head, key_first);
    if (!started) {
      stack_group_rows(op.q_rows, b, kv_head, group, q_first, rows, head_dim, q_stack.data());
      std::fill(acc.begin(), acc.begin() + m * head_dim, 0.f);
      started = true;
    }

    // scores[m, width] = Q_stack @ K_span^T, unscaled
    bool scored = false;
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (packed) {
        gemm_packed(m, width, head_dim, q_stack.data(), head_dim, op.packed_kv.keys_t(group_index, key_first),
                    op.packed_kv.padded_len, scores.data(), score_ld, false);
        scored = true;
      }
    }
    if (!scored) {
      gemm(false, true, m, width, head_dim, 1.f, q_stack.data(), head_dim, k_span_data, op.k_rows.stride_l, 0.f,
           scores.data(), score_ld);
    }
    if (tile_class == TileClass::kPartial) {
      mask_scores_at(scores.data(), score_ld, group, rows, position_of, key_first, width, row_mask_start, kNegInf,
                     op.window);
    }

    // online softmax, one stacked row at a time; p = exp(scale * (s - max))
    const float softmax_scale = op.softmax_scale;
    for (int64_t r = 0; r < m; ++r) {
      float* s = scores.data() + r * score_ld;
      float tile_max_score = at::vec::reduce_all<float>(
          [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s, width);
      const float new_max = std::max(row_max[r], tile_max_score);
      if (new_max == kNegInf) {  // nothing visible to this row so far
        std::fill(s, s + width, 0.f);
        continue;
      }
      const float correction = std::exp(softmax_scale * (row_max[r] - new_max));  // 0 when row_max was -inf
      const float tile_sum = exp_in_place_and_sum(s, width, softmax_scale, softmax_scale * new_max);
      row_sum[r] = row_sum[r] * correction + tile_sum;
      row_max[r] = new_max;
      if (correction != 1.f) {
        float* a = acc.data() + r * head_dim;
        at::vec::map([correction](Vec x) { return x * Vec(correction); }, a, a, head_dim);
      }
    }

    // acc[m, D] += P @ V_span
    if constexpr (std::is_same_v<scalar_t, float>) {
      gemm(false, false, m, head_dim, width, 1.f, scores.data(), score_ld, v_span_data, op.v_rows.stride_l, 1.f,
           acc.data(), head_dim);
    } else {
      convert_rows(scores.data(), score_ld, probs_lowp.data(), score_ld, m, width);
      if (packed) {  // an odd span takes one more key pair: its P column is zero (its V row is a key or padding)
        const int64_t paired = width + width % 2;
        if (paired != width) {
          for (int64_t r = 0; r < m; ++r) probs_lowp[r * score_ld + width] = scalar_t(0);
        }
        gemm_packed(m, head_dim, paired, probs_lowp.data(), score_ld, op.packed_kv.values(group_index, key_first),
                    head_dim, acc.data(), head_dim, true);
      } else {
        gemm(false, false, m, head_dim, width, 1.f, probs_lowp.data(), score_ld, v_span_data, op.v_rows.stride_l,
             1.f, acc.data(), head_dim);
      }
    }
  }

  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = kv_head * group + g;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = g * rows + i;
      const int64_t row_index = (b * op.num_q_heads + head) * op.q_len + q_first + i;
      scalar_t* o = op.out_rows.row(b, head, q_first + i);
      const float* a = acc.data() + r * head_dim;
      if (row_sum[r] == 0.f) {  // no visible key: zeros
        std::fill(o, o + head_dim, scalar_t(0));
        if (lse != nullptr) lse[row_index] = kPosInf;
        continue;
      }
      const float inverse_sum = 1.f / row_sum[r];
      for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<scalar_t>(a[d] * inverse_sum);
      if (lse != nullptr) lse[row_index] = op.softmax_scale * row_max[r] + std::log(row_sum[r]);
    }
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_start,
                  const at::Tensor& tile_min, const at::Tensor& tile_max, double scale, int64_t block_m,
                  int64_t block_n, int64_t window, at::Tensor& out, at::Tensor& lse) {
  const ForwardOperands<scalar_t> op(q, k, v, out, mask_start, tile_min, tile_max, scale, block_m, block_n, window);
  const int64_t batch = q.size(0), seq_len = q.size(2), num_q_tiles = ceil_div(seq_len, block_m);
  const int64_t num_groups = batch * op.num_kv_heads;
  float* lse_data = lse.data_ptr<float>();
  // Later query tiles see more keys: hand them out first.
  parallel_items<ForwardScratch<scalar_t>>(num_groups * num_q_tiles, [&](int64_t item,
                                                                        ForwardScratch<scalar_t>& scratch) {
    const int64_t q_tile = num_q_tiles - 1 - item / num_groups;
    const int64_t b = (item % num_groups) / op.num_kv_heads, kv_head = item % op.num_kv_heads;
    const int64_t q_first = q_tile * block_m, rows = std::min(block_m, seq_len - q_first);
    forward_query_tile(op, scratch, b, kv_head, q_first, rows, q_first, q_first + rows - 1,
                       [q_first](int64_t i) { return q_first + i; }, lse_data);
  });
}

// ------------------------------------------------------------------------------------ cached prefill forward
// Query row i of batch row b stands at key position p = query_positions[b, i] of the Lk keys and sees key j iff
// j <= p < mask_start[b, j]; p >= Lk is a padding row (zeros). The query rows of a batch row are cut into work
// tiles of consecutive rows, at most block_m each, that never straddle two samples: a tile starts anew where a
// row's first visible key lies past every position of the tile so far (its visible keys are disjoint from the
// tile's: another sample), so that a tile of one sample's rows visits that sample's keys only (key tiles of
// the other samples are classified skipped). A run of rows of one sample is cut into equal tiles.
struct QueryTile {
  int64_t b, first, rows, min_pos, max_pos, cost;
};

// first_visible[p] for p in [0, Lk): the first key that position p sees (p + 1 when it sees none). A key hidden
// from p (mask_start <= p, past p, or behind a window) stays hidden from every later position, so one forward
// sweep finds them.
void first_visible_keys(const int32_t* mask_start, int64_t key_len, int64_t window, int64_t* first_visible) {
  int64_t lo = 0;
  for (int64_t p = 0; p < key_len; ++p) {
    while (lo <= p && (mask_start[lo] <= p || (window > 0 && lo <= p - window))) ++lo;
    first_visible[p] = lo;
  }
}

std::vector<QueryTile> cached_query_tiles(const int64_t* positions, const int32_t* mask_start, int64_t batch,
                                          int64_t q_len, int64_t key_len, int64_t block_m, int64_t window) {
  std::vector<std::vector<QueryTile>> per_row(batch);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> first_visible(key_len);
    for (int64_t b = begin; b < end; ++b) {
      first_visible_keys(mask_start + b * key_len, key_len, window, first_visible.data());
      const int64_t* pos = positions + b * q_len;
      std::vector<QueryTile>& tiles = per_row[b];
      auto cut_run = [&](int64_t first, int64_t count) {  // rows first .. first + count - 1: one sample's
        const int64_t pieces = ceil_div(count, block_m);
        for (int64_t piece = 0, row = first; piece < pieces; ++piece) {
          const int64_t rows = count / pieces + (piece < count % pieces ? 1 : 0);
          QueryTile tile{b, row, rows, pos[row], pos[row], 0};
          int64_t lo = first_visible[pos[row]];
          for (int64_t i = row; i < row + rows; ++i) {
            tile.min_pos = std::min(tile.min_pos, pos[i]);
            tile.max_pos = std::max(tile.max_pos, pos[i]);
            lo = std::min(lo, first_visible[pos[i]]);
          }
          tile.cost = rows * std::max<int64_t>(1, tile.max_pos + 1 - lo);
          tiles.push_back(tile);
          row += rows;
        }
      };
      int64_t run_first = -1, run_max = 0;
      for (int64_t i = 0; i <= q_len; ++i) {
        const bool real = i < q_len && pos[i] >= 0 && pos[i] < key_len;
        if (run_first >= 0 && (!real || first_visible[pos[i]] > run_max)) {
          cut_run(run_first, i - run_first);
          run_first = -1;
        }
        if (!real) continue;
        if (run_first < 0) {
          run_first = i;
          run_max = pos[i];
        }
        run_max = std::max(run_max, pos[i]);
      }
    }
  });
  std::vector<QueryTile> tiles;
  for (auto& row : per_row) tiles.insert(tiles.end(), row.begin(), row.end());
  return tiles;
}

template <typename scalar_t>
void cached_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_start,
                         const at::Tensor& query_positions, const at::Tensor& tile_min, const at::Tensor& tile_max,
                         double scale, int64_t block_m, int64_t block_n, int64_t window, at::Tensor& out) {
  const ForwardOperands<scalar_t> op(q, k, v, out, mask_start, tile_min, tile_max, scale, block_m, block_n, window);
  const int64_t batch = q.size(0), q_len = q.size(2), key_len = k.size(2);
  const int64_t* positions = query_positions.data_ptr<int64_t>();
  std::vector<QueryTile> tiles =
      cached_query_tiles(positions, op.mask_start, batch, q_len, key_len, block_m, window);
  // the most expensive tiles (rows x visible key range) first, so that no thread ends with a long one
  std::stable_sort(tiles.begin(), tiles.end(), [](const QueryTile& x, const QueryTile& y) { return x.cost > y.cost; });

  // padding rows (position outside [0, Lk)) are in no tile: zeros
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t p = positions[b * q_len + i];
        if (p >= 0 && p < key_len) continue;
        for (int64_t head = 0; head < op.num_q_heads; ++head) {
          scalar_t* o = op.out_rows.row(b, head, i);
          std::fill(o, o + op.head_dim, scalar_t(0));
        }
      }
    }
  });

  const int64_t num_kv_heads = op.num_kv_heads;
  parallel_items<ForwardScratch<scalar_t>>(static_cast<int64_t>(tiles.size()) * num_kv_heads,
                                           [&](int64_t item, ForwardScratch<scalar_t>& scratch) {
    const QueryTile& tile = tiles[item / num_kv_heads];
    const int64_t* row_positions = positions + tile.b * q_len + tile.first;
    forward_query_tile(op, scratch, tile.b, item % num_kv_heads, tile.first, tile.rows, tile.min_pos, tile.max_pos,
                       [row_positions](int64_t i) { return row_positions[i]; }, nullptr);
  });
}

// ----------------------------------------------------------------------------------------------- backward
// Stacked, tile-major copies of one (batch, kv head)'s Q and dO, with its LSE and Delta = rowsum(dO * O):
// the query tile starting at row q_first occupies the stacked rows [group * q_first, group * (q_first + rows)),
// heads stacked inside it as in the forward.
// The packed path also keeps each query tile's Q and dO transposed, [D, ld_t] per tile at (q_first / block_m)
// * tile_stride_t (the A operands of dK^T += Q^T dS and dV^T += dO^T P; columns past the tile's rows are zero).
template <typename scalar_t>
struct GroupStacks {
  scalar_t* q;
  scalar_t* grad_out;
  float* lse;
  float* delta;
  scalar_t* q_t = nullptr;  // packed path only
  scalar_t* grad_out_t = nullptr;
  int64_t ld_t = 0, tile_stride_t = 0;
};

// Leading dimension of the transposed stacks: the stacked rows, rounded up to even (the GEMMs' k pairs them).
inline int64_t transposed_ld(int64_t stacked_rows) { return stacked_rows + stacked_rows % 2; }

template <typename scalar_t>
void fill_group_stacks(const RowsView<const scalar_t>& q_rows, const RowsView<const scalar_t>& out_rows,
                       const RowsView<const scalar_t>& grad_out_rows, const float* lse_data, int64_t b,
                       int64_t kv_head, int64_t group, int64_t num_q_heads, int64_t seq_len, int64_t head_dim,
                       int64_t q_first, int64_t rows, int64_t block_m, const GroupStacks<scalar_t>& stacks) {
  const int64_t base = group * q_first;
  stack_group_rows(q_rows, b, kv_head, group, q_first, rows, head_dim, stacks.q + base * head_dim);
  stack_group_rows(grad_out_rows, b, kv_head, group, q_first, rows, head_dim, stacks.grad_out + base * head_dim);
  if (stacks.q_t != nullptr) {
    const int64_t m = group * rows, offset = (q_first / block_m) * stacks.tile_stride_t;
    for (const auto& [from, to] : {std::pair{stacks.q, stacks.q_t}, std::pair{stacks.grad_out, stacks.grad_out_t}}) {
      const scalar_t* tile = from + base * head_dim;
      scalar_t* tile_t = to + offset;
      for (int64_t d = 0; d < head_dim; ++d) {
        scalar_t* column = tile_t + d * stacks.ld_t;
        for (int64_t r = 0; r < m; ++r) column[r] = tile[r * head_dim + d];
        std::fill(column + m, column + stacks.ld_t, scalar_t(0));
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = kv_head * group + g;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = base + g * rows + i;
      stacks.lse[r] = lse_data[(b * num_q_heads + head) * seq_len + q_first + i];
      const scalar_t* o = out_rows.row(b, head, q_first + i);
      const scalar_t* d_o = grad_out_rows.row(b, head, q_first + i);
      float delta = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) delta += static_cast<float>(o[d]) * static_cast<float>(d_o[d]);
      stacks.delta[r] = delta;
    }
  }
}

// Per-thread buffers of one (query tile, key tile) pair.
// (ld: block_n, or block_n + 2 on the packed path; the packed path also keeps P and dS in VNNI pairs of rows)
template <typename scalar_t>
struct PairScratch {
  std::vector<scalar_t> probs_lowp, grad_scores_lowp, probs_pairs, grad_scores_pairs, row_pair;
  std::vector<float> scores, grad_probs;
  void resize(int64_t stacked_rows, int64_t ld, bool packed) {
    scores.resize(stacked_rows * ld);
    grad_probs.resize(stacked_rows * ld);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      probs_lowp.resize(stacked_rows * ld);
      grad_scores_lowp.resize(stacked_rows * ld);
      if (packed) {
        probs_pairs.resize(transposed_ld(stacked_rows) * ld);
        grad_scores_pairs.resize(transposed_ld(stacked_rows) * ld);
        row_pair.resize(2 * ld);
      }
    }
  }
};

// rows x cols of fp32 (ld_src) to 16-bit VNNI pairs of rows, the B operand of a GEMM whose k runs over these
// rows: dst[(r / 2) * 2 * ld_dst + 2 * j + r % 2]; an odd last row is paired with zeros. tmp: 2 * cols.
template <typename scalar_t>
void convert_rows_to_pairs(const float* src, int64_t ld_src, int64_t rows, int64_t cols, scalar_t* dst,
                           int64_t ld_dst, scalar_t* tmp) {
  for (int64_t r = 0; r < rows; r += 2) {
    at::vec::convert(src + r * ld_src, tmp, cols);
    if (r + 1 < rows) {
      at::vec::convert(src + (r + 1) * ld_src, tmp + cols, cols);
    } else {
      std::fill(tmp + cols, tmp + 2 * cols, scalar_t(0));
    }
    scalar_t* to = dst + (r / 2) * 2 * ld_dst;
    for (int64_t j = 0; j < cols; ++j) {
      to[2 * j] = tmp[j];
      to[2 * j + 1] = tmp[cols + j];
    }
  }
}

// The GEMM operands of one visited pair: P and dS ([m, width], leading dimension block_n), the stacked Q and
// dO rows of the query tile, and the visible key span.
// Packed path: col_begin / width are widened to start at an even key; probs_pairs / grad_scores_pairs hold P and
// dS in VNNI pairs of rows ([ceil(m / 2), ld, 2]) and grad_scores has a zero column past an odd width.
template <typename scalar_t>
struct PairOperands {
  bool visited;
  int64_t m, col_begin, width, key_first;
  const scalar_t* probs;
  const scalar_t* grad_scores;
  const scalar_t* q_tile;
  const scalar_t* grad_out_tile;
  const scalar_t* k_span;
  const scalar_t* probs_pairs;
  const scalar_t* grad_scores_pairs;
};

// P = exp(scale * S - lse) and dS = P * (dP - Delta) of one (query tile, key tile) pair, both passes share it.
template <typename scalar_t>
PairOperands<scalar_t> pair_probs_and_grad_scores(
    const RowsView<const scalar_t>& k_rows, const RowsView<const scalar_t>& v_rows, const TileBoundsView& bounds,
    const int32_t* row_mask_start, const GroupStacks<scalar_t>& stacks, int64_t b, int64_t kv_head, int64_t group,
    int64_t seq_len, int64_t head_dim, int64_t q_first, int64_t k_tile, int64_t block_m, int64_t block_n,
    float softmax_scale, int64_t window, PairScratch<scalar_t>& scratch,
    const PackedKeysValues<scalar_t>* packed = nullptr, int64_t num_kv_heads = 0) {
  PairOperands<scalar_t> pair{};
  const int64_t ld = packed ? block_n + 2 : block_n;
  const int64_t rows = std::min(block_m, seq_len - q_first);
  const int64_t q_last = q_first + rows - 1;
  const int64_t k_first = k_tile * block_n;
  const int64_t cols = std::min(block_n, seq_len - k_first);
  const TileClass tile_class = bounds.classify(q_first, q_last, k_tile, block_n, window);
  if (tile_class == TileClass::kSkipped) return pair;
  int64_t col_begin = 0, width = cols;
  if (tile_class == TileClass::kPartial) {
    const ColumnSpan span = visible_columns(row_mask_start, q_first, q_last, k_first, cols, window);
    if (span.begin == span.end) return pair;
    col_begin = span.begin;
    width = span.end - span.begin;
    if (packed && (k_first + col_begin) % 2 == 1) {  // K / V pairs start at even keys; the mask hides the extra
      --col_begin;
      ++width;
    }
  }
  const int64_t key_first = k_first + col_begin;
  const scalar_t* k_span_data = k_rows.row(b, kv_head, key_first);
  const scalar_t* v_span_data = v_rows.row(b, kv_head, key_first);
  const int64_t m = group * rows;
  const int64_t base = group * q_first;
  const scalar_t* q_tile_data = stacks.q + base * head_dim;
  const scalar_t* grad_out_tile_data = stacks.grad_out + base * head_dim;
  float* scores = scratch.scores.data();
  float* grad_probs = scratch.grad_probs.data();

  const int64_t group_index = b * num_kv_heads + kv_head;
  // P = exp(scale * S - lse), zero where masked (exp(-inf) = 0); rows with lse = +inf give zeros
  bool packed_gemms = false;
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (packed) {
      gemm_packed(m, width, head_dim, q_tile_data, head_dim, packed->keys_t(group_index, key_first),
                  packed->padded_len, scores, ld, false);
      packed_gemms = true;
    }
  }
  if (!packed_gemms) {
    gemm(false, true, m, width, head_dim, 1.f, q_tile_data, head_dim, k_span_data, k_rows.stride_l, 0.f, scores, ld);
  }
  if (tile_class == TileClass::kPartial) {
    mask_scores(scores, ld, group, rows, q_first, key_first, width, row_mask_start, kNegInf, window);
  }
  for (int64_t r = 0; r < m; ++r) exp_in_place_and_sum(scores + r * ld, width, softmax_scale, stacks.lse[base + r]);
  // dP = dO @ V_span^T
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (packed) {
      gemm_packed(m, width, head_dim, grad_out_tile_data, head_dim, packed->values_t(group_index, key_first),
                  packed->padded_len, grad_probs, ld, false);
    }
  }
  if (!packed_gemms) {
    gemm(false, true, m, width, head_dim, 1.f, grad_out_tile_data, head_dim, v_span_data, v_rows.stride_l, 0.f,
         grad_probs, ld);
  }
  // dS = P * (dP - Delta), written over dP
  for (int64_t r = 0; r < m; ++r) {
    const float* p = scores + r * ld;
    float* ds = grad_probs + r * ld;
    const float row_delta = stacks.delta[base + r];
    at::vec::map2([row_delta](Vec p_vec, Vec dp) { return p_vec * (dp - Vec(row_delta)); }, ds, p, ds, width);
  }
  pair.visited = true;
  pair.m = m;
  pair.col_begin = col_begin;
  pair.width = width;
  pair.key_first = key_first;
  pair.q_tile = q_tile_data;
  pair.grad_out_tile = grad_out_tile_data;
  pair.k_span = k_span_data;
  if constexpr (std::is_same_v<scalar_t, float>) {
    pair.probs = scores;
    pair.grad_scores = grad_probs;
  } else {
    convert_rows(grad_probs, ld, scratch.grad_scores_lowp.data(), ld, m, width);
    pair.grad_scores = scratch.grad_scores_lowp.data();
    if (packed) {
      if (width % 2 == 1) {  // dQ += dS K_span pairs keys: the column past an odd span is zero
        for (int64_t r = 0; r < m; ++r) scratch.grad_scores_lowp[r * ld + width] = scalar_t(0);
      }
      convert_rows_to_pairs(scores, ld, m, width, scratch.probs_pairs.data(), ld, scratch.row_pair.data());
      convert_rows_to_pairs(grad_probs, ld, m, width, scratch.grad_scores_pairs.data(), ld, scratch.row_pair.data());
      pair.probs_pairs = scratch.probs_pairs.data();
      pair.grad_scores_pairs = scratch.grad_scores_pairs.data();
    } else {
      convert_rows(scores, ld, scratch.probs_lowp.data(), ld, m, width);
      pair.probs = scratch.probs_lowp.data();
    }
  }
  return pair;
}

// Two schedules, the same arithmetic per pair (so both match the oracle alike, and each is deterministic):
//   fused (split = false): one work item per (batch, kv head) owns dK / dV of its kv head and dQ of its G query
//     heads: one pass over (key tile, query tile) pairs, 5 GEMMs per pair. B * Hkv items.
//   split (split = true): dK / dV items per (batch, kv head, key tile), 4 GEMMs per pair, then dQ items per
//     (batch, kv head, query tile), 3 GEMMs per pair (S and dP computed again): B * Hkv * (L / block_n) +
//     B * Hkv * (L / block_m) items, at least the forward's B * Hkv * (L / block_m). No atomics either way.
template <typename scalar_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& mask_start,
                   const at::Tensor& tile_min, const at::Tensor& tile_max, double scale, int64_t block_m,
                   int64_t block_n, int64_t window, bool split, at::Tensor& grad_q, at::Tensor& grad_k,
                   at::Tensor& grad_v) {
  const int64_t batch = q.size(0), num_q_heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k.size(1), group = num_q_heads / num_kv_heads;
  const int64_t num_k_tiles = ceil_div(seq_len, block_n), num_q_tiles = ceil_div(seq_len, block_m);
  const RowsView<const scalar_t> q_rows(q), k_rows(k), v_rows(v), out_rows(out), grad_out_rows(grad_out);
  const RowsView<scalar_t> grad_q_rows(grad_q), grad_k_rows(grad_k), grad_v_rows(grad_v);
  const int32_t* mask_start_data = mask_start.data_ptr<int32_t>();
  const int32_t* tile_min_data = tile_min.data_ptr<int32_t>();
  const int32_t* tile_max_data = tile_max.data_ptr<int32_t>();
  const float* lse_data = lse.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);
  const int64_t stacked_rows = group * block_m;
  const int64_t group_elems = group * seq_len * head_dim, group_rows = group * seq_len;
  // The packed path (see the forward): K^T, V^T, K and V packed once per (batch, kv head); per query tile Q^T
  // and dO^T (A of dK^T += Q^T dS and dV^T += dO^T P, so that P and dS are B operands in pairs of rows and never
  // transposed); dK / dV accumulate transposed, [D, ld] per key tile.
  const bool packed = use_packed_path<scalar_t>() && block_n % 2 == 0;
  const int64_t ld = packed ? block_n + 2 : block_n;
  PackedKeysValues<scalar_t> packed_kv;
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (packed) packed_kv = pack_keys_values<scalar_t>(k, v, true);
  }
  const PackedKeysValues<scalar_t>* packed_operands = packed ? &packed_kv : nullptr;
  const int64_t ld_t = transposed_ld(stacked_rows), tile_stride_t = head_dim * ld_t;
  const int64_t group_elems_t = packed ? num_q_tiles * tile_stride_t : 0;
  auto with_transposed = [&](GroupStacks<scalar_t> stacks, scalar_t* q_t, scalar_t* grad_out_t) {
    if (packed) {
      stacks.q_t = q_t;
      stacks.grad_out_t = grad_out_t;
      stacks.ld_t = ld_t;
      stacks.tile_stride_t = tile_stride_t;
    }
    return stacks;
  };

  auto bounds_of = [&](int64_t b) {
    return TileBoundsView{tile_min_data + b * num_k_tiles, tile_max_data + b * num_k_tiles};
  };

  // dK / dV of one key tile of (b, kv_head): accumulates over the query tiles that can see it, then writes.
  auto key_tile_grads = [&](int64_t b, int64_t kv_head, int64_t k_tile, const GroupStacks<scalar_t>& stacks,
                            PairScratch<scalar_t>& pair_scratch, float* grad_k_acc, float* grad_v_acc,
                            float* grad_q_acc) {
    const int64_t k_first = k_tile * block_n;
    const int64_t cols = std::min(block_n, seq_len - k_first);
    const TileBoundsView bounds = bounds_of(b);
    const int32_t* row_mask_start = mask_start_data + b * seq_len;
    // rows layout [cols, D]; packed path: transposed, [D, ld] (a widened span may start one column early)
    std::fill(grad_k_acc, grad_k_acc + ld * head_dim, 0.f);
    std::fill(grad_v_acc, grad_v_acc + ld * head_dim, 0.f);
    // only query rows in [k_first, tile_max) can see a key of this tile (with a window, only rows before the
    // tile's last key + w)
    int64_t visible_end = std::min<int64_t>(bounds.max_mask_start[k_tile], seq_len);
    if (window > 0) visible_end = std::min(visible_end, k_first + cols - 1 + window);
    for (int64_t q_first = (k_first / block_m) * block_m; q_first < visible_end; q_first += block_m) {
      const PairOperands<scalar_t> pair = pair_probs_and_grad_scores(
          k_rows, v_rows, bounds, row_mask_start, stacks, b, kv_head, group, seq_len, head_dim, q_first, k_tile,
          block_m, block_n, softmax_scale, window, pair_scratch, packed_operands, num_kv_heads);
      if (!pair.visited) continue;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (packed) {
          // dV_span^T += dO^T @ P;  dK_span^T += Q^T @ dS;  (fused) dQ_tile += dS @ K_span
          const int64_t paired_m = pair.m + pair.m % 2, tile_offset = (q_first / block_m) * stacks.tile_stride_t;
          gemm_packed(head_dim, pair.width, paired_m, stacks.grad_out_t + tile_offset, stacks.ld_t, pair.probs_pairs,
                      ld, grad_v_acc + pair.col_begin, ld, true);
          gemm_packed(head_dim, pair.width, paired_m, stacks.q_t + tile_offset, stacks.ld_t, pair.grad_scores_pairs,
                      ld, grad_k_acc + pair.col_begin, ld, true);
          if (grad_q_acc != nullptr) {
            gemm_packed(pair.m, head_dim, pair.width + pair.width % 2, pair.grad_scores, ld,
                        packed_kv.keys(b * num_kv_heads + kv_head, pair.key_first), head_dim,
                        grad_q_acc + group * q_first * head_dim, head_dim, true);
          }
          continue;
        }
      }
      // dV_span += P^T @ dO;  dK_span += dS^T @ Q;  (fused) dQ_tile += dS @ K_span
      gemm(true, false, pair.width, head_dim, pair.m, 1.f, pair.probs, ld, pair.grad_out_tile, head_dim, 1.f,
           grad_v_acc + pair.col_begin * head_dim, head_dim);
      gemm(true, false, pair.width, head_dim, pair.m, 1.f, pair.grad_scores, ld, pair.q_tile, head_dim, 1.f,
           grad_k_acc + pair.col_begin * head_dim, head_dim);
      if (grad_q_acc != nullptr) {
        gemm(false, false, pair.m, head_dim, pair.width, 1.f, pair.grad_scores, ld, pair.k_span,
             k_rows.stride_l, 1.f, grad_q_acc + group * q_first * head_dim, head_dim);
      }
    }
    // element (key j, d) of the accumulators
    const int64_t stride_j = packed ? 1 : head_dim, stride_d = packed ? ld : 1;
    for (int64_t j = 0; j < cols; ++j) {
      scalar_t* dk = grad_k_rows.row(b, kv_head, k_first + j);
      scalar_t* dv = grad_v_rows.row(b, kv_head, k_first + j);
      for (int64_t d = 0; d < head_dim; ++d) {
        dk[d] = static_cast<scalar_t>(grad_k_acc[j * stride_j + d * stride_d] * softmax_scale);
        dv[d] = static_cast<scalar_t>(grad_v_acc[j * stride_j + d * stride_d]);
      }
    }
  };

  // writes dQ of one query tile from its stacked fp32 accumulator (rows base .. base + G * rows)
  auto write_grad_q = [&](int64_t b, int64_t kv_head, int64_t q_first, const float* grad_q_tile) {
    const int64_t rows = std::min(block_m, seq_len - q_first);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g;
      for (int64_t i = 0; i < rows; ++i) {
        const float* acc = grad_q_tile + (g * rows + i) * head_dim;
        scalar_t* dq = grad_q_rows.row(b, head, q_first + i);
        for (int64_t d = 0; d < head_dim; ++d) dq[d] = static_cast<scalar_t>(acc[d] * softmax_scale);
      }
    }
  };

  if (!split) {
    struct Scratch {
      std::vector<scalar_t> q_stack, grad_out_stack, q_t, grad_out_t;
      std::vector<float> lse_stack, delta_stack, grad_q_acc, grad_k_acc, grad_v_acc;
      PairScratch<scalar_t> pair;
    };
    parallel_items<Scratch>(batch * num_kv_heads, [&](int64_t item, Scratch& scratch) {
      scratch.q_stack.resize(group_elems);
      scratch.grad_out_stack.resize(group_elems);
      scratch.q_t.resize(group_elems_t);
      scratch.grad_out_t.resize(group_elems_t);
      scratch.grad_q_acc.assign(group_elems, 0.f);
      scratch.lse_stack.resize(group_rows);
      scratch.delta_stack.resize(group_rows);
      scratch.grad_k_acc.resize(ld * head_dim);
      scratch.grad_v_acc.resize(ld * head_dim);
      scratch.pair.resize(stacked_rows, ld, packed);
      const int64_t b = item / num_kv_heads, kv_head = item % num_kv_heads;
      const GroupStacks<scalar_t> stacks = with_transposed(
          GroupStacks<scalar_t>{scratch.q_stack.data(), scratch.grad_out_stack.data(), scratch.lse_stack.data(),
                                scratch.delta_stack.data()},
          scratch.q_t.data(), scratch.grad_out_t.data());
      for (int64_t q_first = 0; q_first < seq_len; q_first += block_m) {
        fill_group_stacks(q_rows, out_rows, grad_out_rows, lse_data, b, kv_head, group, num_q_heads, seq_len,
                          head_dim, q_first, std::min(block_m, seq_len - q_first), block_m, stacks);
      }
      for (int64_t k_tile = 0; k_tile < num_k_tiles; ++k_tile) {
        key_tile_grads(b, kv_head, k_tile, stacks, scratch.pair, scratch.grad_k_acc.data(),
                       scratch.grad_v_acc.data(), scratch.grad_q_acc.data());
      }
      for (int64_t q_first = 0; q_first < seq_len; q_first += block_m) {
        write_grad_q(b, kv_head, q_first, scratch.grad_q_acc.data() + group * q_first * head_dim);
      }
    });
    return;
  }

  // split: the stacks of every (batch, kv head) are shared by both passes (O(Q + dO) extra memory)
  const int64_t num_groups = batch * num_kv_heads;
  std::vector<scalar_t> q_stack(num_groups * group_elems), grad_out_stack(num_groups * group_elems);
  std::vector<scalar_t> q_t_stack(num_groups * group_elems_t), grad_out_t_stack(num_groups * group_elems_t);
  std::vector<float> lse_stack(num_groups * group_rows), delta_stack(num_groups * group_rows);
  auto stacks_of = [&](int64_t group_index) {
    return with_transposed(GroupStacks<scalar_t>{q_stack.data() + group_index * group_elems,
                                                 grad_out_stack.data() + group_index * group_elems,
                                                 lse_stack.data() + group_index * group_rows,
                                                 delta_stack.data() + group_index * group_rows},
                           q_t_stack.data() + group_index * group_elems_t,
                           grad_out_t_stack.data() + group_index * group_elems_t);
  };
  struct NoScratch {};
  parallel_items<NoScratch>(num_groups * num_q_tiles, [&](int64_t item, NoScratch&) {
    const int64_t group_index = item / num_q_tiles, q_first = (item % num_q_tiles) * block_m;
    fill_group_stacks(q_rows, out_rows, grad_out_rows, lse_data, group_index / num_kv_heads,
                      group_index % num_kv_heads, group, num_q_heads, seq_len, head_dim, q_first,
                      std::min(block_m, seq_len - q_first), block_m, stacks_of(group_index));
  });

  struct KeyScratch {
    std::vector<float> grad_k_acc, grad_v_acc;
    PairScratch<scalar_t> pair;
  };
  // later key tiles are seen by fewer queries: hand out the early (expensive) ones first
  parallel_items<KeyScratch>(num_groups * num_k_tiles, [&](int64_t item, KeyScratch& scratch) {
    scratch.grad_k_acc.resize(ld * head_dim);
    scratch.grad_v_acc.resize(ld * head_dim);
    scratch.pair.resize(stacked_rows, ld, packed);
    const int64_t k_tile = item / num_groups, group_index = item % num_groups;
    key_tile_grads(group_index / num_kv_heads, group_index % num_kv_heads, k_tile, stacks_of(group_index),
                   scratch.pair, scratch.grad_k_acc.data(), scratch.grad_v_acc.data(), nullptr);
  });

  struct QueryScratch {
    std::vector<float> grad_q_acc;
    PairScratch<scalar_t> pair;
  };
  // later query tiles see more keys: hand them out first
  parallel_items<QueryScratch>(num_groups * num_q_tiles, [&](int64_t item, QueryScratch& scratch) {
    scratch.grad_q_acc.assign(stacked_rows * head_dim, 0.f);
    scratch.pair.resize(stacked_rows, ld, packed);
    const int64_t q_tile = num_q_tiles - 1 - item / num_groups, group_index = item % num_groups;
    const int64_t b = group_index / num_kv_heads, kv_head = group_index % num_kv_heads;
    const int64_t q_first = q_tile * block_m;
    const int64_t rows = std::min(block_m, seq_len - q_first);
    const TileBoundsView bounds = bounds_of(b);
    const int32_t* row_mask_start = mask_start_data + b * seq_len;
    const GroupStacks<scalar_t> stacks = stacks_of(group_index);
    const int64_t last_k_tile = std::min(num_k_tiles - 1, (q_first + rows - 1) / block_n);
    for (int64_t k_tile = first_key_tile(q_first, window, block_n); k_tile <= last_k_tile; ++k_tile) {
      const PairOperands<scalar_t> pair = pair_probs_and_grad_scores(
          k_rows, v_rows, bounds, row_mask_start, stacks, b, kv_head, group, seq_len, head_dim, q_first, k_tile,
          block_m, block_n, softmax_scale, window, scratch.pair, packed_operands, num_kv_heads);
      if (!pair.visited) continue;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (packed) {
          gemm_packed(pair.m, head_dim, pair.width + pair.width % 2, pair.grad_scores, ld,
                      packed_kv.keys(group_index, pair.key_first), head_dim, scratch.grad_q_acc.data(), head_dim,
                      true);
          continue;
        }
      }
      gemm(false, false, pair.m, head_dim, pair.width, 1.f, pair.grad_scores, ld, pair.k_span,
           k_rows.stride_l, 1.f, scratch.grad_q_acc.data(), head_dim);
    }
    write_grad_q(b, kv_head, q_first, scratch.grad_q_acc.data());
  });
}

// ---------------------------------------------------------------------------------------------- operators
// keys_follow_queries: q, k and v cover the same L positions; false (the cached prefill): Lq query rows, Lk keys.
void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_start,
                  const at::Tensor& tile_min, const at::Tensor& tile_max, int64_t block_m, int64_t block_n,
                  int64_t window, bool keys_follow_queries = true) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && (!keys_follow_queries || q.size(2) == k.size(2)) && q.size(3) == k.size(3),
              "q / k shape mismatch");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v need unit stride along D");
  TORCH_CHECK(mask_start.scalar_type() == at::kInt && mask_start.is_contiguous(), "mask_start: contiguous int32");
  TORCH_CHECK(mask_start.dim() == 2 && mask_start.size(0) == k.size(0) && mask_start.size(1) == k.size(2),
              "mask_start must be [B, L] (L: the keys)");
  TORCH_CHECK(block_m > 0 && block_n > 0, "tile sizes must be positive");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no sliding window), got ", window);
  const int64_t num_k_tiles = ceil_div(k.size(2), block_n);
  for (const auto* bound : {&tile_min, &tile_max}) {
    TORCH_CHECK(bound->scalar_type() == at::kInt && bound->is_contiguous(), "tile bounds: contiguous int32");
    TORCH_CHECK(bound->dim() == 2 && bound->size(0) == k.size(0) && bound->size(1) == num_k_tiles,
                "tile bounds must be [B, ceil(L / block_n)] for this block_n");
  }
}

std::tuple<at::Tensor, at::Tensor> session_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& mask_start,
                                                             const at::Tensor& tile_min, const at::Tensor& tile_max,
                                                             double scale, int64_t block_m, int64_t block_n,
                                                             int64_t window) {
  check_common(q, k, v, mask_start, tile_min, tile_max, block_m, block_n, window);
  at::Tensor out = empty_output(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "session_attention_forward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float64 is served by the PyTorch fallback");
    } else {
      if constexpr (!std::is_same_v<scalar_t, float>) current_tile_gemm<scalar_t>();  // probe outside the pool
      forward_impl<scalar_t>(q, k, v, mask_start, tile_min, tile_max, scale, block_m, block_n, window, out, lse);
    }
  });
  return {out, lse};
}

// The cached prefill: q [B, Hq, Lq, D] at query_positions (int64 [B, Lq]) over k, v [B, Hkv, Lk, D] whose
// mask_start and tile bounds are [B, Lk] and [B, ceil(Lk / block_n)]. Forward only: no LSE is kept.
at::Tensor cached_session_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& mask_start, const at::Tensor& query_positions,
                                            const at::Tensor& tile_min, const at::Tensor& tile_max, double scale,
                                            int64_t block_m, int64_t block_n, int64_t window) {
  check_common(q, k, v, mask_start, tile_min, tile_max, block_m, block_n, window, false);
  TORCH_CHECK(query_positions.scalar_type() == at::kLong && query_positions.is_contiguous() &&
                  query_positions.dim() == 2 && query_positions.size(0) == q.size(0) &&
                  query_positions.size(1) == q.size(2),
              "query_positions must be a contiguous int64 [B, Lq] tensor");
  at::Tensor out = empty_output(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cached_session_attention_forward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float64 is served by the PyTorch fallback");
    } else {
      if constexpr (!std::is_same_v<scalar_t, float>) current_tile_gemm<scalar_t>();  // probe outside the pool
      cached_forward_impl<scalar_t>(q, k, v, mask_start, query_positions, tile_min, tile_max, scale, block_m,
                                    block_n, window, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> session_attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& grad_out,
    const at::Tensor& lse, const at::Tensor& mask_start, const at::Tensor& tile_min, const at::Tensor& tile_max,
    double scale, int64_t block_m, int64_t block_n, bool split, int64_t window) {
  check_common(q, k, v, mask_start, tile_min, tile_max, block_m, block_n, window);
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes(), "out / grad_out must match q");
  TORCH_CHECK(out.stride(3) == 1 && grad_out.stride(3) == 1, "out, grad_out need unit stride along D");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(), "dtype mismatch");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse: contiguous float32 [B, Hq, L]");
  at::Tensor grad_q = empty_output(q);
  at::Tensor grad_k = empty_output(k);
  at::Tensor grad_v = empty_output(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "session_attention_backward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float64 is served by the PyTorch fallback");
    } else {
      if constexpr (!std::is_same_v<scalar_t, float>) current_tile_gemm<scalar_t>();
      backward_impl<scalar_t>(q, k, v, out, grad_out, lse, mask_start, tile_min, tile_max, scale, block_m, block_n,
                              window, split, grad_q, grad_k, grad_v);
    }
  });
  return {grad_q, grad_k, grad_v};
}

std::string blas_info() { return blas_description() + "; vector ISA: " CONVRET_VEC_ISA; }

// "bf16: <choice and probe report>\nfp16: ..." (probes on first call)
std::string tile_gemm_info() {
  return "bf16: " + select_tile_gemm<c10::BFloat16>() + "\nfp16: " + select_tile_gemm<c10::Half>();
}

// dtype "bf16" / "fp16"; impl "auto" (probe again), "mkl", "onednn" or "upcast". Returns the new report.
std::string set_tile_gemm(const std::string& dtype, const std::string& impl) {
  TORCH_CHECK(dtype == "bf16" || dtype == "fp16", "dtype must be bf16 or fp16, got ", dtype);
  return dtype == "bf16" ? select_tile_gemm<c10::BFloat16>(impl, true) : select_tile_gemm<c10::Half>(impl, true);
}

}  // namespace
}  // namespace convret

TORCH_LIBRARY(convret_cpu, m) {
  m.def(
      "session_attention_forward(Tensor q, Tensor k, Tensor v, Tensor mask_start, Tensor tile_min, "
      "Tensor tile_max, float scale, int block_m, int block_n, int window=0) -> (Tensor, Tensor)");
  m.def(
      "session_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad_out, Tensor lse, "
      "Tensor mask_start, Tensor tile_min, Tensor tile_max, float scale, int block_m, int block_n, bool split, "
      "int window=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cached_session_attention_forward(Tensor q, Tensor k, Tensor v, Tensor mask_start, Tensor query_positions, "
      "Tensor tile_min, Tensor tile_max, float scale, int block_m, int block_n, int window=0) -> Tensor");
  m.def("blas_info() -> str", &convret::blas_info);
  m.def("tile_gemm_info() -> str", &convret::tile_gemm_info);
  m.def("set_tile_gemm(str dtype, str impl) -> str", &convret::set_tile_gemm);
}

TORCH_LIBRARY_IMPL(convret_cpu, CPU, m) {
  m.impl("session_attention_forward", &convret::session_attention_forward);
  m.impl("session_attention_backward", &convret::session_attention_backward);
  m.impl("cached_session_attention_forward", &convret::cached_session_attention_forward);
}
