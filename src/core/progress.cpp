#include "core/progress.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>

#include <fmt/format.h>

namespace gptq {

namespace {
std::atomic<bool> g_quiet{false};

std::string format_duration(double s) {
    if (!std::isfinite(s) || s < 0) return "--:--";
    const auto t = static_cast<int64_t>(s + 0.5);
    if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60);
    return fmt::format("{:02}:{:02}", t / 60, t % 60);
}
}  // namespace

void progress_set_quiet(bool quiet) {
    g_quiet.store(quiet);
}
bool progress_is_quiet() {
    return g_quiet.load();
}

progress_bar::progress_bar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total < 0 ? 0 : total),
      enabled_(!progress_is_quiet() && isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

progress_bar::~progress_bar() {
    finish();
}

void progress_bar::update(int64_t done_delta) {
    set(done_ + done_delta);
}

void progress_bar::set(int64_t done) {
    done_ = done < 0 ? 0 : (done > total_ ? total_ : done);
    draw(false);
}

void progress_bar::finish() {
    if (finished_) return;
    finished_ = true;
    if (!enabled_) return;
    draw(true);
    std::fputc('\n', stderr);
    std::fflush(stderr);
}

std::string progress_bar::render(double elapsed_s) const {
    constexpr int width = 30;
    const double  frac  = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
    const int     fill  = static_cast<int>(frac * width);
    std::string   bar(static_cast<size_t>(fill), '#');
    bar.resize(width, '.');
    const double rate = elapsed_s > 0 ? static_cast<double>(done_) / elapsed_s : 0.0;
    const double eta  = rate > 0 ? static_cast<double>(total_ - done_) / rate : NAN;
    return fmt::format("{} [{}] {}/{} {:.1f} {}/s elapsed {} eta {}{}{}", label_, bar, done_, total_, rate, unit_,
                       format_duration(elapsed_s), format_duration(eta), note_.empty() ? "" : " ", note_);
}

void progress_bar::draw(bool force) {
    if (!enabled_ || (finished_ && !force)) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && now - last_draw_ < std::chrono::milliseconds(100) && done_ != total_) return;
    last_draw_             = now;
    const double elapsed_s = std::chrono::duration<double>(now - start_).count();
    std::fprintf(stderr, "\r%s\x1b[K", render(elapsed_s).c_str());
    std::fflush(stderr);
}

}  // namespace gptq
