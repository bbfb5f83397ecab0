"""Plotting and widget helpers shared by the course notebooks: `from deepseek_edu import viz`.

Every helper draws with matplotlib and returns the `Figure`, already closed in pyplot, so a cell
that ends with the figure shows it exactly once as a static PNG -- what GitHub and nbviewer render
from the committed notebook. Figures are small on purpose (`FIG_DPI`, a few inches wide): a
notebook must stay under 1 MB with its outputs.

**Alternative text.** `show(fig, alt=...)` displays a figure as a PNG together with an HTML
`<img alt=...>` of the same PNG, so a screen reader, nbconvert's HTML and a static reader get a
description of every figure (a bare matplotlib figure has none). Cells that show a figure end with
`viz.show(fig, alt="what the figure shows")`.

**Static figure first, one figure only.** An interactive explorer is only alive in a running
kernel; a reader on GitHub sees its saved output. So every explorer first draws its figure at the
default settings as an ordinary output (with its alternative text), then shows the controls
(`explorer`). Moving a control *replaces that same output* (an IPython display id), so the page
never shows a stale static figure beside a live one, and the widget state stores no copy of it.

Submodules (every public name is re-exported here, so notebooks write `viz.plot_rope`):
    core         show, figure_bundle, png_bytes, new_figure, explorer, text_explorer, show_plotly,
                 png_bundle / figure_png; the course's DPI and colours
    plots        generic plots: loss curves, bars, histogram, heatmap, attention, tokens, and the
                 token rows, the paradigm map of notebook 00
    data         chapter 01: tokenizer compression, token lengths
    transformer  chapter 02: RoPE, causal masks
    mla          chapter 03: the MLA diagram, KV-cache sizes, the committed decode benchmark (figure, report)
    moe          chapter 04: the MoE diagram, group routing, expert loads, balance runs, layer stages;
                 the committed balance and layer benchmarks as printed tables
    mtp          chapter 05: the MTP diagram and targets, runs with and without MTP, speculative decoding
    pretraining  chapters 06-07: parameters by part and against E; pre-training losses with expert
                 loads, bits per character of runs, the committed MoE vs dense throughput
    fp8          chapter 08: E4M3, granularity, accumulation, FP8 training, paper vs ours
    kernels      chapter 09: the H200 roofline, quantisation layouts
    grpo         chapter 10: the GRPO loop, a run, the variants, one response's reward
    systems      chapter 11: pipeline timelines, tokens per GPU
"""

from __future__ import annotations

from .core import (
    FIG_DPI,
    TOKEN_COLORS,
    committed_results,
    explorer,
    figure_bundle,
    figure_png,
    new_figure,
    png_bundle,
    png_bytes,
    show,
    show_plotly,
    text_explorer,
)
from .data import plot_compression, plot_token_lengths
from .fp8 import (
    fp8_gradient_error_summary,
    fp8_paper_vs_ours,
    fp8_training_arms,
    fp8_training_curves,
    fp8_training_summary,
    plot_accumulation,
    plot_e4m3_number_line,
    plot_fp8_gradient_error,
    plot_fp8_linear_diagram,
    plot_fp8_training,
    plot_granularity_errors,
)
from .grpo import (
    GRPO_VARIANT_COLORS,
    grpo_loop_entries,
    grpo_variant_rows,
    plot_grpo_loop,
    plot_grpo_run,
    plot_grpo_variants,
    plot_reward_breakdown,
)
from .kernels import H200_DATASHEET, h200_ceilings, plot_quant_layouts, plot_roofline
from .mla import (
    DECODE_KIND_STYLE,
    KV_KIND_COLORS,
    DecodeSpeedSummary,
    decode_speed_summary,
    decode_tokens_per_s,
    kv_cache_curves,
    kv_cache_plotly,
    machine_note,
    mla_decode_summary,
    plot_cache_bytes,
    plot_decode_speed,
    plot_kv_cache_vs_context,
    plot_kv_calculator,
    plot_mla_diagram,
)
from .moe import (
    GROUP_COLORS,
    MOE_STAGES,
    moe_balance_table,
    moe_balance_verdict,
    moe_layer_summary,
    plot_balance_runs,
    plot_committed_balance,
    plot_group_routing,
    plot_moe_diagram,
    plot_moe_stages,
    plot_routing,
    routing_plotly,
    trailing_mean,
)
from .mtp import (
    V3_ACCEPTANCE,
    V3_SPEEDUP,
    plot_mtp_arms,
    plot_mtp_diagram,
    plot_mtp_targets,
    plot_speculative_bench,
    speculative_steps,
    speculative_summary,
)
from .plots import (
    _MAP_BOX_H,
    _MAP_BOX_W,
    TOKEN_FONT,
    _box_edge,
    _printable,
    paradigm_map_entries,
    plot_attention,
    plot_bars,
    plot_heatmap,
    plot_histogram,
    plot_loss_curves,
    plot_paradigm_map,
    plot_token_rows,
    plot_tokens,
)
from .pretraining import (
    PART_COLORS,
    plot_expert_scaling,
    plot_parameter_parts,
    plot_pretraining,
    plot_runs_bits_per_char,
    train_throughput_summary,
)
from .systems import PIPELINE_COLORS, plot_gpu_loads, plot_pipeline_timeline
from .transformer import plot_causal_masks, plot_rope

# The private names are re-exported for the tests that check them (`test_viz.py`).
__all__ = [
    "FIG_DPI", "TOKEN_COLORS", "committed_results", "explorer", "figure_bundle", "figure_png", "new_figure", "png_bundle",
    "png_bytes", "show", "show_plotly", "text_explorer", "plot_compression", "plot_token_lengths",
    "fp8_gradient_error_summary", "fp8_paper_vs_ours", "fp8_training_arms", "fp8_training_curves", "fp8_training_summary", "plot_accumulation", "plot_e4m3_number_line", "plot_fp8_linear_diagram",
    "plot_fp8_gradient_error", "plot_fp8_training", "plot_granularity_errors", "GRPO_VARIANT_COLORS", "grpo_loop_entries",
    "grpo_variant_rows", "plot_grpo_loop", "plot_grpo_run", "plot_grpo_variants", "plot_reward_breakdown",
    "H200_DATASHEET", "h200_ceilings", "plot_quant_layouts", "plot_roofline", "DECODE_KIND_STYLE",
    "KV_KIND_COLORS", "DecodeSpeedSummary", "decode_speed_summary", "decode_tokens_per_s", "kv_cache_curves",
    "kv_cache_plotly", "machine_note", "mla_decode_summary", "plot_cache_bytes", "plot_decode_speed",
    "plot_kv_cache_vs_context", "plot_kv_calculator", "plot_mla_diagram", "GROUP_COLORS", "MOE_STAGES",
    "moe_balance_table", "moe_balance_verdict", "moe_layer_summary", "plot_balance_runs",
    "plot_committed_balance", "plot_group_routing", "plot_moe_diagram", "plot_moe_stages", "plot_routing",
    "routing_plotly", "trailing_mean", "V3_ACCEPTANCE", "V3_SPEEDUP", "plot_mtp_arms", "plot_mtp_diagram",
    "plot_mtp_targets", "plot_speculative_bench", "speculative_steps", "speculative_summary", "_MAP_BOX_H",
    "_MAP_BOX_W", "TOKEN_FONT", "_box_edge", "_printable", "paradigm_map_entries", "plot_attention",
    "plot_bars", "plot_heatmap", "plot_histogram", "plot_loss_curves", "plot_paradigm_map", "plot_token_rows",
    "plot_tokens", "plot_pretraining", "plot_runs_bits_per_char", "PART_COLORS", "plot_parameter_parts",
    "plot_expert_scaling", "train_throughput_summary", "PIPELINE_COLORS", "plot_gpu_loads",
    "plot_pipeline_timeline", "plot_causal_masks", "plot_rope",
]
