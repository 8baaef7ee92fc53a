// A one-line progress bar on stderr: label, bar, count, rate and ETA.
//
// It draws only when stderr is a terminal and progress is not globally silenced (--quiet),
// and redraws at most every 100 ms, so calling update() in a tight loop is cheap.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace gptq {

void progress_set_quiet(bool quiet);  // process-wide; --quiet sets it
bool progress_is_quiet();

class progress_bar {
public:
    // `total` units of work, `unit` names them in the rate ("tok", "layer").
    progress_bar(std::string label, int64_t total, std::string unit = "it");
    ~progress_bar();
    progress_bar(const progress_bar&)            = delete;
    progress_bar& operator=(const progress_bar&) = delete;

    void update(int64_t done_delta = 1);                          // add done work and maybe redraw
    void set(int64_t done);                                       // absolute position
    void finish();                                                // final redraw and newline (idempotent)
    void set_note(std::string note) { note_ = std::move(note); }  // shown after the ETA ("loss 2.31")

    bool enabled() const { return enabled_; }
    // The line as it would be drawn now; exposed for tests.
    std::string render(double elapsed_s) const;

private:
    void draw(bool force);

    std::string                           label_;
    std::string                           unit_;
    std::string                           note_;
    int64_t                               total_;
    int64_t                               done_ = 0;
    bool                                  enabled_;
    bool                                  finished_ = false;
    std::chrono::steady_clock::time_point start_;
    std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace gptq
