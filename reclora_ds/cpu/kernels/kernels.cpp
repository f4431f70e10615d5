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
//       transformers' eager attention (query head h reads key head h / (H / Hk)), bf16, forward only:
//       w = bf16(bf16(bf16(q k^T) * scale) + mask), p = bf16(softmax_fp32(w)), out = bf16(p v),
//       with the same roundings as eager's ops, one (batch, key head) at a time in the core's caches:
//       no [B, H, Tq, Tk] tensor is written, and keys a query row cannot see (its mask at bf16's lowest
//       after its last visible key: the causal future) are skipped. Needs AVX512-BF16
//       (decoder_attention_supported); d a multiple of 64.
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

// One (batch, key head): every query head of its group, every query row.
//   q rows: q + h * q_sh + i * q_st (d bf16 each); k, v rows: k + j * k_st; out rows: out + i * o_st + h * o_sh
AVX512BF16
void attend_group(const uint16_t* q, int64_t q_sh, int64_t q_st, int64_t heads, const uint16_t* k, int64_t k_st,
                  const uint16_t* v, int64_t v_st, const uint16_t* mask, int64_t m_st, const int64_t* limit, int64_t tq, int64_t tk,
                  int64_t d, float scale, uint16_t* out, int64_t o_sh, int64_t o_st) {
  const int64_t tk_pad = (tk + kCols - 1) / kCols * kCols;
  const int64_t d2 = d / 2;
  // K in pairs along d: kp[k2 * tk_pad + j] = (K[j, 2 k2], K[j, 2 k2 + 1]); zero columns past tk.
  std::vector<uint32_t> kp(d2 * tk_pad, 0u);
  for (int64_t j = 0; j < tk; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + j * k_st);
    for (int64_t k2 = 0; k2 < d2; ++k2) kp[k2 * tk_pad + j] = row[k2];
  }
  // V in pairs along the keys: vp[j2 * d + c] = (V[2 j2, c], V[2 j2 + 1, c]); a zero row past tk.
  const int64_t tk2 = tk_pad / 2;
  std::vector<uint32_t> vp(tk2 * d, 0u);
  for (int64_t j = 0; j < tk; ++j) {
    const uint16_t* row = v + j * v_st;
    uint16_t* dst = reinterpret_cast<uint16_t*>(vp.data()) + (j / 2) * d * 2 + (j % 2);
    for (int64_t c = 0; c < d; ++c) dst[2 * c] = row[c];
  }
  std::vector<float> s(kRows * tk_pad);
  std::vector<uint16_t> p(kRows * tk_pad);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i0 = 0; i0 < tq; i0 += kRows) {
      const int64_t rows = std::min(kRows, tq - i0);
      int64_t n = 0;
      for (int64_t r = 0; r < rows; ++r) n = std::max(n, limit[i0 + r]);
      const int64_t n_cols = (n + kCols - 1) / kCols * kCols;
      const uint32_t* qr[kRows];
      for (int64_t r = 0; r < kRows; ++r)
        qr[r] = reinterpret_cast<const uint32_t*>(q + h * q_sh + (i0 + std::min(r, rows - 1)) * q_st);
      // S = Q K^T, 4 rows x 64 columns at a time
      for (int64_t j0 = 0; j0 < n_cols; j0 += kCols)
        block_4x64(qr[0], qr[1], qr[2], qr[3], 1, kp.data() + j0, tk_pad, d2, s.data() + j0, tk_pad);
      for (int64_t r = 0; r < rows; ++r)
        softmax_row(s.data() + r * tk_pad, mask != nullptr ? mask + (i0 + r) * m_st : nullptr, scale, n,
                    n_cols, p.data() + r * tk_pad);
      for (int64_t r = rows; r < kRows; ++r) std::fill(p.data() + r * tk_pad, p.data() + r * tk_pad + n_cols, 0);
      // O = P V, 4 rows x 64 output columns at a time
      const int64_t n2 = n_cols / 2;
      const uint32_t* pr = reinterpret_cast<const uint32_t*>(p.data());
      for (int64_t c0 = 0; c0 < d; c0 += kCols) {
        alignas(64) float o[kRows * kCols];
        block_4x64(pr, pr + tk_pad / 2, pr + tk_pad, pr + 3 * tk_pad / 2, 1, vp.data() + c0, d, n2, o, kCols);
        for (int64_t r = 0; r < rows; ++r) {
          uint16_t* orow = out + (i0 + r) * o_st + h * o_sh + c0;
          for (int t = 0; t < 4; ++t)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + 16 * t),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(o + r * kCols + 16 * t)));
        }
      }
    }
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

// q [B, H, Tq, d], k / v [B, Hk, Tk, d] (bf16, last dim contiguous), mask [B or 1, 1, Tq, Tk] bf16 or none
// -> out [B, Tq, H, d] bf16
at::Tensor decoder_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             const c10::optional<at::Tensor>& mask_in, double scale) {
  TORCH_CHECK(decoder_attention_supported(), "decoder_attention needs a CPU with AVX512-BF16");
  auto last_contig = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == at::kBFloat16 &&
                  k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decoder_attention: q, k, v must be 4-D bf16");
  const int64_t B = q.size(0), H = q.size(1), tq = q.size(2), d = q.size(3), hk = k.size(1), tk = k.size(2);
  TORCH_CHECK(H % hk == 0 && d % kCols == 0 && k.size(3) == d && v.sizes() == k.sizes() && k.size(0) == B,
              "decoder_attention: shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->dim() == 4 && mask_in->size(1) == 1 && mask_in->size(2) == tq && mask_in->size(3) == tk &&
                    (mask_in->size(0) == B || mask_in->size(0) == 1) && mask_in->scalar_type() == at::kBFloat16,
                "decoder_attention: mask ", mask_in->sizes(), " must be bf16 [B or 1, 1, Tq, Tk]");
    mask = mask_in->expand({B, 1, tq, tk});
    if (mask.stride(3) != 1 || mask.stride(2) < tk) mask = mask.contiguous();
  }
  at::Tensor out = at::empty({B, tq, H, d}, q.options());
  const int64_t g = H / hk;
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::vector<int64_t> limits(B * tq, tk);
  if (mask.defined())
    for (int64_t b = 0; b < B; ++b) visible_keys(ptr(mask) + b * mask.stride(0), mask.stride(2), tq, tk, limits.data() + b * tq);
  at::parallel_for(0, B * hk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hk, kh = task % hk;
      attend_group(ptr(q) + b * q.stride(0) + kh * g * q.stride(1), q.stride(1), q.stride(2), g,
                   ptr(k) + b * k.stride(0) + kh * k.stride(1), k.stride(2), ptr(v) + b * v.stride(0) + kh * v.stride(1),
                   v.stride(2), mask.defined() ? ptr(mask) + b * mask.stride(0) : nullptr,
                   mask.defined() ? mask.stride(2) : 0, limits.data() + b * tq, tq, tk, d, static_cast<float>(scale),
                   op + b * tq * H * d + kh * g * d, d, H * d);
    }
  });
  return out;
}
#else
bool decoder_attention_supported() { return false; }

at::Tensor decoder_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             double) {
  TORCH_CHECK(false, "decoder_attention was built without AVX512-BF16 support (not x86-64 GCC >= 10 / clang)");
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
  m.def("decoder_attention_supported() -> bool", decoder_attention_supported_op);
}

TORCH_LIBRARY_IMPL(reclora_ds_cpu_kernels, CPU, m) {
  m.impl("gather_dot", gather_dot);
  m.impl("attention_pool", attention_pool);
  m.impl("attention_pool_backward", attention_pool_backward);
  m.impl("decoder_attention", decoder_attention);
}
