"""The ``moepress`` command. Thin: each subcommand parses flags and calls one public function."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
moepress compresses Mixture-of-Experts language models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2/V3, GraniteMoE, PhiMoE) with GPTQ into really packed low-bit weights, and measures
what that costs in quality and bytes.

  moepress compress --model PATH_OR_HUB_ID --bits 3 --group-size 128 --calib FILE.txt --out OUT_DIR
  moepress plan --model PATH_OR_HUB_ID --budget 2.5bits --strategy ilp -o plan.yaml --plot plan.png
  moepress compress --model PATH_OR_HUB_ID --plan plan.yaml --out OUT_DIR    # mixed precision, per unit
  moepress eval --model OUT_DIR --reference PATH_OR_HUB_ID --text FILE.txt
  moepress compress --model PATH --target llamacpp --bits 4 --out OUT_DIR     # llama.cpp's q4_1, with GPTQ
  moepress export --model OUT_DIR --format gguf --out model.gguf               # then llama-cli -m model.gguf
  moepress compress --model PATH --target vllm --bits 4 --out OUT_DIR         # vLLM's W4A16 (symmetric, g128)
  moepress export --model OUT_DIR --format compressed-tensors --out OUT_CT     # then vllm serve OUT_CT
  moepress tiny --arch mixtral --out tiny-mixtral      # a tiny random model to try it offline
"""


def _group_size(value: str):
    if value.lower() in ("0", "-1", "none", "channel", "per-channel"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be 32, 64, 128 or 0 for per-channel (got {value!r})")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own Python code to run (off by default: it executes code from the model folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_allocation(p: argparse.ArgumentParser) -> None:
    """The allocation flags shared by ``plan`` and ``compress --budget``."""
    p.add_argument("--project", action="store_true",
                   help="with --target: turn a plan the engine cannot express (per-expert widths, moepress's grids) "
                        "into the nearest one it can: each group of units the engine stores as one tensor gets its "
                        "type whose bytes are closest to the group's planned bytes without exceeding them; the "
                        "changes are listed (without it such a plan is refused, naming the unit and the rule)")
    p.add_argument("--scope", choices=("experts", "all"), default="experts",
                    help="what the budget covers: routed experts (others at --others; default) or all linear weights")
    p.add_argument("--strategy", choices=("uniform", "greedy", "heuristic", "ilp", "evolution"), default="ilp")
    p.add_argument("--estimator", choices=("auto", "gptq", "gptq_routed", "hawq", "kl_scaled"), default="auto",
                    help="damage estimate: GPTQ loss (001), x routing mass (003), Hessian trace x perturbation "
                         "(HAWQ), or gptq_routed rescaled per layer and kind by the output KL it adds, measured "
                         "on top of a 4-bit model (kl_scaled: three extra evaluations per layer and kind; keeps the "
                         "model in memory); auto (default): kl_scaled where the model fits in memory, else "
                         "gptq_routed, streamed (said when it falls back)")
    p.add_argument("--granularity", choices=("expert", "linear", "channel"), default="expert",
                    help="a unit is a whole expert (default), one linear (gate/up/down) of an expert, or a group of "
                         "--channel-group intermediate neurons of an expert (its rows of gate/up, columns of down)")
    p.add_argument("--channel-group", type=int, default=None,
                    help="channel granularity: neurons per group, a multiple of --group-size (default: the group "
                         "size; 32 with per-channel options)")
    p.add_argument("--options", default="2,3,4,8,16", help="bit widths units may take (16 = keep; default 2,3,4,8,16)")
    p.add_argument("--prune-options", default="", metavar="LABELS",
                    help="pruned options units may take too, comma-separated (e.g. 2:4+4b,50%%+4b,2:4; SparseGPT, "
                         "at --group-size unless a label says -gN)")
    p.add_argument("--others", default="4b", help="option of the units outside --scope experts (default 4b)")
    p.add_argument("--rules", default="attention,shared,first_k,frequency,outlier,block",
                    help="heuristic: which of Li et al.'s rules rank the units (comma-separated)")
    p.add_argument("--first-k", type=int, default=1, help="heuristic first_k rule: how many first MoE layers (default 1)")
    p.add_argument("--per-layer", action="store_true", help="ilp: split the budget over layers by parameters (MC-MoE)")
    p.add_argument("--population", type=int, default=16, help="evolution: plans per generation (default 16)")
    p.add_argument("--generations", type=int, default=10, help="evolution: generations (default 10)")
    p.add_argument("--fitness-samples", type=int, default=8,
                    help="evolution and kl_scaled: held-out calibration windows KL is measured on (default 8)")
    p.add_argument("--active", type=float, default=None, metavar="SHARE",
                    help="also budget the active parameters per token, as a share of the original's (0.8): plans "
                         "treatments and removals together (the joint ILP; damage in KL, measured in memory)")
    p.add_argument("--trim", default="experts,top_k,moe_layers,blocks", metavar="KINDS",
                    help="with --active: the removals the joint ILP may choose (comma-separated: experts, top_k, "
                         "moe_layers, blocks; default all)")
    p.add_argument("--rounds", type=int, default=2,
                    help="with --active: correction rounds, each re-measuring the plan's removals in the plan (default 2)")
    p.add_argument("--table", metavar="FILE.safetensors",
                    help="cost table cache: read it if it exists (same model), else build it and save it there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moepress", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moepress {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "compress",
        help="quantize an MoE model with GPTQ (or RTN) into packed low-bit weights",
        description="Calibrate layer by layer on --calib text and quantize every attention projection, routed expert, "
        "shared expert and dense MLP into packed --bits weights; the router, norms and embeddings stay in 16 bits. "
        "Writes a checkpoint that `moepress eval`, moepress.load() and AutoModelForCausalLM.from_pretrained load.",
    )
    c.add_argument("--model", required=True, help="local Hugging Face model folder or hub id (safetensors only)")
    c.add_argument("--out", required=True, help="output folder (written atomically; refused if it exists unless --overwrite)")
    c.add_argument("--bits", type=int, default=None,
                   help="2, 3, 4 or 8 (default 4; not with --budget or --plan); 16 keeps the weights (with --prune: "
                        "pruned only)")
    c.add_argument("--group-size", type=_group_size, default=128, help="32, 64, 128, or 0 for per-channel (default 128)")
    c.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="GPTQ (default) or round-to-nearest")
    c.add_argument("--symmetric", action="store_true", help="symmetric grid without stored zero points")
    c.add_argument("--act-order", nargs="?", const="dynamic", default="static", choices=("off", "static", "dynamic"),
                   help="GPTQ column order: by decreasing Hessian diagonal with each group's grid fixed up front "
                        "(static, the default: no extra bytes), with grids from the updated weights and an int16 "
                        "group index per input column (dynamic; --act-order alone), or in storage order (off)")
    c.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of the mean Hessian diagonal (default 0.01)")
    c.add_argument("--calib", default="builtin:calib",
                   help="calibration text: a .txt/.jsonl(.gz) file, builtin:calib (shipped English corpus) or hf:NAME[:CONFIG][:SPLIT]")
    c.add_argument("--calib-samples", type=int, default=128, help="number of calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows (default 0)")
    c.add_argument("--min-expert-tokens", type=int, default=16,
                   help="experts routed fewer calibration tokens than this are calibrated on all tokens (default 16)")
    c.add_argument("--rare-experts", choices=("all_tokens", "routed_only"), default="all_tokens",
                   help="statistics for rare experts: route all calibration tokens through them (default) or only their own")
    c.add_argument("--keep-attention", action="store_true", help="leave attention projections in 16 bits")
    c.add_argument("--prune", metavar="PATTERN",
                   help="also prune: a sparsity (50%%: that share of every output row's weights) or N:M (2:4, 4:8: N "
                        "kept of every M inputs), for the routed experts (--prune-scope all: every unit); pruned and "
                        "quantized at --bits in one pass (SparseGPT), or pruned only with --bits 16")
    c.add_argument("--pruner", choices=("sparsegpt", "wanda", "magnitude"), default="sparsegpt",
                   help="how --prune chooses the weights: SparseGPT (OBS with the calibration Hessian; the default), "
                        "Wanda (|W| x input norm, per row) or magnitude")
    c.add_argument("--prune-scope", choices=("experts", "all"), default="experts",
                   help="what --prune applies to: the routed experts (default) or every unit --bits applies to")
    c.add_argument("--drop-blocks", type=int, default=0, metavar="N",
                   help="remove the N decoder layers that change the hidden states least (He et al.'s Block Drop)")
    c.add_argument("--drop-moe-layers", type=int, default=0, metavar="N",
                   help="remove the N MoE sublayers that change the hidden states least, attention kept (Layer Drop)")
    c.add_argument("--dynamic-pruning", metavar="THRESHOLD[,KEEP]",
                   help="store online dynamic pruning in the checkpoint (MC-MoE's ODP; the loaders apply it): a "
                        "token's secondary experts below THRESHOLD x its top expert's weight are skipped, except "
                        "for the KEEP share of tokens judged important (default 0)")
    c.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="route each token of every MoE layer to K experts (fewer than the model's: fewer active "
                        "parameters per token)")
    c.add_argument("--drop-experts", metavar="AMOUNT",
                   help="remove the least important routed experts of every MoE layer: a share (25%%) or a count (2); "
                        "the router then chooses among the rest")
    c.add_argument("--drop-criterion", choices=("frequency", "mass", "router", "reap", "kl"), default="reap",
                   help="what --drop-experts ranks experts by (see the README): routing frequency, routing-weight "
                        "mass, He et al.'s router probability, REAP's router-weighted output norm (default), or the "
                        "KL divergence each drop adds, measured greedily on the whole model in memory (kl)")
    c.add_argument("--plan", metavar="PLAN.yaml",
                   help="mixed precision: every unit's option from a plan file (moepress plan); replaces --bits/--group-size, "
                   "and the plan's method/symmetric/act-order/damp apply")
    c.add_argument("--budget", metavar="BUDGET",
                   help="plan and compress in one command: allocate options per unit within BUDGET (2.5bits, 11GB; "
                        "as for `moepress plan`) with --strategy, then compress; plan.yaml and costs.safetensors are "
                        "saved in --out")
    _add_allocation(c)
    c.add_argument("--save-profile", metavar="FILE", help="also save the calibration Profile (safetensors) to FILE")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--restart", action="store_true",
                   help="discard the partial run a killed compress left beside --out instead of resuming it")
    c.add_argument("--expert-chunk", type=int, default=None, metavar="N",
                   help="hold the Hessians of N experts at a time (default: all experts of a layer); lower it when "
                        "one layer's Hessians do not fit (float32: E x (H^2 + I^2) x 4 bytes)")
    c.add_argument("--expert-hessian", choices=("plain", "g", "g2"), default="g2",
                   help="each routed token's weight in its expert's GPTQ Hessians: plain (1, as for a dense layer), "
                        "g (its routing weight, MoEQuant) or g2 (g squared: the expert's share of the layer's "
                        "output error; the default)")
    c.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=False,
                   help="choose each group's range among min/max shrunk by 1.0 down to 0.5, the one with the least "
                        "GPTQ loss on the group's columns (RTN: squared rounding error), instead of min/max; needs "
                        "--act-order off or dynamic; the stored format is the same (default off)")
    c.add_argument("--refine", type=int, default=None, metavar="STEPS",
                   help="after GPTQ, refine each layer on the layer's output for STEPS steps (see --refine-params; "
                        "same stored format), keeping GPTQ's result for a layer whose calibration output error does "
                        "not go down; 0: off; default 32 (0 with trims, where it does not apply yet); with --target "
                        "llamacpp the blocks' float16 scales are learned")
    c.add_argument("--refine-params", choices=("scales", "rounding"), default="scales",
                   help="what --refine learns: every group's scale with GPTQ's codes held (default; Adam) or, as "
                        "SignRound, every weight's rounding offset and the groups' scale/zero corrections")
    c.add_argument("--refine-from", choices=("gptq", "rtn"), default="gptq",
                   help="--refine-params rounding's start: GPTQ's codes (default) or nearest rounding on the weights' "
                        "min/max grid (auto-round's start; needs --act-order static or off)")
    c.add_argument("--activations", choices=("int8",), default=None,
                   help="also quantize activations: every quantized unit's input (attention, shared experts, dense "
                        "MLP, each routed expert's gate/up/down) rounded per token onto a symmetric int8 grid, "
                        "scale max|x|/127 (W8A8 with --bits 8, W4A8 with --bits 4); recorded in the checkpoint and "
                        "applied by moepress's runtime (fake-quantized: exact quality, no int8 speed-up). The router "
                        "and 16-bit units keep float inputs; with --plan/--budget the plan's costs stay weight-only")
    c.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations in memory-mapped files beside --out instead of in memory")
    c.add_argument("--target", choices=("llamacpp", "vllm"), default=None,
                   help="the engine that will serve the result: llamacpp quantizes every unit onto llama.cpp's own "
                        "block format (--bits 2: q2_K, 3: q3_K, 4: q4_K, or where a row is not a multiple of 256 "
                        "q4_0 for 2 and 3 bits, q4_1 for 4; 5: q5_K/q5_1; 6: q6_K/q8_0; 8: q8_0; 16: f16) with GPTQ and refuses what a GGUF cannot hold (pruning, "
                        "per-expert mixed types, unequal expert counts); then `moepress export --format gguf`. "
                        "vllm: symmetric 4- or 8-bit weights with --group-size (vLLM's W4A16/W8A16), one scheme per "
                        "layer's experts and per fused q/k/v or gate/up, refusing what vLLM cannot load; then "
                        "`moepress export --format compressed-tensors`")
    c.add_argument("--ggml-type", choices=("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q2_K_S", "q3_K_S", "q3_K_M",
                                           "q3_K_L", "q4_K_S", "q4_K_M", "q5_K_S", "q5_K_M", "q6_K", "q3_K", "q4_K",
                                           "q5_K"),
                   default=None, help="with --target llamacpp, instead of --bits' choice: llama-quantize's file type "
                                      "(q4_K_M, q3_K_M, q2_K, q6_K, q4_0, ...: every tensor gets the type "
                                      "llama-quantize's rules give it in that mix), or q3_K, q4_K, q5_K: that one "
                                      "type for every unit")
    _add_common(c)

    e = sub.add_parser(
        "eval",
        help="perplexity, KL divergence and top-1 agreement against a reference, weight bytes",
        description="Score --model on --text in non-overlapping windows of --seq-len tokens (each window scored on its own). "
        "With --reference, also the KL divergence KL(reference || model) per token and top-1 agreement, in one pass.",
    )
    e.add_argument("--model", required=True, help="model folder (moepress checkpoint or any supported MoE) or hub id")
    e.add_argument("--reference", help="the uncompressed model to compare against")
    e.add_argument("--text", default="builtin:eval", help="evaluation text: a file, builtin:eval (default) or hf:NAME[:CONFIG][:SPLIT]")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--samples", type=int, default=64, help="number of windows (default 64; 0 = all)")
    e.add_argument("--seed", type=int, default=0, help="seed for choosing the windows across the whole text (default 0)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    _add_common(e)

    pl = sub.add_parser(
        "plan",
        help="allocate bits per unit within a budget (uniform, heuristic, ILP, evolution) and write an editable plan",
        description="Build the cost table (every unit x every option: exact bytes and damage estimates, from one "
        "calibration pass over the uncompressed model), then choose one option per unit within --budget with --strategy. "
        "Writes a YAML plan for `moepress compress --plan`.",
    )
    pl.add_argument("--model", required=True, help="local Hugging Face model folder or hub id (safetensors only)")
    pl.add_argument("-o", "--out", required=True, help="plan file to write (YAML)")
    pl.add_argument("--budget", required=True,
                    help="average code bits (2.5bits: the bytes of half 2-bit, half 3-bit) or bytes (11GB, 800MiB)")
    _add_allocation(pl)
    pl.add_argument("--target", choices=("llamacpp", "vllm"), default=None,
                    help="plan for an engine: its own types (llamacpp: q2_K..q8_0, 16; --options to choose), one "
                         "treatment per group it stores as one tensor or scheme, never a type it refuses for a unit; "
                         "a bits budget is bits per weight")
    pl.add_argument("--group-size", type=_group_size, default=128, help="group size of every option (default 128; 0 = per-channel)")
    pl.add_argument("--symmetric", action="store_true", help="symmetric grids without stored zero points")
    pl.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (default 0.01)")
    pl.add_argument("--calib", default="builtin:calib", help="calibration text (as for compress)")
    pl.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    pl.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    pl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    pl.add_argument("--seed", type=int, default=0, help="seed for calibration windows and random choices (default 0)")
    pl.add_argument("--drop-criterion", choices=("frequency", "mass", "router", "reap"), default="reap",
                    help="with --active: which experts an expert-drop candidate removes first (default reap)")
    pl.add_argument("--plot", metavar="FILE.png", help="also draw the plan: layers x experts coloured by bits (matplotlib)")
    _add_common(pl)

    x = sub.add_parser(
        "export",
        help="write a moepress checkpoint in a format another engine serves (GGUF for llama.cpp, "
             "compressed-tensors for vLLM)",
        description="--format gguf: a checkpoint made with `compress --target llamacpp` as one GGUF file, its "
        "llama.cpp block-format weights written as they are (llama-cli, llama-server, llama-perplexity run it). "
        "--format compressed-tensors: a checkpoint (e.g. from `compress --target vllm`) as a folder in "
        "compressed-tensors' pack-quantized layout, the codes and scales moepress computed with "
        "(vllm serve and transformers' from_pretrained load it).",
    )
    x.add_argument("--model", required=True, help="the moepress checkpoint folder (compress --out)")
    x.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"),
                   help="gguf (llama.cpp) or compressed-tensors (vLLM)")
    x.add_argument("--out", required=True, help="the file (gguf) or folder (compressed-tensors) to write (written "
                                                "to a temporary path, then renamed)")
    x.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp's name of the tokenizer's BPE pre-tokenizer (default: gpt-2 for a byte-level BPE "
                        "with GPT-2's split regex; others must be named, e.g. llama-bpe, qwen2)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    d = sub.add_parser(
        "distill",
        help="tune a compressed checkpoint's scales end to end on the uncompressed model's next-token distribution",
        description="Every quantized unit's float16 scales (llama.cpp blocks' float16 values) are tuned together "
        "with Adam on KL(reference || model) over calibration windows, the codes held: the same format, size and "
        "engines. Needs both models in memory. A quarter of the calibration windows is held out of training: the "
        "result is kept only if the KL on those fell. Written to --out.",
    )
    d.add_argument("--model", required=True, help="the moepress checkpoint folder (compress --out)")
    d.add_argument("--out", required=True, help="the checkpoint folder to write (a temporary folder, then renamed)")
    d.add_argument("--reference", default=None,
                   help="the uncompressed model (default: the one the checkpoint was compressed from)")
    d.add_argument("--steps", type=int, default=None,
                   help="Adam steps, one batch of windows each (default: four passes over the training windows, "
                        "the three quarters of the calibration windows not held out)")
    d.add_argument("--calib", default=None, help="calibration text (default: the checkpoint's own)")
    d.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the checkpoint's)")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the checkpoint's)")
    d.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    d.add_argument("--seed", type=int, default=None, help="seed for the windows (default: the checkpoint's)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_common(d)

    t = sub.add_parser(
        "tiny",
        help="write a tiny random MoE model of a supported architecture, with a real tokenizer (to try moepress offline)",
        description="Random weights: useful to try the pipeline, meaningless for quality.",
    )
    from .model.tiny import TINY_CONFIGS

    t.add_argument("--arch", choices=sorted(TINY_CONFIGS), default="mixtral")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def run_compress(args) -> None:
    from .compress import CompressConfig, compress

    config = CompressConfig(
        bits=4 if args.bits is None else args.bits, group_size=args.group_size, method=args.method, symmetric=args.symmetric,
        act_order=args.act_order, damp=args.damp, calib=args.calib, calib_samples=args.calib_samples,
        seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, device=args.device,
        min_expert_tokens=args.min_expert_tokens, rare_experts=args.rare_experts,
        quantize_attention=not args.keep_attention, expert_chunk=args.expert_chunk,
        prune=args.prune, pruner=args.pruner, prune_scope=args.prune_scope,
        drop_experts=args.drop_experts, drop_criterion=args.drop_criterion, top_k=args.top_k,
        drop_blocks=args.drop_blocks, drop_moe_layers=args.drop_moe_layers, dynamic_pruning=args.dynamic_pruning,
        offload_activations=args.offload_activations, target=args.target, ggml_type=args.ggml_type,
        expert_hessian=args.expert_hessian, clip_search=args.clip_search, refine=args.refine or 0,
        refine_from=args.refine_from, refine_params=args.refine_params, activations=args.activations,
    )
    if args.save_profile:
        from .preflight import check_writable_file

        check_writable_file(args.save_profile, "the profile")
    if args.budget is not None and (args.bits is not None or args.plan):
        from .errors import MoepressError

        raise MoepressError(f"--budget plans every unit's option, so it does not combine with "
                            f"{'--bits' if args.bits is not None else '--plan'}; give one of them")
    if args.bits is not None and args.plan:
        from .errors import MoepressError

        raise MoepressError("--plan gives every unit its option, so it does not combine with --bits")
    config.bits = 4 if args.bits is None else args.bits
    config.__post_init__()
    plan = None
    planning = None
    if args.budget is not None:
        from .allocate.command import PlanOptions

        planning = PlanOptions.from_args(args)
    if args.plan:
        from .allocate import load_plan

        plan = load_plan(args.plan)
        q = plan.quantization
        config.method, config.symmetric = q.get("method", "gptq"), bool(q.get("symmetric", False))
        config.act_order, config.damp = q.get("act_order", "static"), float(q.get("damp", 0.01))
        config.__post_init__()
    if args.refine is None:  # the default: refine where it applies
        from .refine import default_steps

        config.refine = default_steps(config, plan, joint=args.active is not None)
        config.__post_init__()
    result = compress(args.model, config=config, out=args.out, overwrite=args.overwrite, restart=args.restart,
                      progress=not args.quiet, trust_remote_code=args.trust_remote_code, plan=plan,
                      budget=args.budget, planning=planning, project=args.project)
    from .pipeline.distributed import is_main

    if not is_main():  # torchrun: rank 0 reports (and saves --save-profile) for all
        return
    if args.save_profile:
        result.profile.save(args.save_profile)
    fp = result.footprint()
    what = (f"the options of {args.plan}" if args.plan else
            f"the options of the {'joint' if args.active is not None else args.strategy} plan within {args.budget}"
            f"{f' and {args.active:g} of the active parameters' if args.active is not None else ''} (plan.yaml in {args.out})" if args.budget else
            (f"llama.cpp's {'/'.join(sorted({t.label for t in result.units.values()}))}" if config.target == "llamacpp"
             else f"{config.bits} bits") +
            (f", the {config.prune_scope} pruned to {config.prune} ({config.pruner})" if config.prune else ""))
    print("\nexpert coverage (calibration tokens routed per expert):", file=sys.stderr)
    print(result.profile.coverage_table(), file=sys.stderr)
    print(
        f"\nquantized {len(result.units)} units to {what} ({config.method}"
        f"{f', {config.activations} activations' if config.activations else ''}) in {result.seconds:.1f} s on "
        f"{result.calibration_tokens:,} calibration tokens; linear weights {fp.linear_bytes:,} bytes "
        f"({fp.bits_per_param:.3f} bits/param); saved to {args.out}"
    )
    trimmed = []
    kept = result.experts_kept()
    if kept:
        trimmed.append("experts kept per MoE layer " + ", ".join(f"{layer}: {len(k)}" for layer, k in kept.items()))
    if result.top_k_counts():
        trimmed.append(f"top-k {sorted(set(result.top_k_counts().values()))}")
    for part, what in (("block", "blocks"), ("moe", "MoE sublayers")):
        if result.dropped(part):
            trimmed.append(f"{what} dropped {result.dropped(part)}")
    if trimmed:
        print("trimmed: " + "; ".join(trimmed))


def run_eval(args) -> None:
    from .evaluate import evaluate

    if args.json:
        from .preflight import check_writable_file

        check_writable_file(args.json, "the report (--json)")
    report = evaluate(
        args.model, reference=args.reference, text=args.text, seq_len=args.seq_len,
        samples=args.samples or None, seed=args.seed, batch_size=args.batch_size, device=args.device,
        progress=not args.quiet, trust_remote_code=args.trust_remote_code,
    )
    print(report.to_markdown())
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            f.write(report.to_json())
        os.replace(tmp, args.json)


def run_plan(args) -> None:
    from .allocate.command import make_plan

    make_plan(args)


def run_export(args) -> None:
    from .errors import MoepressError
    from .export.gguf import export_gguf

    if args.format == "compressed-tensors":
        from .export.compressed_tensors import export_compressed_tensors

        out = export_compressed_tensors(args.model, args.out, overwrite=args.overwrite)
        print(f"wrote {out} (compressed-tensors pack-quantized)")
        return
    if os.path.exists(args.out) and not args.overwrite:
        raise MoepressError(f"{args.out} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise MoepressError(f"the folder of {args.out} does not exist")
    out = export_gguf(args.model, args.out, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")


def run_distill(args) -> None:
    from .distill import distill_checkpoint

    done = distill_checkpoint(args.model, args.out, reference=args.reference, calib=args.calib,
                              calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, steps=args.steps,
                              batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet,
                              trust_remote_code=args.trust_remote_code, device=args.device)
    before, after = done["validation_kl"]
    verdict = "kept" if done["kept"] else "not lower: the scales are unchanged"
    print(f"wrote {args.out}: KL on the held-out calibration windows {before:.3g} -> {after:.3g} ({verdict}), "
          f"{done['steps']} steps in "
          f"{done['seconds']:.0f} s")


def run_tiny(args) -> None:
    import shutil
    import tempfile

    from .data import load_text
    from .data.tokenizer import train_byte_bpe
    from .export import check_output_dir
    from .model.tiny import build_tiny_model

    check_output_dir(args.out, args.overwrite)
    tokenizer = train_byte_bpe(load_text("builtin:calib")[:200_000], vocab_size=512)
    model = build_tiny_model(args.arch, vocab_size=len(tokenizer), seed=args.seed)
    out = os.path.abspath(args.out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote a tiny random {args.arch} model ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.out}")


def main(argv: list[str] | None = None) -> int:
    from .errors import MoepressError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"compress": run_compress, "eval": run_eval, "plan": run_plan, "tiny": run_tiny, "export": run_export,
                "distill": run_distill}
    try:
        handlers[args.command](args)
    except MoepressError as exc:
        print(f"moepress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moepress: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
