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
// together (the cache holds one head per group). ALiBi: score += slope[h] * (k - q) with q = the row's
// last position (Baichuan 2 13B). Every (row, head) is computed alone, in the same order whatever else is
// in the batch, so batched and unbatched decoding give identical outputs.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx512_common.h"

#include <cmath>
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

// One (row, key/value head): G queries q [G, D] (fp32, already times the softmax scale) over keys/values
// k, v [L, D] (positions `stride` elements apart); scores s [G, L] scratch; out [G, D] (q_stride apart).
template <typename T, int C>  // C = D / 16 vectors per head (template: accumulators stay in registers)
static void attend(const float* q, const T* k, const T* v, int64_t stride, int64_t L, int64_t G,
                   const float* slopes, float* s, float* out, int64_t out_stride) {
  constexpr int D = 16 * C;
  for (int64_t g = 0; g < G; ++g) {  // scores: the first query streams the keys in, the others hit L2
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * D + 16 * c);
    float* sg = s + g * L;
    const float slope = slopes ? slopes[g] : 0.f;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    int64_t l0 = 0;
    for (; l0 + 16 <= L; l0 += 16) {  // 16 keys at a time: one vector of 16 scores
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        const T* kl = k + (l0 + j) * stride;
        acc[j] = _mm512_mul_ps(qv[0], load16(kl));
        for (int c = 1; c < C; ++c) acc[j] = _mm512_fmadd_ps(qv[c], load16(kl + 16 * c), acc[j]);
      }
      __m512 x = sum16(acc);
      if (slopes) {
        const __m512 rel = _mm512_add_ps(iota, _mm512_set1_ps((float)(l0 - (L - 1))));
        x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(slope), rel));
      }
      _mm512_storeu_ps(sg + l0, x);
      mxv = _mm512_max_ps(mxv, x);
    }
    float mx = _mm512_reduce_max_ps(mxv);
    for (int64_t l = l0; l < L; ++l) {  // the last L % 16 keys one by one
      const T* kl = k + l * stride;
      __m512 acc = _mm512_mul_ps(qv[0], load16(kl));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kl + 16 * c), acc);
      float x = _mm512_reduce_add_ps(acc);
      if (slopes) x += slope * (float)(l - (L - 1));
      sg[l] = x;
      mx = x > mx ? x : mx;
    }
    __m512 m = _mm512_set1_ps(mx), sum = _mm512_setzero_ps();
    int64_t l = 0;
    for (; l + 16 <= L; l += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + l), m));
      _mm512_storeu_ps(sg + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (l < L) {
      __mmask16 tail = (__mmask16)((1u << (L - l)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + l), m));
      _mm512_mask_storeu_ps(sg + l, tail, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const T* vl = v + j * stride;
      __m512 p = _mm512_set1_ps(sg[j]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vl + 16 * c), acc[c]);
    }
    __m512 iv = _mm512_set1_ps(inv);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * out_stride + 16 * c, _mm512_mul_ps(acc[c], iv));
  }
}

template <typename T>
using AttendFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, const float*, float*, float*,
                          int64_t);

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
      std::vector<float> scores(G * longest);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / KVH, h = i % KVH;
        const int64_t off = r * ks0 + h * ks1;
        fn(qp + (r * H + h * G) * D, kp + off, vp + off, ks2, len[r], G, sp ? sp + h * G : nullptr,
           scores.data(), op + (r * H + h * G) * D, D);
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
