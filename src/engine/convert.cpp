// gptq convert (include/gptq/convert.h): zero points v1 <-> v2, format.md 1.4.
//
// Flow: open the input and decide its zero-point format from the data (io/gptq_zero_format.h);
// plan every module's new zeros and refuse before writing anything when one cannot be stored;
// then, in a temporary folder beside the output marked unfinished: copy every file, rewrite the
// qzeros (and, with clamp_zeros, qweight) bytes of each module in place in the shard copies,
// rewrite the config files; last, rename the folder to the output name.
#include "gptq/convert.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "io/gptq_config.h"
#include "io/gptq_pack.h"
#include "io/gptq_zero_format.h"
#include "io/json_file.h"
#include "io/tensor_source.h"

namespace gptq {

namespace {

namespace fs         = std::filesystem;
using ordered_json   = nlohmann::ordered_json;
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
constexpr auto E_IO  = status_code::STATUS_IO_ERROR;
using F              = gptq_checkpoint_format;

// One module's new zero points, and the (group, column) cells whose zero 0 becomes 1.
struct module_plan {
    gptq_module_desc     m;
    std::vector<int32_t> zeros;    // [n_groups, n_out], real zero points, ready for the output format
    std::vector<int64_t> clamped;  // g * n_out + n of each zero 0 -> 1 (clamp_zeros)
};

status check_paths(const convert_params& p) {
    if (p.input_path.empty()) return make_error(E_ARG, "no input checkpoint given");
    if (p.output_path.empty()) return make_error(E_ARG, "no output folder given (-o)");
    if (p.format != "gptq" && p.format != "gptq_v2")
        return make_error(E_ARG, "--format '{}' is not supported (gptq or gptq_v2)", p.format);
    std::error_code ec;
    if (!fs::is_directory(p.input_path, ec))
        return make_error(E_ARG, "{}: not a folder; pass the checkpoint folder (its configs are converted too)",
                          p.input_path);
    if (fs::exists(p.output_path, ec)) {
        if (fs::equivalent(p.input_path, p.output_path, ec))
            return make_error(E_ARG, "{}: the output is the input; choose another output folder", p.output_path);
        if (!p.force)
            return make_error(E_ARG, "{}: already exists; choose another output folder, or pass --force to replace it",
                              p.output_path);
        if (!fs::is_directory(p.output_path, ec))
            return make_error(E_ARG, "{}: exists and is not a folder; --force replaces only a folder", p.output_path);
    }
    return status::ok();
}

// The new zeros of every module, or an error (naming the first module, group and column) when a
// zero point cannot be stored in the output format. Nothing is written yet.
result<std::vector<module_plan>> plan_modules(const tensor_source& src, F from, F to, bool clamp) {
    std::vector<module_plan> plans;
    int64_t                  n_zero = 0, n_over = 0;
    std::string              first_zero, first_over;
    for (const gptq_module_desc& m : gptq_modules_list(src)) {
        module_plan p;
        p.m = m;
        GPTQ_ASSIGN_OR_RETURN(tensor_entry qz, src.get(m.name + ".qzeros"));
        std::vector<int32_t> words(static_cast<size_t>(qz.info->numel()));
        qz.file->copy_to(*qz.info, words.data());
        p.zeros.resize(static_cast<size_t>(m.n_groups * m.n_out));
        gptq_unpack_qzeros(words.data(), m.n_groups, m.n_out, m.bits, from, p.zeros.data());
        const int32_t maxq = (1 << m.bits) - 1;
        for (int64_t i = 0; i < static_cast<int64_t>(p.zeros.size()); ++i) {
            const int32_t z     = p.zeros[static_cast<size_t>(i)];
            const auto    where = fmt::format("{} group {} column {}", m.name, i / m.n_out, i % m.n_out);
            if (to == F::GPTQ_FORMAT_V1 && z == 0) {
                if (n_zero++ == 0) first_zero = where;
                if (clamp) p.clamped.push_back(i);
            } else if (to == F::GPTQ_FORMAT_V2 && z > maxq) {
                if (n_over++ == 0) first_over = where;
            }
        }
        plans.push_back(std::move(p));
    }
    if (n_over > 0)
        return make_error(E_ARG,
                          "{}: {} zero fields hold 2^bits - 1 (first: {}); read as v1 that is a zero point of 2^bits, "
                          "which gptq_v2 cannot store (a v1 writer wrapped a zero of 0 around: those groups are "
                          "damaged in the input)",
                          src.folder(), n_over, first_over);
    if (n_zero > 0 && !clamp)
        return make_error(E_ARG,
                          "{}: {} zero points are 0 (first: {}); v1 stores zero - 1 and cannot hold 0. Keep "
                          "--format gptq_v2, or pass --clamp-zeros to store them as 1 (the codes of those groups move "
                          "up by one; codes already at 2^bits - 1 lose one scale step)",
                          src.folder(), n_zero, first_zero);
    return plans;
}

// Write `n` bytes at `offset` of the file at `path`.
status write_at(const std::string& path, uint64_t offset, const void* data, size_t n) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return make_error(E_IO, "{}: cannot open for writing: {}", path, std::strerror(errno));
    size_t pos = 0;
    while (pos < n) {
        const ssize_t r =
            ::pwrite(fd, static_cast<const uint8_t*>(data) + pos, n - pos, static_cast<off_t>(offset + pos));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            const int err = errno;
            ::close(fd);
            return make_error(E_IO, "{}: write failed: {}", path, std::strerror(err));
        }
        pos += static_cast<size_t>(r);
    }
    if (::close(fd) != 0) return make_error(E_IO, "{}: close failed: {}", path, std::strerror(errno));
    return status::ok();
}

// fsync every file of `dir`, then `dir` itself: the output is on disk before it gets its name.
status fsync_all(const std::string& dir) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) != 0) {
            const int err = errno;
            if (fd >= 0) ::close(fd);
            return make_error(E_IO, "{}: fsync failed: {}", entry.path().string(), std::strerror(err));
        }
        ::close(fd);
    }
    if (ec) return make_error(E_IO, "{}: cannot list: {}", dir, ec.message());
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        ::close(fd);
    }
    return status::ok();
}

// The copy of a tensor's shard in the work folder, and the tensor's byte offset there.
std::pair<std::string, uint64_t> copy_location(const tensor_entry& e, const std::string& work) {
    return {path_join(work, fs::path(e.file->path()).filename().string()), e.file->data_start() + e.info->begin};
}

// Rewrite one module's qzeros (and with clamped cells its qweight) in the shard copy.
status patch_module(const tensor_source& src, module_plan& p, F to, const std::string& work, convert_report* rep) {
    const gptq_module_desc& m    = p.m;
    const int               maxq = (1 << m.bits) - 1;
    if (!p.clamped.empty()) {
        // Zero 0 -> 1 with every code of the cell + 1: w = s * (q - z) is unchanged but at q = maxq.
        GPTQ_ASSIGN_OR_RETURN(tensor_entry qw, src.get(m.name + ".qweight"));
        GPTQ_ASSIGN_OR_RETURN(tensor_entry gi, src.get(m.name + ".g_idx"));
        std::vector<int32_t> words(static_cast<size_t>(qw.info->numel())), g_idx(static_cast<size_t>(m.n_in));
        qw.file->copy_to(*qw.info, words.data());
        gi.file->copy_to(*gi.info, g_idx.data());
        std::vector<uint8_t> codes(static_cast<size_t>(m.n_out * m.n_in));
        gptq_unpack_qweight(words.data(), m.n_out, m.n_in, m.bits, codes.data());
        for (int64_t cell : p.clamped) {
            const int64_t g = cell / m.n_out, n = cell % m.n_out;
            p.zeros[static_cast<size_t>(cell)] = 1;
            for (int64_t k = 0; k < m.n_in; ++k) {
                if (g_idx[static_cast<size_t>(k)] != g) continue;
                uint8_t& c = codes[static_cast<size_t>(n * m.n_in + k)];
                if (c == maxq)
                    rep->n_codes_changed += 1;
                else
                    c = static_cast<uint8_t>(c + 1);
            }
        }
        rep->n_zeros_clamped += static_cast<int64_t>(p.clamped.size());
        gptq_pack_qweight(codes.data(), m.n_out, m.n_in, m.bits, words.data());
        const auto [path, offset] = copy_location(qw, work);
        GPTQ_TRY(write_at(path, offset, words.data(), words.size() * 4));
    }
    GPTQ_ASSIGN_OR_RETURN(tensor_entry qz, src.get(m.name + ".qzeros"));
    std::vector<int32_t> zwords(static_cast<size_t>(qz.info->numel()));
    GPTQ_TRY(gptq_pack_qzeros(p.zeros.data(), m.n_groups, m.n_out, m.bits, to, zwords.data()).with_context(m.name));
    const auto [path, offset] = copy_location(qz, work);
    return write_at(path, offset, zwords.data(), zwords.size() * 4);
}

// checkpoint_format (and GPTQModel's "format", where present) of a quantization config object.
void relabel(ordered_json& q, const char* name) {
    q["checkpoint_format"] = name;
    if (q.contains("format")) q["format"] = name;
}

// Rewrite the config files present in the input into the work folder (which holds their copies).
status rewrite_configs(const std::string& in, const std::string& work, const char* name) {
    for (const char* file : {"quantize_config.json", "quant_config.json", "config.json"}) {
        const std::string path = path_join(in, file);
        if (!file_exists(path)) continue;
        GPTQ_ASSIGN_OR_RETURN(std::string text, file_read_all(path));
        ordered_json j = ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() || !j.is_object()) return make_error(E_ARG, "{}: not a JSON object", path);
        if (std::string(file) == "config.json") {
            if (!j.contains("quantization_config") || !j["quantization_config"].is_object()) continue;
            relabel(j["quantization_config"], name);
        } else {
            relabel(j, name);
        }
        GPTQ_TRY(file_write_atomic(path_join(work, file), j.dump(2) + "\n"));
    }
    return status::ok();
}

// Copy every regular file of the input folder into the work folder (sub-folders and special
// files are left out, with a warning).
status copy_files(const std::string& in, const std::string& work) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(in, ec)) {
        const std::string name = entry.path().filename().string();
        if (!entry.is_regular_file(ec)) {
            GPTQ_LOG_WARN("{}: not a regular file; not copied", entry.path().string());
            continue;
        }
        fs::copy_file(entry.path(), path_join(work, name), fs::copy_options::overwrite_existing, ec);
        if (ec) return make_error(E_IO, "copying {}: {}", entry.path().string(), ec.message());
    }
    if (ec) return make_error(E_IO, "{}: cannot list: {}", in, ec.message());
    return status::ok();
}

// Move the finished work folder to the output name (replacing an old output with force).
status publish(const std::string& work, const std::string& out) {
    std::error_code ec;
    fs::remove(path_join(work, k_work_folder_marker), ec);
    const std::string old = out + ".old-" + std::to_string(getpid());
    const bool        had = fs::exists(out, ec);
    if (had) {
        fs::rename(out, old, ec);
        if (ec) return make_error(E_IO, "renaming {} to {}: {}", out, old, ec.message());
    }
    fs::rename(work, out, ec);
    if (ec) {
        std::error_code ec2;
        if (had) fs::rename(old, out, ec2);
        return make_error(E_IO, "renaming {} to {}: {}", work, out, ec.message());
    }
    if (had) fs::remove_all(old, ec);
    return status::ok();
}

result<convert_report> convert_run(const convert_params& p, const std::string& work) {
    GPTQ_ASSIGN_OR_RETURN(auto src, tensor_source::open(p.input_path));
    auto cfg = gptq_config_find(p.input_path);
    if (!cfg) return make_error(E_ARG, "{}: not a GPTQ checkpoint ({})", p.input_path, cfg.error().message());
    if (cfg->format == F::GPTQ_FORMAT_MARLIN)
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: checkpoint_format 'marlin' cannot be converted",
                          cfg->source);
    convert_report rep;
    rep.output_path = p.output_path;
    rep.label_in    = gptq_checkpoint_format_name(cfg->format);
    GPTQ_ASSIGN_OR_RETURN(gptq_zero_format_evidence ev, gptq_zero_format_resolve(*src, &*cfg));
    rep.format_in  = gptq_checkpoint_format_name(ev.format);
    rep.basis      = ev.basis;
    rep.format_out = p.format;
    rep.n_files    = static_cast<int64_t>(src->n_files());
    const F to     = p.format == "gptq" ? F::GPTQ_FORMAT_V1 : F::GPTQ_FORMAT_V2;

    // Every module with qzeros must be one we rewrite: a half-converted checkpoint is worse than none.
    size_t n_qzeros = 0;
    for (const auto& name : src->names()) n_qzeros += name.size() > 7 && name.ends_with(".qzeros") ? 1 : 0;
    GPTQ_ASSIGN_OR_RETURN(std::vector<module_plan> plans, plan_modules(*src, ev.format, to, p.clamp_zeros));
    if (plans.size() != n_qzeros)
        return make_error(E_ARG,
                          "{}: {} tensors end in .qzeros but only {} modules have a consistent qweight/qzeros/"
                          "scales/g_idx set; gptq inspect names the others",
                          p.input_path, n_qzeros, plans.size());
    rep.n_modules = static_cast<int64_t>(plans.size());

    std::error_code ec;
    fs::create_directories(work, ec);
    if (ec) return make_error(E_IO, "{}: cannot create: {}", work, ec.message());
    GPTQ_TRY(file_write_atomic(path_join(work, k_work_folder_marker),
                               "This folder is the work folder of an unfinished `gptq convert`. It becomes the "
                               "output folder when complete; an interrupted run leaves it: remove it.\n"));
    GPTQ_TRY(copy_files(p.input_path, work));
    // The same format: the copies already hold the right bytes (v1 fields at 2^bits - 1 included).
    if (ev.format != to)
        for (module_plan& plan : plans) GPTQ_TRY(patch_module(*src, plan, to, work, &rep));
    GPTQ_TRY(rewrite_configs(p.input_path, work, gptq_checkpoint_format_name(to)));
    if (rep.n_zeros_clamped > 0)
        GPTQ_LOG_WARN(
            "{} zero points of 0 stored as 1 (--clamp-zeros): {} weights (codes at 2^bits - 1) lost one scale step",
            rep.n_zeros_clamped, rep.n_codes_changed);
    src.reset();  // unmap the input before the rename
    GPTQ_TRY(fsync_all(work));
    GPTQ_TRY(publish(work, p.output_path));
    return rep;
}

}  // namespace

result<convert_report> convert_checkpoint(const convert_params& params) {
    GPTQ_TRY(check_paths(params));
    const std::string work = params.output_path + ".tmp-convert-" + std::to_string(getpid());
    auto              r    = convert_run(params, work);
    if (!r) {
        std::error_code ec;
        fs::remove_all(work, ec);  // nothing half-written stays behind
    }
    return r;
}

std::string convert_report_summary(const convert_report& r) {
    std::string s = fmt::format("wrote {}: zero points {} -> {} ({} modules in {} safetensors files)\n", r.output_path,
                                r.format_in, r.format_out, r.n_modules, r.n_files);
    if (r.label_in != r.format_in)
        s += fmt::format("the input's checkpoint_format said '{}'; its data says '{}' ({})\n", r.label_in, r.format_in,
                         r.basis);
    if (r.n_zeros_clamped > 0)
        s += fmt::format("{} zero points of 0 stored as 1; {} weights lost one scale step\n", r.n_zeros_clamped,
                         r.n_codes_changed);
    return s;
}

}  // namespace gptq
