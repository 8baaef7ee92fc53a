#include "kernels/cpu/attention.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/f16_isa.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/vec_exp.h"

namespace gptq::cpu {

namespace {
// First visible key of a query at position p.
int64_t first_key(int64_t p, int64_t window) {
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
}

void check_shape(const attention_shape& s) {
    GPTQ_ASSERT(s.n_head_kv > 0 && s.n_head % s.n_head_kv == 0);
    GPTQ_ASSERT(s.q_pos0 >= 0 && s.q_pos0 + s.n_q <= s.n_kv);
    GPTQ_ASSERT(s.q_stride >= s.n_head * s.head_dim && s.out_stride >= s.n_head * s.head_dim);
    GPTQ_ASSERT(s.kv_stride >= s.n_head_kv * s.head_dim);
    GPTQ_ASSERT(s.softcap >= 0);
}
}  // namespace

void attention_ref(const float* q, const float* k, const float* v, float* out, const attention_shape& s) {
    check_shape(s);
    const int64_t       group = s.n_head / s.n_head_kv;
    std::vector<double> w(static_cast<size_t>(s.n_kv));
    for (int64_t i = 0; i < s.n_q; ++i) {
        const int64_t p  = s.q_pos0 + i;
        const int64_t j0 = first_key(p, s.window);
        for (int64_t h = 0; h < s.n_head; ++h) {
            const float*  qh = q + i * s.q_stride + h * s.head_dim;
            const int64_t hk = h / group;
            double        m  = -INFINITY;
            for (int64_t j = j0; j <= p; ++j) {
                const float* kj  = k + j * s.kv_stride + hk * s.head_dim;
                double       dot = 0.0;
                for (int64_t d = 0; d < s.head_dim; ++d) dot += static_cast<double>(qh[d]) * kj[d];
                w[j] = dot * s.scale;
                if (s.softcap > 0) w[j] = std::tanh(w[j] / s.softcap) * s.softcap;
                m = std::max(m, w[j]);
            }
            double sum = 0.0;
            for (int64_t j = j0; j <= p; ++j) sum += (w[j] = std::exp(w[j] - m));
            float* oh = out + i * s.out_stride + h * s.head_dim;
            for (int64_t d = 0; d < s.head_dim; ++d) {
                double acc = 0.0;
                for (int64_t j = j0; j <= p; ++j) acc += w[j] * v[j * s.kv_stride + hk * s.head_dim + d];
                oh[d] = static_cast<float>(acc / sum);
            }
        }
    }
}

namespace {
// Queries per work item: enough rows that the sgemms are not degenerate, few enough that causal
// blocks skip most of the masked half and two threads get balanced work at seqlen 128+.
constexpr int64_t k_q_block = 32;

// One query over keys [0, nk) of k/v (rows ld floats apart), of which [a, nk) are visible.
void attention_row(const float* q, const float* k, const float* v, int64_t ld, float* out, const attention_shape& s,
                   int64_t a, int64_t nk, float* scores) {
    const int64_t n = nk - a;
    // Zeroed first: some BLASes scale y by beta = 0 (a -inf or NaN left in it would survive).
    std::fill(scores, scores + n, 0.0f);
    std::fill(out, out + s.head_dim, 0.0f);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(n), static_cast<blasint>(s.head_dim), s.scale,
                k + a * ld, static_cast<blasint>(ld), q, 1, 0.0f, scores, 1);
    if (s.softcap > 0) softcap(scores, n, s.softcap, nullptr);
    softmax_rows(scores, scores, 1, n, nullptr);
    cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<blasint>(n), static_cast<blasint>(s.head_dim), 1.0f, v + a * ld,
                static_cast<blasint>(ld), scores, 1, 0.0f, out, 1);
}

// Keys [jlo, jhi) that some query of the block [i0, i1) sees.
struct key_range {
    int64_t lo = 0, hi = 0;
};
key_range keys_of_block(const attention_shape& s, int64_t i0, int64_t i1) {
    return {first_key(s.q_pos0 + i0, s.window), s.q_pos0 + i1};
}

// Queries [i0, i1) of head h over the block's keys (keys_of_block): kr, vr point at the first key's
// head_dim values of h's key/value head, rows ld floats apart.
// row_softmax: nullptr = softmax_rows over each masked row (F32 attention, ppl); else a vector
// softmax run on each row's visible keys only, the masked ones set to 0 (the F16 cache's prompts).
using row_softmax_fn = void (*)(float* x, int64_t n);
void attention_block(const float* q, const float* kr, const float* vr, int64_t ld, float* out, const attention_shape& s,
                     int64_t h, int64_t i0, int64_t i1, std::vector<float>& scores,
                     row_softmax_fn row_softmax = nullptr) {
    const int64_t nq  = i1 - i0;
    const int64_t jlo = keys_of_block(s, i0, i1).lo;
    const int64_t nk  = keys_of_block(s, i0, i1).hi - jlo;
    scores.resize(static_cast<size_t>(nq * nk));
    if (nq == 1) {  // a decode row: sgemv reads K and V in place (sgemm would copy them into panels)
        attention_row(q + i0 * s.q_stride + h * s.head_dim, kr, vr, ld, out + i0 * s.out_stride + h * s.head_dim, s,
                      first_key(s.q_pos0 + i0, s.window) - jlo, nk, scores.data());
        return;
    }
    // scores[nq, nk] = scale * q_block[nq, hd] k_range[nk, hd]^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(nq), static_cast<blasint>(nk),
                static_cast<blasint>(s.head_dim), s.scale, q + i0 * s.q_stride + h * s.head_dim,
                static_cast<blasint>(s.q_stride), kr, static_cast<blasint>(ld), 0.0f, scores.data(),
                static_cast<blasint>(nk));
    if (s.softcap > 0) softcap(scores.data(), nq * nk, s.softcap, nullptr);  // masked entries are overwritten next
    for (int64_t r = 0; r < nq; ++r) {
        const int64_t p   = s.q_pos0 + i0 + r;
        const int64_t a   = first_key(p, s.window) - jlo;  // visible: [a, b) within the range
        const int64_t b   = p + 1 - jlo;
        float*        row = scores.data() + r * nk;
        if (row_softmax) {  // b - a >= 1: a query sees its own key
            row_softmax(row + a, b - a);
            std::fill(row, row + a, 0.0f);
            std::fill(row + b, row + nk, 0.0f);
        } else {
            std::fill(row, row + a, -INFINITY);
            std::fill(row + b, row + nk, -INFINITY);
        }
    }
    if (!row_softmax) softmax_rows(scores.data(), scores.data(), nq, nk, nullptr);
    // out_block[nq, hd] = scores[nq, nk] v_range[nk, hd]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(nq), static_cast<blasint>(s.head_dim),
                static_cast<blasint>(nk), 1.0f, scores.data(), static_cast<blasint>(nk), vr, static_cast<blasint>(ld),
                0.0f, out + i0 * s.out_stride + h * s.head_dim, static_cast<blasint>(s.out_stride));
}

// parallel_for hands out contiguous chunks, and a causal block's cost grows with its index;
// visiting blocks as 0, B-1, 1, B-2, ... gives every chunk the same mix.
int64_t balanced_block(int64_t u, int64_t n_blocks) {
    return (u % 2 == 0) ? u / 2 : n_blocks - 1 - u / 2;
}
}  // namespace

void attention_blas(const float* q, const float* k, const float* v, float* out, const attention_shape& s,
                    thread_pool* pool) {
    check_shape(s);
    if (s.n_q == 0) return;
    blas_init_single_threaded();
    const int64_t group    = s.n_head / s.n_head_kv;
    const int64_t n_blocks = (s.n_q + k_q_block - 1) / k_q_block;
    const int64_t n_items  = s.n_head * n_blocks;
    auto          run      = [&](int64_t t0, int64_t t1) {
        std::vector<float> scores;
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t h = t % s.n_head, blk = balanced_block(t / s.n_head, n_blocks);
            const int64_t i0 = blk * k_q_block, i1 = std::min(s.n_q, i0 + k_q_block);
            const int64_t off = keys_of_block(s, i0, i1).lo * s.kv_stride + h / group * s.head_dim;
            attention_block(q, k + off, v + off, s.kv_stride, out, s, h, i0, i1, scores);
        }
    };
    if (!pool || n_items == 1) {
        run(0, n_items);
        return;
    }
    pool->parallel_for(n_items, run);
}

// ---- Keys and values in F16 (a KV cache of F16 bits) ----

void attention_f16_ref(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s) {
    check_shape(s);
    std::vector<float> kf(static_cast<size_t>(s.n_kv * s.kv_stride)), vf(kf.size());
    f16_to_f32_row(k, kf.data(), kf.size());
    f16_to_f32_row(v, vf.data(), vf.size());
    attention_ref(q, kf.data(), vf.data(), out, s);
}

namespace {
// The decode rows, one copy per instruction set (attention_f16_body.inc).
namespace f16_avx512 {
#define GPTQ_KT __attribute__((target("avx512f")))
using vf              = __m512;
constexpr int64_t k_w = 16;
GPTQ_KT inline vf vzero() {
    return _mm512_setzero_ps();
}
GPTQ_KT inline vf vset1(float x) {
    return _mm512_set1_ps(x);
}
GPTQ_KT inline vf vload(const float* p) {
    return _mm512_loadu_ps(p);
}
GPTQ_KT inline vf vload_h(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
GPTQ_KT inline vf vfma(vf a, vf b, vf c) {
    return _mm512_fmadd_ps(a, b, c);
}
GPTQ_KT inline void vstore(float* p, vf v) {
    _mm512_storeu_ps(p, v);
}
GPTQ_KT inline float vhsum(vf v) {
    return _mm512_reduce_add_ps(v);
}
inline void vprefetch(const uint16_t* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}
GPTQ_KT inline vf vmax(vf a, vf b) {
    return _mm512_max_ps(a, b);
}
GPTQ_KT inline float vhmax(vf v) {
    return _mm512_reduce_max_ps(v);
}
GPTQ_KT inline vf vsub(vf a, vf b) {
    return _mm512_sub_ps(a, b);
}
GPTQ_KT inline vf vmul(vf a, vf b) {
    return _mm512_mul_ps(a, b);
}
GPTQ_KT inline vf vadd(vf a, vf b) {
    return _mm512_add_ps(a, b);
}
GPTQ_KT inline vf vexp(vf x) {
    return vec_exp512(x);
}
#include "kernels/cpu/attention_f16_body.inc"
#undef GPTQ_KT
}  // namespace f16_avx512

namespace f16_avx2 {
#define GPTQ_KT __attribute__((target("avx2,fma,f16c")))
using vf              = __m256;
constexpr int64_t k_w = 8;
GPTQ_KT inline vf vzero() {
    return _mm256_setzero_ps();
}
GPTQ_KT inline vf vset1(float x) {
    return _mm256_set1_ps(x);
}
GPTQ_KT inline vf vload(const float* p) {
    return _mm256_loadu_ps(p);
}
GPTQ_KT inline vf vload_h(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
GPTQ_KT inline vf vfma(vf a, vf b, vf c) {
    return _mm256_fmadd_ps(a, b, c);
}
GPTQ_KT inline void vstore(float* p, vf v) {
    _mm256_storeu_ps(p, v);
}
GPTQ_KT inline float vhsum(vf v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t        = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t        = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
inline void vprefetch(const uint16_t* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}
GPTQ_KT inline vf vmax(vf a, vf b) {
    return _mm256_max_ps(a, b);
}
GPTQ_KT inline float vhmax(vf v) {
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t        = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t        = _mm_max_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
GPTQ_KT inline vf vsub(vf a, vf b) {
    return _mm256_sub_ps(a, b);
}
GPTQ_KT inline vf vmul(vf a, vf b) {
    return _mm256_mul_ps(a, b);
}
GPTQ_KT inline vf vadd(vf a, vf b) {
    return _mm256_add_ps(a, b);
}
GPTQ_KT inline vf vexp(vf x) {
    return vec_exp256(x);
}
#include "kernels/cpu/attention_f16_body.inc"
#undef GPTQ_KT
}  // namespace f16_avx2

namespace f16_portable {
#define GPTQ_KT
using vf              = float;
constexpr int64_t k_w = 1;
inline vf         vzero() {
            return 0.0f;
}
inline vf vset1(float x) {
    return x;
}
inline vf vload(const float* p) {
    return *p;
}
inline vf vload_h(const uint16_t* p) {
    return f16_to_f32(*p);
}
inline vf vfma(vf a, vf b, vf c) {
    return a * b + c;
}
inline void vstore(float* p, vf v) {
    *p = v;
}
inline float vhsum(vf v) {
    return v;
}
inline void vprefetch(const uint16_t*, int64_t) {}
inline vf   vmax(vf a, vf b) {
      return std::max(a, b);
}
inline float vhmax(vf v) {
    return v;
}
inline vf vsub(vf a, vf b) {
    return a - b;
}
inline vf vmul(vf a, vf b) {
    return a * b;
}
inline vf vadd(vf a, vf b) {
    return a + b;
}
inline vf vexp(vf x) {
    return std::exp(x);
}
#include "kernels/cpu/attention_f16_body.inc"
#undef GPTQ_KT
}  // namespace f16_portable

void decode_heads(f16_isa isa, const float* q, const uint16_t* k, const uint16_t* v, int64_t stride, int64_t n,
                  int64_t hd, int64_t g, float scale, float cap, float* scores, float* out) {
    switch (isa) {
        case f16_isa::AVX512:
            return f16_avx512::decode_heads(q, k, v, stride, n, hd, g, scale, cap, scores, out);
        case f16_isa::AVX2:
            return f16_avx2::decode_heads(q, k, v, stride, n, hd, g, scale, cap, scores, out);
        default:
            return f16_portable::decode_heads(q, k, v, stride, n, hd, g, scale, cap, scores, out);
    }
}

// The vector softmax of the decode rows (vexp), for the prompt blocks too.
row_softmax_fn softmax_of(f16_isa isa) {
    switch (isa) {
        case f16_isa::AVX512:
            return f16_avx512::softmax_row_v;
        case f16_isa::AVX2:
            return f16_avx2::softmax_row_v;
        default:
            return f16_portable::softmax_row_v;
    }
}

// rows of src (F16, ld apart; hd values each) -> dst [n, hd] F32.
void convert_rows(f16_isa isa, const uint16_t* src, int64_t ld, int64_t n, int64_t hd, float* dst) {
    for (int64_t j = 0; j < n; ++j) f16_convert(isa, src + j * ld, dst + j * hd, hd);
}

// Work item (key/value head hk, queries [i0, i1)): the group's query heads.
struct f16_scratch {
    std::vector<float> scores, kf, vf;
};
void f16_item(f16_isa isa, const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s,
              int64_t hk, int64_t i0, int64_t i1, f16_scratch& w) {
    const int64_t   group = s.n_head / s.n_head_kv, hd = s.head_dim;
    const key_range keys = keys_of_block(s, i0, i1);
    const int64_t   nk   = keys.hi - keys.lo;
    const int64_t   off  = keys.lo * s.kv_stride + hk * hd;
    if (i1 - i0 == 1) {  // a decode row: K and V converted in registers, each read once for the group
        w.scores.resize(static_cast<size_t>(group * nk));
        decode_heads(isa, q + i0 * s.q_stride + hk * group * hd, k + off, v + off, s.kv_stride, nk, hd, group, s.scale,
                     s.softcap, w.scores.data(), out + i0 * s.out_stride + hk * group * hd);
        return;
    }
    // A prompt block: the keys/values it sees converted once (exact), then the F32 block with the
    // decode rows' vector softmax on each row's visible keys.
    w.kf.resize(static_cast<size_t>(nk * hd));
    w.vf.resize(w.kf.size());
    convert_rows(isa, k + off, s.kv_stride, nk, hd, w.kf.data());
    convert_rows(isa, v + off, s.kv_stride, nk, hd, w.vf.data());
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        attention_block(q, w.kf.data(), w.vf.data(), hd, out, s, h, i0, i1, w.scores, softmax_of(isa));
}
}  // namespace

void attention_f16(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s,
                   thread_pool* pool, f16_isa isa) {
    check_shape(s);
    GPTQ_ASSERT(f16_isa_supported(isa));
    if (s.n_q == 0) return;
    blas_init_single_threaded();
    const int64_t n_blocks = (s.n_q + k_q_block - 1) / k_q_block;
    const int64_t n_items  = s.n_head_kv * n_blocks;
    auto          run      = [&](int64_t t0, int64_t t1) {
        thread_local f16_scratch w;  // kept between calls: no allocation per decode step
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t hk = t % s.n_head_kv, blk = balanced_block(t / s.n_head_kv, n_blocks);
            const int64_t i0 = blk * k_q_block;
            f16_item(isa, q, k, v, out, s, hk, i0, std::min(s.n_q, i0 + k_q_block), w);
        }
    };
    if (!pool || n_items == 1) {
        run(0, n_items);
        return;
    }
    pool->parallel_for(n_items, run);
}

void attention_f16(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s,
                   thread_pool* pool) {
    attention_f16(q, k, v, out, s, pool, f16_best_isa());
}

}  // namespace gptq::cpu
