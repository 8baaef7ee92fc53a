#include "io/gptq_zero_format.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "io/gptq_pack.h"

namespace gptq {

namespace {

constexpr std::string_view k_qzeros_suffix = ".qzeros";

const tensor_entry* find_i32(const tensor_source& src, const std::string& name) {
    const tensor_entry* e = src.find(name);
    return e && e->info->type == dtype::DTYPE_I32 ? e : nullptr;
}

// The sizes a module's tensors imply, or false when they do not fit together.
bool module_from_tensors(const tensor_source& src, const std::string& name, gptq_module_desc* m) {
    const tensor_entry* qw = find_i32(src, name + ".qweight");
    const tensor_entry* qz = find_i32(src, name + ".qzeros");
    const tensor_entry* gi = find_i32(src, name + ".g_idx");
    const tensor_entry* sc = src.find(name + ".scales");
    if (!qw || !qz || !gi || !sc) return false;
    const auto &sw = qw->info->shape, &sz = qz->info->shape, &sg = gi->info->shape, &ss = sc->info->shape;
    if (sw.size() != 2 || sz.size() != 2 || sg.size() != 1 || ss.size() != 2) return false;
    m->name     = name;
    m->n_in     = sg[0];
    m->n_groups = ss[0];
    m->n_out    = ss[1];
    if (m->n_in <= 0 || m->n_out <= 0 || m->n_groups <= 0 || sw[1] != m->n_out || sz[0] != m->n_groups) return false;
    if ((sw[0] * 32) % m->n_in != 0) return false;
    m->bits = static_cast<int>(sw[0] * 32 / m->n_in);
    if (m->bits != 2 && m->bits != 3 && m->bits != 4 && m->bits != 8) return false;
    return (m->n_out * m->bits) % 32 == 0 && sz[1] == gptq_packed_words(m->n_out, m->bits);
}

// Add one module's zero fields and (for its first rows and columns) code means to the evidence.
struct offset_sums {
    double sum = 0.0, sum_sq = 0.0;
};

status sample_module(const tensor_source& src, const gptq_module_desc& m, gptq_zero_format_evidence* ev,
                     offset_sums* acc) {
    const int      b    = m.bits;
    const uint32_t maxq = (1u << b) - 1;
    const int64_t  G = m.n_groups, N = m.n_out;

    // The stored fields, as they are (v2 unpacking adds nothing).
    GPTQ_ASSIGN_OR_RETURN(tensor_entry qz, src.get(m.name + ".qzeros"));
    std::vector<int32_t> words(static_cast<size_t>(qz.info->numel()));
    qz.file->copy_to(*qz.info, words.data());
    std::vector<int32_t> fields(static_cast<size_t>(G * N));
    gptq_unpack_qzeros(words.data(), G, N, b, gptq_checkpoint_format::GPTQ_FORMAT_V2, fields.data());
    ev->n_modules += 1;
    ev->n_fields += static_cast<int64_t>(fields.size());
    for (int32_t f : fields) {
        ev->n_sym_v1 += f == (1 << (b - 1)) - 1 ? 1 : 0;
        ev->n_sym_v2 += f == (1 << (b - 1)) ? 1 : 0;
    }

    // Codes of the first rows (a multiple of 32 keeps every bit width's words whole) and columns.
    int64_t rows = std::min(m.n_in, k_zero_sample_rows);
    if (rows >= 32) rows -= rows % 32;
    const int64_t C = std::min(N, k_zero_sample_cols);
    GPTQ_ASSIGN_OR_RETURN(tensor_entry gi, src.get(m.name + ".g_idx"));
    std::vector<int32_t> g_idx(static_cast<size_t>(m.n_in));
    gi.file->copy_to(*gi.info, g_idx.data());
    GPTQ_ASSIGN_OR_RETURN(tensor_entry qw, src.get(m.name + ".qweight"));
    const int64_t        n_words = gptq_packed_words(rows, b);
    std::vector<int32_t> qwords(static_cast<size_t>(n_words * C));
    const uint8_t*       qbytes = qw.file->bytes(*qw.info);
    for (int64_t w = 0; w < n_words; ++w)  // row w of qweight [words, N], first C columns
        std::memcpy(&qwords[static_cast<size_t>(w * C)], qbytes + static_cast<size_t>(w * N) * 4,
                    static_cast<size_t>(C) * 4);
    std::vector<uint8_t> codes(static_cast<size_t>(C * rows));
    gptq_unpack_qweight(qwords.data(), C, rows, b, codes.data());

    std::vector<double>  sums(static_cast<size_t>(G * C), 0.0);
    std::vector<int64_t> count(static_cast<size_t>(G), 0);
    for (int64_t k = 0; k < rows; ++k) {
        const int32_t g = g_idx[static_cast<size_t>(k)];
        if (g >= 0 && g < G) count[static_cast<size_t>(g)] += 1;  // bad g_idx: loading reports it
    }
    for (int64_t n = 0; n < C; ++n)
        for (int64_t k = 0; k < rows; ++k) {
            const int32_t g = g_idx[static_cast<size_t>(k)];
            if (g >= 0 && g < G) sums[static_cast<size_t>(g * C + n)] += codes[static_cast<size_t>(n * rows + k)];
        }
    for (int64_t g = 0; g < G; ++g) {
        const int64_t c = count[static_cast<size_t>(g)];
        if (c < 8) continue;  // too few codes for a mean
        for (int64_t n = 0; n < C; ++n) {
            const double   mean = sums[static_cast<size_t>(g * C + n)] / static_cast<double>(c);
            const uint32_t f    = static_cast<uint32_t>(fields[static_cast<size_t>(g * N + n)]);
            if (f == maxq) {  // v1: a zero of 0 wrapped around; v2: a zero of 2^b - 1
                ev->n_top += 1;
                ev->n_wrap += mean < maxq / 2.0 ? 1 : 0;
                continue;
            }
            const double off = mean - static_cast<double>(f);
            acc->sum += off;
            acc->sum_sq += off * off;
            ev->n_pairs += 1;
        }
    }
    return status::ok();
}

void decide(gptq_zero_format_evidence* ev, const offset_sums& acc) {
    using F     = gptq_checkpoint_format;
    ev->format  = ev->label;
    ev->decided = true;
    if (ev->n_fields > 0 && ev->n_sym_v1 == ev->n_fields) {
        ev->format = F::GPTQ_FORMAT_V1;
        ev->basis  = fmt::format(
             "every zero field of the {} modules looked at holds 2^(bits-1) - 1, the v1 value of a symmetric "
              "checkpoint; v2 stores 2^(bits-1)",
             ev->n_modules);
    } else if (ev->n_fields > 0 && ev->n_sym_v2 == ev->n_fields) {
        ev->format = F::GPTQ_FORMAT_V2;
        ev->basis  = fmt::format(
             "every zero field of the {} modules looked at holds 2^(bits-1), the v2 value of a symmetric "
              "checkpoint; v1 stores 2^(bits-1) - 1",
             ev->n_modules);
    } else if (ev->n_pairs >= k_zero_min_pairs) {
        const double n   = static_cast<double>(ev->n_pairs);
        ev->mean_offset  = acc.sum / n;
        ev->offset_se    = std::sqrt(std::max(0.0, acc.sum_sq / n - ev->mean_offset * ev->mean_offset) / n);
        const double d   = ev->mean_offset;
        const auto   why = fmt::format(
              "mean code minus stored zero = {:.3f} (standard error {:.3f}) over {} (group, column) pairs of {} "
                "modules; ~1 means v1, ~0 means v2",
              d, ev->offset_se, ev->n_pairs, ev->n_modules);
        if (ev->offset_se > k_zero_max_se) {
            ev->decided = false;
            ev->basis   = why + ": too imprecise, the label decides";
        } else if (d >= k_zero_offset_v1_min) {
            ev->format = F::GPTQ_FORMAT_V1;
            ev->basis  = why;
        } else if (d <= k_zero_offset_v2_max) {
            ev->format = F::GPTQ_FORMAT_V2;
            ev->basis  = why;
        } else {
            ev->decided = false;
            ev->basis   = why + ": ambiguous, the label decides";
        }
    } else {
        ev->decided = false;
        ev->basis   = fmt::format("{} (group, column) pairs are too few to tell (at least {}): the label decides",
                                  ev->n_pairs, k_zero_min_pairs);
    }
    if (ev->n_wrap > 0)
        ev->basis += fmt::format("; {} fields at 2^bits - 1 with low codes (a v1 zero of 0)", ev->n_wrap);
    ev->mismatch = ev->decided && ev->format != ev->label;
}

}  // namespace

std::vector<gptq_module_desc> gptq_modules_list(const tensor_source& src) {
    std::vector<gptq_module_desc> out;
    for (const std::string& name : src.names()) {
        if (name.size() <= k_qzeros_suffix.size() ||
            name.compare(name.size() - k_qzeros_suffix.size(), k_qzeros_suffix.size(), k_qzeros_suffix) != 0)
            continue;
        gptq_module_desc m;
        if (module_from_tensors(src, name.substr(0, name.size() - k_qzeros_suffix.size()), &m))
            out.push_back(std::move(m));
    }
    return out;
}

result<gptq_zero_format_evidence> gptq_zero_format_detect(const tensor_source& src, const gptq_config& cfg) {
    gptq_zero_format_evidence ev;
    ev.label = ev.format = cfg.format;
    if (cfg.format == gptq_checkpoint_format::GPTQ_FORMAT_MARLIN) {
        ev.basis = "a marlin checkpoint has no qzeros";
        return ev;
    }
    const auto mods = gptq_modules_list(src);
    if (mods.empty()) {
        ev.basis = "no quantized module found";
        return ev;
    }
    // Modules spread evenly over the (sorted) list, first and last layers included; when their
    // statistic is too imprecise to decide (few outputs, 8 bits), every module.
    const size_t      m = mods.size(), s = std::min<size_t>(m, k_zero_sample_modules);
    std::vector<bool> seen(m, false);
    offset_sums       acc;
    for (size_t i = 0; i < s; ++i) {
        const size_t j = s == 1 ? 0 : i * (m - 1) / (s - 1);
        seen[j]        = true;
        GPTQ_TRY(sample_module(src, mods[j], &ev, &acc));
    }
    decide(&ev, acc);
    if (!ev.decided && ev.n_sym_v1 != ev.n_fields && ev.n_sym_v2 != ev.n_fields && s < m) {
        for (size_t j = 0; j < m; ++j)
            if (!seen[j]) GPTQ_TRY(sample_module(src, mods[j], &ev, &acc));
        decide(&ev, acc);
    }
    return ev;
}

std::string gptq_zero_format_message(const gptq_zero_format_evidence& ev, const gptq_config& cfg) {
    const char* data = gptq_checkpoint_format_name(ev.format);
    return fmt::format(
        "{}: checkpoint_format says '{}' but the zero points are '{}': {}. Reading them as '{}'; `gptq convert "
        "IN -o OUT --format {}` writes a copy whose label matches",
        cfg.source, gptq_checkpoint_format_name(ev.label), data, ev.basis, data, data);
}

result<gptq_zero_format_evidence> gptq_zero_format_resolve(const tensor_source& src, gptq_config* cfg) {
    const auto t0 = std::chrono::steady_clock::now();
    GPTQ_ASSIGN_OR_RETURN(gptq_zero_format_evidence ev, gptq_zero_format_detect(src, *cfg));
    GPTQ_LOG_DEBUG("{}: zero points read as '{}' ({}; {:.1f} ms)", cfg->source, gptq_checkpoint_format_name(ev.format),
                   ev.basis, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (ev.mismatch) {
        static std::mutex            mu;
        static std::set<std::string> warned;  // checkpoint folders already warned about
        bool                         first = false;
        {
            std::lock_guard<std::mutex> lock(mu);
            first = warned.insert(src.folder() + "\n" + cfg->source).second;
        }
        if (first) GPTQ_LOG_WARN("{}", gptq_zero_format_message(ev, *cfg));
    }
    cfg->format = ev.format;
    return ev;
}

}  // namespace gptq
