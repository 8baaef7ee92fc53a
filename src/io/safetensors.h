// safetensors: validated, memory-mapped reading and streaming, crash-safe writing.
//
// Format (docs/formats.md, ../shared/docs/format.md section 5): u64 little-endian header length N,
// N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {str: str}},
// then the data region; offsets are relative to its start. The reader checks everything the spec
// requires (see safetensors_parse_header) before handing out any view, so a hostile file gives an
// error naming the file and the offending value, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"

namespace gptq {

constexpr uint64_t k_safetensors_max_header = 100'000'000;  // the reference parser's limit

struct safetensors_tensor_info {
    std::string          name;
    dtype                type = dtype::DTYPE_F32;
    std::vector<int64_t> shape;      // outermost first; empty = scalar
    uint64_t             begin = 0;  // byte offset in the data region
    uint64_t             end   = 0;  // one past the last byte

    uint64_t nbytes() const { return end - begin; }
    int64_t  numel() const;
};

struct safetensors_header {
    std::vector<safetensors_tensor_info> tensors;         // sorted by data offset
    std::map<std::string, std::string>   metadata;        // __metadata__, possibly empty
    uint64_t                             data_start = 0;  // 8 + N
    uint64_t                             data_size  = 0;  // bytes of the data region
};

// Validate a complete file image (or at least its first 8 + N bytes when only the header is
// available: pass the real file size as `file_size`). `path` only labels error messages.
result<safetensors_header> safetensors_parse_header(const uint8_t* bytes, size_t n_bytes, uint64_t file_size,
                                                    const std::string& path);

// A memory-mapped, validated .safetensors file. Views stay valid while the object lives.
class safetensors_file {
public:
    static result<std::unique_ptr<safetensors_file>> open(const std::string& path);
    ~safetensors_file();
    safetensors_file(const safetensors_file&)            = delete;
    safetensors_file& operator=(const safetensors_file&) = delete;

    const std::string&                          path() const { return path_; }
    uint64_t                                    file_size() const { return size_; }
    const std::vector<safetensors_tensor_info>& tensors() const { return header_.tensors; }
    const std::map<std::string, std::string>&   metadata() const { return header_.metadata; }
    const safetensors_tensor_info*              find(std::string_view name) const;
    uint64_t data_start() const { return header_.data_start; }  // file offset of the data region

    // Zero-copy view of a tensor's bytes (read-only mapping: do not write through it). The data
    // pointer is aligned to the element size only if the writer aligned it (ours always does);
    // use is_aligned() or copy_to() before treating it as a typed array.
    tensor_view    view(const safetensors_tensor_info& info) const;
    const uint8_t* bytes(const safetensors_tensor_info& info) const;
    bool           is_aligned(const safetensors_tensor_info& info) const;
    // Copy the raw bytes of a tensor into dst (nbytes() bytes).
    void copy_to(const safetensors_tensor_info& info, void* dst) const;
    // Convert a float tensor (F32/F16/BF16) into dst (numel() floats), whatever its alignment. A
    // NaN or Inf is an error (check_finite's), found in the same pass as the conversion.
    status read_f32(const safetensors_tensor_info& info, float* dst) const;
    // For a float tensor (F64/F32/F16/BF16): an error naming the file, the tensor, the first NaN or
    // Inf (its flat index) and how many there are. Other dtypes are always ok. Reads in place.
    status check_finite(const safetensors_tensor_info& info) const;

private:
    safetensors_file() = default;
    std::string                                path_;
    uint8_t*                                   map_  = nullptr;
    uint64_t                                   size_ = 0;
    safetensors_header                         header_;
    std::map<std::string, size_t, std::less<>> index_;
};

// Declaration of one tensor to write: the writer needs all of them up front to lay out the header.
struct safetensors_decl {
    std::string          name;
    dtype                type = dtype::DTYPE_F32;
    std::vector<int64_t> shape;
};

// Streaming writer. create() writes the header to "<path>.tmp-<pid>"; write() places one tensor's
// bytes at its offset (any order, each exactly once); finish() checks that every tensor was written,
// fsyncs, renames to `path` and fsyncs the folder. Destroying an unfinished writer deletes the
// temporary file, so an interrupted write never leaves a file that looks complete.
// Layout: tensors sorted by element size (largest first) then name, so every tensor is naturally
// aligned; the header is padded with spaces to a multiple of 8; __metadata__ has "format": "pt".
class safetensors_writer {
public:
    static result<std::unique_ptr<safetensors_writer>> create(const std::string&                 path,
                                                              std::vector<safetensors_decl>      decls,
                                                              std::map<std::string, std::string> metadata = {});
    ~safetensors_writer();
    safetensors_writer(const safetensors_writer&)            = delete;
    safetensors_writer& operator=(const safetensors_writer&) = delete;

    // `data` holds numel * dtype_size bytes in row-major order.
    status write(std::string_view name, const void* data, size_t n_bytes);
    status finish();

    uint64_t           data_size() const { return data_size_; }
    const std::string& path() const { return path_; }

private:
    safetensors_writer() = default;
    std::string                                path_;
    std::string                                tmp_path_;
    int                                        fd_         = -1;
    uint64_t                                   data_start_ = 0;
    uint64_t                                   data_size_  = 0;
    std::vector<safetensors_tensor_info>       layout_;
    std::vector<bool>                          written_;
    std::map<std::string, size_t, std::less<>> index_;
    bool                                       finished_ = false;
};

}  // namespace gptq
