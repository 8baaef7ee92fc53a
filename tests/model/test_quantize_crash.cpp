// Crash safety of gptq quantize (docs/reliability.md): the CLI is SIGKILLed at >= 20 moments spread
// over a run (times taken from an uninterrupted run, from startup to the final rename), then
// rerun with --resume until it completes (some resumes are killed too). Each finished checkpoint
// must be byte-identical to the uninterrupted one, the output folder must never exist beside the
// work folder (it appears only by the final rename), and the work folder left by a kill must never
// load as a model.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <thread>

#include "io/hf_config.h"
#include "io/tensor_source.h"
#include "test_util.h"

extern char** environ;

using namespace gptq;
namespace fs     = std::filesystem;
using clock_type = std::chrono::steady_clock;

namespace {

// Start `gptq quantize` (stdout/stderr to `log`); returns the pid.
pid_t spawn_quantize(const std::string& out, bool resume, const std::string& log) {
    std::vector<std::string> args = {test::gptq_binary(),
                                     "-q",
                                     "quantize",
                                     test::source_path("models/tiny-llama"),
                                     "-o",
                                     out,
                                     "--nsamples",
                                     "4",
                                     "--seqlen",
                                     "64",
                                     "--threads",
                                     "2"};
    if (resume) args.push_back("--resume");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    return pid;
}

// Wait for the child; kill it first after `kill_after` seconds if still running (< 0: never).
// Returns {exit status, whether it was killed}.
// With `watch`, the seconds until that path first existed go to *watch_seen (-1 if never).
std::pair<int, bool> run_child(pid_t pid, double kill_after, const std::string& watch = "",
                               double* watch_seen = nullptr) {
    const auto t0 = clock_type::now();
    if (watch_seen) *watch_seen = -1;
    for (;;) {
        if (watch_seen && *watch_seen < 0 && fs::exists(watch))
            *watch_seen = std::chrono::duration<double>(clock_type::now() - t0).count();
        int         st = 0;
        const pid_t r  = waitpid(pid, &st, WNOHANG);
        if (r == pid) return {WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), false};
        if (kill_after >= 0 && std::chrono::duration<double>(clock_type::now() - t0).count() >= kill_after) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            // It may have exited on its own between the two calls.
            if (WIFEXITED(st)) return {WEXITSTATUS(st), false};
            return {128 + WTERMSIG(st), true};
        }
        std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
}

std::map<std::string, std::string> folder_bytes(const std::string& dir) {
    std::map<std::string, std::string> m;
    for (const auto& e : fs::directory_iterator(dir))
        m[e.path().filename().string()] = test::read_file(e.path().string());
    return m;
}

}  // namespace

TEST(quantize_crash, sigkill_at_20_points_then_resume_is_byte_identical) {
#ifdef GPTQ_SANITIZE
    GTEST_SKIP() << "about 25 full quantize runs: too slow under ASan; the release build runs it";
#endif
    test::temp_dir    dir("q-crash");
    const std::string log = dir.file("log.txt");

    // The uninterrupted reference, timed: whole run, and when the work folder appeared (startup
    // and calibration come before it).
    const auto t0     = clock_type::now();
    double     t_work = -1;
    const auto [ref_rc, ref_kill] =
        run_child(spawn_quantize(dir.file("ref"), false, log), -1, dir.file("ref.partial"), &t_work);
    const double t_run = std::chrono::duration<double>(clock_type::now() - t0).count();
    ASSERT_EQ(ref_rc, 0) << test::read_file(log);
    ASSERT_GT(t_work, 0.0);
    const auto ref = folder_bytes(dir.file("ref"));
    ASSERT_TRUE(ref.count("model.safetensors") && ref.count("config.json") && ref.count("quantize_config.json"));

    // Kill points: 4 in the startup, 20 spread over the layers and the finish, 2 at the very end
    // (these may land after completion: then the run simply must have succeeded).
    std::vector<double> points;
    for (int j = 0; j < 4; ++j) points.push_back(t_work * (0.1 + 0.25 * j));
    for (int j = 0; j < 20; ++j) points.push_back(t_work + (t_run - t_work) * (j + 0.5) / 20.0);
    points.push_back(t_run * 0.985);
    points.push_back(t_run * 0.995);
    const int                  k_points = static_cast<int>(points.size());
    std::map<std::string, int> phases;
    int                        n_killed = 0, n_resumes = 0;
    // Runs on a loaded machine vary in length: kill points that land after a run finished are
    // replaced by extra points inside the shortest run seen, until 20 kills have landed.
    double t_fastest = t_run;
    auto   try_point = [&](int k, double at) {
        SCOPED_TRACE(testing::Message() << "kill point " << k << " at " << at << " s");
        const std::string out     = dir.file("out" + std::to_string(k));
        const auto        t_start = clock_type::now();
        const auto [rc, killed]   = run_child(spawn_quantize(out, false, log), at);
        if (!killed)
            t_fastest = std::min(t_fastest, std::chrono::duration<double>(clock_type::now() - t_start).count());
        if (killed) {
            ++n_killed;
            // Killed after the rename (while exiting): OUT is then complete, checked below.
            EXPECT_FALSE(fs::exists(out) && fs::exists(out + ".partial"));
            // Where the kill landed, for the summary printed at the end.
            const std::string marker = out + "/" + k_work_folder_marker;
            std::string       phase  = fs::exists(marker) ? "renamed, marker left"
                                         : fs::exists(out)  ? "after the rename"
                                                            : "before the work folder";
            if (fs::exists(marker)) {  // complete but marked: loaders refuse it, --resume finishes it
                EXPECT_FALSE(tensor_source::open(out).is_ok());
                EXPECT_FALSE(model_config_load(out).is_ok());
            }
            if (fs::exists(out + ".partial")) {
                int n_layers = 0;
                for (const auto& e : fs::directory_iterator(out + ".partial"))
                    n_layers += e.path().filename().string().rfind("layer-", 0) == 0;
                phase = fs::exists(out + ".partial/config.json")           ? "finish: configs written"
                          : fs::exists(out + ".partial/globals.safetensors") ? "finish: assembling"
                                                                             : std::to_string(n_layers) + " layer files";
            }
            ++phases[phase];
            if (fs::exists(out + ".partial")) {
                EXPECT_FALSE(tensor_source::open(out + ".partial").is_ok());
                EXPECT_FALSE(model_config_load(out + ".partial").is_ok());
                if (k % 4 == 0) {
                    auto insp = test::run_command(test::gptq_binary() + " inspect " + out + ".partial");
                    EXPECT_NE(insp.exit_code, 0) << insp.out;
                }
            }
            // Resume until complete; every third point also kills its first resume half way.
            for (int attempt = 0; !fs::exists(out) || fs::exists(out + "/" + k_work_folder_marker); ++attempt) {
                ASSERT_LT(attempt, 4) << test::read_file(log);
                const double kill_resume  = (k % 3 == 0 && attempt == 0) ? t_run * 0.5 : -1.0;
                const auto [rrc, rkilled] = run_child(spawn_quantize(out, true, log), kill_resume);
                ++n_resumes;
                if (!rkilled) {
                    ASSERT_EQ(rrc, 0) << test::read_file(log);
                } else {
                    EXPECT_FALSE(fs::exists(out) && fs::exists(out + ".partial"));
                }
            }
        } else {
            ASSERT_EQ(rc, 0) << test::read_file(log);
        }
        EXPECT_FALSE(fs::exists(out + ".partial"));
        const auto got = folder_bytes(out);
        ASSERT_EQ(got.size(), ref.size());
        for (const auto& [name, bytes] : ref)
            EXPECT_TRUE(got.count(name) && got.at(name) == bytes) << name << " differs";
        fs::remove_all(out);
    };
    for (int k = 0; k < k_points && !HasFatalFailure(); ++k) try_point(k, points[static_cast<size_t>(k)]);
    for (int e = 0; n_killed < 20 && e < 40 && !HasFatalFailure(); ++e)
        try_point(k_points + e, t_fastest * (0.05 + 0.9 * static_cast<double>((e * 7) % 20) / 20.0));
    std::printf("uninterrupted run %.2f s (work folder at %.2f s); %d kills, %d resumes; kills by phase:", t_run,
                t_work, n_killed, n_resumes);
    for (const auto& [phase, n] : phases) std::printf(" [%s] %d", phase.c_str(), n);
    std::printf("\n");
    EXPECT_GE(n_killed, 20) << "too few kills landed inside a run (uninterrupted run took " << t_run << " s)";
    RecordProperty("kills", n_killed);
    RecordProperty("resumes", n_resumes);
    RecordProperty("run_seconds", std::to_string(t_run));
}
