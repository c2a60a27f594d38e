// Weight-only int8 (per output channel) matrix times a few activation rows on AVX-512 VNNI CPUs
// (batch-1..16 decoding), the way llama.cpp's Q8_0 dot works: activations are quantised to int8 per
// block of 32 (one fp32 scale per block) and vpdpbusd multiplies 32 weight bytes by 32 activation bytes
// per 256-bit instruction, summed in int32. Converting int8 weights to fp32 for FMAs (our first version,
// 1.4x faster than torch._weight_int8pack_mm) costs ~3x the instructions per weight, and decoding was
// instruction-bound, not memory-bound, on 2 cores.
//
// vpdpbusd multiplies unsigned by signed bytes, so the weights are stored shifted, wu = w + 128
// (uint8), and the shift is taken back per activation block: dot(wu, xq) - 128 * sum(xq). With
// w = q * scale[n] and x ~ xq * sx per block of 32,
//     y[m, n] = scale[n] * sum_b sx[m, b] * (dot(wu[n, b], xq[m, b]) - 128 * sum(xq[m, b])).
// Every (activation row, output) pair is computed in the same order whatever M is, so batched and
// unbatched decoding give identical outputs.
//
// Weight layout (made at load time by baichuan2.model.quant.Int8Linear): uint8 [N/4, K/32, 4, 32], four
// output rows interleaved per 32-column block so the kernel reads one sequential stream.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

constexpr int R = 4;  // output rows interleaved in the packing
// Fully unrolled r/m loops: without it GCC keeps the accumulator arrays on the stack, and the loop-carried
// FMA chain goes through store-to-load forwarding (measured: int8 hot loop 3x slower).
#define UNROLL _Pragma("GCC unroll 16")

// Per activation row: int8 codes (K), one scale per 32-block (K/32), and the per-row shift correction
// 128 * sum_b sx[b] * sum(xq[b]).
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* sx, float* corr) {
  const int64_t blocks = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    float c = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + m * K + b * 32;
      __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      const float s = amax / 127.f;
      sx[m * blocks + b] = s;
      __m512 iv = _mm512_set1_ps(inv);
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, iv));
      _mm_storeu_si128((__m128i*)(xq + m * K + b * 32), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(xq + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
      c += s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
    corr[m] = 128.f * c;
  }
}

// Four interleaved output rows (block nb) against MB activation rows.
template <int MB>
static inline void block(const int8_t* xq, const float* sx, const float* corr, const uint8_t* q, const float* s,
                         float* y, int64_t K, int64_t N, int64_t nb) {
  const int64_t blocks = K / 32;
  const uint8_t* qb = q + nb * blocks * R * 32;
  __m256 acc[R][MB];
  UNROLL for (int r = 0; r < R; ++r) UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i xv[MB];
    __m256 sv[MB];
    UNROLL for (int m = 0; m < MB; ++m) {
      xv[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + b * 32));
      sv[m] = _mm256_set1_ps(sx[m * blocks + b]);
    }
    const uint8_t* qc = qb + b * R * 32;
    // a block is 128 bytes (two cache lines) of one sequential stream: fetch both, 32 blocks ahead
    _mm_prefetch((const char*)(qc + 4096), _MM_HINT_T0);
    _mm_prefetch((const char*)(qc + 4096 + 64), _MM_HINT_T0);
    UNROLL for (int r = 0; r < R; ++r) {
      __m256i w = _mm256_loadu_si256((const __m256i*)(qc + r * 32));
      UNROLL for (int m = 0; m < MB; ++m) {
        __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv[m]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv[m], acc[r][m]);
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    const int64_t n = nb * R + r;
    UNROLL for (int m = 0; m < MB; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[m * N + n] = s[n] * (_mm_cvtss_f32(h) - corr[m]);
    }
  }
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 4 && s.dim() == 1,
              "int8_gemv: x [M, K], shifted codes [N/4, K/32, 4, 32], scales [N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kByte && s.scalar_type() == torch::kFloat,
              "int8_gemv: x fp32, codes uint8, scales fp32");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous(), "int8_gemv: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0);
  TORCH_CHECK(K % 32 == 0, "int8_gemv: K must be a multiple of 32");
  TORCH_CHECK(N % R == 0 && q.size(0) == N / R && q.size(1) == K / 32 && q.size(2) == R && q.size(3) == 32,
              "int8_gemv: shapes do not match");
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * (K / 32)), corr(M);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), sx.data(), corr.data());
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>(); const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = K / 32;
  at::parallel_for(0, N / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        block<4>(xq.data() + m * K, sx.data() + m * blocks, corr.data() + m, qp, sp, yp + m * N, K, N, nb);
      const int8_t* xm = xq.data() + m * K; const float* sm = sx.data() + m * blocks;
      const float* cm = corr.data() + m; float* ym = yp + m * N;
      switch (M - m) {
        case 3: block<3>(xm, sm, cm, qp, sp, ym, K, N, nb); break;
        case 2: block<2>(xm, sm, cm, qp, sp, ym, K, N, nb); break;
        case 1: block<1>(xm, sm, cm, qp, sp, ym, K, N, nb); break;
      }
    }
  });
  return y;
}

bool supported() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("supported", &supported);
}
