// gptq quantize: a Hugging Face checkpoint in, a GPTQ checkpoint out (AutoGPTQ / GPTQModel /
// transformers / vLLM / ExLlama compatible; format.md section 1), layer by layer.
//
// Flow (docs/quantize.md): calibration text -> tokens -> random windows -> embeddings; then for
// each decoder layer: load its weights only, capture the inputs of each linear group in
// true-sequential order (q,k,v -> o -> gate,up -> down), GPTQ each linear against its Hessian,
// run the layer with the quantized weights to make the next layer's inputs, write the layer's
// tensors to the work folder, free it. The output appears under its final name only when complete;
// an interrupted run continues with `resume`.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct quantize_params {
    std::string model_path;   // HF model folder
    std::string output_path;  // folder to create; must not exist (unless resuming into its work folder)

    // GPTQ settings (AutoGPTQ names and defaults, except group size: 128 is what is published).
    int         bits            = 4;      // 2, 3, 4, 8
    int         group_size      = 128;    // -1 = one group per output row
    bool        desc_act        = false;  // act-order
    bool        gar             = false;  // act-order inside groups, contiguous g_idx (quant/gptq.h)
    bool        sym             = true;
    bool        static_groups   = false;
    bool        true_sequential = true;
    double      damp_percent    = 0.01;
    bool        mse             = false;   // clipping-range grid search
    bool        mse_hessian     = false;   // clipping range by diag(H)-weighted error (CPU solve only)
    std::string method          = "gptq";  // "gptq" or "rtn" (round to nearest, no calibration)
    std::string format          = "";      // "gptq" (v1) or "gptq_v2"; "" = gptq (asym: zeros kept >= 1)
    // GPTAQ (GPTQModel's "GPTQv2" algorithm, asymmetric calibration; docs/quantize.md "GPTAQ"):
    // each linear's solve also fits the full-precision model's output, from a second stream of
    // calibration hidden states (the unquantized model's) carried beside the quantized one: twice
    // the calibration activations' memory. CPU only (--device cpu), dense models only.
    bool   gptaq       = false;
    double gptaq_alpha = 0.25;  // the cross term's weight in [0, 1] (GPTQModel's default 0.25)
    // Quantize lm_head too (GPTQ with the Hessian of the final norm's output; GPTQModel's "lm_head":
    // true). A tied lm_head gets its own quantized copy: the embedding table stays as it was and
    // config.json says tie_word_embeddings false.
    bool quantize_lm_head = false;
    // Quantize the input embedding table (docs/quantize.md, "Quantized embeddings"): written as
    // GPTQModel's quantized model.embed_tokens (the GPTQ linear of E^T: groups of consecutive token
    // ids per hidden column), round to nearest with a clipping search per group (embed_clip), and a
    // `dynamic` rule on model.embed_tokens when its bits / group size differ from the base. A tied
    // lm_head computes with the dequantized table (as GPTQModel does), unless quantize_lm_head
    // gives it a GPTQ copy of its own. The calibration windows are embedded with the quantized table.
    bool quantize_embeddings = false;
    int  embed_bits          = 8;  // 2, 3, 4 or 8
    int  embed_group_size    = 0;  // 0: group_size; else -1 or one of 16, 32, ..., 1024 (GPTQModel's)
    // The clipping range of each group: "none" (the full range, plain RTN), "uniform" (the range
    // minimising the group's squared error), "frequency" (the same error weighted by how often each
    // token occurs in the calibration text, plus one: the diagonal Hessian of a one-hot input).
    // "" (default): frequency, or uniform with --method rtn (no calibration text).
    std::string embed_clip = "";
    // Mixed precision (docs/quantize.md, "Mixed precision"): > 0 chooses bits (2, 3, 4, 8) and group
    // size per module so that the quantized linears take at most this many bits per weight
    // (qweight, qzeros, scales and g_idx counted as written) with the least summed error, and
    // writes the choice as GPTQModel `dynamic` rules over the base --bits / --group-size.
    double target_bpw = 0.0;
    // Group sizes the plan may choose besides --group-size (each must divide a module's inputs to be
    // a choice for it; -1 allowed).
    std::vector<int> bpw_group_sizes;
    // What the plan minimises (docs/quantize.md, "Mixed precision"): "output", the KL divergence of
    // the model's next-token distribution on bpw_windows calibration windows when the unit alone is
    // quantized (GPTQ on its unquantized inputs' Hessian), summed over the units; or "hessian", each
    // module's Hessian-weighted GPTQ error on its own layer.
    std::string bpw_sensitivity = "output";
    int64_t     bpw_windows     = 8;  // the first this many calibration windows (all when fewer)
    // The candidates' errors of an earlier run's plan (its plan.json, or a --report JSON) instead of
    // measuring them: other targets planned from one measurement ("": measure).
    std::string bpw_measured;

    // Calibration.
    std::string calib = "default";  // "default" (bundled calibration text), "wikitext2", or a path
                                    // (.jsonl with a "text" field per line, else plain text)
    int64_t  nsamples = 128;
    int64_t  seqlen   = 2048;
    uint64_t seed     = 0;
    // "random": nsamples windows at seeded random offsets across the whole text (the reference);
    // "contiguous": consecutive windows from the start of the text.
    std::string calib_sampling = "random";

    uint64_t    max_shard_bytes = 4ull << 30;  // split the weights into shards beyond this
    bool        resume          = false;       // continue an interrupted run from its last finished layer
    std::string report_path;                   // write a JSON report here ("" = none)
    int         n_threads         = 0;         // 0 = all cores
    int64_t     stop_after_layers = -1;        // testing: stop (as if killed) after this many layers
    // Mixture of experts (docs/quantize.md "Mixture of experts"): an expert whose routed calibration
    // tokens are fewer than moe_min_tokens (-1: 2 * hidden_size / 16, the expert's in_features / 8)
    // gets, by moe_coverage: "route-all" (its Hessians from every calibration token, for Hessian
    // collection only: the layer's output keeps the real routing), "rtn" (round to nearest, with a
    // warning) or "fail" (an error naming the experts).
    std::string moe_coverage   = "route-all";
    int64_t     moe_min_tokens = -1;

    // Where each linear's GPTQ solve (Cholesky of H^-1, column loop) runs: "cpu", or "cuda[:N]",
    // EXPERIMENTAL (docs/cuda.md, "GPTQ on the GPU"); the calibration passes stay on the CPU.
    std::string device = "cpu";
};

struct quantize_linear_report {
    std::string name;  // "model.layers.3.mlp.down_proj"
    int64_t     n_out = 0, n_in = 0;
    int         bits = 0, group_size = 0;  // the module's settings (differ per module with --target-bpw)
    double      error_gptq   = 0.0;        // Hessian-weighted error of the method used (tr(D H D^T))
    double      error_rtn    = 0.0;        // the same for round-to-nearest on this layer's weights
    double      damp_percent = 0.0;
    double      seconds      = 0.0;
    // MoE experts: the calibration tokens routed to the expert (-1: not an expert's linear, all
    // tokens) and how its Hessian was made: "routed", "route-all", "rtn" (none), "" for others.
    int64_t     tokens = -1;
    std::string coverage;
};

struct quantize_report {
    std::string                         output_path;
    std::string                         method;
    int                                 bits = 0, group_size = 0;
    bool                                desc_act = false, sym = true;
    std::string                         format;
    int64_t                             n_calib_tokens  = 0;
    int64_t                             n_layers        = 0;
    double                              seconds         = 0.0;
    uint64_t                            bytes_in        = 0;  // original safetensors
    uint64_t                            bytes_out       = 0;  // written safetensors
    uint64_t                            peak_plan_bytes = 0;  // the memory plan's estimate
    std::vector<quantize_linear_report> linears;
    // --target-bpw: the plan as JSON (target, budget, bytes, per module its choice and the measured
    // error of every candidate); null otherwise.
    std::string bit_plan_json;
    // --quantize-embeddings: the table as written. error / error_rtn: sum over the table of the
    // squared error of the written codes / of plain RTN (full range), each token's row weighted by
    // its count in the calibration text plus one (without calibration, --method rtn: by one).
    struct embeddings_report {
        bool        quantized = false;
        int         bits = 0, group_size = 0;
        std::string clip;
        int64_t     n_vocab = 0, n_embd = 0;
        uint64_t    bytes = 0, bytes_f16 = 0;  // GPTQ tensors as written; the table in F16
        double      error = 0.0, error_rtn = 0.0, seconds = 0.0;
    } embeddings;
    // Wall time of this run by phase, summed over the layers: where the time goes (not kept across
    // --resume). Before the layers: open (model, checks), tokenize, embed, runner (the calibration
    // runner opened: inputs to the device); per layer: check, load, calibration, hessian, rtn,
    // solve, error, write, update, forward, state; after: assemble (globals, shards, configs). With
    // the reader / writer threads (docs/quantize.md, "Issue 18"), load and write count only the
    // time the layer loop waited for them. The phases add up to the run's time, less process
    // start-up and small steps between them.
    std::vector<std::pair<std::string, double>> phase_seconds;
    // Parts of phases and work beside them (not to be added to the phases): read_thread /
    // write_thread (the overlap threads' own time), solve.prepare / .cholesky / .loop / .download
    // (the GPU solve's steps, wall), calibration.hessian_gpu (GPU time of the Hessian
    // accumulation inside the calibration passes, timing events).
    std::vector<std::pair<std::string, double>> detail_seconds;
    // The GPU runner's peak of device memory in use (cudaMemGetInfo sampled at each phase end: the
    // whole device, CUDA context included); 0 on the CPU.
    uint64_t device_used_peak_bytes = 0;
};

result<quantize_report> quantize_model(const quantize_params& params);

std::string quantize_report_json(const quantize_report& r);

// `gptq report` (engine/report_plot.cpp): a --report file read back.
struct quantize_report_view {
    std::string                         method;
    int                                 bits = 0, group_size = 0;  // the base settings
    int64_t                             n_layers = 0;
    std::vector<quantize_linear_report> linears;  // name, shape, bits, group size, errors
};
struct quantize_layer_errors {
    int64_t                             layer = 0;                          // n_layers for lm_head
    std::string                         label;                              // "3", "lm_head"
    double                              error_gptq = 0.0, error_rtn = 0.0;  // sums over its linears
    std::vector<quantize_linear_report> modules;
};
// Errors: not JSON, no "linears" array, an entry without name / error_gptq / error_rtn, or errors
// that are not finite and >= 0 (named with `where` and the entry).
result<quantize_report_view>       quantize_report_read(const std::string& json_text, const std::string& where);
std::vector<quantize_layer_errors> quantize_report_layers(const quantize_report_view& v);
// An SVG: per layer the error GPTQ left against RTN's (log scale, the ratio above each pair), and
// below it each module's bits (2, 3, 4, 8 coloured).
std::string quantize_report_svg(const quantize_report_view& v, const std::string& title);
std::string quantize_report_summary(const quantize_report& r);  // the closing lines the CLI prints

// `gptq report POINTS.json --plot out.svg` (engine/report_plot.cpp): a scatter of labelled points
// in series, each series joined in x order, e.g. ppl against file size (docs/results.md). The file:
// {"title": "...", "x_label": "...", "y_label": "...", "y_log": false, "points": [{"series": "ours",
// "label": "W4 g128", "x": 17.5, "y": 116.3}, ...]}.
struct plot_point {
    std::string series, label;
    double      x = 0.0, y = 0.0;
};
struct scatter_view {
    std::string             title, x_label, y_label;
    bool                    x_log = false, y_log = false;
    std::vector<plot_point> points;
};
// True when the JSON text is an object with a "points" array (a points file, not a --report).
bool is_points_file(const std::string& json_text);
// Errors: not JSON, no "points" array or an empty one, a point without series / x / y, a non-finite
// coordinate, or one <= 0 on a log axis (named with `where` and the point's index).
result<scatter_view> scatter_read(const std::string& json_text, const std::string& where);
std::string          scatter_svg(const scatter_view& v);

}  // namespace gptq
