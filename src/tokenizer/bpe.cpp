#include "tokenizer/bpe.h"

#include <fmt/format.h>

#include <queue>

#include "tokenizer/utf8.h"

namespace gptq {

namespace {

constexpr size_t           cache_max_word_bytes = 64;
constexpr size_t           cache_max_entries    = 1 << 17;
constexpr std::string_view metaspace            = "\xE2\x96\x81";  // U+2581

struct symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool    alive;
};

struct candidate {
    int32_t rank;
    int32_t pos;  // index of the left symbol (stable: symbols never move)
    int32_t merged;
    // std::priority_queue is a max-heap: "less" means "popped later" (higher rank, then righter).
    bool operator<(const candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

}  // namespace

void bpe_model::add_merge(int32_t left, int32_t right, int32_t merged, int32_t rank) {
    // The first occurrence of a pair wins (lowest rank), as when HF builds its merge map.
    merges_.emplace(pair_key(left, right), merge_info{rank, merged});
}

void bpe_model::finish_setup() {
    for (int b = 0; b < 256; ++b) byte_ids_[b] = find(fmt::format("<0x{:02X}>", b));
    // Is U+2581 ever preceded by another character inside a token?
    bool interior = false;
    for (const auto& [tok, id] : vocab) {
        for (size_t pos = tok.find(metaspace, 1); pos != std::string::npos && !interior;
             pos        = tok.find(metaspace, pos + 1))
            interior = pos < metaspace.size() || tok.compare(pos - metaspace.size(), metaspace.size(), metaspace) != 0;
        if (interior) break;
    }
    split_at_metaspace_ = !interior && !ignore_merges;
}

void bpe_model::merge_symbols(std::vector<int32_t>& ids) const {
    const auto n = static_cast<int32_t>(ids.size());
    if (n < 2) return;
    std::vector<symbol> syms(n);
    for (int32_t i = 0; i < n; ++i) syms[i] = symbol{ids[i], i - 1, i + 1 < n ? i + 1 : -1, true};

    std::vector<candidate> initial;
    initial.reserve(n);
    for (int32_t i = 0; i + 1 < n; ++i) {
        auto it = merges_.find(pair_key(ids[i], ids[i + 1]));
        if (it != merges_.end()) initial.push_back({it->second.rank, i, it->second.merged});
    }
    std::priority_queue<candidate> heap(std::less<candidate>(), std::move(initial));

    auto push_pair = [&](int32_t left) {
        if (left < 0) return;
        const int32_t right = syms[left].next;
        if (right < 0) return;
        auto it = merges_.find(pair_key(syms[left].id, syms[right].id));
        if (it != merges_.end()) heap.push({it->second.rank, left, it->second.merged});
    };

    while (!heap.empty()) {
        const candidate top = heap.top();
        heap.pop();
        symbol& left = syms[top.pos];
        if (!left.alive || left.next < 0) continue;
        // A stale candidate: the pair at pos changed since it was pushed. Like HF, the check is on
        // the merged id only.
        auto it = merges_.find(pair_key(left.id, syms[left.next].id));
        if (it == merges_.end() || it->second.merged != top.merged) continue;

        symbol& right = syms[left.next];
        left.id       = top.merged;
        right.alive   = false;
        left.next     = right.next;
        if (right.next >= 0) syms[right.next].prev = top.pos;
        push_pair(left.prev);
        push_pair(top.pos);
    }

    ids.clear();
    for (int32_t i = 0; i >= 0 && i < n; i = syms[i].next) ids.push_back(syms[i].id);
}

void bpe_model::encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges) {
        const int32_t id = find(word);
        if (id >= 0) {
            out.push_back(id);
            return;
        }
    }
    if (!split_at_metaspace_) {
        encode_chunk(word, out);
        return;
    }
    // Cut before each U+2581 that follows another character (see split_at_metaspace_).
    size_t start = 0;
    for (size_t pos = word.find(metaspace, 1); pos != std::string_view::npos; pos = word.find(metaspace, pos + 1)) {
        if (pos >= metaspace.size() && word.compare(pos - metaspace.size(), metaspace.size(), metaspace) == 0)
            continue;  // inside a run of U+2581
        if (pos > start) encode_chunk(word.substr(start, pos - start), out);
        start = pos;
    }
    encode_chunk(word.substr(start), out);
}

void bpe_model::encode_chunk(std::string_view word, std::vector<int32_t>& out) const {
    const bool cacheable = word.size() <= cache_max_word_bytes;
    if (cacheable) {
        std::lock_guard<std::mutex> lock(cache_mutex_);
        auto                        it = cache_.find(word);
        if (it != cache_.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }

    std::vector<int32_t> ids;
    ids.reserve(word.size());
    bool prev_unk = false;
    for (size_t i = 0; i < word.size();) {
        const size_t start = i;
        utf8_next(word, i);
        const std::string_view ch = word.substr(start, i - start);
        const int32_t          id = find(ch);
        if (id >= 0) {
            ids.push_back(id);
            prev_unk = false;
            continue;
        }
        if (byte_fallback) {
            bool all = true;
            for (char c : ch) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
            if (all) {
                for (char c : ch) ids.push_back(byte_ids_[static_cast<uint8_t>(c)]);
                prev_unk = false;
                continue;
            }
        }
        if (unk_id >= 0) {
            if (!(fuse_unk && prev_unk)) ids.push_back(unk_id);
            prev_unk = true;
        }
    }
    merge_symbols(ids);

    if (cacheable) {
        std::lock_guard<std::mutex> lock(cache_mutex_);
        if (cache_.size() < cache_max_entries) cache_.emplace(std::string(word), ids);
    }
    out.insert(out.end(), ids.begin(), ids.end());
}

}  // namespace gptq
