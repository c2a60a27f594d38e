// Attention of one new token per sequence over a slot KV cache: the decoding step of continuous batching
// on CPU (baichuan2.model.model.SlotKVCache).
//
// Why not PyTorch's SDPA: its CPU flash-attention kernel, given one query per row, runs a blocked GEMM per
// (row, head) over the LONGEST row's keys (the others masked), and its bf16 path is 2-3.5x slower than
// fp32, so the cache had to be kept in fp32 for bf16 models. Here each (row, key/value head) reads only
// its own row's keys and values, once, in the cache's own dtype (bf16 caches: half the bytes; a bf16
// model's keys are bf16 numbers, so nothing is rounded), computing in fp32. Decoding is bound by reading
// the cache, so bytes read is the cost.
//
// Grouped-query attention: the G = heads / kv_heads query heads of a group read their key/value head
// together (the cache holds one head per group): each block of keys is widened to fp32 once for all G, and
// each value vector is loaded once for all G (their outputs accumulate side by side in registers).
// ALiBi: score += slope[h] * (k - q) with q = the row's last position (Baichuan 2 13B). Every (row, head) is computed alone, in the same order whatever else is
// in the batch, so batched and unbatched decoding give identical outputs.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx512_common.h"

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

// The sums of 16 vectors, as one vector: lane j = sum of v[j]'s lanes (a transpose-and-add tree: ~3
// instructions per sum instead of the ~10 of one horizontal reduction each).
static inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3] of v[2i], v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per block: the block sums of v[4i..4i+3]
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // blocks 0+1 and 2+3 of b[2i], then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Keys [n, D] of one row (`stride` elements apart) as fp32 rows of D in `dst`: a bf16 block is widened
// ONCE, not once per query head that reads it.
template <typename T, int C>
static inline void widen(const T* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(dst + j * 16 * C + 16 * c, load16(src + j * stride + 16 * c));
}

// The cache lines of rows [0, n) (`stride` elements apart) into L1 ahead of use: one row's keys span
// pages, and the hardware prefetcher does not follow a stream past a page.
template <typename T, int C>
static inline void prefetch_rows(const T* p, int64_t stride, int64_t n) {
  constexpr int64_t bytes = 16 * C * (int64_t)sizeof(T);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + j * stride) + b, _MM_HINT_T0);
}

// out[g] += sum_j w[g][j] * v[j] for NG queries at once (NG * C accumulators in registers, each value
// vector loaded once for all of them); two interleaved sets when that leaves the FMA chains too few.
template <typename T, int C, int NG>
static inline void weigh_values(const T* v, int64_t stride, int64_t L, const float* w, int64_t w_stride, float* out,
                                int64_t out_stride, float inv_sum[]) {
  constexpr int SETS = NG * C <= 8 ? 2 : 1;
  __m512 acc[SETS][NG][C];
  for (int s = 0; s < SETS; ++s)
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < C; ++c) acc[s][g][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + SETS <= L; j += SETS) {
    if ((j & 15) == 0 && j + 32 <= L) prefetch_rows<T, C>(v + (j + 16) * stride, stride, 16);
    for (int s = 0; s < SETS; ++s) {
      __m512 x[C];
      for (int c = 0; c < C; ++c) x[c] = load16(v + (j + s) * stride + 16 * c);
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(w[g * w_stride + j + s]);
        for (int c = 0; c < C; ++c) acc[s][g][c] = _mm512_fmadd_ps(p, x[c], acc[s][g][c]);
      }
    }
  }
  for (; j < L; ++j) {
    for (int c = 0; c < C; ++c) {
      const __m512 x = load16(v + j * stride + 16 * c);
      for (int g = 0; g < NG; ++g) acc[0][g][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * w_stride + j]), x, acc[0][g][c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < C; ++c) {
      __m512 a = acc[0][g][c];
      if constexpr (SETS == 2) a = _mm512_add_ps(a, acc[1][g][c]);
      _mm512_storeu_ps(out + g * out_stride + 16 * c, _mm512_mul_ps(a, _mm512_set1_ps(inv_sum[g])));
    }
}

// One (row, key/value head): G queries q [G, D] (fp32, already times the softmax scale) over keys/values
// k, v [L, D] (positions `stride` elements apart); s [G, L] and kb [16, D] scratch; out [G, D] (out_stride
// apart). Keys go in blocks of 16, each widened to fp32 once for all G queries; a last partial block
// computes its missing keys as zero products and masks them (nothing past L is read), so a row's numbers
// depend on its own length only. Values are read once for all G queries (`weigh_values`).
template <typename T, int C>  // C = D / 16 vectors per head (template: accumulators stay in registers)
static void attend(const float* q, const T* k, const T* v, int64_t stride, int64_t L, int64_t G,
                   const float* slopes, float* s, float* kb, float* out, int64_t out_stride) {
  constexpr int D = 16 * C;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float inv_sum[64];
  __m512 mxv[64];
  for (int64_t g = 0; g < G; ++g) mxv[g] = _mm512_set1_ps(-INFINITY);
  for (int64_t l0 = 0; l0 < L; l0 += 16) {  // scores
    const int64_t n = L - l0 < 16 ? L - l0 : 16;
    const __mmask16 valid = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
    if (l0 + 16 < L) prefetch_rows<T, C>(k + (l0 + 16) * stride, stride, L - l0 - 16 < 16 ? L - l0 - 16 : 16);
    widen<T, C>(k + l0 * stride, stride, n, kb);
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[C];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * D + 16 * c);
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        if (j < n) {
          dots[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kb + j * D));
          for (int c = 1; c < C; ++c) dots[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kb + j * D + 16 * c), dots[j]);
        } else {
          dots[j] = _mm512_setzero_ps();
        }
      }
      __m512 x = sum16(dots);
      if (slopes) {
        const __m512 rel = _mm512_add_ps(iota, _mm512_set1_ps((float)(l0 - (L - 1))));
        x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(slopes[g]), rel));
      }
      _mm512_mask_storeu_ps(s + g * L + l0, valid, x);
      mxv[g] = _mm512_mask_max_ps(mxv[g], valid, mxv[g], x);
    }
  }
  if (L > 16) prefetch_rows<T, C>(v, stride, 16);  // the values' first block, while the weights are made
  for (int64_t g = 0; g < G; ++g) {  // softmax weights (unnormalised) and their sums
    float* sg = s + g * L;
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mxv[g]));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
      const __mmask16 valid = (__mmask16)(L - l >= 16 ? 0xFFFF : (1u << (L - l)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sg + l), m)));
      _mm512_mask_storeu_ps(sg + l, valid, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  constexpr int NG = C <= 4 ? 4 : C <= 8 ? 2 : 1;  // queries weighed together: NG * C <= 16 accumulators
  for (int64_t g = 0; g < G; g += NG) {
    float* o = out + g * out_stride;
    switch (G - g < NG ? G - g : NG) {
      case 1: weigh_values<T, C, 1>(v, stride, L, s + g * L, L, o, out_stride, inv_sum + g); break;
      case 2: if constexpr (NG >= 2) weigh_values<T, C, 2>(v, stride, L, s + g * L, L, o, out_stride, inv_sum + g); break;
      case 3: if constexpr (NG >= 3) weigh_values<T, C, 3>(v, stride, L, s + g * L, L, o, out_stride, inv_sum + g); break;
      default: if constexpr (NG >= 4) weigh_values<T, C, 4>(v, stride, L, s + g * L, L, o, out_stride, inv_sum + g); break;
    }
  }
}

template <typename T>
using AttendFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, const float*, float*, float*,
                          float*, int64_t);

template <typename T>
static AttendFn<T> pick(int64_t D) {
  switch (D) {  // head sizes in use: 16-128 in steps of 16 (tiny test models to 7B/13B), and 256
    case 16: return attend<T, 1>;
    case 32: return attend<T, 2>;
    case 48: return attend<T, 3>;
    case 64: return attend<T, 4>;
    case 80: return attend<T, 5>;
    case 96: return attend<T, 6>;
    case 112: return attend<T, 7>;
    case 128: return attend<T, 8>;
    case 256: return attend<T, 16>;
    default: return nullptr;
  }
}

// q [b, H, 1, D] (fp32 or bf16, any strides but the last), k/v [b, KVH, >= max(lengths), D] views of the
// cache (same dtype, fp32 or bf16, last stride 1), lengths [b] int64 (keys of each row, the new one
// included), slopes [H] fp32 or empty. Returns fp32 [b, 1, H, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                               torch::Tensor slopes, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: bad ranks");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == B && k.size(3) == D,
              "decode_attention: k/v shapes");
  TORCH_CHECK(H % KVH == 0, "decode_attention: heads do not split into key/value groups");
  TORCH_CHECK(H / KVH <= 64, "decode_attention: more than 64 query heads per key/value head");
  TORCH_CHECK(k.stride(3) == 1 && q.stride(3) == 1, "decode_attention: last dimension must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k/v dtypes differ");
  TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.numel() == B, "decode_attention: lengths");
  TORCH_CHECK(slopes.numel() == 0 || (slopes.numel() == H && slopes.scalar_type() == torch::kFloat),
              "decode_attention: slopes");
  const int64_t G = H / KVH;
  auto lens = lengths.contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r)
    TORCH_CHECK(len[r] >= 1 && len[r] <= k.size(2), "decode_attention: row length out of range");
  // queries in fp32, times the softmax scale, [b, H, D] contiguous
  auto qf = (q.to(torch::kFloat) * scale).reshape({B, H, D}).contiguous();
  auto sl = slopes.contiguous();
  auto out = torch::empty({B, 1, H, D}, q.options().dtype(torch::kFloat));
  const float* qp = qf.data_ptr<float>();
  const float* sp = sl.numel() ? sl.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  int64_t longest = 0;
  for (int64_t r = 0; r < B; ++r) longest = std::max(longest, len[r]);

  auto run = [&](auto* kp, auto* vp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    AttendFn<T> fn = pick<T>(D);
    TORCH_CHECK(fn != nullptr, "decode_attention: head_dim ", D, " not supported");
    at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(G * longest), kb(16 * D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / KVH, h = i % KVH;
        const int64_t off = r * ks0 + h * ks1;
        if (i + 1 < end) {  // the next (row, head)'s first keys: a new stream, which this one's work hides
          const int64_t r1 = (i + 1) / KVH, off1 = r1 * ks0 + ((i + 1) % KVH) * ks1;
          for (int64_t j = 0; j < std::min<int64_t>(len[r1], 16); ++j)
            _mm_prefetch(reinterpret_cast<const char*>(kp + off1 + j * ks2), _MM_HINT_T1);
        }
        fn(qp + (r * H + h * G) * D, kp + off, vp + off, ks2, len[r], G, sp ? sp + h * G : nullptr,
           scores.data(), kb.data(), op + (r * H + h * G) * D, D);
      }
    });
  };
  if (k.scalar_type() == torch::kFloat) {
    run(k.data_ptr<float>(), v.data_ptr<float>());
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kBFloat16, "decode_attention: cache dtype must be float32 or bfloat16");
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  }
  return out;
}

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "one-token attention over a slot KV cache (fp32/bf16)");
  m.def("supported", &supported, "the CPU runs this kernel");
}
