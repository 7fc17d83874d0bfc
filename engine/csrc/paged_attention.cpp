// Paged attention on the CPU: every sequence of a step (decodes and prefill chunks alike) in one
// call, reading K/V in place from the paged cache through block tables. No gathered copy of a
// context, no per-sequence Python. engine/kernels.py builds it (torch cpp_extension); attention.py keeps
// the plain-torch SDPA path as the reference every test compares this kernel against.
//
// Shapes: q, out [T, num_heads, head_dim] (rows of one sequence are consecutive);
// k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], inner three dims contiguous,
// any stride between blocks (so a block-major cache that interleaves layers works too);
// block_tables [S, max_blocks] int32; cu_q [S + 1] int32 (sequence s owns rows cu_q[s]..cu_q[s+1]);
// ctx_lens [S] int32 (context length including the new rows). Row i of a sequence with n rows and
// context c attends to keys 0 .. c - n + i (causal, the new rows last).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kQueryTile = 16;  // query rows per work item in prefill chunks

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

struct WorkItem {
  int32_t seq;
  int32_t row_begin;  // absolute row index
  int32_t row_end;
};

// The tile's query vectors (row-major, head within group innermost), pre-scaled, into qf [R, hd], and
// how many keys each may see (causal, the sequence's new rows last) into limit [R].
template <typename scalar_t>
void load_queries(const WorkItem& w, int64_t kv_head, const scalar_t* q, int64_t num_heads, int64_t group,
                  int64_t hd, int64_t ctx_len, int64_t num_rows, int64_t row0, float scale, float* qf,
                  int64_t* limit) {
  for (int64_t row = w.row_begin; row < w.row_end; ++row) {
    const int64_t visible = ctx_len - num_rows + (row - row0) + 1;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t i = (row - w.row_begin) * group + g;
      const scalar_t* src = q + (row * num_heads + kv_head * group + g) * hd;
      for (int64_t d = 0; d < hd; ++d) qf[i * hd + d] = to_f(src[d]) * scale;
      limit[i] = visible;
    }
  }
}

// Scores never reach +-inf (masked keys are skipped, not set to -inf), so the fast-math build
// (vectorised exp) is safe; kNegBig stands for "no key seen yet".
constexpr float kNegBig = -1e30f;

template <typename scalar_t>
void attend_tile(const WorkItem& w, int64_t kv_head, const scalar_t* q, scalar_t* out, const scalar_t* k_cache,
                 const scalar_t* v_cache, int64_t block_stride_k, int64_t block_stride_v, const int32_t* table,
                 int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t ctx_len,
                 int64_t num_rows, int64_t row0, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tile_rows = w.row_end - w.row_begin;
  const int64_t R = tile_rows * group;  // query vectors in this item
  const int64_t hd = head_dim, bs = block_size;
  const int64_t token_stride = num_kv_heads * hd;  // between tokens inside a block

  // qf [R, hd] (pre-scaled), acc [R, hd], kt [hd, bs] (K transposed), vf [bs, hd], s [R, bs]
  std::vector<float> qf(R * hd), acc(R * hd, 0.f), m(R, kNegBig), l(R, 0.f), kt(hd * bs), vf(bs * hd), s(R * bs);
  std::vector<int64_t> limit(R);  // keys [0, limit) are visible to vector i
  load_queries(w, kv_head, q, num_heads, group, hd, ctx_len, num_rows, row0, scale, qf.data(), limit.data());
  const int64_t max_keys = limit[R - 1];  // the tile's last row sees the most
  const int64_t num_blocks = (max_keys + bs - 1) / bs;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block = table[b];
    const scalar_t* kb = k_cache + block * block_stride_k + kv_head * hd;
    const scalar_t* vb = v_cache + block * block_stride_v + kv_head * hd;
    const int64_t key0 = b * bs;
    const int64_t nk = std::min(bs, max_keys - key0);
    for (int64_t j = 0; j < nk; ++j) {
      const scalar_t* kr = kb + j * token_stride;
      const scalar_t* vr = vb + j * token_stride;
      for (int64_t d = 0; d < hd; ++d) kt[d * bs + j] = to_f(kr[d]);
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) vf[j * hd + d] = to_f(vr[d]);
    }
    for (int64_t j = nk; j < bs; ++j) {  // a partial last block: zero keys (their scores are skipped)
      for (int64_t d = 0; d < hd; ++d) kt[d * bs + j] = 0.f;
    }
    // S = Q K^T over the whole block: broadcast q[i][d] against a row of K^T (one vector of bs keys)
    for (int64_t i = 0; i < R; ++i) {
      float* si = s.data() + i * bs;
      const float* qi = qf.data() + i * hd;
#pragma omp simd
      for (int64_t j = 0; j < bs; ++j) si[j] = 0.f;
      for (int64_t d = 0; d < hd; ++d) {
        const float qd = qi[d];
        const float* ktd = kt.data() + d * bs;
#pragma omp simd
        for (int64_t j = 0; j < bs; ++j) si[j] += qd * ktd[j];
      }
    }
    for (int64_t i = 0; i < R; ++i) {
      const int64_t nv = std::min(nk, limit[i] - key0);  // keys of this block vector i may see
      if (nv <= 0) continue;
      float* si = s.data() + i * bs;
      float block_max = kNegBig;
      for (int64_t j = 0; j < nv; ++j) block_max = std::max(block_max, si[j]);
      const float m_new = std::max(m[i], block_max);
      const float correction = std::exp(m[i] - m_new);  // 0 on the first block
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nv; ++j) {
        si[j] = std::exp(si[j] - m_new);
        sum += si[j];
      }
      float* ai = acc.data() + i * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) ai[d] *= correction;
      for (int64_t j = 0; j < nv; ++j) {
        const float p = si[j];
        const float* vj = vf.data() + j * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) ai[d] += p * vj[d];
      }
      l[i] = l[i] * correction + sum;
      m[i] = m_new;
    }
  }
  for (int64_t r = 0; r < tile_rows; ++r) {
    const int64_t row = w.row_begin + r;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t i = r * group + g;
      scalar_t* dst = out + (row * num_heads + kv_head * group + g) * hd;
      const float inv = 1.f / l[i];
      for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<scalar_t>(acc[i * hd + d] * inv);
    }
  }
}

// ---- the vectorised path: head_dim a multiple of 16, keys in chunks of 16 (one vector) ----------
// GCC/Clang vector extensions: one v16 is a zmm register with AVX-512, two ymm with AVX2.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int kChunk = 16;

inline v16 splat(float x) { return v16{} + x; }

inline float hmax(v16 x) {
  float m = x[0];
  for (int j = 1; j < kChunk; ++j) m = std::max(m, x[j]);
  return m;
}

inline float hsum(v16 x) {
  float s = 0.f;
  for (int j = 0; j < kChunk; ++j) s += x[j];
  return s;
}

// exp(x) for x <= 0: 2^n * e^r with |r| < ln 2, degree-8 Taylor (relative error < 2e-7).
inline v16 vexp(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16i n = __builtin_convertvector(x * 1.44269504088896341f, v16i);  // truncates toward zero
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = x - nf * 0.693145751953125f - nf * 1.42860682030941723212e-6f;
  v16 p = splat(1.f / 40320) * r + 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v16i bits = (n + 127) << 23;
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename scalar_t, int HD>
void attend_tile_vec(const WorkItem& w, int64_t kv_head, const scalar_t* q, scalar_t* out, const scalar_t* k_cache,
                     const scalar_t* v_cache, int64_t block_stride_k, int64_t block_stride_v, const int32_t* table,
                     int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t ctx_len, int64_t num_rows,
                     int64_t row0, float scale) {
  constexpr int NV = HD / kChunk;  // vectors per head_dim row
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tile_rows = w.row_end - w.row_begin;
  const int64_t R = tile_rows * group;
  const int64_t token_stride = num_kv_heads * HD;
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

  // qf [R][HD] pre-scaled; acc [R][NV] vectors; kt [HD] vectors = K chunk transposed; vf [16][NV] vectors
  std::vector<float> qf(R * HD);
  std::vector<v16> acc(R * NV, v16{}), kt(HD), vf(kChunk * NV);
  std::vector<float> m(R, kNegBig), l(R, 0.f);
  std::vector<int64_t> limit(R);
  load_queries(w, kv_head, q, num_heads, group, HD, ctx_len, num_rows, row0, scale, qf.data(), limit.data());
  const int64_t max_keys = limit[R - 1];
  for (int64_t key0 = 0; key0 < max_keys; key0 += kChunk) {
    const int64_t nk = std::min<int64_t>(kChunk, max_keys - key0);
    for (int64_t j = 0; j < kChunk; ++j) {
      if (j >= nk) {  // past the context: zero keys and values (their lanes are masked below)
        for (int d = 0; d < HD; ++d) kt[d][j] = 0.f;
        for (int c = 0; c < NV; ++c) vf[j * NV + c] = v16{};
        continue;
      }
      const int64_t t = key0 + j;
      const int64_t block = table[t / block_size];
      const scalar_t* kr = k_cache + block * block_stride_k + (t % block_size) * token_stride + kv_head * HD;
      const scalar_t* vr = v_cache + block * block_stride_v + (t % block_size) * token_stride + kv_head * HD;
      for (int d = 0; d < HD; ++d) kt[d][j] = to_f(kr[d]);
      for (int c = 0; c < NV; ++c)
        for (int e = 0; e < kChunk; ++e) vf[j * NV + c][e] = to_f(vr[c * kChunk + e]);
    }
    int64_t i = 0;
    for (; i < R; i += 4) {
      const int64_t nb = std::min<int64_t>(4, R - i);
      v16 s[4] = {v16{}, v16{}, v16{}, v16{}};
      const float* q0 = qf.data() + i * HD;
      if (nb == 4) {
        for (int d = 0; d < HD; ++d) {
          const v16 kd = kt[d];
          s[0] += q0[d] * kd;
          s[1] += q0[HD + d] * kd;
          s[2] += q0[2 * HD + d] * kd;
          s[3] += q0[3 * HD + d] * kd;
        }
      } else {
        for (int64_t b = 0; b < nb; ++b)
          for (int d = 0; d < HD; ++d) s[b] += q0[b * HD + d] * kt[d];
      }
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t ii = i + b;
        const int64_t visible = limit[ii] - key0;  // lanes [0, visible) are real keys this vector may see
        if (visible <= 0) continue;
        const auto ok = lane < static_cast<int32_t>(std::min<int64_t>(visible, kChunk));
        const v16 sv = ok ? s[b] : splat(kNegBig);
        const float m_new = std::max(m[ii], hmax(sv));
        const float correction = std::exp(m[ii] - m_new);
        const v16 p = ok ? vexp(sv - m_new) : v16{};
        l[ii] = l[ii] * correction + hsum(p);
        m[ii] = m_new;
        v16 a[NV];
        for (int c = 0; c < NV; ++c) a[c] = acc[ii * NV + c] * correction;
        for (int j = 0; j < kChunk; ++j) {
          const float pj = p[j];
          for (int c = 0; c < NV; ++c) a[c] += pj * vf[j * NV + c];
        }
        for (int c = 0; c < NV; ++c) acc[ii * NV + c] = a[c];
      }
    }
  }
  for (int64_t r = 0; r < tile_rows; ++r) {
    const int64_t row = w.row_begin + r;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t ii = r * group + g;
      scalar_t* dst = out + (row * num_heads + kv_head * group + g) * HD;
      const float inv = 1.f / l[ii];
      for (int c = 0; c < NV; ++c)
        for (int e = 0; e < kChunk; ++e) dst[c * kChunk + e] = static_cast<scalar_t>(acc[ii * NV + c][e] * inv);
    }
  }
}

// ---- the decode path: one query row per sequence (q_len 1), the GQA group's vectors together ----
// A decode has 1-8 query vectors per KV head, too few to pay for transposing K: each key row is
// loaded as it lies in the cache and dotted with every query vector (the products of 16 keys are
// then summed lane-wise by a transpose-and-add tree), and each value row is added into the
// accumulators straight from the cache.
constexpr int64_t kMaxDecodeGroup = 8;

template <typename scalar_t, int NV>
inline void load_row(const scalar_t* src, v16* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    __builtin_memcpy(dst, src, sizeof(v16) * NV);  // unaligned vector loads, no conversion
  } else {
    for (int c = 0; c < NV; ++c)
      for (int e = 0; e < kChunk; ++e) dst[c][e] = to_f(src[c * kChunk + e]);
  }
}

// lane j of the result = the sum of t[j]'s 16 lanes (a 16 x 16 transpose folded into additions).
inline v16 reduce16(const v16* t) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  v16 u[8], v[4], w[2];
  for (int k = 0; k < 8; ++k)  // lanes 0-7: 8 partial sums of key 2k; 8-15: of key 2k+1
    u[k] = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(t[2 * k], t[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int k = 0; k < 4; ++k)  // groups of 4 lanes
    v[k] = __builtin_shufflevector(u[2 * k], u[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(u[2 * k], u[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)  // pairs
    w[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const v16 x = __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // x holds key bitreverse4(lane) in each lane; put key j in lane j
  return __builtin_shufflevector(x, x, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
#else
  v16 r;
  for (int j = 0; j < kChunk; ++j) r[j] = hsum(t[j]);
  return r;
#endif
}

template <typename scalar_t, int HD>
void attend_decode_vec(int64_t row, int64_t group, const scalar_t* q, scalar_t* out, const scalar_t* k_cache,
                       const scalar_t* v_cache, int64_t block_stride_k, int64_t block_stride_v,
                       const int32_t* table, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                       int64_t ctx_len, float scale) {
  // Every KV head of the sequence in one pass over its keys, so that each block (all heads of 16
  // tokens, contiguous in the cache) is read front to back once.
  constexpr int NV = HD / kChunk;
  const int64_t token_stride = num_kv_heads * HD;
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  std::vector<v16> qv(num_heads * NV), acc(num_heads * NV, v16{});  // vector i = head i
  std::vector<float> m(num_heads, kNegBig), l(num_heads, 0.f);
  for (int64_t i = 0; i < num_heads; ++i) {
    load_row<scalar_t, NV>(q + (row * num_heads + i) * HD, &qv[i * NV]);
    for (int c = 0; c < NV; ++c) qv[i * NV + c] *= scale;
  }
  v16 t[kMaxDecodeGroup][kChunk], p[kMaxDecodeGroup], kr[NV], vr[NV];
  for (int64_t key0 = 0; key0 < ctx_len; key0 += kChunk) {
    const int64_t nk = std::min<int64_t>(kChunk, ctx_len - key0);
    const auto ok = lane < static_cast<int32_t>(nk);
    // The next chunk's K and V rows are fetched while this one is computed: blocks sit anywhere in
    // memory, which the hardware prefetcher cannot follow.
    const int64_t row_bytes = token_stride * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t tok = key0 + kChunk; tok < std::min<int64_t>(key0 + 2 * kChunk, ctx_len); ++tok) {
      const int64_t off = (tok % block_size) * token_stride;
      const char* kb = reinterpret_cast<const char*>(k_cache + table[tok / block_size] * block_stride_k + off);
      const char* vb = reinterpret_cast<const char*>(v_cache + table[tok / block_size] * block_stride_v + off);
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kb + b);
        __builtin_prefetch(vb + b);
      }
    }
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const v16* qh = &qv[h * group * NV];
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t tok = key0 + j;
        load_row<scalar_t, NV>(
            k_cache + table[tok / block_size] * block_stride_k + (tok % block_size) * token_stride + h * HD, kr);
        for (int64_t g = 0; g < group; ++g) {
          v16 d = qh[g * NV] * kr[0];
          for (int c = 1; c < NV; ++c) d += qh[g * NV + c] * kr[c];
          t[g][j] = d;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t j = nk; j < kChunk; ++j) t[g][j] = v16{};
        const int64_t i = h * group + g;
        const v16 sv = ok ? reduce16(t[g]) : splat(kNegBig);
        const float m_new = std::max(m[i], hmax(sv));
        const float correction = std::exp(m[i] - m_new);
        p[g] = ok ? vexp(sv - m_new) : v16{};
        l[i] = l[i] * correction + hsum(p[g]);
        m[i] = m_new;
        for (int c = 0; c < NV; ++c) acc[i * NV + c] *= correction;
      }
      v16* ah = &acc[h * group * NV];
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t tok = key0 + j;
        load_row<scalar_t, NV>(
            v_cache + table[tok / block_size] * block_stride_v + (tok % block_size) * token_stride + h * HD, vr);
        for (int64_t g = 0; g < group; ++g) {
          const float pj = p[g][j];
          for (int c = 0; c < NV; ++c) ah[g * NV + c] += pj * vr[c];
        }
      }
    }
  }
  for (int64_t i = 0; i < num_heads; ++i) {
    scalar_t* dst = out + (row * num_heads + i) * HD;
    const float inv = 1.f / l[i];
    for (int c = 0; c < NV; ++c)
      for (int e = 0; e < kChunk; ++e) dst[c * kChunk + e] = static_cast<scalar_t>(acc[i * NV + c][e] * inv);
  }
}


// The decode path for blocks of a multiple of 16 tokens and a GQA group known at compile time: the
// keys are walked block by block (one table lookup and one base pointer per block, no division per
// key), a head group's query vectors and accumulators stay in registers, and the whole next block's
// K and V rows are prefetched while this one is computed.
template <typename scalar_t, int HD, int G>
void attend_decode_blocks(int64_t row, const scalar_t* q, scalar_t* out, const scalar_t* k_cache,
                          const scalar_t* v_cache, int64_t block_stride_k, int64_t block_stride_v,
                          const int32_t* table, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                          int64_t ctx_len, float scale) {
  constexpr int NV = HD / kChunk;
  const int64_t token_stride = num_kv_heads * HD;
  const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  std::vector<v16> qv(num_heads * NV), acc(num_heads * NV, v16{});  // vector i * NV + c: head i
  std::vector<float> m(num_heads, kNegBig), l(num_heads, 0.f);
  for (int64_t i = 0; i < num_heads; ++i) {
    load_row<scalar_t, NV>(q + (row * num_heads + i) * HD, &qv[i * NV]);
    for (int c = 0; c < NV; ++c) qv[i * NV + c] *= scale;
  }
  const int64_t num_blocks = (ctx_len + block_size - 1) / block_size;
  v16 t[G][kChunk], kr[NV], vr[NV];
  for (int64_t b = 0; b < num_blocks; ++b) {
    const scalar_t* kb = k_cache + static_cast<int64_t>(table[b]) * block_stride_k;
    const scalar_t* vb = v_cache + static_cast<int64_t>(table[b]) * block_stride_v;
    // Blocks sit anywhere in memory, where the hardware prefetcher cannot follow. While this block
    // computes, the next one is fetched into L2 a row at a time, each K (V) row beside the load of the
    // same row here: spread over the block's work, not 512 prefetches at once (which filled the miss
    // queue and thrashed L1). benchmarks/kernel_ab.py, KV from DRAM: 0.56-0.75x the time;
    // with the KV already in cache the extra instructions cost 1.15x.
    const int64_t ahead = b + 1;
    const char* pk = ahead < num_blocks
        ? reinterpret_cast<const char*>(k_cache + static_cast<int64_t>(table[ahead]) * block_stride_k) : nullptr;
    const char* pvb = ahead < num_blocks
        ? reinterpret_cast<const char*>(v_cache + static_cast<int64_t>(table[ahead]) * block_stride_v) : nullptr;
    const int64_t in_block = std::min<int64_t>(block_size, ctx_len - b * block_size);
    for (int64_t c0 = 0; c0 < in_block; c0 += kChunk) {
      const int64_t nk = std::min<int64_t>(kChunk, in_block - c0);
      const auto ok = lane < static_cast<int32_t>(nk);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const scalar_t* kh = kb + c0 * token_stride + h * HD;
        const scalar_t* vh = vb + c0 * token_stride + h * HD;
        v16 qh[G][NV];
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < NV; ++c) qh[g][c] = qv[(h * G + g) * NV + c];
        constexpr int kRowBytes = HD * static_cast<int>(sizeof(scalar_t));
        const int64_t row_off = (c0 * token_stride + h * HD) * static_cast<int64_t>(sizeof(scalar_t));
        auto score = [&](int j) {  // key j of the chunk dotted with each of the group's query vectors
          if (pk) {
            const char* r = pk + row_off + j * token_stride * static_cast<int64_t>(sizeof(scalar_t));
            for (int o = 0; o < kRowBytes; o += 64) __builtin_prefetch(r + o, 0, 2);
          }
          load_row<scalar_t, NV>(kh + j * token_stride, kr);
          for (int g = 0; g < G; ++g) {
            v16 d = qh[g][0] * kr[0];
            for (int c = 1; c < NV; ++c) d += qh[g][c] * kr[c];
            t[g][j] = d;
          }
        };
        if (nk == kChunk) {  // a whole chunk: a fixed trip count the compiler unrolls
          for (int j = 0; j < kChunk; ++j) score(j);
        } else {
          for (int j = 0; j < kChunk; ++j) {
            if (j < nk) {
              score(j);
            } else {
              for (int g = 0; g < G; ++g) t[g][j] = v16{};
            }
          }
        }
        float p[G][kChunk];
        v16 a[G][NV];
        for (int g = 0; g < G; ++g) {
          const int64_t i = h * G + g;
          const v16 sv = ok ? reduce16(t[g]) : splat(kNegBig);
          const float m_new = std::max(m[i], hmax(sv));
          const float correction = std::exp(m[i] - m_new);
          const v16 pg = ok ? vexp(sv - m_new) : v16{};
          l[i] = l[i] * correction + hsum(pg);
          m[i] = m_new;
          __builtin_memcpy(p[g], &pg, sizeof(pg));
          for (int c = 0; c < NV; ++c) a[g][c] = acc[i * NV + c] * correction;
        }
        for (int64_t j = 0; j < nk; ++j) {
          if (pvb) {
            const char* r = pvb + row_off + j * token_stride * static_cast<int64_t>(sizeof(scalar_t));
            for (int o = 0; o < kRowBytes; o += 64) __builtin_prefetch(r + o, 0, 2);
          }
          load_row<scalar_t, NV>(vh + j * token_stride, vr);
          for (int g = 0; g < G; ++g) {
            const float pj = p[g][j];
            for (int c = 0; c < NV; ++c) a[g][c] += pj * vr[c];
          }
        }
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < NV; ++c) acc[(h * G + g) * NV + c] = a[g][c];
      }
    }
  }
  for (int64_t i = 0; i < num_heads; ++i) {
    scalar_t* dst = out + (row * num_heads + i) * HD;
    const float inv = 1.f / l[i];
    for (int c = 0; c < NV; ++c)
      for (int e = 0; e < kChunk; ++e) dst[c * kChunk + e] = static_cast<scalar_t>(acc[i * NV + c][e] * inv);
  }
}

// One decode: the block-walking path where the block size and the group allow, else attend_decode_vec.
template <typename scalar_t, int HD>
void attend_decode(int64_t row, int64_t group, const scalar_t* q, scalar_t* out, const scalar_t* k_cache,
                   const scalar_t* v_cache, int64_t sk, int64_t sv, const int32_t* table, int64_t block_size,
                   int64_t num_heads, int64_t num_kv_heads, int64_t ctx_len, float scale) {
  if (block_size % kChunk == 0) {
    switch (group) {
#define PDSERVE_DECODE_GROUP(G)                                                                              \
  case G:                                                                                                    \
    return attend_decode_blocks<scalar_t, HD, G>(row, q, out, k_cache, v_cache, sk, sv, table, block_size, \
                                                 num_heads, num_kv_heads, ctx_len, scale);
      PDSERVE_DECODE_GROUP(1)
      PDSERVE_DECODE_GROUP(2)
      PDSERVE_DECODE_GROUP(3)
      PDSERVE_DECODE_GROUP(4)
      PDSERVE_DECODE_GROUP(8)
#undef PDSERVE_DECODE_GROUP
      default:
        break;
    }
  }
  attend_decode_vec<scalar_t, HD>(row, group, q, out, k_cache, v_cache, sk, sv, table, block_size, num_heads,
                                  num_kv_heads, ctx_len, scale);
}

}  // namespace

void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor cu_q, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, num_heads, head_dim]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "caches must be [blocks, bs, nkv, hd]");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "k_cache: the inner three dims must be contiguous");
  TORCH_CHECK(v_cache.stride(3) == 1 && v_cache.stride(2) == v_cache.size(3) &&
                  v_cache.stride(1) == v_cache.size(2) * v_cache.size(3),
              "v_cache: the inner three dims must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && cu_q.scalar_type() == at::kInt &&
                  ctx_lens.scalar_type() == at::kInt, "block_tables, cu_q and ctx_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && cu_q.is_contiguous() && ctx_lens.is_contiguous(),
              "metadata tensors must be contiguous");
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes do not match");
  const int64_t S = ctx_lens.size(0);
  TORCH_CHECK(cu_q.size(0) == S + 1 && block_tables.size(0) == S, "metadata sizes do not match");
  const int32_t* cu = cu_q.data_ptr<int32_t>();
  const int32_t* ctx = ctx_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);

  // Work: a decode (one new row) is one item covering all its heads; prefill rows are cut into
  // tiles of kQueryTile rows, one item per tile and KV head.
  const int64_t group = num_heads / num_kv_heads;
  const bool decode_path = group <= kMaxDecodeGroup && (head_dim == 64 || head_dim == 128);
  std::vector<WorkItem> items, decodes;
  for (int64_t s = 0; s < S; ++s) {
    const int32_t n = cu[s + 1] - cu[s];
    TORCH_CHECK(n >= 1 && ctx[s] >= n && (ctx[s] + block_size - 1) / block_size <= max_blocks,
                "sequence ", s, ": bad query rows or context length");
    if (n == 1 && decode_path) {
      decodes.push_back({static_cast<int32_t>(s), cu[s], cu[s] + 1});
      continue;
    }
    for (int32_t r = cu[s]; r < cu[s + 1]; r += kQueryTile)
      items.push_back({static_cast<int32_t>(s), r, std::min<int32_t>(r + kQueryTile, cu[s + 1])});
  }
  // Longest tiles first, so the threads finish together.
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    return ctx[a.seq] - (cu[a.seq + 1] - a.row_end) > ctx[b.seq] - (cu[b.seq + 1] - b.row_end);
  });
  const int64_t num_tiles = static_cast<int64_t>(items.size()) * num_kv_heads;
  const int64_t num_items = num_tiles + static_cast<int64_t>(decodes.size());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int64_t sk = k_cache.stride(0), sv = v_cache.stride(0);
    const float sc = static_cast<float>(scale);
    at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        if (it >= num_tiles) {
          const WorkItem& w = decodes[it - num_tiles];
          const int32_t* table = tables + w.seq * max_blocks;
          if (head_dim == 64)
            attend_decode<scalar_t, 64>(w.row_begin, group, qp, op, kp, vp, sk, sv, table, block_size,
                                            num_heads, num_kv_heads, ctx[w.seq], sc);
          else
            attend_decode<scalar_t, 128>(w.row_begin, group, qp, op, kp, vp, sk, sv, table, block_size,
                                             num_heads, num_kv_heads, ctx[w.seq], sc);
          continue;
        }
        const WorkItem& w = items[it / num_kv_heads];
        const int64_t h = it % num_kv_heads;
        const int32_t* table = tables + w.seq * max_blocks;
        const int64_t n = cu[w.seq + 1] - cu[w.seq];
        switch (head_dim) {
          case 64:
            attend_tile_vec<scalar_t, 64>(w, h, qp, op, kp, vp, sk, sv, table, block_size, num_heads, num_kv_heads,
                                          ctx[w.seq], n, cu[w.seq], sc);
            break;
          case 128:
            attend_tile_vec<scalar_t, 128>(w, h, qp, op, kp, vp, sk, sv, table, block_size, num_heads,
                                           num_kv_heads, ctx[w.seq], n, cu[w.seq], sc);
            break;
          default:  // any other head size: the plain loops
            attend_tile<scalar_t>(w, h, qp, op, kp, vp, sk, sv, table, block_size, num_heads, num_kv_heads,
                                  head_dim, ctx[w.seq], n, cu[w.seq], sc);
        }
      }
    });
  });
}
