// The small per-layer operations around the matmuls, each one pass over its tensor, for CPU inference:
// RMSNorm, RoPE, and SiLU(gate) * up. Why: at decode batch sizes they are tensors of a few hundred KB, and
// PyTorch runs each as 4-8 separate operators (bf16 -> fp32 copies, pow, mean, rsqrt, chunk, cat, neg ...):
// measured on SmolLM2 (30 layers of width 576), ~1.4 ms per layer per step in bf16 at 64 rows, a third of
// the step. Each function computes what the module's PyTorch code computes, in the same order and with
// the same roundings (a bf16 result is rounded where PyTorch rounds it), except that sums (RMSNorm's mean
// of squares) and exp (SiLU) may differ in the last bit. Every row is computed alone, so batched and
// unbatched decoding stay identical.
// Built on first use by baichuan2.model.cpu_kernels (torch.utils.cpp_extension.load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx512_common.h"

#include <cmath>
#include <cstring>

static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// fp32 -> bf16 rounding to nearest even, NaN kept quiet (what PyTorch's conversion does)
static inline __m512 round_bf16(__m512 v) {
  __m512i i = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(i, _mm512_set1_epi32(0x00400000)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000)));
}
static inline void store16(at::BFloat16* p, __m512 v) {
  __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}
template <typename T> static inline __m512 as_dtype(__m512 v);  // the value T would hold (rounded)
template <> inline __m512 as_dtype<float>(__m512 v) { return v; }
template <> inline __m512 as_dtype<at::BFloat16>(__m512 v) { return round_bf16(v); }

static void check_rows(const torch::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == width && x.stride(-1) == 1, what, ": last dimension must be ",
              width, " and contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, what,
              ": dtype must be float32 or bfloat16");
}

// RMSNorm of one row as the model's module: w * (x * rsqrt(mean(x^2) + eps)) with x in fp32, the normalised
// value rounded to x's dtype before the (dtype) product with w.
template <typename T>
static inline void rms_row(const T* xp, const T* wp, T* yp, int64_t H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    __m512 v = load16(xp + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)H + eps);
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < H; i += 16)
    store16(yp + i, _mm512_mul_ps(load16(wp + i), as_dtype<T>(_mm512_mul_ps(load16(xp + i), iv))));
}

static void check_norm_weight(const torch::Tensor& x, const torch::Tensor& w, int64_t H, const char* what) {
  TORCH_CHECK(H % 16 == 0, what, ": width must be a multiple of 16");
  check_rows(x, H, what);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H && w.scalar_type() == x.scalar_type() && w.is_contiguous(), what,
              ": weight must be [width] in x's dtype");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t H = x.size(-1);
  check_norm_weight(x, w, H, "rms_norm");
  auto xc = x.reshape({-1, H});
  auto y = torch::empty({xc.size(0), H}, x.options());
  auto run = [&](auto* xp0, auto* wp, auto* yp0) {
    const int64_t ld = xc.stride(0);
    at::parallel_for(0, xc.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_row(xp0 + r * ld, wp, yp0 + r * H, H, (float)eps);
    });
  };
  if (x.scalar_type() == torch::kFloat)
    run(xc.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>());
  else
    run(xc.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y.view(x.sizes());
}

// The residual stream's step between sublayers: x += y in place (rounded to x's dtype, as ``x + y``), then
// returns rms_norm(x, w). x [R, H] contiguous, y [R, H] (rows may be strided), same dtype.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps) {
  const int64_t H = x.size(-1);
  check_norm_weight(x, w, H, "add_rms_norm");
  check_rows(y, H, "add_rms_norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0) &&
                  y.scalar_type() == x.scalar_type(),
              "add_rms_norm: x must be contiguous [rows, width], y [rows, width] in x's dtype");
  auto out = torch::empty_like(x);
  auto run = [&](auto* xp0, auto* yp0, auto* wp, auto* op0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp0)>>;
    const int64_t ldy = y.stride(0);
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* xp = xp0 + r * H;
        const T* yp = yp0 + r * ldy;
        for (int64_t i = 0; i < H; i += 16) store16(xp + i, _mm512_add_ps(load16(xp + i), load16(yp + i)));
        rms_row(xp, wp, op0 + r * H, H, (float)eps);
      }
    });
  };
  if (x.scalar_type() == torch::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
        out.data_ptr<at::BFloat16>());
  return out;
}

// One head of RoPE: first half x1*cos - x2*sin, second x2*cos + x1*sin (products rounded, then the sum:
// no FMA, as PyTorch's separate operators)
template <typename T>
static inline void rotate_head(const T* xp, T* yp, const float* c, const float* s, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load16(xp + i), x2 = load16(xp + half + i);
    store16(yp + i, _mm512_add_ps(_mm512_mul_ps(x1, load16(c + i)),
                                  _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + i))));
    store16(yp + half + i, _mm512_add_ps(_mm512_mul_ps(x2, load16(c + half + i)),
                                         _mm512_mul_ps(x1, load16(s + half + i))));
  }
}

// RoPE ("half" convention) as apply_rope: (x*cos + rotate(x)*sin) in fp32, rounded to x's dtype.
// x [b, t, n, d] (last dimension contiguous), cos/sin [b, t, d] fp32 (any b/t strides, last contiguous).
// Returns a contiguous [b, t, n, d].
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4, "rope: x must be [b, t, heads, d]");
  const int64_t B = x.size(0), T_ = x.size(1), N = x.size(2), D = x.size(3);
  check_rows(x, D, "rope");
  TORCH_CHECK(D % 32 == 0, "rope: head_dim must be a multiple of 32");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(1) == T_ &&
                  cos.size(2) == D && cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat &&
                  cos.stride(2) == 1 && sin.stride(2) == 1,
              "rope: cos/sin must be fp32 [b, t, head_dim]");
  auto y = torch::empty({B, T_, N, D}, x.options());
  auto run = [&](auto* xp0, auto* yp0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp0)>>;
    const float* cp0 = cos.data_ptr<float>();
    const float* sp0 = sin.data_ptr<float>();
    at::parallel_for(0, B * T_, 8, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T_, t = bt % T_;
        const float* c = cp0 + b * cos.stride(0) + t * cos.stride(1);
        const float* s = sp0 + b * sin.stride(0) + t * sin.stride(1);
        for (int64_t h = 0; h < N; ++h) {
          const T* xp = xp0 + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
          T* yp = yp0 + ((b * T_ + t) * N + h) * D;
          rotate_head(xp, yp, c, s, D);
        }
      }
    });
  };
  if (x.scalar_type() == torch::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y;
}

// One decoding step's attention input, in one pass: qkv [R, (H + 2*KVH) * D] (the fused projection's output:
// query heads, then key heads, then value heads; rows may be strided) -> the queries rotated by RoPE, returned
// as [R, H, D]; the keys rotated and the values copied straight into the cache at each row's own position
// (keys/values [slots, KVH, L, D], contiguous, the model's dtype; row r writes position starts[r]). cos/sin
// fp32 [R, D] (the rows' positions), or empty for a model without RoPE (ALiBi): nothing is rotated. The same
// arithmetic as rope() + the cache's index_copy_, without the separate operators and the copies between them.
torch::Tensor rope_append(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                          torch::Tensor values, torch::Tensor starts, int64_t H) {
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == values.scalar_type(),
              "rope_append: keys/values must be contiguous [slots, kv_heads, length, head_dim] of one dtype");
  const int64_t KVH = keys.size(1), L = keys.size(2), D = keys.size(3), R = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (H + 2 * KVH) * D && qkv.scalar_type() == keys.scalar_type(),
              "rope_append: qkv must be [rows, (heads + 2 kv_heads) * head_dim] in the cache's dtype");
  check_rows(qkv, (H + 2 * KVH) * D, "rope_append");
  TORCH_CHECK(D % 32 == 0 && H % KVH == 0 && R <= keys.size(0), "rope_append: head_dim / heads / rows");
  const bool rotate = cos.numel() > 0;
  if (rotate)
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == R && cos.size(1) == D &&
                    cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat &&
                    cos.stride(1) == 1 && sin.stride(1) == 1,
                "rope_append: cos/sin must be fp32 [rows, head_dim]");
  TORCH_CHECK(starts.scalar_type() == torch::kLong && starts.numel() == R, "rope_append: starts");
  auto st = starts.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(sp[r] >= 0 && sp[r] < L, "rope_append: position out of range");
  auto q = torch::empty({R, H, D}, qkv.options());
  auto run = [&](auto* in0, auto* q0, auto* k0, auto* v0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(in0)>>;
    const int64_t ld = qkv.stride(0);
    at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* in = in0 + r * ld;
        const float* c = rotate ? cos.data_ptr<float>() + r * cos.stride(0) : nullptr;
        const float* s = rotate ? sin.data_ptr<float>() + r * sin.stride(0) : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          if (rotate) rotate_head(in + h * D, q0 + (r * H + h) * D, c, s, D);
          else std::memcpy(q0 + (r * H + h) * D, in + h * D, D * sizeof(T));
        }
        for (int64_t h = 0; h < KVH; ++h) {
          const int64_t at = ((r * KVH + h) * L + sp[r]) * D;
          if (rotate) rotate_head(in + (H + h) * D, k0 + at, c, s, D);
          else std::memcpy(k0 + at, in + (H + h) * D, D * sizeof(T));
          std::memcpy(v0 + at, in + (H + KVH + h) * D, D * sizeof(T));
        }
      }
    });
  };
  if (qkv.scalar_type() == torch::kFloat)
    run(qkv.data_ptr<float>(), q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>());
  else
    run(qkv.data_ptr<at::BFloat16>(), q.data_ptr<at::BFloat16>(), keys.data_ptr<at::BFloat16>(),
        values.data_ptr<at::BFloat16>());
  return q;
}

// silu(gate) * up, the SiLU rounded to the dtype before the product (as two PyTorch operators would).
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  const int64_t I = gate.size(-1);
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && I % 16 == 0,
              "silu_mul: gate and up must have one shape and dtype, width a multiple of 16");
  check_rows(gate, I, "silu_mul");
  check_rows(up, I, "silu_mul");
  auto g = gate.reshape({-1, I}), u = up.reshape({-1, I});
  auto y = torch::empty({g.size(0), I}, gate.options());
  auto run = [&](auto* gp0, auto* up0, auto* yp0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(gp0)>>;
    at::parallel_for(0, g.size(0), 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* gp = gp0 + r * g.stride(0);
        const T* upp = up0 + r * u.stride(0);
        T* yp = yp0 + r * I;
        for (int64_t i = 0; i < I; i += 16) {
          const __m512 x = load16(gp + i);
          const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f),
                                                             exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
          store16(yp + i, _mm512_mul_ps(as_dtype<T>(silu), load16(upp + i)));
        }
      }
    });
  };
  if (gate.scalar_type() == torch::kFloat)
    run(g.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>());
  else
    run(g.data_ptr<at::BFloat16>(), u.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y.view(gate.sizes());
}

// 16 values of a row tail (n < 16 left) as fp32, the missing lanes -inf (never a row's maximum)
static inline __m512 load_tail(const float* p, __mmask16 m) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, p);
}
static inline __m512 load_tail(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), v);
}

// Greedy decoding's argmax: the first index of each row's maximum, a NaN counting as the maximum (as
// torch.max(dim).indices). One pass over [R, V] logits (rows contiguous; PyTorch's reduction over the last
// dimension measured ~0.4 G values/s here, 8 ms for 64 rows of a 49k vocabulary).
// Lane j keeps the largest value it has seen at j, j + 16, ... and where (a strict > keeps the first);
// ties between lanes go to the lower index.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0 &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "argmax_rows: x must be fp32 or bf16 [rows, n > 0] with contiguous rows");
  TORCH_CHECK(x.size(1) < (int64_t(1) << 31), "argmax_rows: rows of 2^31 values or more");
  const int64_t R = x.size(0), V = x.size(1), ld = x.stride(0);
  auto out = torch::empty({R}, x.options().dtype(torch::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  auto run = [&](auto* xp) {
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto* p = xp + r * ld;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i where = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512i at = where;
        const __m512i step = _mm512_set1_epi32(16);
        int64_t nan_at = -1;
        for (int64_t i = 0; i < V; i += 16) {
          const __m512 v = V - i >= 16 ? load16(p + i) : load_tail(p + i, (__mmask16)((1u << (V - i)) - 1));
          const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          if (nan) {  // the first NaN is the answer
            nan_at = i + __builtin_ctz(nan);
            break;
          }
          const __mmask16 more = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
          best = _mm512_mask_mov_ps(best, more, v);
          where = _mm512_mask_mov_epi32(where, more, at);
          at = _mm512_add_epi32(at, step);
        }
        if (nan_at >= 0) {
          op[r] = nan_at;
          continue;
        }
        alignas(64) float bv[16];
        alignas(64) int32_t bi[16];
        _mm512_store_ps(bv, best);
        _mm512_store_si512(bi, where);
        int j = 0;
        for (int l = 1; l < 16; ++l)
          if (bv[l] > bv[j] || (bv[l] == bv[j] && bi[l] < bi[j])) j = l;
        op[r] = bi[j];
      }
    });
  };
  if (x.scalar_type() == torch::kFloat)
    run(x.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>());
  return out;
}

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, release(), "RMSNorm as the model's module (fp32 / bf16)");
  m.def("add_rms_norm", &add_rms_norm, release(), "x += y in place, then RMSNorm of x (fp32 / bf16)");
  m.def("rope", &rope, release(), "RoPE as apply_rope (fp32 / bf16)");
  m.def("rope_append", &rope_append, release(),
        "one decoding step: rotate q and k, write k and v into the slot cache (fp32 / bf16)");
  m.def("silu_mul", &silu_mul, release(), "silu(gate) * up (fp32 / bf16)");
  m.def("argmax_rows", &argmax_rows, release(), "first index of each row's maximum (fp32 / bf16)");
  m.def("supported", &supported, "the CPU runs this kernel");
}
