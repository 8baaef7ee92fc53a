#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "core/error.h"
#include "io/json_file.h"

namespace gptq {

namespace {

constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;
constexpr auto E_IO    = status_code::STATUS_IO_ERROR;

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

uint64_t read_u64_le(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

// numel * elem_size, or false on overflow.
bool checked_nbytes(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* out) {
    uint64_t n = elem_size;
    for (int64_t d : shape) {
        const auto ud = static_cast<uint64_t>(d);
        if (ud != 0 && n > std::numeric_limits<uint64_t>::max() / ud) return false;
        n *= ud;
    }
    *out = n;
    return true;
}

// Parse one tensor entry of the header.
result<safetensors_tensor_info> parse_entry(const std::string& name, const json& v, const std::string& path) {
    safetensors_tensor_info info;
    info.name = name;
    if (!v.is_object())
        return make_error(E_PARSE, "{}: header entry '{}' is {}, expected an object with dtype, shape, data_offsets",
                          path, name, json_fields::quote(v));
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string())
        return make_error(E_PARSE, "{}: tensor '{}' has no string 'dtype'", path, name);
    if (!dtype_from_name(dt->get<std::string>(), &info.type))
        return make_error(E_PARSE, "{}: tensor '{}' has unknown dtype '{}'", path, name, dt->get<std::string>());
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array())
        return make_error(E_PARSE, "{}: tensor '{}' has no 'shape' array", path, name);
    for (const auto& d : *sh) {
        if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            return make_error(E_PARSE, "{}: tensor '{}' has invalid shape {}", path, name, json_fields::quote(*sh));
        info.shape.push_back(d.get<int64_t>());
    }
    if (info.shape.size() > static_cast<size_t>(k_max_dims))
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: tensor '{}' has {} dimensions, at most {} supported",
                          path, name, info.shape.size(), k_max_dims);
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
        return make_error(E_PARSE, "{}: tensor '{}' has invalid data_offsets {} (expected [begin, end])", path, name,
                          off == v.end() ? std::string("(missing)") : json_fields::quote(*off));
    info.begin = (*off)[0].get<uint64_t>();
    info.end   = (*off)[1].get<uint64_t>();
    if (info.end < info.begin)
        return make_error(E_PARSE, "{}: tensor '{}' has data_offsets [{}, {}] with end before begin", path, name,
                          info.begin, info.end);
    uint64_t expect = 0;
    if (!checked_nbytes(info.shape, dtype_size(info.type), &expect) || expect != info.end - info.begin)
        return make_error(E_PARSE, "{}: tensor '{}' has shape {} of {} ({} bytes) but data_offsets span {} bytes", path,
                          name, shape_str(info.shape), dtype_name(info.type), expect, info.end - info.begin);
    return info;
}

}  // namespace

int64_t safetensors_tensor_info::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

result<safetensors_header> safetensors_parse_header(const uint8_t* bytes, size_t n_bytes, uint64_t file_size,
                                                    const std::string& path) {
    if (file_size < 8 || n_bytes < 8)
        return make_error(E_PARSE, "{}: file is {} bytes, too short for a safetensors header length (8 bytes)", path,
                          file_size);
    const uint64_t n = read_u64_le(bytes);
    if (n > k_safetensors_max_header)
        return make_error(E_PARSE, "{}: header length {} exceeds the limit of {} bytes", path, n,
                          k_safetensors_max_header);
    if (n > file_size - 8)
        return make_error(E_PARSE, "{}: header length {} is larger than the file ({} bytes after the length field)",
                          path, n, file_size - 8);
    if (n > n_bytes - 8)
        return make_error(E_IO, "{}: only {} bytes of the {}-byte header are available", path, n_bytes - 8, n);
    if (n < 2 || bytes[8] != '{')
        return make_error(E_PARSE, "{}: header does not start with '{{' (not a safetensors file?)", path);

    // Parse, rejecting duplicate keys at the top level (nlohmann would silently keep the last one).
    const char*           text = reinterpret_cast<const char*>(bytes + 8);
    std::set<std::string> seen;
    std::string           duplicate;
    json                  j;
    try {
        j = json::parse(
            text, text + n,
            [&](int depth, json::parse_event_t event, json& parsed) {
                if (depth == 1 && event == json::parse_event_t::key) {
                    auto key = parsed.get<std::string>();
                    if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
                }
                return true;
            },
            true);
    } catch (const json::exception& e) {
        return make_error(E_PARSE, "{}: header is not valid JSON: {}", path, e.what());
    }
    if (!duplicate.empty()) return make_error(E_PARSE, "{}: header has duplicate key '{}'", path, duplicate);
    if (!j.is_object()) return make_error(E_PARSE, "{}: header JSON is not an object", path);

    safetensors_header h;
    h.data_start = 8 + n;
    h.data_size  = file_size - h.data_start;
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (it.key() == "__metadata__") {
            if (!it->is_object())
                return make_error(E_PARSE, "{}: __metadata__ is {}, expected an object of strings", path,
                                  json_fields::quote(*it));
            for (auto m = it->begin(); m != it->end(); ++m) {
                if (!m->is_string())
                    return make_error(E_PARSE, "{}: __metadata__ value of '{}' is {}, expected a string", path, m.key(),
                                      json_fields::quote(*m));
                h.metadata[m.key()] = m->get<std::string>();
            }
            continue;
        }
        auto info = parse_entry(it.key(), *it, path);
        if (!info) return info.error();
        h.tensors.push_back(std::move(info).value());
    }

    // The spans, sorted by offset, must tile the data region exactly.
    std::stable_sort(h.tensors.begin(), h.tensors.end(), [](const auto& a, const auto& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expected_begin = 0;
    for (size_t i = 0; i < h.tensors.size(); ++i) {
        const auto& t = h.tensors[i];
        if (t.end > h.data_size)
            return make_error(E_PARSE, "{}: tensor '{}' data_offsets [{}, {}] lie outside the data region of {} bytes",
                              path, t.name, t.begin, t.end, h.data_size);
        if (t.begin < expected_begin)
            return make_error(E_PARSE, "{}: tensor '{}' data_offsets [{}, {}] overlap tensor '{}' ending at {}", path,
                              t.name, t.begin, t.end, h.tensors[i - 1].name, expected_begin);
        if (t.begin > expected_begin)
            return make_error(E_PARSE, "{}: tensor '{}' starts at offset {} but the previous data ends at {} (hole)",
                              path, t.name, t.begin, expected_begin);
        expected_begin = t.end;
    }
    if (expected_begin != h.data_size)
        return make_error(E_PARSE, "{}: tensor data ends at offset {} but the data region is {} bytes{}", path,
                          expected_begin, h.data_size, expected_begin < h.data_size ? " (trailing bytes)" : "");
    return h;
}

result<std::unique_ptr<safetensors_file>> safetensors_file::open(const std::string& path) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; it is
    // refused just below (fstat) like any other file that is not a regular one.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        const auto code = errno == ENOENT ? status_code::STATUS_NOT_FOUND : E_IO;
        return make_error(code, "{}: cannot open: {}", path, std::strerror(errno));
    }
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        const char* kind = file_kind_name(st.st_mode);
        ::close(fd);
        return make_error(E_IO, "{}: not a regular file ({}); expected a .safetensors file", path, kind);
    }
    std::unique_ptr<safetensors_file> f(new safetensors_file());
    f->path_ = path;
    f->size_ = static_cast<uint64_t>(st.st_size);
    if (f->size_ > 0) {
        void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            const int err = errno;
            ::close(fd);
            return make_error(E_IO, "{}: mmap of {} bytes failed: {}", path, f->size_, std::strerror(err));
        }
        f->map_ = static_cast<uint8_t*>(m);
    }
    ::close(fd);
    auto h = safetensors_parse_header(f->map_, f->size_, f->size_, path);
    if (!h) return h.error();
    f->header_ = std::move(h).value();
    for (size_t i = 0; i < f->header_.tensors.size(); ++i) f->index_[f->header_.tensors[i].name] = i;
    return f;
}

safetensors_file::~safetensors_file() {
    if (map_) munmap(map_, size_);
}

const safetensors_tensor_info* safetensors_file::find(std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

const uint8_t* safetensors_file::bytes(const safetensors_tensor_info& info) const {
    return map_ + header_.data_start + info.begin;
}

bool safetensors_file::is_aligned(const safetensors_tensor_info& info) const {
    return reinterpret_cast<uintptr_t>(bytes(info)) % dtype_size(info.type) == 0;
}

tensor_view safetensors_file::view(const safetensors_tensor_info& info) const {
    GPTQ_ASSERT(info.shape.size() <= static_cast<size_t>(k_max_dims));
    return tensor_view::contiguous(const_cast<uint8_t*>(bytes(info)), info.type, info.shape.data(),
                                   static_cast<int>(info.shape.size()));
}

void safetensors_file::copy_to(const safetensors_tensor_info& info, void* dst) const {
    if (info.nbytes()) std::memcpy(dst, bytes(info), info.nbytes());
}

status safetensors_file::read_f32(const safetensors_tensor_info& info, float* dst) const {
    const size_t   n   = static_cast<size_t>(info.numel());
    const uint8_t* src = bytes(info);
    switch (info.type) {
        case dtype::DTYPE_F32: {
            std::memcpy(dst, src, n * 4);
            bool finite = true;
            for (size_t i = 0; i < n; ++i) finite &= std::isfinite(dst[i]);
            return finite ? status::ok() : check_finite(info);
        }
        case dtype::DTYPE_F16:
        case dtype::DTYPE_BF16: {
            // Non-finite values are caught in the conversion pass itself (exponent bits all ones), so
            // loading costs no extra pass; the error path counts them all (check_finite).
            const bool     f16 = info.type == dtype::DTYPE_F16;
            const uint16_t e   = f16 ? 0x7c00 : 0x7f80;
            uint16_t       bad = 0;
            for (size_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                bad |= static_cast<uint16_t>((h & e) == e);
                dst[i] = f16 ? f16_to_f32(h) : bf16_to_f32(h);
            }
            return bad ? check_finite(info) : status::ok();
        }
        default:
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", path_, info.name,
                              dtype_name(info.type));
    }
}

status safetensors_file::check_finite(const safetensors_tensor_info& info) const {
    const uint8_t* src = bytes(info);
    const size_t   n   = static_cast<size_t>(info.numel());
    // Non-finite = exponent bits all ones; read the bits, no conversion.
    auto bad = [&](size_t i) -> bool {
        switch (info.type) {
            case dtype::DTYPE_F32: {
                uint32_t u;
                std::memcpy(&u, src + 4 * i, 4);
                return (u & 0x7f800000u) == 0x7f800000u;
            }
            case dtype::DTYPE_F16:
            case dtype::DTYPE_BF16: {
                uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                const uint16_t e = info.type == dtype::DTYPE_F16 ? 0x7c00 : 0x7f80;
                return (h & e) == e;
            }
            case dtype::DTYPE_F64: {
                uint64_t u;
                std::memcpy(&u, src + 8 * i, 8);
                return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
            }
            default:
                return false;
        }
    };
    size_t n_bad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
        if (bad(i) && n_bad++ == 0) first = i;
    if (n_bad == 0) return status::ok();
    return make_error(E_PARSE, "{}: tensor '{}' holds NaN or Inf at element {} ({} non-finite value{} of {})", path_,
                      info.name, first, n_bad, n_bad == 1 ? "" : "s", n);
}

// ---- writer ------------------------------------------------------------------------------------

result<std::unique_ptr<safetensors_writer>> safetensors_writer::create(const std::string&                 path,
                                                                       std::vector<safetensors_decl>      decls,
                                                                       std::map<std::string, std::string> metadata) {
    std::unique_ptr<safetensors_writer> w(new safetensors_writer());
    w->path_     = path;
    w->tmp_path_ = path + ".tmp-" + std::to_string(getpid());

    std::stable_sort(decls.begin(), decls.end(), [](const auto& a, const auto& b) {
        const size_t sa = dtype_size(a.type), sb = dtype_size(b.type);
        return sa != sb ? sa > sb : a.name < b.name;
    });
    json     header = json::object();
    uint64_t offset = 0;
    for (const auto& d : decls) {
        if (d.name.empty() || d.name == "__metadata__")
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: invalid tensor name '{}'", path, d.name);
        if (w->index_.count(d.name))
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' declared twice", path, d.name);
        for (int64_t s : d.shape)
            if (s < 0)
                return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' has negative shape {}", path,
                                  d.name, shape_str(d.shape));
        uint64_t nb = 0;
        if (!checked_nbytes(d.shape, dtype_size(d.type), &nb))
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' shape {} overflows", path, d.name,
                              shape_str(d.shape));
        safetensors_tensor_info info{d.name, d.type, d.shape, offset, offset + nb};
        header[d.name] = {
            {"dtype", std::string(dtype_name(d.type))}, {"shape", d.shape}, {"data_offsets", {offset, offset + nb}}};
        w->index_[d.name] = w->layout_.size();
        w->layout_.push_back(std::move(info));
        offset += nb;
    }
    metadata.emplace("format", "pt");
    header["__metadata__"] = metadata;
    std::string text       = header.dump();
    text.resize((text.size() + 7) / 8 * 8, ' ');
    w->data_start_ = 8 + text.size();
    w->data_size_  = offset;
    w->written_.assign(w->layout_.size(), false);

    w->fd_ = ::open(w->tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd_ < 0) return make_error(E_IO, "{}: cannot create: {}", w->tmp_path_, std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(text.size() >> (8 * i));
    if (pwrite(w->fd_, len, 8, 0) != 8 ||
        pwrite(w->fd_, text.data(), text.size(), 8) != static_cast<ssize_t>(text.size()))
        return make_error(E_IO, "{}: writing the header failed: {}", w->tmp_path_, std::strerror(errno));
    // Size the file now so that a short disk shows up early rather than at the last tensor.
    if (ftruncate(w->fd_, static_cast<off_t>(w->data_start_ + w->data_size_)) != 0)
        return make_error(E_IO, "{}: cannot size file to {} bytes: {}", w->tmp_path_, w->data_start_ + w->data_size_,
                          std::strerror(errno));
    return w;
}

safetensors_writer::~safetensors_writer() {
    if (fd_ >= 0) ::close(fd_);
    if (!finished_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

status safetensors_writer::write(std::string_view name, const void* data, size_t n_bytes) {
    if (finished_) return make_error(status_code::STATUS_INTERNAL, "{}: write('{}') after finish()", path_, name);
    auto it = index_.find(name);
    if (it == index_.end())
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' was not declared", path_, name);
    const auto& info = layout_[it->second];
    if (written_[it->second])
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' written twice", path_, name);
    if (n_bytes != info.nbytes())
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: tensor '{}' needs {} bytes, got {}", path_, name,
                          info.nbytes(), n_bytes);
    const auto* p   = static_cast<const uint8_t*>(data);
    uint64_t    pos = 0;
    while (pos < n_bytes) {
        const size_t  chunk = static_cast<size_t>(std::min<uint64_t>(n_bytes - pos, 1u << 30));
        const ssize_t r     = pwrite(fd_, p + pos, chunk, static_cast<off_t>(data_start_ + info.begin + pos));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            return make_error(E_IO, "{}: writing tensor '{}' failed: {}", tmp_path_, name,
                              r < 0 ? std::strerror(errno) : "no progress");
        pos += static_cast<uint64_t>(r);
    }
    written_[it->second] = true;
    return status::ok();
}

status safetensors_writer::finish() {
    if (finished_) return status::ok();
    for (size_t i = 0; i < layout_.size(); ++i)
        if (!written_[i])
            return make_error(status_code::STATUS_INTERNAL, "{}: tensor '{}' was declared but never written", path_,
                              layout_[i].name);
    if (fsync(fd_) != 0) return make_error(E_IO, "{}: fsync failed: {}", tmp_path_, std::strerror(errno));
    ::close(fd_);
    fd_ = -1;
    if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0)
        return make_error(E_IO, "{}: rename from {} failed: {}", path_, tmp_path_, std::strerror(errno));
    finished_ = true;
    // Make the rename durable.
    std::string dir = path_.find('/') == std::string::npos ? "." : path_.substr(0, path_.rfind('/'));
    if (dir.empty()) dir = "/";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        ::close(dfd);
    }
    return status::ok();
}

}  // namespace gptq
