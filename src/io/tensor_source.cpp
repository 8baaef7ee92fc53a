#include "io/tensor_source.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/json_file.h"

namespace gptq {

status work_folder_check(const std::string& folder) {
    if (!file_exists(path_join(folder, k_work_folder_marker))) return status::ok();
    return make_error(status_code::STATUS_INVALID_ARGUMENT,
                      "{}: the work folder of an unfinished `gptq quantize` ({} is present), not a model; finish "
                      "it with `gptq quantize ... --resume`",
                      folder, k_work_folder_marker);
}

result<std::unique_ptr<tensor_source>> tensor_source::open(const std::string& path) {
    auto src   = std::make_unique<tensor_source>();
    src->path_ = path;

    auto add_file = [&](const std::string& file_path) -> result<size_t> {
        GPTQ_ASSIGN_OR_RETURN(auto f, safetensors_file::open(file_path));
        src->files_.push_back(std::move(f));
        return src->files_.size() - 1;
    };
    auto add_all_tensors = [&](size_t i_file) -> status {
        const auto& f = *src->files_[i_file];
        for (const auto& t : f.tensors()) {
            if (src->entries_.count(t.name))
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: tensor '{}' is also in {}", f.path(), t.name,
                                  src->entries_[t.name].file->path());
            src->entries_[t.name] = {&f, &t};
        }
        return status::ok();
    };

    if (file_exists(path)) {
        src->folder_ = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
        GPTQ_ASSIGN_OR_RETURN(size_t i, add_file(path));
        GPTQ_TRY(add_all_tensors(i));
    } else if (dir_exists(path)) {
        // Which files: the one decision of the checkpoint detector (io/checkpoint.h).
        GPTQ_ASSIGN_OR_RETURN(checkpoint_weights located, checkpoint_weights_locate(path));
        src->folder_            = path;
        const std::string index = located.index;
        if (!index.empty()) {
            GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(index));
            auto wm = j.is_object() ? j.find("weight_map") : j.end();
            if (wm == j.end() || !wm->is_object())
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: no 'weight_map' object", index);
            std::map<std::string, size_t> shard_index;
            for (auto it = wm->begin(); it != wm->end(); ++it) {
                if (!it->is_string())
                    return make_error(status_code::STATUS_PARSE_ERROR,
                                      "{}: weight_map entry '{}' is {}, expected a file name", index, it.key(),
                                      json_fields::quote(*it));
                const std::string shard = it->get<std::string>();
                if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
                    return make_error(status_code::STATUS_PARSE_ERROR,
                                      "{}: weight_map entry '{}' names shard '{}', expected a file name in the folder",
                                      index, it.key(), shard);
                if (!shard_index.count(shard)) {
                    auto i = add_file(path_join(path, shard));
                    if (!i) return i.error().with_context(index + ": shard of tensor '" + it.key() + "'");
                    shard_index[shard] = *i;
                }
                const auto& f    = *src->files_[shard_index[shard]];
                const auto* info = f.find(it.key());
                if (!info)
                    return make_error(status_code::STATUS_NOT_FOUND,
                                      "{}: tensor '{}' is listed in shard '{}' but {} does not contain it", index,
                                      it.key(), shard, f.path());
                src->entries_[it.key()] = {&f, info};
            }
        } else {
            GPTQ_ASSIGN_OR_RETURN(size_t i, add_file(located.file));
            GPTQ_TRY(add_all_tensors(i));
        }
    } else {
        struct stat st {};
        if (stat(path.c_str(), &st) == 0)
            return make_error(status_code::STATUS_IO_ERROR, "{}: {}, expected a model folder or a .safetensors file",
                              path, file_kind_name(st.st_mode));
        return make_error(status_code::STATUS_NOT_FOUND, "{}: no such file or folder", path);
    }
    for (const auto& [name, e] : src->entries_) src->names_.push_back(name);
    return src;
}

uint64_t tensor_source::total_bytes() const {
    uint64_t n = 0;
    for (const auto& f : files_) n += f->file_size();
    return n;
}

uint64_t tensor_source::total_params() const {
    uint64_t n = 0;
    for (const auto& [name, e] : entries_) n += static_cast<uint64_t>(e.info->numel());
    return n;
}

const tensor_entry* tensor_source::find(std::string_view name) const {
    auto it = entries_.find(name);
    return it == entries_.end() ? nullptr : &it->second;
}

result<tensor_entry> tensor_source::get(std::string_view name) const {
    if (const auto* e = find(name)) return *e;
    return make_error(status_code::STATUS_NOT_FOUND, "{}: missing tensor '{}'", path_, name);
}

status tensor_source::read_f32(std::string_view name, float* dst, const std::vector<int64_t>& expected_shape) const {
    GPTQ_ASSIGN_OR_RETURN(tensor_entry e, get(name));
    if (!expected_shape.empty() && e.info->shape != expected_shape) {
        auto str = [](const std::vector<int64_t>& s) {
            std::string r = "[";
            for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
            return r + "]";
        };
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: tensor '{}' has shape {}, expected {}", e.file->path(),
                          name, str(e.info->shape), str(expected_shape));
    }
    return e.file->read_f32(*e.info, dst);
}

status safetensors_index_write(const std::string& path, uint64_t total_size,
                               const std::map<std::string, std::string>& weight_map) {
    json j;
    j["metadata"]   = {{"total_size", total_size}};
    j["weight_map"] = weight_map;  // std::map: keys sorted
    return file_write_atomic(path, j.dump(2) + "\n");
}

shard_plan safetensors_plan_shards(const std::vector<safetensors_decl>& decls, uint64_t max_shard_bytes) {
    shard_plan plan;
    uint64_t   in_current = 0;
    for (const auto& d : decls) {
        uint64_t nb = dtype_size(d.type);
        for (int64_t s : d.shape) nb *= static_cast<uint64_t>(s);
        if (plan.shards.empty() || (in_current > 0 && in_current + nb > max_shard_bytes)) {
            plan.shards.emplace_back();
            in_current = 0;
        }
        plan.shards.back().push_back(d);
        in_current += nb;
    }
    if (plan.shards.empty()) plan.shards.emplace_back();
    const size_t n = plan.shards.size();
    for (size_t i = 0; i < n; ++i)
        plan.file_names.push_back(n == 1 ? std::string("model.safetensors")
                                         : fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, n));
    return plan;
}

status safetensors_save(const std::string& folder, const std::vector<named_buffer>& tensors, uint64_t max_shard_bytes,
                        const std::map<std::string, std::string>& metadata) {
    std::vector<safetensors_decl>      decls;
    std::map<std::string, const void*> data;
    for (const auto& t : tensors) {
        decls.push_back(t.decl);
        data[t.decl.name] = t.data;
    }
    const shard_plan                   plan = safetensors_plan_shards(decls, max_shard_bytes);
    std::map<std::string, std::string> weight_map;
    uint64_t                           total = 0;
    for (size_t i = 0; i < plan.shards.size(); ++i) {
        const std::string path = path_join(folder, plan.file_names[i]);
        GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path, plan.shards[i], metadata));
        for (const auto& d : plan.shards[i]) {
            uint64_t nb = dtype_size(d.type);
            for (int64_t s : d.shape) nb *= static_cast<uint64_t>(s);
            GPTQ_TRY(w->write(d.name, data[d.name], nb));
            weight_map[d.name] = plan.file_names[i];
        }
        total += w->data_size();
        GPTQ_TRY(w->finish());
    }
    if (plan.shards.size() > 1)
        GPTQ_TRY(safetensors_index_write(path_join(folder, "model.safetensors.index.json"), total, weight_map));
    return status::ok();
}

}  // namespace gptq
