// A bare SentencePiece tokenizer.model (no tokenizer.json next to it), through libsentencepiece.
// Encoding and decoding are SentencePiece's own: special-token strings in the text are plain text,
// and decode drops control tokens (<s>, </s>) whatever skip_special says.
#include <sentencepiece_processor.h>

#include "core/error.h"
#include "tokenizer/loaders.h"
#include "tokenizer/utf8.h"

namespace gptq {

namespace {

class spm_tokenizer final : public tokenizer {
public:
    sentencepiece::SentencePieceProcessor sp;
    bool                                  add_bos = true;
    bool                                  add_eos = false;

    std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
        std::vector<int>  pieces;
        const std::string clean = utf8_is_valid(text) ? std::string(text) : utf8_sanitize(text);
        // Encode only fails when no model is loaded, which load() rules out.
        (void)sp.Encode(clean, &pieces);
        std::vector<int32_t> ids;
        ids.reserve(pieces.size() + 2);
        if (add_special && add_bos && sp.bos_id() >= 0) ids.push_back(sp.bos_id());
        ids.insert(ids.end(), pieces.begin(), pieces.end());
        if (add_special && add_eos && sp.eos_id() >= 0) ids.push_back(sp.eos_id());
        return ids;
    }

    std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
        std::vector<int> in;
        in.reserve(ids.size());
        for (int32_t id : ids)
            if (id >= 0 && id < vocab_size_ && !(skip_special && is_special(id))) in.push_back(id);
        std::string out;
        (void)sp.Decode(in, &out);
        return out;
    }

    std::string id_to_piece(int32_t id) const override {
        return id >= 0 && id < vocab_size_ ? sp.IdToPiece(id) : std::string();
    }
    int32_t piece_to_id(std::string_view piece) const override {
        const int id = sp.PieceToId(std::string(piece));
        // PieceToId answers unk for unknown pieces; only a real match counts.
        return id >= 0 && sp.IdToPiece(id) == piece ? id : -1;
    }
    bool is_special(int32_t id) const override { return id >= 0 && id < vocab_size_ && sp.IsControl(id); }

    void setup(bool bos, bool eos) {
        add_bos     = bos;
        add_eos     = eos;
        vocab_size_ = sp.GetPieceSize();
        bos_id_     = sp.bos_id();
        if (sp.eos_id() >= 0) eos_ids_ = {sp.eos_id()};
        adds_bos_ = add_bos && bos_id_ >= 0;
        kind_     = tokenizer_kind::TOKENIZER_KIND_SENTENCEPIECE;
    }

protected:
    void on_config() override {
        if (config_.add_bos_token) add_bos = *config_.add_bos_token;
        if (config_.add_eos_token) add_eos = *config_.add_eos_token;
        adds_bos_ = add_bos && bos_id_ >= 0;
    }
};

}  // namespace

result<std::unique_ptr<tokenizer>> spm_tokenizer_load(const std::string& model_path, bool add_bos, bool add_eos) {
    GPTQ_ASSIGN_OR_RETURN(std::string bytes, tokenizer_read_file(model_path));
    auto       tok = std::make_unique<spm_tokenizer>();
    const auto st  = tok->sp.LoadFromSerializedProto(bytes);
    if (!st.ok())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: not a SentencePiece model: {}", model_path,
                          st.ToString());
    tok->setup(add_bos, add_eos);
    return std::unique_ptr<tokenizer>(std::move(tok));
}

}  // namespace gptq
