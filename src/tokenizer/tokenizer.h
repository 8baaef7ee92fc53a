// Tokenizers that give exactly the ids Hugging Face gives for the same files.
//
// tokenizer::load(path) looks at what a model folder ships and picks one path (docs/tokenizer.md):
//   1. tokenizer.json            -> the HF `tokenizers` pipeline (added tokens, normalizer,
//                                   pre-tokenizer, BPE model, post-processor, decoder)
//   2. vocab.json + merges.txt   -> GPT-2 byte-level BPE (the same pipeline, built in code)
//   3. tokenizer.model alone     -> SentencePiece through libsentencepiece
// tokenizer_config.json (if present) gives bos/eos, add_bos_token and the chat template.
// `path` may also name one of those files directly, which forces that path.
//
// Typical use (perplexity, calibration):
//     GPTQ_ASSIGN_OR_RETURN(auto tok, tokenizer::load(model_dir));
//     std::vector<int32_t> ids = tok->encode(text, /*add_special=*/true);  // BOS first for Llama
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace gptq {

enum class tokenizer_kind {
    TOKENIZER_KIND_HF_JSON,        // tokenizer.json
    TOKENIZER_KIND_GPT2_FILES,     // vocab.json + merges.txt
    TOKENIZER_KIND_SENTENCEPIECE,  // tokenizer.model
};

const char* tokenizer_kind_name(tokenizer_kind kind);

// What tokenizer_config.json (and generation_config.json) say. Missing keys stay unset.
struct tokenizer_config {
    std::optional<std::string> bos_token;
    std::optional<std::string> eos_token;
    std::optional<std::string> unk_token;
    std::optional<std::string> pad_token;
    std::optional<bool>        add_bos_token;
    std::optional<bool>        add_eos_token;
    std::string                chat_template;       // kept for later; empty when none
    std::vector<int32_t>       generation_eos_ids;  // generation_config.json eos_token_id
};

class tokenizer {
public:
    virtual ~tokenizer() = default;

    // Load from a model folder (or one tokenizer file). Errors name the file and the offending
    // value or component ("tokenizer.json: unsupported pre_tokenizer type 'Whitespace'").
    static result<std::unique_ptr<tokenizer>> load(const std::string& path);

    // Ids for `text`. add_special: add what the tokenizer adds around a sequence (BOS for
    // Llama-style, nothing for GPT-2). Special-token strings inside `text` are matched as tokens
    // (HF default). Invalid UTF-8 in `text` is first replaced by U+FFFD (one per maximal invalid
    // subsequence), which is what Python's bytes.decode("utf-8", "replace") gives.
    virtual std::vector<int32_t> encode(std::string_view text, bool add_special) const = 0;

    // Text for `ids`. skip_special: leave out special tokens (<s>, </s>, ...). Ids out of range
    // are skipped. Incomplete UTF-8 at the end comes out as U+FFFD, as HF does.
    virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special) const = 0;

    // The vocabulary string of one id ("▁the", "Ġthe", "<0x0A>", "<s>"); "" out of range.
    virtual std::string id_to_piece(int32_t id) const = 0;
    // The id of a vocabulary string, or -1.
    virtual int32_t piece_to_id(std::string_view piece) const = 0;
    virtual bool    is_special(int32_t id) const              = 0;

    int32_t                     vocab_size() const { return vocab_size_; }
    int32_t                     bos_id() const { return bos_id_; }  // -1: none
    const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
    // Whether encode(text, true) puts bos_id() first.
    bool                    adds_bos() const { return adds_bos_; }
    tokenizer_kind          kind() const { return kind_; }
    const tokenizer_config& config() const { return config_; }
    const std::string&      source_path() const { return source_path_; }

protected:
    // Called once tokenizer_config.json has been applied (config_, bos_id_, eos_ids_ are set).
    virtual void on_config() {}

    int32_t              vocab_size_ = 0;
    int32_t              bos_id_     = -1;
    std::vector<int32_t> eos_ids_;
    bool                 adds_bos_ = false;
    tokenizer_kind       kind_     = tokenizer_kind::TOKENIZER_KIND_HF_JSON;
    tokenizer_config     config_;
    std::string          source_path_;

    friend result<std::unique_ptr<tokenizer>> tokenizer_finish_load(std::unique_ptr<tokenizer>,
                                                                    const tokenizer_config&);
};

// Streaming decode for generation: feed ids one at a time, get the text that became final.
// Holds back text while the last tokens end in an incomplete UTF-8 sequence (U+FFFD at the end),
// and keeps only a short window of ids, so each step costs O(window), not O(sequence).
// Concatenating every step() and finish() gives decode(all ids, skip_special) except where that
// decode would strip or merge across the window (a Strip decoder only affects the very start).
class incremental_decoder {
public:
    incremental_decoder(const tokenizer& tok, bool skip_special) : tok_(tok), skip_special_(skip_special) {}

    std::string step(int32_t id);
    std::string finish();  // whatever is still held back (incomplete bytes as U+FFFD)
    void        reset();

private:
    const tokenizer&     tok_;
    bool                 skip_special_;
    std::vector<int32_t> ids_;  // window: ids_[0, read_) already emitted
    size_t               read_ = 0;
    std::string          prefix_;  // decode(ids_[0, read_))
};

}  // namespace gptq
