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

// exp(x) for x <= 0 (softmax's shifted scores): Cody-Waite reduction and Cephes' expf polynomial (about 1e-7
// relative error, branch-free so the loops vectorise); 0 below -87.3, where exp leaves float's normal range.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.3f ? 0.f : p * scale;
}

constexpr int64_t kRows = 4;   // query rows per block
constexpr int64_t kCols = 64;  // key columns (of S) or output columns (of O) per block: 4 registers of 16 floats
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// softmax of one row of raw scores (fp32 accumulations), as eager attention rounds: bf16(S), bf16(* scale),
// bf16(+ mask), fp32 softmax, bf16 probabilities written to p[0, n) and zeros to p[n, n_pad).
AVX512BF16
void softmax_row(float* s, const uint16_t* m, float scale, int64_t n, int64_t n_pad, uint16_t* p) {
  float mx = -INFINITY;
  if (m != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      const float w = round_bf16(round_bf16(round_bf16(s[j]) * scale) + bf16_to_f32(m[j]));
      s[j] = w;
      mx = w > mx ? w : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      const float w = round_bf16(round_bf16(s[j]) * scale);
      s[j] = w;
      mx = w > mx ? w : mx;
    }
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] = f32_to_bf16(s[j] * inv);
  for (int64_t j = n; j < n_pad; ++j) p[j] = 0;
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

// pairs along the rows: out[j2 * d + c] = (x[2 j2, c], x[2 j2 + 1, c]); zero rows past n, up to n_pad rows
void pack_pairs_along_rows(const uint16_t* x, int64_t x_st, int64_t n, int64_t d, int64_t n_pad, uint32_t* out) {
  std::fill(out, out + n_pad / 2 * d, 0u);
  uint16_t* half = reinterpret_cast<uint16_t*>(out);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = x + j * x_st;
    uint16_t* dst = half + (j / 2) * d * 2 + (j % 2);
    for (int64_t c = 0; c < d; ++c) dst[2 * c] = row[c];
  }
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
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) dot += round_bf16(dp[j]) * bf16_to_f32(p[j]);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    ds[j] = f32_to_bf16(round_bf16(bf16_to_f32(p[j]) * (round_bf16(dp[j]) - dot)) * scale);
  for (int64_t j = n; j < n_pad; ++j) ds[j] = 0;
}

// c += the 4 x 64 block of a x b (block_4x64), for sums over the heads of a group
AVX512BF16
void add_block_4x64(const uint32_t* const* a, const uint32_t* b, int64_t b_stride, int64_t depth, float* c,
                    int64_t c_stride, int64_t rows) {
  alignas(64) float t[kRows * kCols];
  block_4x64(a[0], a[1], a[2], a[3], 1, b, b_stride, depth, t, kCols);
  for (int64_t r = 0; r < rows; ++r)
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
  const int64_t tq_rows = (g.tq + kRows - 1) / kRows * kRows, tk_rows = (g.tk + kRows - 1) / kRows * kRows;
  std::vector<uint32_t> vt(d / 2 * tk_pad), kr(tk_pad / 2 * d);
  pack_pairs_along_width(g.v, g.v_st, g.tk, d, tk_pad, vt.data());  // for dP = dO V^T
  pack_pairs_along_rows(g.k, g.k_st, g.tk, d, tk_pad, kr.data());   // for dQ = dS K
  std::vector<uint32_t> qr(tq2 * d), gr(tq2 * d);                    // Q, dO in pairs along the queries
  std::vector<uint16_t> ds(tq_rows * tk_pad, 0);                     // this head's dS, [tq rows][tk_pad]
  std::vector<uint32_t> dst((tk_rows + kRows) * tq2, 0u), pt((tk_rows + kRows) * tq2, 0u);  // dS^T, P^T pairs
  std::vector<float> dk_sum(tk_rows * d, 0.f), dv_sum(tk_rows * d, 0.f);
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
    // dK += dS^T Q and dV += P^T dO, 4 keys x 64 columns at a time, summed over all query rows
    pack_pairs_along_rows(q, g.q_st, g.tq, d, 2 * tq2, qr.data());
    pack_pairs_along_rows(go, o_st, g.tq, d, 2 * tq2, gr.data());
    transpose_pairs(ds.data(), tk_pad, g.tq, g.tk, dst.data());
    transpose_pairs(ph, p_st, g.tq, g.tk, pt.data());
    for (int64_t j0 = 0; j0 < g.tk; j0 += kRows) {
      const int64_t rows = std::min(kRows, g.tk - j0);
      // query rows before the first that sees key j0 have P = dS = 0 on these keys (the causal past of j0)
      int64_t first = 0;
      while (first < g.tq && g.limit[first] <= j0) ++first;
      const int64_t pair0 = first / 2, depth = tq2 - pair0;
      if (depth <= 0) continue;
      const uint32_t* sa[kRows];
      const uint32_t* pa[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        sa[r] = dst.data() + (j0 + r) * tq2 + pair0;  // rows past tk are zero
        pa[r] = pt.data() + (j0 + r) * tq2 + pair0;
      }
      for (int64_t c0 = 0; c0 < d; c0 += kCols) {
        add_block_4x64(sa, qr.data() + pair0 * d + c0, d, depth, dk_sum.data() + j0 * d + c0, d, rows);
        add_block_4x64(pa, gr.data() + pair0 * d + c0, d, depth, dv_sum.data() + j0 * d + c0, d, rows);
      }
    }
  }
  for (int64_t x = 0; x < g.tk * d; ++x) {
    dk[x] = f32_to_bf16(dk_sum[x]);
    dv[x] = f32_to_bf16(dv_sum[x]);
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
  in.limits.assign(in.batch * in.tq, in.tk);
  if (mask_in.has_value() && mask_in->defined()) {
    const at::Tensor& m = *mask_in;
    TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(2) == in.tq && m.size(3) == in.tk &&
                    (m.size(0) == in.batch || m.size(0) == 1) && m.scalar_type() == at::kBFloat16,
                op, ": mask ", m.sizes(), " must be bf16 [B or 1, 1, Tq, Tk]");
    in.mask = m.expand({in.batch, 1, in.tq, in.tk});
    if (in.mask.stride(3) != 1 || in.mask.stride(2) < in.tk) in.mask = in.mask.contiguous();
    for (int64_t b = 0; b < in.batch; ++b)
      visible_keys(Inputs::ptr(in.mask) + b * in.mask.stride(0), in.mask.stride(2), in.tq, in.tk,
                   in.limits.data() + b * in.tq);
  }
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
#endif

bool decoder_attention_supported_op() { return decoder_attention_supported(); }

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
}

TORCH_LIBRARY_IMPL(reclora_ds_cpu_kernels, CPU, m) {
  m.impl("gather_dot", gather_dot);
  m.impl("attention_pool", attention_pool);
  m.impl("attention_pool_backward", attention_pool_backward);
  m.impl("decoder_attention", decoder_attention);
  m.impl("decoder_attention_train", decoder_attention_train);
  m.impl("decoder_attention_backward", decoder_attention_backward);
}
