// bf16 activations [M, K] times a prepacked bf16 weight [N, K]^T with Intel AMX tiles (TDPBF16PS), for CPU
// inference at decode batch sizes (M = 1..64 rows: one token per running sequence).
//
// Why not oneDNN's packed inner product (what PyTorch offers, also on AMX): at decode batch sizes the
// weights stream from memory once per call and the tile units wait on them; measured on one core of this
// project's Xeon oneDNN streams bf16 weights at ~5 GB/s at 16 rows, well under the core's bandwidth. Here
// the weight is packed into panels of 32 output columns, each a sequence of 2 KB blocks (32 k x 32 n, in
// the tiles' pair-interleaved layout) read in order (the hardware prefetcher follows; a panel read more than
// once, for more than 32 rows, also prefetches the next panel into L2 in equal shares meanwhile). On this
// Xeon's one core, SmolLM2's 151 matmuls of a step with weights from memory: 1.3x / 1.2x / 1.05x the
// first version of this kernel at 16 / 32 / 64 rows, which was itself ahead of oneDNN at those sizes.
//
// Rows are computed in 16-row tiles (a last partial tile is zero-padded), every row through the same tile
// instructions whatever M is: a row's result does not depend on the others
// in the batch (batched and unbatched decoding agree exactly). Accumulation is fp32 in the tiles; the
// result is rounded once to bf16 (as oneDNN's bf16 inner product does).
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

constexpr int NB = 32;  // output columns per panel: two 16-column B tiles
constexpr int KB = 32;  // k per tile step: 16 bf16 pairs
constexpr int TR = 16;  // rows per tile
constexpr int64_t BLOCK = KB * NB;  // bf16 elements per k step of a panel (2 KB)
constexpr int64_t CHUNK = 256;      // rows per sweep over the weight

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0, tmm1: A (two 16-row blocks of activations); tmm2, tmm3: B (two 16-column halves of the panel);
// tmm4..7: C[a][b] at 4 + 2a + b. Every tile is 16 rows x 64 bytes.
static void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = TR;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// pf_lines cache lines from pf are prefetched into L2 spread over the k loop, one share per pass
static inline void prefetch_share(const char* pf, int64_t pf_lines, int64_t k, int64_t steps, int64_t& issued) {
  const int64_t due = pf_lines * (k + 1) / steps;
  while (issued < due) _mm_prefetch(pf + 64 * issued++, _MM_HINT_T1);
}

// a later k step's 2 KB block into L1 (reads past the panel's end stay inside the packed weight or are
// harmless: prefetches do not fault)
constexpr int AHEAD = 2;
static inline void prefetch_l1(const uint16_t* block) {
  const char* p = reinterpret_cast<const char*>(block);
  for (int i = 0; i < 32; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
}

// 32 rows (two A tiles) x one 32-column panel over all k steps; C stored as fp32 [32, 32] in c.
// All eight tile registers are taken (2 A, 2 B, 4 C), so nothing is double-buffered: instead each load of
// the next k step is issued right after the last product that reads its register (tile registers are not
// renamed, so a load waits for its register's readers), and the next step's first product finds its
// operands loaded while this step's last ones ran. (Loading all four after the four products left the
// products waiting on three loads every step.)
static inline void pass2(const uint16_t* a, int64_t lda_bytes, const uint16_t* w, int64_t steps, float* c,
                         const char* pf, int64_t pf_lines) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  int64_t issued = 0;
  const char* a1 = reinterpret_cast<const char*>(a) + TR * lda_bytes;
  _tile_loadd(0, a, lda_bytes);
  _tile_loadd(2, w, 64);
  _tile_loadd(3, w + TR * KB, 64);
  _tile_loadd(1, a1, lda_bytes);
  for (int64_t s = 0; s < steps; ++s) {
    prefetch_share(pf, pf_lines, s, steps, issued);
    const uint16_t* next = w + (s + 1) * BLOCK;
    prefetch_l1(next + AHEAD * BLOCK);
    const bool more = s + 1 < steps;
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if (more) _tile_loadd(0, a + (s + 1) * KB, lda_bytes);
    _tile_dpbf16ps(6, 1, 2);
    if (more) _tile_loadd(2, next, 64);
    _tile_dpbf16ps(7, 1, 3);
    if (more) {
      _tile_loadd(1, a1 + (s + 1) * KB * 2, lda_bytes);
      _tile_loadd(3, next + TR * KB, 64);
    }
  }
  _tile_stored(4, c, NB * 4);
  _tile_stored(5, c + 16, NB * 4);
  _tile_stored(6, c + TR * NB, NB * 4);
  _tile_stored(7, c + TR * NB + 16, NB * 4);
}

// 16 rows (one A tile) x one panel. Tile registers are not renamed: a load into a tile waits for the
// products reading it, so consecutive k steps alternate between two sets of A/B tiles (tmm0, 2, 3 and
// tmm1, 6, 7) and one step's loads overlap the other's products.
static inline void pass1(const uint16_t* a, int64_t lda_bytes, const uint16_t* w, int64_t steps, float* c,
                         const char* pf, int64_t pf_lines) {
  _tile_zero(4);
  _tile_zero(5);
  int64_t issued = 0, s = 0;
  for (; s + 1 < steps; s += 2) {
    prefetch_share(pf, pf_lines, s + 1, steps, issued);
    const uint16_t* b = w + s * BLOCK;
    prefetch_l1(b + AHEAD * BLOCK);
    prefetch_l1(b + (AHEAD + 1) * BLOCK);
    _tile_loadd(2, b, 64);
    _tile_loadd(3, b + TR * KB, 64);
    _tile_loadd(0, a + s * KB, lda_bytes);
    _tile_loadd(6, b + BLOCK, 64);
    _tile_loadd(7, b + BLOCK + TR * KB, 64);
    _tile_loadd(1, a + (s + 1) * KB, lda_bytes);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(4, 1, 6);
    _tile_dpbf16ps(5, 1, 7);
  }
  if (s < steps) {  // an odd number of k steps
    prefetch_share(pf, pf_lines, s, steps, issued);
    const uint16_t* b = w + s * BLOCK;
    _tile_loadd(2, b, 64);
    _tile_loadd(3, b + TR * KB, 64);
    _tile_loadd(0, a + s * KB, lda_bytes);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
  }
  _tile_stored(4, c, NB * 4);
  _tile_stored(5, c + 16, NB * 4);
}

// fp32 c [rows, 32] -> bf16 y rows (round to nearest even), the first `cols` columns
static inline void store_rows(const float* c, int rows, uint16_t* y, int64_t ldy, int64_t cols) {
  const __mmask16 lo = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? (__mmask16)0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  for (int m = 0; m < rows; ++m) {
    const __m256bh r0 = _mm512_cvtneps_pbh(_mm512_loadu_ps(c + m * NB));
    const __m256bh r1 = _mm512_cvtneps_pbh(_mm512_loadu_ps(c + m * NB + 16));
    _mm256_mask_storeu_epi16(y + m * ldy, lo, (__m256i)r0);
    if (hi) _mm256_mask_storeu_epi16(y + m * ldy + 16, hi, (__m256i)r1);
  }
}

// x [M, K] bf16 (rows contiguous), packed [ceil(N/32), ceil(K/32), 2, 16, 16, 2] bf16 (zero-padded; made
// by baichuan2.model.model.PrepackedWeight), n = N -> y [M, N] bf16.
torch::Tensor bf16_gemm(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "bf16_gemm: x must be bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), steps = (K + KB - 1) / KB, panels = (n + NB - 1) / NB;
  TORCH_CHECK(packed.dim() == 6 && packed.is_contiguous() && packed.scalar_type() == torch::kBFloat16 &&
                  packed.size(0) == panels && packed.size(1) == steps && packed.size(2) == 2 &&
                  packed.size(3) == 16 && packed.size(4) == 16 && packed.size(5) == 2,
              "bf16_gemm: packed weight does not match");
  auto y = torch::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  // every tile load must read whole, defined rows and k steps: activations whose shape is not a multiple
  // of the tiles' are first copied into a zero-padded buffer
  const int64_t Mp = (M + TR - 1) / TR * TR, Kp = steps * KB;
  torch::Tensor a = x;
  if (Mp != M || Kp != K || x.stride(0) != K) {
    a = torch::empty({Mp, Kp}, x.options());
    a.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
    if (Kp != K) a.narrow(0, 0, M).narrow(1, K, Kp - K).zero_();
    if (Mp != M) a.narrow(0, M, Mp - M).zero_();
  }
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t lda = Kp * 2, panel = steps * BLOCK;
  // at most CHUNK rows per sweep over the weight: the activations a sweep re-reads for every panel stay in
  // L2 (a prefill chunk of thousands of rows would otherwise stream from memory once per panel)
  for (int64_t r0 = 0; r0 < M; r0 += CHUNK) {
    const int64_t blocks = (std::min<int64_t>(M - r0, CHUNK) + TR - 1) / TR;
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      configure();
      alignas(64) float c[2 * TR * NB];
      for (int64_t p = begin; p < end; ++p) {
        const uint16_t* w = wp + p * panel;
        const int64_t cols = std::min<int64_t>(NB, n - p * NB);
        // the next panel is prefetched into L2 only when this one is read more than once (> 32 rows):
        // a single pass streams in order and the hardware prefetcher keeps up alone (measured: 1.1-1.3x
        // faster at 16-32 rows without the software prefetches, 5-20% slower at 64 rows)
        const int64_t passes = (blocks + 1) / 2, lines = p + 1 < end && passes > 1 ? panel * 2 / 64 : 0;
        const char* next = reinterpret_cast<const char*>(w + panel);
        for (int64_t j = 0, b = 0; b < blocks; ++j, b += 2) {
          const int64_t first = lines * j / passes, last = lines * (j + 1) / passes;
          const int64_t m0 = r0 + b * TR;
          if (b + 1 < blocks) {  // 32 rows: each B tile serves two A tiles
            pass2(ap + m0 * Kp, lda, w, steps, c, next + 64 * first, last - first);
          } else {
            pass1(ap + m0 * Kp, lda, w, steps, c, next + 64 * first, last - first);
          }
          const int rows = (int)std::min<int64_t>(b + 1 < blocks ? 2 * TR : TR, M - m0);
          store_rows(c, rows, yp + m0 * n + p * NB, n, cols);
        }
      }
    });
  }
  return y;
}

// AMX-BF16 and AVX512-BF16 in the CPU, and the kernel's permission to use the tile registers
// (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per process)
bool supported() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d >> 22 & 1) && (d >> 24 & 1);  // AMX-BF16, AMX-TILE
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512bf16 = a >> 5 & 1;
  if (!amx || !avx512bf16 || !__builtin_cpu_supports("avx512bw")) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemm", &bf16_gemm, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "bf16 [M,K] x packed bf16 weight -> bf16 [M,N]");
  m.def("supported", &supported, "the CPU runs this kernel (AMX-BF16) and the OS lets it");
}
