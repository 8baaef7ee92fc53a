// model_session.h: what both backends share: opening by device, the step checks, the weights' name.
#include "model_session.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"

namespace gptq {

namespace {
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;
}  // namespace

std::string model_session::weights() const {
    if (const gptq_config* q = model().quantization())
        return fmt::format("gptq-{}bit-g{}{}", q->bits, q->group_size, q->desc_act ? "-act" : "");
    const std::string& d = model().config().dtype_name;
    return d.empty() ? "unknown" : d;
}

status model_session::profile_ops(bool) {
    return make_error(status_code::STATUS_UNSUPPORTED,
                      "op profiling times the ops of the GPU model; the {} session has none (use --device cuda)",
                      device());
}

status model_session::step_top(std::span<const seq_step> steps, int64_t k, const float* inv_temp, logits_top* out) {
    for (const seq_step& s : steps)
        if (s.all_logits)
            return make_error(E_ARG, "step_top: slot {} asks for every row's logits; candidates are one row per step",
                              s.seq);
    if (k < 1 || k > k_logits_top_max)
        return make_error(E_ARG, "step_top: {} candidates per row; 1 to {} are supported", k, k_logits_top_max);
    top_rows_ = 0;
    top_logits_.resize(steps.size() * static_cast<size_t>(n_vocab()));
    GPTQ_TRY(step(steps, top_logits_.data()));
    top_rows_ = static_cast<int64_t>(steps.size());
    logits_top_cpu(top_logits_.data(), top_rows_, n_vocab(), k, inv_temp, out);
    return status::ok();
}

status model_session::step_row_logits(int64_t row, float* logits) {
    if (row < 0 || row >= top_rows_)
        return make_error(E_ARG, "step_row_logits: row {} of a step_top of {} rows", row, top_rows_);
    std::copy_n(top_logits_.data() + row * n_vocab(), n_vocab(), logits);
    return status::ok();
}

status model_session::ids_check(const int32_t* ids, int64_t n, const std::string& where) const {
    for (int64_t t = 0; t < n; ++t)
        if (ids[t] < 0 || ids[t] >= n_vocab())
            return make_error(E_ARG, "{}, token {} of {}: id {} is outside the vocabulary [0, {})", where, t, n, ids[t],
                              n_vocab());
    return status::ok();
}

status model_session::lora_check(int32_t lora, const std::string& where) const {
    if (lora < -1 || lora >= static_cast<int32_t>(lora_names_.size()))
        return make_error(E_ARG, "{}: LoRA adapter {} is not loaded ({} {})", where, lora, lora_names_.size(),
                          lora_names_.size() == 1 ? "is" : "are");
    return status::ok();
}

status model_session::steps_check(std::span<const seq_step> steps) const {
    const int64_t        n_slots = n_seq();
    std::vector<int64_t> entry_of(static_cast<size_t>(n_slots), -1);  // the entry that lists each slot
    for (size_t i = 0; i < steps.size(); ++i) {
        const seq_step& s = steps[i];
        if (n_slots == 0)
            return make_error(E_ARG, "step: slot {}: no slots are reserved (model_session::reserve first)", s.seq);
        if (s.seq < 0 || s.seq >= n_slots)
            return make_error(E_ARG, "step: slot {} is not one of the {} reserved (0 .. {})", s.seq, n_slots,
                              n_slots - 1);
        int64_t& first = entry_of[static_cast<size_t>(s.seq)];
        if (first >= 0)
            return make_error(E_ARG, "step: slot {} is listed twice (entries {} and {}); a step runs each at most once",
                              s.seq, first, i);
        first = static_cast<int64_t>(i);
        if (s.n_tokens < 1 || !s.ids)
            return make_error(E_ARG, "step: slot {} has {} new tokens{}, expected at least 1", s.seq, s.n_tokens,
                              s.ids ? "" : " and no ids");
        const int64_t pos = seq_pos(s.seq);
        if (s.n_tokens > n_ctx() - pos)
            return make_error(E_ARG, "step: slot {}: {} tokens after its {} cached positions exceed the {} reserved",
                              s.seq, s.n_tokens, pos, n_ctx());
        GPTQ_TRY(ids_check(s.ids, s.n_tokens, fmt::format("step: slot {}", s.seq)));
        GPTQ_TRY(lora_check(s.lora, fmt::format("step: slot {}", s.seq)));
    }
    return status::ok();
}

status model_session_check(const model_session_options& o) {
    GPTQ_TRY(device_check(o.device));
    if (!o.device.cuda && (!o.device_map.empty() || !o.max_memory.empty()))
        return make_error(E_ARG,
                          "--device-map and --max-memory place the model's modules for the GPU runtime; they need "
                          "--device cuda or cuda:N (got --device {})",
                          device_name(o.device));
    if (o.n_threads < 0) return make_error(E_ARG, "--threads is {}, expected >= 0", o.n_threads);
    return status::ok();
}

result<std::unique_ptr<model_session>> model_session_open(const model_session_options& options) {
    GPTQ_TRY(model_session_check(options));
    return options.device.cuda ? model_session_open_cuda(options) : model_session_open_cpu(options);
}

}  // namespace gptq
