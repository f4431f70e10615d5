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
// float32, contiguous CPU tensors; one thread (the CRM runs one rank per core). Loaded by
// torch.utils.cpp_extension from reclora_ds.cpu.kernels.load.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

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

}  // namespace

TORCH_LIBRARY(reclora_ds_cpu_kernels, m) {
  m.def("gather_dot(Tensor table, Tensor ids, Tensor query) -> Tensor");
  m.def("attention_pool(Tensor pre, Tensor u, Tensor w, Tensor c, Tensor mask, Tensor h) -> (Tensor, Tensor)");
  m.def(
      "attention_pool_backward(Tensor g_out, Tensor pre, Tensor u, Tensor w, Tensor mask, Tensor h, Tensor s) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reclora_ds_cpu_kernels, CPU, m) {
  m.impl("gather_dot", gather_dot);
  m.impl("attention_pool", attention_pool);
  m.impl("attention_pool_backward", attention_pool_backward);
}
