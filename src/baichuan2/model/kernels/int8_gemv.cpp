// Weight-only int8 matrix times a few activation rows on AVX-512 CPUs (batch-1..16 decoding).
//
// PyTorch's _weight_int8pack_mm wants bf16 activations and, at one row, reads the weights at ~70% of
// the memory bandwidth a plain fp32 matmul reaches; this loop converts 16 int8 weights to fp32 once
// per load, multiplies them into every activation row, and keeps R x M independent accumulators so
// the FMA latency is hidden. Activations and outputs stay fp32 (no casts around the call).
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// R output rows against M activation rows: R*M independent accumulators keep the FMA units busy,
// and each 16-weight load is converted to fp32 once for all M rows.
template <int M, int R>
static inline void block(const float* x, const int8_t* q, const float* s, float* y, int64_t K, int64_t N,
                         int64_t n) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      // R weight rows are R streams: a software prefetch 512 bytes ahead beats the hardware prefetcher
      // by ~20% at one activation row (R = 8; measured on 2 cores: 37 -> 31 ms per ladder-500m token)
      if ((k & 63) == 0) _mm_prefetch((const char*)(q + (n + r) * K + k + 512), _MM_HINT_T0);
      __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + (n + r) * K + k))));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) {
    float t = _mm512_reduce_add_ps(acc[r][m]);
    const int8_t* qr = q + (n + r) * K;
    for (int64_t kk = k; kk < K; ++kk) t += x[m * K + kk] * (float)qr[kk];
    y[m * N + n + r] = t * s[n + r];
  }
}

template <int R>
static void rows(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t n) {
  // weight rows n..n+R stay in L1/L2 while every activation row passes over them
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<4, R>(x + m * K, q, s, y + m * N, K, N, n);
  switch (M - m) {
    case 3: block<3, R>(x + m * K, q, s, y + m * N, K, N, n); break;
    case 2: block<2, R>(x + m * K, q, s, y + m * N, K, N, n); break;
    case 1: block<1, R>(x + m * K, q, s, y + m * N, K, N, n); break;
  }
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && s.dim() == 1, "int8_gemv: x [M, K], q [N, K], s [N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kChar && s.scalar_type() == torch::kFloat,
              "int8_gemv: x fp32, q int8, s fp32");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(), "int8_gemv: contiguous inputs");
  TORCH_CHECK(x.size(1) == q.size(1) && s.size(0) == q.size(0), "int8_gemv: shapes do not match");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (M == 1) for (; n + 8 <= n1; n += 8) rows<8>(xp, qp, sp, yp, M, K, N, n);
    else if (M == 2) for (; n + 4 <= n1; n += 4) rows<4>(xp, qp, sp, yp, M, K, N, n);
    else for (; n + 2 <= n1; n += 2) rows<2>(xp, qp, sp, yp, M, K, N, n);
    for (; n < n1; ++n) rows<1>(xp, qp, sp, yp, M, K, N, n);
  });
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_gemv", &int8_gemv); }
