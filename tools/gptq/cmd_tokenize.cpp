// gptq tokenize PATH [TEXT] [--file F] [--no-bos] [--pieces]
// Prints the ids (or pieces) of TEXT on one line, or one line per line of F.
#include <cstdio>
#include <fstream>
#include <memory>

#include "commands.h"
#include "gptq/tokenize.h"

namespace gptq::cli {

namespace {

std::string format_line(const tokenizer_handle& tok, const std::string& text, bool add_special, bool pieces) {
    const std::vector<int32_t> ids = tok.encode(text, add_special);
    std::string                out;
    if (pieces) {
        for (const auto& p : tok.pieces(ids)) {
            if (!out.empty()) out += ' ';
            out += p;
        }
    } else {
        for (int32_t id : ids) {
            if (!out.empty()) out += ' ';
            out += std::to_string(id);
        }
    }
    out += '\n';
    return out;
}

}  // namespace

command register_tokenize(CLI::App& app) {
    struct opts {
        std::string path;
        std::string text;
        std::string file;
        bool        no_bos = false;
        bool        pieces = false;
    };
    auto o   = std::make_shared<opts>();
    auto sub = app.add_subcommand("tokenize", "print the token ids of a text with a model's tokenizer");
    sub->add_option("path", o->path, "model folder, or a folder (or file) with tokenizer files")->required();
    auto text_opt = sub->add_option("text", o->text, "the text to encode");
    auto file_opt = sub->add_option("--file", o->file,
                                    "encode every line of this file (without its newline); "
                                    "one output line per input line");
    text_opt->excludes(file_opt);
    sub->add_flag("--no-bos", o->no_bos, "leave out the BOS (and other special tokens) the tokenizer adds");
    sub->add_flag("--pieces", o->pieces, "print the vocabulary pieces instead of ids");
    return {
        sub, [o, text_opt, file_opt] {
            if (!*text_opt && !*file_opt)
                return report_error(status(status_code::STATUS_INVALID_ARGUMENT, "tokenize: give a TEXT or --file F"));
            auto r = tokenizer_handle::load(o->path);
            if (!r) return report_error(r.error());
            const tokenizer_handle& tok = *r;
            if (!*file_opt) {
                std::fputs(format_line(tok, o->text, !o->no_bos, o->pieces).c_str(), stdout);
                return 0;
            }
            std::ifstream in(o->file, std::ios::binary);
            if (!in) return report_error(status(status_code::STATUS_NOT_FOUND, o->file + ": cannot open"));
            std::string line;
            while (std::getline(in, line)) {
                if (!line.empty() && line.back() == '\r') line.pop_back();
                std::fputs(format_line(tok, line, !o->no_bos, o->pieces).c_str(), stdout);
            }
            if (in.bad()) return report_error(status(status_code::STATUS_IO_ERROR, o->file + ": read failed"));
            return 0;
        }};
}

}  // namespace gptq::cli
