// Weight-only int4 (group-wise, asymmetric) matrix times a few activation rows on AVX-512 VNNI CPUs
// (batch-1..16 decoding), the way llama.cpp's Q4_0 x Q8_0 dot works: activations are quantised to int8
// per block of 32 (one fp32 scale per block), and vpdpbusd multiplies 4-bit codes (as unsigned bytes)
// by int8 activations, 32 products per 256-bit instruction, summed in int32. Converting codes to fp32
// and using FMAs (our first version, and PyTorch's _weight_int4pack_mm_for_cpu) costs ~3x the
// instructions per weight, and decoding is instruction-bound, not memory-bound, on 2 cores.
//
// With w = (q - 8) * scale + (min + 8 * scale) per weight group and x ~ xq * sx per activation block of 32,
//     y[m, n] = sum_b scale[n, g(b)] * sx[m, b] * (dot(q[n, b], xq[m, b]) - 8 * sum(xq[m, b]))
// (the -8 * sum(xq) starts each block's integer dot product, so centring costs no instruction)
//             + sum_g (min + 8 * scale)[n, g] * sum(x[m, g])
// where the last sums are of the unquantised activations. Centring the codes (q - 8) matters: the
// activations' rounding error is multiplied by the codes, and uncentred 0..15 codes doubled it. Every (activation row, output) pair is
// computed in the same order whatever M is, so batched and unbatched decoding give identical outputs.
//
// Weight layout (made at load time by baichuan2.model.quant.Int4Linear from the checkpoint's nibbles):
//   codes  uint8 [N/4, K/64, 4, 32]: four output rows interleaved per 64-column chunk, so the kernel
//          reads one sequential stream; byte j of a row's 32 holds column j (low nibble) and 32 + j (high);
//   scales fp16  [N/4, K/32, 4]: each row's group scale repeated per 32-column block;
//   mins   fp16  [N, K/G]: min + 8 * scale (the centred codes' offset).
// fp16 (as llama.cpp's Q4_0 scales): 20 bytes per 32 weights instead of 24, and decoding reads every byte.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

constexpr int R = 4;  // output rows interleaved in the packing
// Fully unrolled r/m loops: without it GCC keeps the accumulator arrays on the stack, and the loop-carried
// FMA chain goes through store-to-load forwarding (measured: int8 hot loop 3x slower).
#define UNROLL _Pragma("GCC unroll 16")

// Per activation row: int8 codes (K), one scale per 32-block (K/32), fp32 sums per weight group (K/G).
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* sx, int32_t* cq,
                          float* xs) {
  const int64_t blocks = K / 32, groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + m * K + b * 32;
      __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      sx[m * blocks + b] = amax / 127.f;
      __m512 iv = _mm512_set1_ps(inv);
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, iv));
      _mm_storeu_si128((__m128i*)(xq + m * K + b * 32), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(xq + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
      cq[m * blocks + b] = -8 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
    for (int64_t g = 0; g < groups; ++g) {  // a plain loop: the same order for every row and M
      float t = 0.f;
      for (int64_t k = 0; k < G; ++k) t += x[m * K + g * G + k];
      xs[m * groups + g] = t;
    }
  }
}

// Four interleaved output rows (block nb) against MB activation rows.
template <int MB>
static inline void block(const int8_t* xq, const float* sx, const int32_t* cq, const float* xs, const uint8_t* q,
                         const uint16_t* s, const uint16_t* mn, float* y, int64_t K, int64_t N, int64_t G, int64_t nb) {
  const int64_t chunks = K / 64, blocks = K / 32, groups = K / G;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* qb = q + nb * chunks * R * 32;
  const uint16_t* sb = s + nb * blocks * R;
  __m256 acc[R][MB];
  UNROLL for (int r = 0; r < R; ++r) UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  alignas(16) float sc[MB][2][R];  // this chunk's scale[row] * sx[block], per activation row (GCC keeps it in registers)
  for (int64_t c = 0; c < chunks; ++c) {
    __m256i x0[MB], x1[MB], c0[MB], c1[MB];
    const __m128 s0 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sb + (2 * c) * R)));
    const __m128 s1 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sb + (2 * c + 1) * R)));
    UNROLL for (int m = 0; m < MB; ++m) {
      x0[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + c * 64));
      x1[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + c * 64 + 32));
      // the dot products start from the centring term -8 * sum(xq) (in one lane): exact, in integers
      c0[m] = _mm256_zextsi128_si256(_mm_cvtsi32_si128(cq[m * blocks + 2 * c]));
      c1[m] = _mm256_zextsi128_si256(_mm_cvtsi32_si128(cq[m * blocks + 2 * c + 1]));
      // the four rows' scales times the block's activation scale, one multiply for all four rows
      _mm_store_ps(sc[m][0], _mm_mul_ps(s0, _mm_set1_ps(sx[m * blocks + 2 * c])));
      _mm_store_ps(sc[m][1], _mm_mul_ps(s1, _mm_set1_ps(sx[m * blocks + 2 * c + 1])));
    }
    const uint8_t* qc = qb + c * R * 32;
    // a chunk is 128 bytes (two cache lines) of one sequential stream: fetch both, 32 chunks ahead
    // (measured on 2 cores, 2048x5504 matrices not in cache: 0.48 ms unprefetched, 0.37 ms so)
    _mm_prefetch((const char*)(qc + 4096), _MM_HINT_T0);
    _mm_prefetch((const char*)(qc + 4096 + 64), _MM_HINT_T0);
    UNROLL for (int r = 0; r < R; ++r) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(qc + r * 32));
      __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      UNROLL for (int m = 0; m < MB; ++m) {
        __m256i d0 = _mm256_dpbusd_epi32(c0[m], lo, x0[m]);
        __m256i d1 = _mm256_dpbusd_epi32(c1[m], hi, x1[m]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(sc[m][0][r]), acc[r][m]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(sc[m][1][r]), acc[r][m]);
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    const int64_t n = nb * R + r;
    const uint16_t* mr = mn + n * groups;
    UNROLL for (int m = 0; m < MB; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float t = _mm_cvtss_f32(h);
      const float* xm = xs + m * groups;
      __m512 mv = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 16 <= groups; g += 16)
        mv = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mr + g))), _mm512_loadu_ps(xm + g), mv);
      if (g < groups) {
        const __mmask16 k = (__mmask16)((1u << (groups - g)) - 1);
        mv = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mr + g)), _mm512_maskz_loadu_ps(k, xm + g), mv);
      }
      y[m * N + n] = t + _mm512_reduce_add_ps(mv);
    }
  }
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor mn, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 4 && s.dim() == 3 && mn.dim() == 2,
              "int4_gemv: x [M, K], codes [N/4, K/64, 4, 32], scales [N/4, K/32, 4], mins [N, K/G]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kByte &&
              s.scalar_type() == torch::kHalf && mn.scalar_type() == torch::kHalf,
              "int4_gemv: x fp32, codes uint8, scales and mins fp16");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && s.is_contiguous() && mn.is_contiguous(),
              "int4_gemv: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), N = mn.size(0);
  TORCH_CHECK(G % 32 == 0 && K % G == 0 && K % 64 == 0,
              "int4_gemv: the group size must be a multiple of 32 dividing K, and K a multiple of 64");
  TORCH_CHECK(N % R == 0 && q.size(0) == N / R && q.size(1) == K / 64 && q.size(2) == R && q.size(3) == 32 &&
              s.size(0) == N / R && s.size(1) == K / 32 && s.size(2) == R && mn.size(1) == K / G,
              "int4_gemv: shapes do not match");
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * (K / 32)), xs(M * (K / G));
  std::vector<int32_t> cq(M * (K / 32));
  quantize_rows(x.data_ptr<float>(), M, K, G, xq.data(), sx.data(), cq.data(), xs.data());
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = (const uint16_t*)s.data_ptr<at::Half>(); const uint16_t* mp = (const uint16_t*)mn.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = K / 32, groups = K / G;
  at::parallel_for(0, N / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        block<4>(xq.data() + m * K, sx.data() + m * blocks, cq.data() + m * blocks, xs.data() + m * groups, qp, sp, mp,
                 yp + m * N, K, N, G, nb);
      const int8_t* xm = xq.data() + m * K; const float* sm = sx.data() + m * blocks;
      const int32_t* um = cq.data() + m * blocks; const float* xsm = xs.data() + m * groups; float* ym = yp + m * N;
      switch (M - m) {
        case 3: block<3>(xm, sm, um, xsm, qp, sp, mp, ym, K, N, G, nb); break;
        case 2: block<2>(xm, sm, um, xsm, qp, sp, mp, ym, K, N, G, nb); break;
        case 1: block<1>(xm, sm, um, xsm, qp, sp, mp, ym, K, N, G, nb); break;
      }
    }
  });
  return y;
}

bool supported() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("supported", &supported);
}
