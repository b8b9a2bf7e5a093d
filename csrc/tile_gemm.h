// Row-major tile GEMMs with an fp32 accumulator, through the BLAS that torch itself links.
//
//   C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C,   C always float.
//
// torch's x86 wheels link MKL statically and export its entry points; we bind them as weak symbols, so the
// extension still loads against a torch without MKL (ARM, macOS) and then takes the at::mm_out path.
// MKL's bf16 x bf16 -> fp32 GEMM keeps the scores in fp32; an ATen bf16 GEMM would round them to bf16.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

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
  std::string bf16 = cblas_gemm_bf16bf16f32 ? "MKL gemm_bf16bf16f32" : "fp32 upcast + " + fp32;
  std::string fp16 = cblas_gemm_f16f16f32 ? "MKL gemm_f16f16f32" : "fp32 upcast + " + fp32;
  return "fp32: " + fp32 + "; bf16: " + bf16 + "; fp16: " + fp16;
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

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
                 int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_bf16bf16f32) {
    cblas_gemm_bf16bf16f32(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans,
                           trans_b ? kCblasTrans : kCblasNoTrans, m, n, k, alpha,
                           reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb,
                           beta, c, ldc);
    return;
  }
  gemm_with_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kBFloat16);
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
                 int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_f16f16f32) {
    cblas_gemm_f16f16f32(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans,
                         trans_b ? kCblasTrans : kCblasNoTrans, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a),
                         lda, reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
    return;
  }
  gemm_with_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kHalf);
}

}  // namespace convret
