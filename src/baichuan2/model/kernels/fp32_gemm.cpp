// fp32 activations [M, K] times a prepacked fp32 weight [N, K]^T on AVX-512, for CPU inference at decode
// batch sizes (M = 1..64 rows: one token for each running sequence) and prefill chunks.
//
// Why not oneDNN's packed inner product (what PyTorch offers): measured on one core of this project's
// 2-core Xeon it reaches ~45-60 GFLOP/s at 16 rows (the weights stream from memory once per call: the
// kernel must keep FMAs busy while they arrive), ~85 at 64. Here the weight is packed into panels of 48
// output columns, K-major ([N/48, K, 48]): a panel streams sequentially while up to 8 activation rows x 48
// columns (24 zmm accumulators) take one broadcast FMA per weight vector, and the next panel's lines are
// prefetched while this one is computed.
//
// Every output y[m, n] is one accumulator summed over k = 0..K-1 in order, whatever M is and whichever
// tile the row falls in, so a row's result does not depend on the others in the batch: batched and
// unbatched decoding give identical outputs.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

constexpr int NB = 48;  // output columns per panel (3 zmm)
constexpr int MB = 8;   // activation rows per tile (8 x 3 = 24 accumulators)
#define UNROLL _Pragma("GCC unroll 8")

template <int ROWS>
static inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                        int64_t cols, const char* pf, int64_t pf_lines) {
  __m512 acc[ROWS][3];
  UNROLL for (int m = 0; m < ROWS; ++m) {
    acc[m][0] = _mm512_setzero_ps();
    acc[m][1] = _mm512_setzero_ps();
    acc[m][2] = _mm512_setzero_ps();
  }
  // pf_lines cache lines from pf (a share of the next panel) are prefetched into L2, spread evenly over
  // the k loop (16.16 fixed point), so the memory stream overlaps the FMAs of every pass
  const uint64_t rate = pf_lines > 0 ? ((uint64_t)pf_lines << 16) / (uint64_t)K : 0;
  uint64_t due = 0;
  int64_t issued = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * NB;
    due += rate;
    while (issued < (int64_t)(due >> 16)) _mm_prefetch(pf + 64 * issued++, _MM_HINT_T1);
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32);
    UNROLL for (int m = 0; m < ROWS; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
    }
  }
  if (cols == NB) {
    UNROLL for (int m = 0; m < ROWS; ++m) {
      _mm512_storeu_ps(y + m * ldy, acc[m][0]);
      _mm512_storeu_ps(y + m * ldy + 16, acc[m][1]);
      _mm512_storeu_ps(y + m * ldy + 32, acc[m][2]);
    }
  } else {  // the last panel of an N that is not a multiple of 48
    for (int j = 0; j < 3; ++j) {
      const int64_t left = cols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
      for (int m = 0; m < ROWS; ++m) _mm512_mask_storeu_ps(y + m * ldy + 16 * j, mask, acc[m][j]);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const char*,
                       int64_t);
static const TileFn TILES[MB + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// x [M, K] fp32 (rows contiguous), packed [ceil(N/48), K, 48] fp32 (zero-padded columns;
// made by baichuan2.model.model.PrepackedWeight), n = N -> y [M, N] fp32.
torch::Tensor fp32_gemm(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1, "fp32_gemm: x must be fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == NB &&
                  packed.scalar_type() == torch::kFloat && packed.size(1) == x.size(1) &&
                  packed.size(0) == (n + NB - 1) / NB,
              "fp32_gemm: packed weight does not match");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), ldx = x.stride(0);
  auto y = torch::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* w = wp + p * K * NB;
      const int64_t cols = std::min<int64_t>(NB, n - p * NB);
      // the next panel (64-byte lines) is prefetched in equal shares by this panel's passes over M
      const int64_t passes = (M + MB - 1) / MB, lines = p + 1 < end ? K * NB * (int64_t)sizeof(float) / 64 : 0;
      const char* next = reinterpret_cast<const char*>(w + K * NB);
      for (int64_t j = 0, m0 = 0; m0 < M; ++j, m0 += MB) {
        const int rows = (int)std::min<int64_t>(MB, M - m0);
        const int64_t first = lines * j / passes, last = lines * (j + 1) / passes;
        TILES[rows](xp + m0 * ldx, ldx, w, K, yp + m0 * n + p * NB, n, cols, next + 64 * first, last - first);
      }
    }
  });
  return y;
}

bool supported() { return __builtin_cpu_supports("avx512f"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp32_gemm", &fp32_gemm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "fp32 [M,K] x packed fp32 weight -> [M,N]");
  m.def("supported", &supported, "the CPU runs this kernel");
}
