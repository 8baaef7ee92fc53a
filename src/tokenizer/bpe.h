// The BPE model of HF `tokenizers`: vocab + ranked merges, applied to one pre-tokenized word.
//
// A word starts as one symbol per code point (a code point missing from the vocab becomes its
// <0xXX> byte tokens with byte_fallback, else the unk token, else nothing). Then the adjacent pair
// with the lowest merge rank is merged (leftmost first on equal rank) until no pair has a merge.
// A min-heap of candidate pairs over a linked list of symbols makes this O(n log n) in the word
// length, so SentencePiece-style tokenizers, whose "word" is a whole line, stay fast.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace gptq {

struct string_hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using string_id_map = std::unordered_map<std::string, int32_t, string_hash, std::equal_to<>>;

class bpe_model {
public:
    string_id_map            vocab;
    std::vector<std::string> id_to_token;  // dense; "" where an id has no token
    int32_t                  unk_id        = -1;
    bool                     byte_fallback = false;
    bool                     fuse_unk      = false;
    bool                     ignore_merges = false;

    // Call after vocab/id_to_token are filled. rank: position in the merge list (0 first).
    void add_merge(int32_t left, int32_t right, int32_t merged, int32_t rank);
    void finish_setup();  // byte-token table

    int32_t find(std::string_view token) const {
        auto it = vocab.find(token);
        return it == vocab.end() ? -1 : it->second;
    }

    // Appends the ids of one word.
    void encode_word(std::string_view word, std::vector<int32_t>& out) const;

private:
    struct merge_info {
        int32_t rank;
        int32_t merged;
    };
    static uint64_t pair_key(int32_t a, int32_t b) {
        return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
    }
    void merge_symbols(std::vector<int32_t>& ids) const;
    void encode_chunk(std::string_view chunk, std::vector<int32_t>& out) const;

    // SentencePiece-style vocabularies put U+2581 only at the start of a token (after other
    // U+2581). Then no merge can join a symbol ending in another character with a following
    // U+2581, so a word can be cut before each such U+2581 and the pieces merged independently:
    // exact, and it keeps whole lines (the "word" when there is no pre-tokenizer) cheap and cacheable.
    // Checked on the vocab at setup; off with ignore_merges (which looks at the whole word).
    bool split_at_metaspace_ = false;

    std::unordered_map<uint64_t, merge_info> merges_;
    std::array<int32_t, 256>                 byte_ids_{};

    // Word -> ids cache for short words (byte-level BPE sees the same words again and again).
    mutable std::mutex                                                                          cache_mutex_;
    mutable std::unordered_map<std::string, std::vector<int32_t>, string_hash, std::equal_to<>> cache_;
};

}  // namespace gptq
