// Row-major tile GEMMs with an fp32 accumulator, through the BLAS that torch itself links.
//
//   C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C,   C always float.
//
// torch's x86 wheels link MKL statically and export its entry points; we bind them as weak symbols, so the
// extension still loads against a torch without MKL (ARM, macOS) and then takes the at::mm_out path.
//
// bf16 and fp16 tiles have several implementations, all with an fp32 C (the scores are never rounded to
// 16 bits; at::mm would round them):
//   mkl     MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32. On CPUs where MKL does not use the bf16
//           units (AMD EPYC with AVX512-BF16) it runs at the fp32 rate;
//   onednn  ATen's at::native::cpublas::brgemm (oneDNN's brgemm ukernel: AVX512-BF16, AMX, AVX512-FP16),
//           with op(A) / op(B) copied to plain row-major and B packed to VNNI where the CPU wants it;
//   upcast  the operands converted to fp32 in thread-local scratch, then MKL sgemm: the fastest on a CPU
//           without 16-bit units, where MKL's 16-bit GEMM converts internally and less well;
//   packed  not a per-tile GEMM but a path of the kernels: oneDNN's brgemm ukernel (through
//           at::native::cpublas::brgemm with is_vnni) on B operands the kernels pack once into VNNI pairs
//           (K^T and V once per (batch, kv head), reused by every query tile and head of the GQA group). The
//           ukernel is JIT-generated once per shape and cached per thread by ATen; per tile it only executes.
//           It runs where oneDNN has a bf16 / fp16 ukernel (AVX512-BF16, AMX; AVX512-FP16 for fp16) and the
//           library was built with it; elsewhere its check throws and the probe never picks it.
// The first 16-bit call (or backend_info()) runs a short probe of every available implementation at the
// kernels' tile shapes and keeps the fastest (select_tile_gemm); the report says what was measured.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k, float alpha,
                            const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                            int64_t ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k, float alpha,
                          const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                          int64_t ldc) __attribute__((weak));
}

namespace convret {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

inline std::string blas_description() {
  std::string fp32 = sgemm_ ? "MKL sgemm" : "at::mm_out";
  std::string bf16 = std::string(cblas_gemm_bf16bf16f32 ? "MKL gemm_bf16bf16f32, " : "") +
                     "oneDNN brgemm, fp32 upcast + " + fp32;
  std::string fp16 = std::string(cblas_gemm_f16f16f32 ? "MKL gemm_f16f16f32, " : "") +
                     "oneDNN brgemm, fp32 upcast + " + fp32;
  return "fp32: " + fp32 + "; bf16: one of " + bf16 + "; fp16: one of " + fp16 +
         " (picked by a probe at first use: tile_gemm_info)";
}

// Reads a row-major op(X) of shape [rows, cols] with leading dimension ld as a strided tensor (no copy).
inline at::Tensor strided_view(const void* data, at::ScalarType dtype, bool transposed, int64_t rows, int64_t cols,
                               int64_t ld) {
  auto options = at::TensorOptions().dtype(dtype);
  if (!transposed) return at::from_blob(const_cast<void*>(data), {rows, cols}, {ld, 1}, options);
  return at::from_blob(const_cast<void*>(data), {rows, cols}, {1, ld}, options);
}

inline void gemm_with_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                           const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc,
                           at::ScalarType dtype) {
  at::Tensor a_view = strided_view(a, dtype, trans_a, m, k, lda).to(at::kFloat);
  at::Tensor b_view = strided_view(b, dtype, trans_b, k, n, ldb).to(at::kFloat);
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.f) {
    at::mm_out(c_view, a_view, b_view);
    if (alpha != 1.f) c_view.mul_(alpha);
  } else {
    c_view.addmm_(a_view, b_view, beta, alpha);
  }
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_) {
    // column-major BLAS sees every row-major matrix transposed: C^T = op(B)^T op(A)^T
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int ldai = static_cast<int>(lda), ldbi = static_cast<int>(ldb), ldci = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
    return;
  }
  gemm_with_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kFloat);
}

// ------------------------------------------------------------------------------- 16-bit implementations
enum class TileGemm : int { kMkl = 0, kOnednn = 1, kUpcast = 2, kPacked = 3 };
constexpr int kNumTileGemms = 4;
constexpr int kNumPerTileGemms = 3;  // kPacked is a path of the kernels, not a drop-in tile GEMM
inline const char* tile_gemm_name(TileGemm impl) {
  switch (impl) {
    case TileGemm::kMkl: return "mkl";
    case TileGemm::kOnednn: return "onednn";
    case TileGemm::kPacked: return "packed";
    default: return "upcast";
  }
}

// ------------------------------------------------------------------------------ VNNI-packed B operands
// The brgemm ukernel reads a 16-bit B [k, n] in VNNI pairs: element (kk, j) at b[(kk / 2) * 2 * ldb + 2 * j +
// kk % 2] (two consecutive k of one column side by side, so one 32-bit lane holds both). k is even (an odd k
// is padded with a zero row). A column span j0 .. j0 + n of a packed B is the pointer b + 2 * j0 with the same
// ldb, so the kernels narrow a tile's keys without repacking.

// B = X^T for a row-major X [rows, cols] (leading dimension ld, cols even): B [cols, rows], B's pairs are
// consecutive elements of a row of X, so this is a transpose of 32-bit pairs. out holds (cols / 2) * 2 * ld_out
// elements; columns rows .. ld_out - 1 are left as they are.
template <typename scalar_t>
void pack_transposed_vnni(const scalar_t* x, int64_t ld, int64_t rows, int64_t cols, scalar_t* out,
                          int64_t ld_out) {
  static_assert(sizeof(scalar_t) == 2, "VNNI pairs of 16-bit values");
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* from = x + r * ld;
    for (int64_t pair = 0; pair < cols / 2; ++pair) {
      uint32_t both;
      std::memcpy(&both, from + 2 * pair, sizeof(both));
      std::memcpy(out + pair * 2 * ld_out + 2 * r, &both, sizeof(both));
    }
  }
}

// B = X for a row-major X [rows, cols] (leading dimension ld): rows become the k of B, paired; an odd last row
// is paired with zeros. out holds ceil(rows / 2) * 2 * ld_out elements.
template <typename scalar_t>
void pack_rows_vnni(const scalar_t* x, int64_t ld, int64_t rows, int64_t cols, scalar_t* out, int64_t ld_out) {
  static_assert(sizeof(scalar_t) == 2, "VNNI pairs of 16-bit values");
  for (int64_t r = 0; r < rows; r += 2) {
    const scalar_t* even = x + r * ld;
    const scalar_t* odd = r + 1 < rows ? x + (r + 1) * ld : nullptr;
    scalar_t* to = out + (r / 2) * 2 * ld_out;
    for (int64_t j = 0; j < cols; ++j) {
      to[2 * j] = even[j];
      to[2 * j + 1] = odd ? odd[j] : scalar_t(0);
    }
  }
}

// C[m, n] (+)= A[m, k] @ B, A row-major (lda), B VNNI-packed (ldb), k even, fp32 C.
template <typename scalar_t>
inline void gemm_packed(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
                        int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}

template <typename scalar_t>
bool mkl_16bit_available() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return cblas_gemm_bf16bf16f32 != nullptr;
  else return cblas_gemm_f16f16f32 != nullptr;
}

template <typename scalar_t>
void gemm_mkl_16bit(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const scalar_t* a,
                    int64_t lda, const scalar_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  auto fn = std::is_same_v<scalar_t, c10::BFloat16> ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  fn(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans, m, n, k, alpha,
     reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

// row-major op(X) [rows, cols] (X read with leading dimension ld) into a dense [rows, cols] buffer
template <typename in_t, typename out_t>
void copy_op(const in_t* x, int64_t ld, bool transposed, int64_t rows, int64_t cols, out_t* out) {
  if (!transposed) {
    for (int64_t r = 0; r < rows; ++r) {
      const in_t* from = x + r * ld;
      out_t* to = out + r * cols;
      for (int64_t j = 0; j < cols; ++j) to[j] = static_cast<out_t>(from[j]);
    }
    return;
  }
  // op(X)[r, j] = X[j, r]: walk X's rows, scatter into columns
  for (int64_t j = 0; j < cols; ++j) {
    const in_t* from = x + j * ld;
    for (int64_t r = 0; r < rows; ++r) out[r * cols + j] = static_cast<out_t>(from[r]);
  }
}

template <typename scalar_t>
void gemm_upcast(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const scalar_t* a,
                 int64_t lda, const scalar_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> a32, b32;
  a32.resize(m * k);
  b32.resize(k * n);
  copy_op(a, lda, trans_a, m, k, a32.data());
  copy_op(b, ldb, trans_b, k, n, b32.data());
  gemm(false, false, m, n, k, alpha, a32.data(), k, b32.data(), n, beta, c, ldc);
}

template <typename scalar_t>
void gemm_onednn(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const scalar_t* a,
                 int64_t lda, const scalar_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // brgemm computes C (+)= A @ B with row-major A [m, k] and B [k, n] (VNNI-packed where the CPU needs it)
  thread_local std::vector<scalar_t> a_plain, b_plain, b_packed;
  const scalar_t* a_use = a;
  int64_t ld_a = lda;
  if (trans_a) {
    a_plain.resize(m * k);
    copy_op(a, lda, true, m, k, a_plain.data());
    a_use = a_plain.data();
    ld_a = k;
  }
  const scalar_t* b_use = b;
  int64_t ld_b = ldb;
  if (trans_b) {
    b_plain.resize(k * n);
    copy_op(b, ldb, true, k, n, b_plain.data());
    b_use = b_plain.data();
    ld_b = n;
  }
  constexpr at::ScalarType dtype = std::is_same_v<scalar_t, c10::BFloat16> ? at::kBFloat16 : at::kHalf;
  const bool vnni = at::native::cpublas::could_pack(dtype);
  if (vnni) {
    const int64_t k_padded = (k + 1) / 2 * 2;  // VNNI pairs rows of B
    b_packed.assign(k_padded * n, scalar_t(0));
    at::native::cpublas::pack(k, n, ld_b, n, dtype, dtype, b_use, b_packed.data());
    b_use = b_packed.data();
    ld_b = n;
  }
  TORCH_CHECK(alpha == 1.f && (beta == 0.f || beta == 1.f), "onednn tile GEMM: alpha 1, beta 0 or 1 only");
  at::native::cpublas::brgemm(m, n, k, ld_a, ld_b, ldc, beta == 1.f, a_use, b_use, c, vnni);
}

// What the probe chose, per 16-bit dtype (-1: not probed yet), and its report.
struct TileGemmChoice {
  std::atomic<int> impl{-1};         // the per-tile GEMM (mkl, onednn or upcast): every GEMM outside the packed path
  std::atomic<bool> packed{false};   // the kernels take the packed path (probe: where it measured fastest)
  std::mutex mutex;
  std::string report = "not probed yet";
};

template <typename scalar_t>
TileGemmChoice& tile_gemm_choice() {
  static TileGemmChoice choice;
  return choice;
}

template <typename scalar_t>
void gemm_16bit_with(TileGemm impl, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, float beta, float* c,
                     int64_t ldc) {
  switch (impl) {
    case TileGemm::kMkl:
      if (mkl_16bit_available<scalar_t>()) {
        gemm_mkl_16bit(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
      }
      break;
    case TileGemm::kOnednn:
      gemm_onednn(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    default:
      break;
  }
  gemm_upcast(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The kernels' three tile GEMM patterns (S = Q K^T, O += P V, dV += P^T dO) at 128 x 128 x 128.
struct ProbeOperands {
  static constexpr int64_t size = 128;
  std::vector<float> c = std::vector<float>(size * size), reference = std::vector<float>(size * size);
};
constexpr bool kProbePatterns[3][2] = {{false, true}, {false, false}, {true, false}};

// The packed path's operands for the same three patterns, packed once outside the timed calls (as the kernels
// pack K / V once per (batch, kv head)): B^T packed from column 1 of a wider buffer (the kernels' narrowed key
// spans start anywhere), B packed by rows, and A^T as a plain copy (the kernels write P^T / dS^T directly).
template <typename scalar_t>
struct PackedProbeOperands {
  static constexpr int64_t size = ProbeOperands::size, ld_wide = size + 8;
  std::vector<scalar_t> b_transposed = std::vector<scalar_t>(size * ld_wide, scalar_t(0));
  std::vector<scalar_t> b_rows = std::vector<scalar_t>(size * size);
  std::vector<scalar_t> a_transposed = std::vector<scalar_t>(size * size);
  PackedProbeOperands(const std::vector<scalar_t>& a, const std::vector<scalar_t>& b) {
    pack_transposed_vnni(b.data(), size, size, size, b_transposed.data() + 2, ld_wide);
    pack_rows_vnni(b.data(), size, size, size, b_rows.data(), size);
    copy_op(a.data(), size, true, size, size, a_transposed.data());
  }
  // pattern i of kProbePatterns through the packed path
  void run(int pattern, const std::vector<scalar_t>& a, float* c, bool accumulate) const {
    const scalar_t* a_use = pattern == 2 ? a_transposed.data() : a.data();
    if (pattern == 0) {
      gemm_packed(size, size, size, a_use, size, b_transposed.data() + 2, ld_wide, c, size, accumulate);
    } else {
      gemm_packed(size, size, size, a_use, size, b_rows.data(), size, c, size, accumulate);
    }
  }
};

// Checks one implementation against the fp32 path on the three patterns; false (with `why`) when it is
// unavailable, throws, or is wrong.
template <typename scalar_t>
bool check_tile_gemm(TileGemm impl, const std::vector<scalar_t>& a, const std::vector<scalar_t>& b,
                     std::string& why) {
  if (impl == TileGemm::kMkl && !mkl_16bit_available<scalar_t>()) {
    why = "not in this torch's MKL";
    return false;
  }
  ProbeOperands out;
  const int64_t size = ProbeOperands::size;
  try {
    for (int pattern = 0; pattern < 3; ++pattern) {
      const bool trans_a = kProbePatterns[pattern][0], trans_b = kProbePatterns[pattern][1];
      if (impl == TileGemm::kPacked) {
        PackedProbeOperands<scalar_t>(a, b).run(pattern, a, out.c.data(), false);
        at::native::cpublas::brgemm_release();
      } else {
        gemm_16bit_with(impl, trans_a, trans_b, size, size, size, 1.f, a.data(), size, b.data(), size, 0.f,
                        out.c.data(), size);
      }
      gemm_upcast(trans_a, trans_b, size, size, size, 1.f, a.data(), size, b.data(), size, 0.f,
                  out.reference.data(), size);
      for (int64_t i = 0; i < size * size; ++i) {
        if (!(std::fabs(out.c[i] - out.reference[i]) <= 1e-3f * (1.f + std::fabs(out.reference[i])))) {
          why = "wrong results in the probe";
          return false;
        }
      }
    }
  } catch (const std::exception& error) {
    why = std::string("unavailable: ") + error.what();
    const size_t newline = why.find('\n');
    if (newline != std::string::npos) why.resize(newline);
    return false;
  }
  return true;
}

// GFLOP/s of one implementation over about 10 ms, single-threaded.
template <typename scalar_t>
double time_tile_gemm(TileGemm impl, const std::vector<scalar_t>& a, const std::vector<scalar_t>& b) {
  ProbeOperands out;
  const int64_t size = ProbeOperands::size;
  std::unique_ptr<PackedProbeOperands<scalar_t>> packed;
  if (impl == TileGemm::kPacked) packed = std::make_unique<PackedProbeOperands<scalar_t>>(a, b);
  int64_t calls = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < 0.01 || calls < 15) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      if (packed) {
        packed->run(pattern, a, out.c.data(), true);
      } else {
        gemm_16bit_with(impl, kProbePatterns[pattern][0], kProbePatterns[pattern][1], size, size, size, 1.f,
                        a.data(), size, b.data(), size, 1.f, out.c.data(), size);
      }
    }
    calls += 3;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  if (packed || impl == TileGemm::kOnednn) at::native::cpublas::brgemm_release();
  return 2.0 * size * size * size * calls / elapsed / 1e9;
}

template <typename scalar_t>
void probe_operands(std::vector<scalar_t>& a, std::vector<scalar_t>& b) {
  const int64_t n = ProbeOperands::size * ProbeOperands::size;
  a.resize(n);
  b.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    a[i] = static_cast<scalar_t>(std::sin(0.37 * i));
    b[i] = static_cast<scalar_t>(std::cos(0.11 * i));
  }
}

// Picks the 16-bit tile GEMM for scalar_t. `forced`: "auto" probes (once; again when asked explicitly),
// "mkl" / "onednn" / "upcast" / "packed" set it. Returns the report. The packed path is taken only where it
// runs, gives the right results and (under "auto") measures faster than the best per-tile GEMM; the per-tile
// GEMM is always the fastest of mkl / onednn / upcast, for the GEMMs outside the packed path.
template <typename scalar_t>
std::string select_tile_gemm(const std::string& forced = "auto", bool reprobe = false) {
  TileGemmChoice& choice = tile_gemm_choice<scalar_t>();
  std::lock_guard<std::mutex> lock(choice.mutex);
  if (choice.impl >= 0 && !reprobe && forced == "auto") return choice.report;
  std::vector<scalar_t> a, b;
  probe_operands(a, b);
  int forced_impl = -1;
  if (forced != "auto") {
    for (int i = 0; i < kNumTileGemms; ++i) {
      if (forced == tile_gemm_name(static_cast<TileGemm>(i))) forced_impl = i;
    }
    TORCH_CHECK(forced_impl >= 0, "unknown tile GEMM '", forced, "': use auto, mkl, onednn, upcast or packed");
    std::string why;
    TORCH_CHECK(check_tile_gemm<scalar_t>(static_cast<TileGemm>(forced_impl), a, b, why), "tile GEMM '", forced,
                "' cannot run here: ", why);
    if (forced_impl != static_cast<int>(TileGemm::kPacked)) {
      choice.impl = forced_impl;
      choice.packed = false;
      choice.report = std::string(tile_gemm_name(static_cast<TileGemm>(forced_impl))) + " (forced)";
      return choice.report;
    }
    if (choice.impl >= 0) {  // packed, with the per-tile GEMM already chosen: no new probe
      choice.packed = true;
      choice.report = std::string("packed (forced), per-tile GEMM elsewhere: ") +
                      tile_gemm_name(static_cast<TileGemm>(choice.impl.load()));
      return choice.report;
    }
  }
  const char* env = std::getenv("CONVRET_CPU_TILE_GEMM");  // a site can pin one: mkl, onednn, upcast, packed
  std::string why[kNumTileGemms];
  bool usable[kNumTileGemms];
  double rate[kNumTileGemms] = {0, 0, 0, 0};
  for (int i = 0; i < kNumTileGemms; ++i) usable[i] = check_tile_gemm<scalar_t>(static_cast<TileGemm>(i), a, b, why[i]);
  // three interleaved rounds, best of each: a neighbour's burst on a shared machine hits every candidate alike
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < kNumTileGemms; ++i) {
      if (usable[i]) rate[i] = std::max(rate[i], time_tile_gemm<scalar_t>(static_cast<TileGemm>(i), a, b));
    }
  }
  int best = static_cast<int>(TileGemm::kUpcast);  // of the per-tile GEMMs
  std::string measured;
  for (int i = 0; i < kNumTileGemms; ++i) {
    char buffer[64];
    std::snprintf(buffer, sizeof(buffer), "%.1f GFLOP/s", rate[i]);
    measured += std::string(i ? ", " : "") + tile_gemm_name(static_cast<TileGemm>(i)) + " " +
                (usable[i] ? std::string(buffer) : why[i]);
    if (i < kNumPerTileGemms && usable[i] && rate[i] > rate[best]) best = i;
  }
  const int packed_index = static_cast<int>(TileGemm::kPacked);
  bool packed = usable[packed_index] && rate[packed_index] > rate[best];
  std::string how = " (fastest)";
  if (forced_impl == packed_index) {
    packed = true;
    how = " (forced)";
  } else {
    for (int i = 0; env && i < kNumTileGemms; ++i) {
      if (std::string(env) == tile_gemm_name(static_cast<TileGemm>(i)) && usable[i]) {
        how = std::string(" ($CONVRET_CPU_TILE_GEMM=") + env + ")";
        packed = i == packed_index;
        if (!packed) best = i;
      }
    }
  }
  choice.impl = best;
  choice.packed = packed;
  choice.report = std::string(packed ? "packed" : tile_gemm_name(static_cast<TileGemm>(best))) + how +
                  (packed ? std::string(", per-tile GEMM elsewhere: ") + tile_gemm_name(static_cast<TileGemm>(best))
                          : std::string()) +
                  "; probe, 1 thread, 128^3 tiles: " + measured;
  return choice.report;
}

template <typename scalar_t>
inline TileGemm current_tile_gemm() {
  int impl = tile_gemm_choice<scalar_t>().impl.load(std::memory_order_relaxed);
  if (impl < 0) {
    select_tile_gemm<scalar_t>();
    impl = tile_gemm_choice<scalar_t>().impl.load();
  }
  return static_cast<TileGemm>(impl);
}

// True when the kernels take the packed (VNNI brgemm) path for scalar_t (probes on first use); never for fp32.
template <typename scalar_t>
inline bool use_packed_path() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return false;
  } else {
    current_tile_gemm<scalar_t>();
    // oneDNN switched off after the probe (torch.backends.mkldnn): the ukernel would refuse, take the per-tile GEMM
    return tile_gemm_choice<scalar_t>().packed.load() && at::globalContext().userEnabledMkldnn();
  }
}

// Called once per worker after its last tile GEMM: oneDNN's brgemm may hold AMX tile state.
inline void release_tile_gemm_context() {
  auto uses_brgemm = [](const TileGemmChoice& choice) {
    return choice.packed.load() || choice.impl.load() == static_cast<int>(TileGemm::kOnednn);
  };
  if (uses_brgemm(tile_gemm_choice<c10::BFloat16>()) || uses_brgemm(tile_gemm_choice<c10::Half>())) {
    at::native::cpublas::brgemm_release();
  }
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
                 int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_16bit_with(current_tile_gemm<c10::BFloat16>(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                  ldc);
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
                 int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_16bit_with(current_tile_gemm<c10::Half>(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace convret
