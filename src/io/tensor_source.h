// tensor_source: "give me tensor NAME" over a model folder or a single .safetensors file.
//
// A folder is read through the files checkpoint_weights_locate (io/checkpoint.h) picks: the GPTQ
// config's model_file_base_name, model.safetensors.index.json (every tensor it names must exist in
// the shard it names), model.safetensors, or the one *.safetensors file it holds. Shards are
// memory-mapped once; nothing is read until a tensor is asked for.
// The same interface serves FP16/BF16 originals and GPTQ checkpoints. io never learns architectures.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "io/safetensors.h"

namespace gptq {

struct tensor_entry {
    const safetensors_file*        file = nullptr;
    const safetensors_tensor_info* info = nullptr;
};

// A folder holding this file is the work folder of an unfinished `gptq quantize` (its files may
// look like a model before they are complete): tensor_source::open and model_config_load refuse
// it. quantize writes it first and removes it just before renaming the folder to its final name.
constexpr const char* k_work_folder_marker = "INCOMPLETE-gptq-quantize.txt";
// STATUS_INVALID_ARGUMENT naming the folder when it holds k_work_folder_marker, else ok.
status work_folder_check(const std::string& folder);

class tensor_source {
public:
    // `path`: a folder or a .safetensors file.
    static result<std::unique_ptr<tensor_source>> open(const std::string& path);

    const std::string&              path() const { return path_; }      // as given
    const std::string&              folder() const { return folder_; }  // folder holding the files
    const std::vector<std::string>& names() const { return names_; }    // sorted
    size_t                          n_files() const { return files_.size(); }
    const safetensors_file&         file(size_t i) const { return *files_[i]; }
    uint64_t                        total_bytes() const;   // sum of shard file sizes
    uint64_t                        total_params() const;  // sum of numel over tensors

    bool                has(std::string_view name) const { return find(name) != nullptr; }
    const tensor_entry* find(std::string_view name) const;
    // The tensor, or STATUS_NOT_FOUND naming the tensor and the checkpoint.
    result<tensor_entry> get(std::string_view name) const;
    // Read a float tensor into F32, checking its shape against `expected_shape` when non-empty.
    status read_f32(std::string_view name, float* dst, const std::vector<int64_t>& expected_shape = {}) const;

private:
    std::string                                      path_;
    std::string                                      folder_;
    std::vector<std::unique_ptr<safetensors_file>>   files_;
    std::map<std::string, tensor_entry, std::less<>> entries_;
    std::vector<std::string>                         names_;
};

// Write a model.safetensors.index.json (atomically) for shards already written:
// {"metadata": {"total_size": N}, "weight_map": {name: shard file name}} with keys sorted.
status safetensors_index_write(const std::string& path, uint64_t total_size,
                               const std::map<std::string, std::string>& weight_map);

// Shard plan: split declared tensors (in the given order) into files of at most `max_shard_bytes`
// of tensor data each (a tensor larger than the limit gets a shard of its own). Names follow the HF
// convention: model.safetensors for one shard, else model-00001-of-0000N.safetensors.
struct shard_plan {
    std::vector<std::string>                   file_names;
    std::vector<std::vector<safetensors_decl>> shards;
};
shard_plan safetensors_plan_shards(const std::vector<safetensors_decl>& decls, uint64_t max_shard_bytes);

// Write a whole (small) set of in-memory tensors as one file or shards + index into `folder`.
// Used by tests and by small outputs; the quantizer streams through safetensors_writer instead.
struct named_buffer {
    safetensors_decl decl;
    const void*      data = nullptr;
};
status safetensors_save(const std::string& folder, const std::vector<named_buffer>& tensors, uint64_t max_shard_bytes,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace gptq
