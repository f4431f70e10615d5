// reclora_ds CPU kernels (the math: reclora_ds/models/ops.py; building and registering them:
// reclora_ds/cpu/kernels/__init__.py).
//
//   gather_dot(table [V, E], ids [B, L], query [B, E]) -> [B, L]
//       out[b, l] = sum_e table[ids[b, l], e] * query[b, e]
//       The soft search's row inner products, without the [B, L, E] temporary of index_select + vecdot.
//       Forward only.
//
//   attention_pool(pre [B, L, H], u [B, H], w [H], c [1], mask [B, L], h [B, L, D]) -> (out [B, D], s [B, L])
//       x[b, j] = pre[b, j] + u[b]  (the first layer's output: per-behaviour part + per-target part)
//       s[b, j] = mask[b, j] ? sum_k relu(x[b, j, k]) * w[k] + c : 0,   out[b] = sum_j s[b, j] h[b, j]
//   attention_pool_backward(g_out [B, D], pre, u, w, mask, h, s) -> (g_pre, g_u, g_w, g_c, g_h)
//       DIN's activation unit from its first layer's two parts on (their sum, ReLU, the H -> 1 output
//       layer, the mask, the weighted sum): one pass over the [B, L, H] activations each way instead of
//       one per op.
//
//   decoder_attention(q [B, H, Tq, d], k [B, Hk, Tk, d], v [B, Hk, Tk, d], mask [B or 1, 1, Tq, Tk] or none,
//                     scale) -> out [B, Tq, H, d]
//       transformers' eager attention (query head h reads key head h / (H / Hk)), bf16:
//       w = bf16(bf16(bf16(q k^T) * scale) + mask), p = bf16(softmax_fp32(w)), out = bf16(p v),
//       with the same roundings as eager's ops, one (batch, key head) at a time in the core's caches:
//       no [B, H, Tq, Tk] tensor is written, and keys a query row cannot see (its mask at bf16's lowest
//       after its last visible key: the causal future) are skipped. Needs AVX512-BF16
//       (decoder_attention_supported); d a multiple of 64.
//   decoder_attention_train(q, k, v, mask, scale) -> (out, probs [B, H, Tq, Tk])
//       The same, keeping the bf16 probabilities for the backward.
//   decoder_attention_backward(grad [B, Tq, H, d], q, k, v, mask, probs, scale) -> (dq, dk, dv)
//       dP = dO v^T, dS = bf16(bf16(p (dP - sum_j dP p)) * scale) (eager's softmax backward from the bf16 p),
//       dq = dS k, dk = sum over the group's query heads of dS^T q, dv = sum of p^T dO; one (batch, key head)
//       at a time in the core's caches.
//
//   attention_probs(scores [B, H, Tq, Tk], mask, scale) -> probs [B, H, Tq, Tk]
//   attention_probs_backward(dP [B, H, Tq, Tk], probs, mask, scale) -> dS [B, H, Tq, Tk]
//       The two row passes of the same attention when its products run as matrix multiplications
//       (reclora_ds.cpu.kernels' matmul form: S = q k^T and the rest through oneDNN, on AMX tiles where the CPU
//       has them): p = bf16(softmax_fp32(bf16(bf16(S) * scale) + mask)) and
//       dS = bf16(bf16(p (dP - sum_j dP p)) * scale), each row once, zeros past its visible keys. bf16,
//       AVX512-BF16. cpu_has_amx() says whether the CPU has AMX-BF16 and the OS lets the process use it.
//
//   rms_norm(x [..., D], w [D], eps) -> out [..., D]
//       transformers' LlamaRMSNorm in bf16, with its roundings: r = 1 / sqrt(mean_j x_j^2 + eps) (fp32),
//       out = bf16(w * bf16(x r)); one pass over a row instead of one op per step. Needs AVX512-BF16.
//   rms_norm_train(x, w, eps) -> (out, r [rows] fp32)
//   rms_norm_backward(grad, x, w, r) -> dx   (w frozen: no gradient for it)
//       g = bf16(grad w), dx = bf16(g r - x r^3 / D * sum_j g_j x_j), autograd's chain through eager's ops.
//
// The CRM's kernels: float32, contiguous CPU tensors; one thread (the CRM runs one rank per core). Loaded by
// torch.utils.cpp_extension from reclora_ds.cpu.kernels.load.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 10)
#define RECLORA_AVX512_BF16 1
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// Each per-sample loop is compiled twice, for AVX2 + FMA and for the baseline, and picked at load time
// (GCC's function multi-versioning), so one cached build runs on any x86-64 CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CPU_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CPU_KERNEL
#endif

constexpr int64_t kNoBadId = std::numeric_limits<int64_t>::min();

// One sample: `count` rows of `table` at `ids`, each dotted with `query`. Out-of-range ids are reported
// through `bad` (the caller raises) and give 0.
CPU_KERNEL
void gather_dot_sample(const float* table, int64_t rows, int64_t width, const int64_t* ids,
                       const float* query, int64_t count, float* __restrict__ out, int64_t* bad) {
  for (int64_t l = 0; l < count; ++l) {
    const int64_t id = ids[l];
    if (id < 0 || id >= rows) {
      *bad = id;
      out[l] = 0.f;
      continue;
    }
    const float* row = table + id * width;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < width; ++e) acc += row[e] * query[e];
    out[l] = acc;
  }
}

at::Tensor gather_dot(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& query) {
  TORCH_CHECK(table.dim() == 2 && ids.dim() == 2 && query.dim() == 2,
              "gather_dot: expects table [V, E], ids [B, L], query [B, E]; got ", table.sizes(), ", ",
              ids.sizes(), ", ", query.sizes());
  TORCH_CHECK(table.device().is_cpu() && ids.device().is_cpu() && query.device().is_cpu(),
              "gather_dot: CPU tensors only");
  TORCH_CHECK(table.scalar_type() == at::kFloat && query.scalar_type() == at::kFloat &&
                  ids.scalar_type() == at::kLong,
              "gather_dot: expects float32 table and query and int64 ids");
  TORCH_CHECK(ids.size(0) == query.size(0) && table.size(1) == query.size(1),
              "gather_dot: table ", table.sizes(), ", ids ", ids.sizes(), " and query ", query.sizes(),
              " disagree");
  const at::Tensor t = table.contiguous();
  const at::Tensor i = ids.contiguous();
  const at::Tensor q = query.contiguous();
  const int64_t batch = i.size(0), length = i.size(1), rows = t.size(0), width = t.size(1);
  at::Tensor out = at::empty({batch, length}, t.options());
  const float* tp = t.data_ptr<float>();
  const int64_t* ip = i.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t bad = kNoBadId;
  for (int64_t b = 0; b < batch; ++b) {
    gather_dot_sample(tp, rows, width, ip + b * length, qp + b * width, length, op + b * length, &bad);
  }
  TORCH_CHECK(bad == kNoBadId, "gather_dot: id ", bad, " is outside the table's ", rows, " rows");
  return out;
}

void check_attention(const at::Tensor& pre, const at::Tensor& u, const at::Tensor& w, const at::Tensor& mask,
                     const at::Tensor& h) {
  TORCH_CHECK(pre.dim() == 3 && u.dim() == 2 && w.dim() == 1 && mask.dim() == 2 && h.dim() == 3,
              "attention_pool: expects pre [B, L, H], u [B, H], w [H], mask [B, L], h [B, L, D]; got ", pre.sizes(),
              ", ", u.sizes(), ", ", w.sizes(), ", ", mask.sizes(), ", ", h.sizes());
  TORCH_CHECK(pre.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  h.scalar_type() == at::kFloat && mask.scalar_type() == at::kBool,
              "attention_pool: expects float32 pre, u, w, h and a bool mask");
  TORCH_CHECK(pre.device().is_cpu() && u.device().is_cpu() && w.device().is_cpu() && mask.device().is_cpu() &&
                  h.device().is_cpu(),
              "attention_pool: CPU tensors only");
  TORCH_CHECK(pre.size(0) == h.size(0) && pre.size(1) == h.size(1) && mask.size(0) == pre.size(0) &&
                  mask.size(1) == pre.size(1) && w.size(0) == pre.size(2) && u.size(0) == pre.size(0) &&
                  u.size(1) == pre.size(2),
              "attention_pool: pre ", pre.sizes(), ", u ", u.sizes(), ", w ", w.sizes(), ", mask ", mask.sizes(),
              " and h ", h.sizes(), " disagree");
}

// Scores and pooled output of one sample's L behaviours.
CPU_KERNEL
void attention_pool_sample(const float* pre, const float* u, const float* w, float c, const bool* mask,
                           const float* h, int64_t length, int64_t hidden, int64_t width, float* __restrict__ out,
                           float* __restrict__ s) {
  for (int64_t d = 0; d < width; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    if (!mask[j]) {
      s[j] = 0.f;
      continue;
    }
    const float* x = pre + j * hidden;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < hidden; ++k) {
      const float v = x[k] + u[k];
      acc += (v > 0.f ? v : 0.f) * w[k];
    }
    const float score = acc + c;
    s[j] = score;
    const float* row = h + j * width;
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) out[d] += score * row[d];
  }
}

std::tuple<at::Tensor, at::Tensor> attention_pool(const at::Tensor& pre, const at::Tensor& u, const at::Tensor& w,
                                                  const at::Tensor& c, const at::Tensor& mask, const at::Tensor& h) {
  check_attention(pre, u, w, mask, h);
  TORCH_CHECK(c.numel() == 1 && c.scalar_type() == at::kFloat, "attention_pool: c must hold one float32");
  const at::Tensor x = pre.contiguous(), uc = u.contiguous(), wc = w.contiguous(), m = mask.contiguous();
  const at::Tensor hc = h.contiguous();
  const int64_t batch = x.size(0), length = x.size(1), hidden = x.size(2), width = hc.size(2);
  at::Tensor out = at::empty({batch, width}, x.options());
  at::Tensor s = at::empty({batch, length}, x.options());
  const float bias = c.item<float>();
  for (int64_t b = 0; b < batch; ++b) {
    attention_pool_sample(x.data_ptr<float>() + b * length * hidden, uc.data_ptr<float>() + b * hidden,
                          wc.data_ptr<float>(), bias,
                          m.data_ptr<bool>() + b * length, hc.data_ptr<float>() + b * length * width, length,
                          hidden, width, out.data_ptr<float>() + b * width, s.data_ptr<float>() + b * length);
  }
  return {out, s};
}

// Gradients of one sample; g_w accumulates over samples, the returned value adds to g_c.
CPU_KERNEL
double attention_pool_backward_sample(const float* g_out, const float* pre, const float* u, const float* w,
                                      const bool* mask, const float* h, const float* s, int64_t length,
                                      int64_t hidden, int64_t width, float* __restrict__ g_pre,
                                      float* __restrict__ g_u, float* __restrict__ g_w, float* __restrict__ g_h) {
  for (int64_t k = 0; k < hidden; ++k) g_u[k] = 0.f;
  double g_c = 0.0;
  for (int64_t j = 0; j < length; ++j) {
    float* gx = g_pre + j * hidden;
    float* gh = g_h + j * width;
    if (!mask[j]) {
      for (int64_t k = 0; k < hidden; ++k) gx[k] = 0.f;
      for (int64_t d = 0; d < width; ++d) gh[d] = 0.f;
      continue;
    }
    const float* row = h + j * width;
    float g_s = 0.f;  // d loss / d s[j] = <g_out, h_j>
#pragma omp simd reduction(+ : g_s)
    for (int64_t d = 0; d < width; ++d) g_s += g_out[d] * row[d];
    const float score = s[j];
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) gh[d] = score * g_out[d];
    const float* x = pre + j * hidden;
#pragma omp simd
    for (int64_t k = 0; k < hidden; ++k) {  // branch-free: the signs of x are data, not a pattern
      const float v = x[k] + u[k];
      const float active = v > 0.f ? 1.f : 0.f;
      const float g = active * g_s * w[k];
      gx[k] = g;
      g_u[k] += g;
      g_w[k] += active * g_s * v;
    }
    g_c += g_s;
  }
  return g_c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_backward(
    const at::Tensor& g_out, const at::Tensor& pre, const at::Tensor& u, const at::Tensor& w, const at::Tensor& mask,
    const at::Tensor& h, const at::Tensor& s) {
  check_attention(pre, u, w, mask, h);
  const at::Tensor x = pre.contiguous(), uc = u.contiguous(), wc = w.contiguous(), m = mask.contiguous();
  const at::Tensor hc = h.contiguous();
  const at::Tensor go = g_out.contiguous(), sc = s.contiguous();
  const int64_t batch = x.size(0), length = x.size(1), hidden = x.size(2), width = hc.size(2);
  TORCH_CHECK(go.scalar_type() == at::kFloat && go.size(0) == batch && go.size(1) == width &&
                  sc.scalar_type() == at::kFloat && sc.size(0) == batch && sc.size(1) == length,
              "attention_pool_backward: g_out ", go.sizes(), " or s ", sc.sizes(), " disagree with the inputs");
  at::Tensor g_pre = at::empty_like(x);
  at::Tensor g_u = at::empty_like(uc);
  at::Tensor g_h = at::empty_like(hc);
  at::Tensor g_w = at::zeros({hidden}, x.options());
  double g_c = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    g_c += attention_pool_backward_sample(
        go.data_ptr<float>() + b * width, x.data_ptr<float>() + b * length * hidden, uc.data_ptr<float>() + b * hidden,
        wc.data_ptr<float>(), m.data_ptr<bool>() + b * length, hc.data_ptr<float>() + b * length * width,
        sc.data_ptr<float>() + b * length, length, hidden, width, g_pre.data_ptr<float>() + b * length * hidden,
        g_u.data_ptr<float>() + b * hidden, g_w.data_ptr<float>(), g_h.data_ptr<float>() + b * length * width);
  }
  return {g_pre, g_u, g_w, at::full({1}, static_cast<float>(g_c), x.options()), g_h};
}


// ---------------------------------------------------------------------------------------------------------
// decoder_attention
// ---------------------------------------------------------------------------------------------------------

#ifdef RECLORA_AVX512_BF16
// bf16 <-> float as c10::BFloat16 converts (round to nearest even; NaN stays a quiet NaN)
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int64_t kRows = 4;   // query rows per block
constexpr int64_t kCols = 64;  // key columns (of S) or output columns (of O) per block: 4 registers of 16 floats
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// 16 lanes at a time: bf16 <-> float (vcvtneps2bf16 rounds to nearest even, as c10 does; it also flushes
// denormals to zero, values below 1.2e-38 that no softmax or score here distinguishes from 0)
AVX512BF16
inline __m512 bf16x16_to_ps(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
AVX512BF16
inline __m256i ps_to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
AVX512BF16
inline __m512 round_bf16_ps(__m512 x) { return bf16x16_to_ps(ps_to_bf16x16(x)); }
inline __mmask16 first_lanes(int64_t left) {  // lanes [0, min(left, 16))
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp(x) for x <= 0 (softmax's shifted scores) on 16 lanes: Cody-Waite reduction and Cephes' expf polynomial
// (about 1e-7 relative error); 0 below -87.3, where exp leaves float's normal range.
AVX512BF16
inline __m512 exp_nonpositive_ps(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), e);
}

// softmax of one row of raw scores (fp32 accumulations), as eager attention rounds: bf16(S), bf16(* scale),
// bf16(+ mask), fp32 softmax, bf16 probabilities written to p[0, n) and zeros to p[n, n_pad).
AVX512BF16
void softmax_row(float* s, const uint16_t* m, float scale, int64_t n, int64_t n_pad, uint16_t* p) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    __m512 w = round_bf16_ps(_mm512_mul_ps(round_bf16_ps(_mm512_maskz_loadu_ps(k, s + j)), vscale));
    if (m != nullptr) w = round_bf16_ps(_mm512_add_ps(w, bf16x16_to_ps(_mm256_maskz_loadu_epi16(k, m + j))));
    _mm512_mask_storeu_ps(s + j, k, w);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, w);
  }
  const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    const __m512 e = exp_nonpositive_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vmx));
    _mm512_mask_storeu_ps(s + j, k, e);
    vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
  }
  const __m512 vinv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    _mm256_mask_storeu_epi16(p + j, k, ps_to_bf16x16(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), vinv)));
  }
  std::fill(p + n, p + n_pad, static_cast<uint16_t>(0));
}

// c[r][0, 64) = sum_k2 a_r[k2 * a_step] . b[k2 * b_stride + (0..64)], bf16 pairs, fp32 sums: 4 rows x 64 columns
// in 16 registers.
AVX512BF16
inline void block_4x64(const uint32_t* a0, const uint32_t* a1, const uint32_t* a2, const uint32_t* a3, int64_t a_step,
                       const uint32_t* b, int64_t b_stride, int64_t depth, float* c, int64_t c_stride) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  for (int64_t k = 0; k < depth; ++k) {
    const uint32_t* bk = b + k * b_stride;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk), b1 = (__m512bh)_mm512_loadu_si512(bk + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bk + 32), b3 = (__m512bh)_mm512_loadu_si512(bk + 48);
    __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a0[k * a_step]));
    c00 = _mm512_dpbf16_ps(c00, x, b0); c01 = _mm512_dpbf16_ps(c01, x, b1);
    c02 = _mm512_dpbf16_ps(c02, x, b2); c03 = _mm512_dpbf16_ps(c03, x, b3);
    x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a1[k * a_step]));
    c10 = _mm512_dpbf16_ps(c10, x, b0); c11 = _mm512_dpbf16_ps(c11, x, b1);
    c12 = _mm512_dpbf16_ps(c12, x, b2); c13 = _mm512_dpbf16_ps(c13, x, b3);
    x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a2[k * a_step]));
    c20 = _mm512_dpbf16_ps(c20, x, b0); c21 = _mm512_dpbf16_ps(c21, x, b1);
    c22 = _mm512_dpbf16_ps(c22, x, b2); c23 = _mm512_dpbf16_ps(c23, x, b3);
    x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a3[k * a_step]));
    c30 = _mm512_dpbf16_ps(c30, x, b0); c31 = _mm512_dpbf16_ps(c31, x, b1);
    c32 = _mm512_dpbf16_ps(c32, x, b2); c33 = _mm512_dpbf16_ps(c33, x, b3);
  }
  _mm512_storeu_ps(c, c00); _mm512_storeu_ps(c + 16, c01); _mm512_storeu_ps(c + 32, c02); _mm512_storeu_ps(c + 48, c03);
  c += c_stride;
  _mm512_storeu_ps(c, c10); _mm512_storeu_ps(c + 16, c11); _mm512_storeu_ps(c + 32, c12); _mm512_storeu_ps(c + 48, c13);
  c += c_stride;
  _mm512_storeu_ps(c, c20); _mm512_storeu_ps(c + 16, c21); _mm512_storeu_ps(c + 32, c22); _mm512_storeu_ps(c + 48, c23);
  c += c_stride;
  _mm512_storeu_ps(c, c30); _mm512_storeu_ps(c + 16, c31); _mm512_storeu_ps(c + 32, c32); _mm512_storeu_ps(c + 48, c33);
}

// bf16 pairs as uint32 words, the operands of vdpbf16ps (block_4x64's a and b):
// pairs along the width: out[c2 * n_pad + j] = (x[j, 2 c2], x[j, 2 c2 + 1]); zero columns j in [n, n_pad)
void pack_pairs_along_width(const uint16_t* x, int64_t x_st, int64_t n, int64_t d, int64_t n_pad, uint32_t* out) {
  std::fill(out, out + d / 2 * n_pad, 0u);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + j * x_st);
    for (int64_t c2 = 0; c2 < d / 2; ++c2) out[c2 * n_pad + j] = row[c2];
  }
}

// pairs along the rows, 32 columns at a time: out[j2 * out_cols + c] = (x[2 j2, c], x[2 j2 + 1, c]) for
// c < cols, zero for c in [cols, out_cols) (a multiple of 32) and for rows past n, up to n_pad rows
AVX512BF16
void interleave_row_pairs(const uint16_t* x, int64_t x_st, int64_t n, int64_t cols, int64_t out_cols, int64_t n_pad,
                          uint32_t* out) {
  alignas(64) static constexpr uint16_t kLow[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int64_t j2 = 0; j2 < n_pad / 2; ++j2) {
    const uint16_t* r0 = 2 * j2 < n ? x + 2 * j2 * x_st : nullptr;
    const uint16_t* r1 = 2 * j2 + 1 < n ? x + (2 * j2 + 1) * x_st : nullptr;
    uint32_t* o = out + j2 * out_cols;
    for (int64_t c = 0; c < out_cols; c += 32) {
      const __mmask32 k = c >= cols ? 0u : cols - c >= 32 ? 0xFFFFFFFFu : (1u << (cols - c)) - 1u;
      const __m512i a = r0 != nullptr ? _mm512_maskz_loadu_epi16(k, r0 + c) : _mm512_setzero_si512();
      const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(k, r1 + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + c, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(o + c + 16, _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

// pairs along the rows of an [n, d] matrix (d a multiple of 32): out[j2 * d + c] = (x[2 j2, c], x[2 j2 + 1, c]);
// zero rows past n, up to n_pad rows
AVX512BF16
void pack_pairs_along_rows(const uint16_t* x, int64_t x_st, int64_t n, int64_t d, int64_t n_pad, uint32_t* out) {
  interleave_row_pairs(x, x_st, n, d, d, n_pad, out);
}

// transposed pairs of an [n_rows, n_cols] bf16 matrix (row stride m_st): out[j * rows2 + i2] = (m[2 i2, j],
// m[2 i2 + 1, j]) for j < n_cols, rows2 = n_rows rounded up to even / 2 (a zero row past n_rows)
void transpose_pairs(const uint16_t* m, int64_t m_st, int64_t n_rows, int64_t n_cols, uint32_t* out) {
  const int64_t rows2 = (n_rows + 1) / 2;
  uint16_t* half = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n_rows; ++i) {
    const uint16_t* row = m + i * m_st;
    uint16_t* dst = half + 2 * (i / 2) + (i % 2);
    for (int64_t j = 0; j < n_cols; ++j) dst[j * rows2 * 2] = row[j];
  }
  if (n_rows % 2)
    for (int64_t j = 0; j < n_cols; ++j) half[j * rows2 * 2 + n_rows] = 0;
}

// one past the last key any of rows [i0, i0 + rows) can see, and that rounded up to whole blocks of keys
inline int64_t visible_in_block(const int64_t* limit, int64_t i0, int64_t rows) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) n = std::max(n, limit[i0 + r]);
  return n;
}
inline int64_t whole_blocks(int64_t n) { return (n + kCols - 1) / kCols * kCols; }

// the 4 row pointers of a block: rows i0 .. i0 + 3 of x (the last real row repeated past `rows`)
inline void block_rows(const uint16_t* x, int64_t x_st, int64_t i0, int64_t rows, const uint32_t** out) {
  for (int64_t r = 0; r < kRows; ++r)
    out[r] = reinterpret_cast<const uint32_t*>(x + (i0 + std::min(r, rows - 1)) * x_st);
}

// rows of a 4 x 64 float block (row stride kCols) rounded to bf16 into dst rows (stride dst_st)
AVX512BF16
void store_block_bf16(const float* block, int64_t rows, uint16_t* dst, int64_t dst_st) {
  for (int64_t r = 0; r < rows; ++r)
    for (int t = 0; t < 4; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * dst_st + 16 * t),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(block + r * kCols + 16 * t)));
}

// Where a (batch, key head)'s tensors are: row i of query head h of the group at q + h * q_sh + i * q_st, and
// so on; out / grad_out rows at o + i * o_st + h * o_sh; probs rows (training) at p + h * p_sh + i * p_st.
struct Group {
  const uint16_t* q; int64_t q_sh, q_st;
  const uint16_t* k; int64_t k_st;
  const uint16_t* v; int64_t v_st;
  const uint16_t* mask; int64_t m_st;  // [Tq, Tk] rows, or null
  const int64_t* limit;                // per query row: the keys [0, limit) it can see
  int64_t heads, tq, tk, d;
  float scale;
};

// Forward of one (batch, key head): every query head of its group, every query row; the probabilities are
// also written to probs (rows of tk, zeros past a row's visible keys) when it is not null.
AVX512BF16
void attend_group(const Group& g, uint16_t* out, int64_t o_sh, int64_t o_st, uint16_t* probs, int64_t p_sh,
                  int64_t p_st) {
  const int64_t tk_pad = whole_blocks(g.tk);
  std::vector<uint32_t> kp(g.d / 2 * tk_pad), vp(tk_pad / 2 * g.d);
  pack_pairs_along_width(g.k, g.k_st, g.tk, g.d, tk_pad, kp.data());  // for S = Q K^T
  pack_pairs_along_rows(g.v, g.v_st, g.tk, g.d, tk_pad, vp.data());   // for O = P V
  std::vector<float> s(kRows * tk_pad);
  std::vector<uint16_t> p(kRows * tk_pad);
  for (int64_t h = 0; h < g.heads; ++h) {
    for (int64_t i0 = 0; i0 < g.tq; i0 += kRows) {
      const int64_t rows = std::min(kRows, g.tq - i0);
      const int64_t n = visible_in_block(g.limit, i0, rows), n_cols = whole_blocks(n);
      const uint32_t* qr[kRows];
      block_rows(g.q + h * g.q_sh, g.q_st, i0, rows, qr);
      for (int64_t j0 = 0; j0 < n_cols; j0 += kCols)  // S = Q K^T, 4 rows x 64 keys at a time
        block_4x64(qr[0], qr[1], qr[2], qr[3], 1, kp.data() + j0, tk_pad, g.d / 2, s.data() + j0, tk_pad);
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* pr = p.data() + r * tk_pad;
        softmax_row(s.data() + r * tk_pad, g.mask != nullptr ? g.mask + (i0 + r) * g.m_st : nullptr, g.scale, n,
                    n_cols, pr);
        if (probs != nullptr) {
          uint16_t* dst = probs + h * p_sh + (i0 + r) * p_st;
          std::copy(pr, pr + std::min(n_cols, g.tk), dst);
          std::fill(dst + std::min(n_cols, g.tk), dst + g.tk, 0);
        }
      }
      for (int64_t r = rows; r < kRows; ++r) std::fill(p.data() + r * tk_pad, p.data() + r * tk_pad + n_cols, 0);
      const uint32_t* pw = reinterpret_cast<const uint32_t*>(p.data());
      for (int64_t c0 = 0; c0 < g.d; c0 += kCols) {  // O = P V, 4 rows x 64 output columns at a time
        alignas(64) float o[kRows * kCols];
        block_4x64(pw, pw + tk_pad / 2, pw + tk_pad, pw + 3 * tk_pad / 2, 1, vp.data() + c0, g.d, n_cols / 2, o,
                   kCols);
        store_block_bf16(o, rows, out + i0 * o_st + h * o_sh + c0, o_st);
      }
    }
  }
}

// dS of one row from dP (fp32 sums, rounded to bf16 as eager's matmul output is) and the bf16 probabilities:
// ds = bf16(bf16(p (dp - sum_j dp p)) * scale) on [0, n), zeros on [n, n_pad) (eager's softmax backward in
// float32, back to bf16, then the scale's backward).
AVX512BF16
void softmax_backward_row(const float* dp, const uint16_t* p, float scale, int64_t n, int64_t n_pad, uint16_t* ds) {
  __m512 vdot = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    const __m512 pj = bf16x16_to_ps(_mm256_maskz_loadu_epi16(k, p + j));
    vdot = _mm512_fmadd_ps(round_bf16_ps(_mm512_maskz_loadu_ps(k, dp + j)), pj, vdot);
  }
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot)), vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    const __m512 pj = bf16x16_to_ps(_mm256_maskz_loadu_epi16(k, p + j));
    const __m512 dpj = round_bf16_ps(_mm512_maskz_loadu_ps(k, dp + j));
    const __m512 dsj = _mm512_mul_ps(round_bf16_ps(_mm512_mul_ps(pj, _mm512_sub_ps(dpj, dot))), vscale);
    _mm256_mask_storeu_epi16(ds + j, k, ps_to_bf16x16(dsj));
  }
  std::fill(ds + n, ds + n_pad, static_cast<uint16_t>(0));
}

// c += the 4 x 64 block of a x b (block_4x64), for sums over the heads of a group
AVX512BF16
void add_block_4x64(const uint32_t* const* a, const uint32_t* b, int64_t b_stride, int64_t depth, float* c,
                    int64_t c_stride) {
  alignas(64) float t[kRows * kCols];
  block_4x64(a[0], a[1], a[2], a[3], 1, b, b_stride, depth, t, kCols);
  for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
    for (int64_t x = 0; x < kCols; ++x) c[r * c_stride + x] += t[r * kCols + x];
}

// Backward of one (batch, key head): dq rows at dq + h * dq_sh + i * dq_st; dk, dv rows of tk x d (the sums
// over the group's query heads), contiguous.
//   dP = dO V^T, dS = softmax_backward(dP, P) * scale, dQ = dS K, dK = sum_h dS^T Q, dV = sum_h P^T dO
AVX512BF16
void attend_group_backward(const Group& g, const uint16_t* grad, int64_t o_sh, int64_t o_st, const uint16_t* probs,
                           int64_t p_sh, int64_t p_st, uint16_t* dq, int64_t dq_sh, int64_t dq_st, uint16_t* dk,
                           uint16_t* dv) {
  const int64_t tk_pad = whole_blocks(g.tk), tq2 = (g.tq + 1) / 2, d = g.d;
  const int64_t tq_rows = (g.tq + kRows - 1) / kRows * kRows;
  std::vector<uint32_t> vt(d / 2 * tk_pad), kr(tk_pad / 2 * d);
  pack_pairs_along_width(g.v, g.v_st, g.tk, d, tk_pad, vt.data());  // for dP = dO V^T
  pack_pairs_along_rows(g.k, g.k_st, g.tk, d, tk_pad, kr.data());   // for dQ = dS K
  std::vector<uint32_t> qt(d * tq2), got(d * tq2);                   // Q^T, dO^T in pairs along the queries
  std::vector<uint16_t> ds(tq_rows * tk_pad, 0);                     // this head's dS, [tq rows][tk_pad]
  std::vector<uint32_t> dsp(tq2 * tk_pad), pp(tq2 * tk_pad);         // dS, P in pairs along the queries
  std::vector<float> dkt_sum(d * tk_pad, 0.f), dvt_sum(d * tk_pad, 0.f);  // dK^T, dV^T [d][tk_pad]
  std::vector<float> dp(kRows * tk_pad);
  for (int64_t h = 0; h < g.heads; ++h) {
    const uint16_t* q = g.q + h * g.q_sh;
    const uint16_t* go = grad + h * o_sh;
    const uint16_t* ph = probs + h * p_sh;
    for (int64_t i0 = 0; i0 < g.tq; i0 += kRows) {
      const int64_t rows = std::min(kRows, g.tq - i0);
      const int64_t n = visible_in_block(g.limit, i0, rows), n_cols = whole_blocks(n);
      const uint32_t* gw[kRows];
      block_rows(go, o_st, i0, rows, gw);
      for (int64_t j0 = 0; j0 < n_cols; j0 += kCols)  // dP = dO V^T
        block_4x64(gw[0], gw[1], gw[2], gw[3], 1, vt.data() + j0, tk_pad, d / 2, dp.data() + j0, tk_pad);
      for (int64_t r = 0; r < rows; ++r)
        softmax_backward_row(dp.data() + r * tk_pad, ph + (i0 + r) * p_st, g.scale, std::min(n, g.tk), n_cols,
                             ds.data() + (i0 + r) * tk_pad);
      const uint32_t* dw = reinterpret_cast<const uint32_t*>(ds.data() + i0 * tk_pad);
      for (int64_t c0 = 0; c0 < d; c0 += kCols) {  // dQ = dS K
        alignas(64) float o[kRows * kCols];
        block_4x64(dw, dw + tk_pad / 2, dw + tk_pad, dw + 3 * tk_pad / 2, 1, kr.data() + c0, d, n_cols / 2, o, kCols);
        store_block_bf16(o, rows, dq + h * dq_sh + i0 * dq_st + c0, dq_st);
      }
    }
    // dK^T += Q^T dS and dV^T += dO^T P, 4 head-width rows x 64 keys at a time, summed over the query rows
    transpose_pairs(q, g.q_st, g.tq, d, qt.data());
    transpose_pairs(go, o_st, g.tq, d, got.data());
    interleave_row_pairs(ds.data(), tk_pad, g.tq, tk_pad, tk_pad, 2 * tq2, dsp.data());
    interleave_row_pairs(ph, p_st, g.tq, g.tk, tk_pad, 2 * tq2, pp.data());
    for (int64_t j0 = 0; j0 < g.tk; j0 += kCols) {
      // query rows before the first that sees key j0 have P = dS = 0 on these keys (their causal past)
      int64_t first = 0;
      while (first < g.tq && g.limit[first] <= j0) ++first;
      const int64_t pair0 = first / 2, depth = tq2 - pair0;
      if (depth <= 0) continue;
      for (int64_t c0 = 0; c0 < d; c0 += kRows) {
        const uint32_t* qa[kRows];
        const uint32_t* ga[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          qa[r] = qt.data() + (c0 + r) * tq2 + pair0;
          ga[r] = got.data() + (c0 + r) * tq2 + pair0;
        }
        add_block_4x64(qa, dsp.data() + pair0 * tk_pad + j0, tk_pad, depth, dkt_sum.data() + c0 * tk_pad + j0,
                       tk_pad);
        add_block_4x64(ga, pp.data() + pair0 * tk_pad + j0, tk_pad, depth, dvt_sum.data() + c0 * tk_pad + j0,
                       tk_pad);
      }
    }
  }
  for (int64_t j = 0; j < g.tk; ++j)
    for (int64_t c = 0; c < d; ++c) {
      dk[j * d + c] = f32_to_bf16(dkt_sum[c * tk_pad + j]);
      dv[j * d + c] = f32_to_bf16(dvt_sum[c * tk_pad + j]);
    }
}

// For each query row: one past the last key whose mask is above bf16's lowest (transformers' masked value);
// a row with no such key keeps them all (eager attention then spreads it evenly over every key).
AVX512BF16
void visible_keys(const uint16_t* mask, int64_t m_st, int64_t tq, int64_t tk, int64_t* limit) {
  const float lowest = -3.3895313892515355e38f;
  for (int64_t i = 0; i < tq; ++i) {
    const uint16_t* mrow = mask + i * m_st;
    int64_t last = 0;
#pragma omp simd reduction(max : last)
    for (int64_t j = 0; j < tk; ++j) last = bf16_to_f32(mrow[j]) > lowest ? std::max(last, j + 1) : last;
    limit[i] = last == 0 ? tk : last;
  }
}

bool decoder_attention_supported() { return __builtin_cpu_supports("avx512bf16"); }

// The mask [B or 1, 1, Tq, Tk] bf16 (checked) expanded to B rows with unit key stride, or an undefined tensor
// when there is none; limits[b * Tq + i] receives one past the last key query row i of batch b can see
// (visible_keys; Tk without a mask).
at::Tensor batch_mask(const char* op, const c10::optional<at::Tensor>& mask_in, int64_t batch, int64_t tq,
                      int64_t tk, std::vector<int64_t>& limits) {
  limits.assign(batch * tq, tk);
  if (!mask_in.has_value() || !mask_in->defined()) return at::Tensor();
  const at::Tensor& m = *mask_in;
  TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(2) == tq && m.size(3) == tk &&
                  (m.size(0) == batch || m.size(0) == 1) && m.scalar_type() == at::kBFloat16,
              op, ": mask ", m.sizes(), " must be bf16 [B or 1, 1, Tq, Tk]");
  at::Tensor mask = m.expand({batch, 1, tq, tk});
  if (mask.stride(3) != 1 || mask.stride(2) < tk) mask = mask.contiguous();
  for (int64_t b = 0; b < batch; ++b)
    visible_keys(reinterpret_cast<const uint16_t*>(mask.data_ptr<at::BFloat16>()) + b * mask.stride(0),
                 mask.stride(2), tq, tk, limits.data() + b * tq);
  return mask;
}

// The checked inputs of the attention ops: q [B, H, Tq, d], k / v [B, Hk, Tk, d] (bf16, last dim contiguous),
// mask [B or 1, 1, Tq, Tk] bf16 or none, and each query row's visible keys.
struct Inputs {
  at::Tensor q, k, v, mask;
  int64_t batch, heads, tq, d, kv_heads, tk;
  std::vector<int64_t> limits;  // [B * Tq]

  static const uint16_t* ptr(const at::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  }

  // the Group of (batch b, key head kh)
  Group group(int64_t b, int64_t kh, double scale) const {
    const int64_t g = heads / kv_heads;
    return Group{ptr(q) + b * q.stride(0) + kh * g * q.stride(1), q.stride(1), q.stride(2),
                 ptr(k) + b * k.stride(0) + kh * k.stride(1), k.stride(2),
                 ptr(v) + b * v.stride(0) + kh * v.stride(1), v.stride(2),
                 mask.defined() ? ptr(mask) + b * mask.stride(0) : nullptr, mask.defined() ? mask.stride(2) : 0,
                 limits.data() + b * tq, g, tq, tk, d, static_cast<float>(scale)};
  }
};

Inputs check_inputs(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    const c10::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(decoder_attention_supported(), op, " needs a CPU with AVX512-BF16");
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  Inputs in;
  in.q = last_contiguous(q_in);
  in.k = last_contiguous(k_in);
  in.v = last_contiguous(v_in);
  TORCH_CHECK(in.q.dim() == 4 && in.k.dim() == 4 && in.v.dim() == 4 && in.q.scalar_type() == at::kBFloat16 &&
                  in.k.scalar_type() == at::kBFloat16 && in.v.scalar_type() == at::kBFloat16,
              op, ": q, k, v must be 4-D bf16");
  in.batch = in.q.size(0), in.heads = in.q.size(1), in.tq = in.q.size(2), in.d = in.q.size(3);
  in.kv_heads = in.k.size(1), in.tk = in.k.size(2);
  TORCH_CHECK(in.heads % in.kv_heads == 0 && in.d % kCols == 0 && in.k.size(3) == in.d &&
                  in.v.sizes() == in.k.sizes() && in.k.size(0) == in.batch,
              op, ": shapes q ", in.q.sizes(), " k ", in.k.sizes(), " v ", in.v.sizes());
  in.mask = batch_mask(op, mask_in, in.batch, in.tq, in.tk, in.limits);
  return in;
}

// -> out [B, Tq, H, d], and the probabilities [B, H, Tq, Tk] when with_probs (the backward's input)
std::tuple<at::Tensor, at::Tensor> forward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const c10::optional<at::Tensor>& mask, double scale,
                                           bool with_probs) {
  const Inputs in = check_inputs(op, q, k, v, mask);
  at::Tensor out = at::empty({in.batch, in.tq, in.heads, in.d}, in.q.options());
  at::Tensor probs = with_probs ? at::empty({in.batch, in.heads, in.tq, in.tk}, in.q.options()) : at::Tensor();
  uint16_t* op_out = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  uint16_t* op_probs = with_probs ? reinterpret_cast<uint16_t*>(probs.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t g = in.heads / in.kv_heads;
  at::parallel_for(0, in.batch * in.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / in.kv_heads, kh = task % in.kv_heads;
      uint16_t* p = op_probs == nullptr ? nullptr : op_probs + (b * in.heads + kh * g) * in.tq * in.tk;
      attend_group(in.group(b, kh, scale), op_out + b * in.tq * in.heads * in.d + kh * g * in.d, in.d,
                   in.heads * in.d, p, in.tq * in.tk, in.tk);
    }
  });
  return {out, probs};
}

at::Tensor decoder_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask, double scale) {
  return std::get<0>(forward("decoder_attention", q, k, v, mask, scale, false));
}

std::tuple<at::Tensor, at::Tensor> decoder_attention_train(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                                                           double scale) {
  return forward("decoder_attention_train", q, k, v, mask, scale, true);
}

// grad [B, Tq, H, d] (of out), probs [B, H, Tq, Tk] (decoder_attention_train's) -> dq [B, H, Tq, d],
// dk / dv [B, Hk, Tk, d]
std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& probs_in, double scale) {
  const Inputs in = check_inputs("decoder_attention_backward", q, k, v, mask);
  const at::Tensor grad = grad_in.contiguous(), probs = probs_in.contiguous();
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && probs.scalar_type() == at::kBFloat16 &&
                  grad.sizes() == at::IntArrayRef({in.batch, in.tq, in.heads, in.d}) &&
                  probs.sizes() == at::IntArrayRef({in.batch, in.heads, in.tq, in.tk}),
              "decoder_attention_backward: grad ", grad.sizes(), " or probs ", probs.sizes(),
              " disagree with the inputs");
  at::Tensor dq = at::empty({in.batch, in.heads, in.tq, in.d}, in.q.options());
  at::Tensor dk = at::empty({in.batch, in.kv_heads, in.tk, in.d}, in.q.options());
  at::Tensor dv = at::empty_like(dk);
  const int64_t g = in.heads / in.kv_heads;
  const uint16_t* gp = Inputs::ptr(grad);
  const uint16_t* pp = Inputs::ptr(probs);
  uint16_t* dqp = reinterpret_cast<uint16_t*>(dq.data_ptr<at::BFloat16>());
  uint16_t* dkp = reinterpret_cast<uint16_t*>(dk.data_ptr<at::BFloat16>());
  uint16_t* dvp = reinterpret_cast<uint16_t*>(dv.data_ptr<at::BFloat16>());
  at::parallel_for(0, in.batch * in.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / in.kv_heads, kh = task % in.kv_heads;
      const int64_t kv_offset = (b * in.kv_heads + kh) * in.tk * in.d;
      attend_group_backward(in.group(b, kh, scale), gp + b * in.tq * in.heads * in.d + kh * g * in.d, in.d,
                            in.heads * in.d, pp + (b * in.heads + kh * g) * in.tq * in.tk, in.tq * in.tk, in.tk,
                            dqp + (b * in.heads + kh * g) * in.tq * in.d, in.tq * in.d, in.d, dkp + kv_offset,
                            dvp + kv_offset);
    }
  });
  return {dq, dk, dv};
}

constexpr int64_t kScoreRowsPerTask = 16;  // rows of attention_probs(_backward) per task of a parallel run

// a bf16 row of n values as floats (16 lanes at a time)
AVX512BF16
void row_to_float(const uint16_t* x, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first_lanes(n - j);
    _mm512_mask_storeu_ps(out + j, k, bf16x16_to_ps(_mm256_maskz_loadu_epi16(k, x + j)));
  }
}

// The rows of a [B, H, Tq, Tk] bf16 tensor (checked, contiguous) and each row's visible keys, for the two row
// passes of the matmul form of the attention.
struct ScoreRows {
  at::Tensor x, mask;
  int64_t batch, heads, tq, tk;
  std::vector<int64_t> limits;  // [B * Tq]

  ScoreRows(const char* op, const at::Tensor& x_in, const c10::optional<at::Tensor>& mask_in) {
    TORCH_CHECK(decoder_attention_supported(), op, " needs a CPU with AVX512-BF16");
    TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kBFloat16, op, ": ", x_in.sizes(),
                " must be 4-D bf16 [B, H, Tq, Tk]");
    x = x_in.contiguous();
    batch = x.size(0), heads = x.size(1), tq = x.size(2), tk = x.size(3);
    mask = batch_mask(op, mask_in, batch, tq, tk, limits);
  }
  // row r = ((b * H) + h) * Tq + i: its mask row (or null) and its visible keys
  const uint16_t* mask_row(int64_t r) const {
    if (!mask.defined()) return nullptr;
    const int64_t b = r / (heads * tq), i = r % tq;
    return reinterpret_cast<const uint16_t*>(mask.data_ptr<at::BFloat16>()) + b * mask.stride(0) + i * mask.stride(2);
  }
  int64_t visible(int64_t r) const { return limits[r / (heads * tq) * tq + r % tq]; }
  // op(r, n, row) for every row r of x, in parallel: n its visible keys, row its first n values as floats
  template <typename RowOp>
  void for_each_row(RowOp op) const {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    at::parallel_for(0, batch * heads * tq, kScoreRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> row(tk);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = visible(r);
        row_to_float(xp + r * tk, n, row.data());
        op(r, n, row.data());
      }
    });
  }
};

// scores [B, H, Tq, Tk] bf16 (S = Q K^T from a matmul, rounded to bf16 as eager's is), mask, scale -> the
// probabilities [B, H, Tq, Tk]: softmax_row on each row (eager's roundings), zeros past its visible keys
at::Tensor attention_probs(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale) {
  const ScoreRows in("attention_probs", scores, mask);
  at::Tensor probs = at::empty_like(in.x);
  uint16_t* pp = reinterpret_cast<uint16_t*>(probs.data_ptr<at::BFloat16>());
  const int64_t tk = in.tk;
  in.for_each_row([&](int64_t r, int64_t n, float* s) {
    softmax_row(s, in.mask_row(r), static_cast<float>(scale), n, tk, pp + r * tk);
  });
  return probs;
}

// dP [B, H, Tq, Tk] bf16 (dO V^T from a matmul), the probabilities, mask, scale -> dS [B, H, Tq, Tk]:
// softmax_backward_row on each row (eager's softmax backward from the bf16 p, then the scale's), zeros past
// its visible keys
at::Tensor attention_probs_backward(const at::Tensor& grad_probs, const at::Tensor& probs_in,
                                   const c10::optional<at::Tensor>& mask, double scale) {
  const ScoreRows in("attention_probs_backward", grad_probs, mask);
  const at::Tensor probs = probs_in.contiguous();
  TORCH_CHECK(probs.scalar_type() == at::kBFloat16 && probs.sizes() == in.x.sizes(),
              "attention_probs_backward: probs ", probs.sizes(), " disagree with grad ", in.x.sizes());
  at::Tensor ds = at::empty_like(in.x);
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(probs.data_ptr<at::BFloat16>());
  uint16_t* dsp = reinterpret_cast<uint16_t*>(ds.data_ptr<at::BFloat16>());
  const int64_t tk = in.tk;
  in.for_each_row([&](int64_t r, int64_t n, float* dp) {
    softmax_backward_row(dp, pp + r * tk, static_cast<float>(scale), n, tk, dsp + r * tk);
  });
  return ds;
}

// The CPU has AMX-BF16 (CPUID) and the kernel lets this process use its tile registers: Linux hands them out
// on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, as oneDNN asks before its AMX kernels); a kernel
// that refuses (older than 5.16) leaves oneDNN on AVX-512 and this false.
bool cpu_has_amx() {
  if (!__builtin_cpu_supports("amx-bf16")) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

constexpr int64_t kNormRowsPerTask = 64;  // rows of rms_norm per task of a parallel run

// rms_norm: rows of width d; r (when not null) receives each row's 1 / sqrt(mean x^2 + eps)
AVX512BF16
void rms_norm_rows(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t d, float eps, uint16_t* out,
                   float* r_out) {
  const float inv_d = 1.f / static_cast<float>(d);  // mean = sum * (1 / D), as ATen's mean
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* xr = x + i * d;
    uint16_t* o = out + i * d;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < d; ++j) {
      const float v = bf16_to_f32(xr[j]);
      squares += v * v;
    }
    const float r = 1.f / std::sqrt(squares * inv_d + eps);
    if (r_out != nullptr) r_out[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) o[j] = f32_to_bf16(bf16_to_f32(w[j]) * round_bf16(bf16_to_f32(xr[j]) * r));
  }
}

AVX512BF16
void rms_norm_backward_rows(const uint16_t* grad, const uint16_t* x, const uint16_t* w, const float* r_in,
                            int64_t rows, int64_t d, uint16_t* dx) {
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* gr = grad + i * d;
    const uint16_t* xr = x + i * d;
    uint16_t* o = dx + i * d;
    const float r = r_in[i];
    float dot = 0.f;  // sum_j g_j x_j, g = bf16(grad w) (the gradient of bf16(x r))
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d; ++j) dot += round_bf16(bf16_to_f32(gr[j]) * bf16_to_f32(w[j])) * bf16_to_f32(xr[j]);
    const float c = -dot * r * r * r * inv_d;  // d(x r)/dx through r: -x r^3 / D * sum_j g_j x_j
#pragma omp simd
    for (int64_t j = 0; j < d; ++j)
      o[j] = f32_to_bf16(round_bf16(bf16_to_f32(gr[j]) * bf16_to_f32(w[j])) * r + c * bf16_to_f32(xr[j]));
  }
}

at::Tensor check_norm_input(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(decoder_attention_supported(), op, " needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 1 &&
                  x.dim() >= 1 && x.size(-1) == w.size(0),
              op, ": expects bf16 x [..., D] and weight [D]; got ", x.sizes(), " ", x.scalar_type(), " and ",
              w.sizes(), " ", w.scalar_type());
  return x.contiguous();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const char* op, const at::Tensor& x_in, const at::Tensor& w_in,
                                                    double eps, bool with_r) {
  const at::Tensor x = check_norm_input(op, x_in, w_in), w = w_in.contiguous();
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  at::Tensor out = at::empty_like(x);
  at::Tensor r = with_r ? at::empty({rows}, x.options().dtype(at::kFloat)) : at::Tensor();
  const uint16_t *xp = Inputs::ptr(x), *wp = Inputs::ptr(w);
  uint16_t* op_out = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* rp = with_r ? r.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, kNormRowsPerTask, [&](int64_t begin, int64_t end) {
    rms_norm_rows(xp + begin * d, wp, end - begin, d, static_cast<float>(eps), op_out + begin * d,
                  rp == nullptr ? nullptr : rp + begin);
  });
  return {out, r};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return std::get<0>(rms_norm_forward("rms_norm", x, w, eps, false));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor& x, const at::Tensor& w, double eps) {
  return rms_norm_forward("rms_norm_train", x, w, eps, true);
}

at::Tensor rms_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                             const at::Tensor& r_in) {
  const at::Tensor x = check_norm_input("rms_norm_backward", x_in, w_in), w = w_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), r = r_in.contiguous();
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kBFloat16 && r.scalar_type() == at::kFloat &&
                  r.numel() == rows,
              "rms_norm_backward: grad ", grad.sizes(), " or r ", r.sizes(), " disagree with x ", x.sizes());
  at::Tensor dx = at::empty_like(x);
  const uint16_t *gp = Inputs::ptr(grad), *xp = Inputs::ptr(x), *wp = Inputs::ptr(w);
  const float* rp = r.data_ptr<float>();
  uint16_t* dxp = reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, kNormRowsPerTask, [&](int64_t begin, int64_t end) {
    rms_norm_backward_rows(gp + begin * d, xp + begin * d, wp, rp + begin, end - begin, d, dxp + begin * d);
  });
  return dx;
}
#else
bool decoder_attention_supported() { return false; }

constexpr const char* kNoBf16Build = "was built without AVX512-BF16 support (not x86-64 GCC >= 10 / clang)";

at::Tensor decoder_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             double) {
  TORCH_CHECK(false, "decoder_attention ", kNoBf16Build);
}

std::tuple<at::Tensor, at::Tensor> decoder_attention_train(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const c10::optional<at::Tensor>&, double) {
  TORCH_CHECK(false, "decoder_attention_train ", kNoBf16Build);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_attention_backward(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, const at::Tensor&,
                                                                          const c10::optional<at::Tensor>&,
                                                                          const at::Tensor&, double) {
  TORCH_CHECK(false, "decoder_attention_backward ", kNoBf16Build);
}

at::Tensor attention_probs(const at::Tensor&, const c10::optional<at::Tensor>&, double) {
  TORCH_CHECK(false, "attention_probs ", kNoBf16Build);
}

at::Tensor attention_probs_backward(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double) {
  TORCH_CHECK(false, "attention_probs_backward ", kNoBf16Build);
}

bool cpu_has_amx() { return false; }

at::Tensor rms_norm(const at::Tensor&, const at::Tensor&, double) { TORCH_CHECK(false, "rms_norm ", kNoBf16Build); }

std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor&, const at::Tensor&, double) {
  TORCH_CHECK(false, "rms_norm_train ", kNoBf16Build);
}

at::Tensor rms_norm_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "rms_norm_backward ", kNoBf16Build);
}
#endif

bool decoder_attention_supported_op() { return decoder_attention_supported(); }
bool cpu_has_amx_op() { return cpu_has_amx(); }

}  // namespace

TORCH_LIBRARY(reclora_ds_cpu_kernels, m) {
  m.def("gather_dot(Tensor table, Tensor ids, Tensor query) -> Tensor");
  m.def("attention_pool(Tensor pre, Tensor u, Tensor w, Tensor c, Tensor mask, Tensor h) -> (Tensor, Tensor)");
  m.def(
      "attention_pool_backward(Tensor g_out, Tensor pre, Tensor u, Tensor w, Tensor mask, Tensor h, Tensor s) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("decoder_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("decoder_attention_train(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> (Tensor, Tensor)");
  m.def(
      "decoder_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor probs, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("decoder_attention_supported() -> bool", decoder_attention_supported_op);
  m.def("attention_probs(Tensor scores, Tensor? mask, float scale) -> Tensor");
  m.def("attention_probs_backward(Tensor grad_probs, Tensor probs, Tensor? mask, float scale) -> Tensor");
  m.def("cpu_has_amx() -> bool", cpu_has_amx_op);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_train(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor r) -> Tensor");
}

TORCH_LIBRARY_IMPL(reclora_ds_cpu_kernels, CPU, m) {
  m.impl("gather_dot", gather_dot);
  m.impl("attention_pool", attention_pool);
  m.impl("attention_pool_backward", attention_pool_backward);
  m.impl("decoder_attention", decoder_attention);
  m.impl("decoder_attention_train", decoder_attention_train);
  m.impl("decoder_attention_backward", decoder_attention_backward);
  m.impl("attention_probs", attention_probs);
  m.impl("attention_probs_backward", attention_probs_backward);
  m.impl("rms_norm", rms_norm);
  m.impl("rms_norm_train", rms_norm_train);
  m.impl("rms_norm_backward", rms_norm_backward);
}
