#!/usr/bin/env python3
"""Synthetic MoE checkpoints of any size, written to disk one decoder layer at a time.

    python benchmarks/synthetic_moe.py --shape tiny --depth 2 --out /tmp/tiny-synthetic --verify

Random weights (normal, std 0.02; norms at 1.0): for measuring memory and time, never quality.
The checkpoint is what a hub download looks like: ``config.json`` (``config.save_pretrained``),
a byte-level BPE tokenizer, bf16 safetensors shards in the *hub* layout (one tensor per expert
linear) and ``model.safetensors.index.json``. The whole model is never in memory: tensors are
drawn one at a time and flushed to a shard whenever the shard reaches ``shard_bytes``.

Two architectures: Qwen3-MoE (``qwen3_moe``: ``mlp.experts.E.{gate,up,down}_proj``, ``mlp.gate``
router, q/k norms) and Mixtral (``mixtral``: ``block_sparse_moe.experts.E.w1/w2/w3``). The key names
and shapes come from :func:`layout`; :func:`check_layout` compares them with what transformers
itself saves for a 1-layer model of the same architecture and tiny sizes (run before every
generation, so a change of layout in transformers is caught instead of producing a checkpoint
that loads with random re-initialised weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

INDEX = "model.safetensors.index.json"
MARKER = "synthetic.json"  # written last: a folder with it is complete
STD = 0.02
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """The sizes of one synthetic MoE (one decoder layer; depth is separate)."""

    name: str
    model_type: str  # qwen3_moe or mixtral
    hidden: int
    experts: int
    expert_intermediate: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    depths: tuple[int, ...]  # default depths of the benchmark
    calib_samples: int = 16  # default calibration of the benchmark for this shape
    seq_len: int = 128
    methods: tuple[str, ...] | None = None  # default treatments (None: the benchmark's default)
    project_to: int | None = None  # layers of the real model the measurements are projected to
    note: str = ""


SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", "qwen3_moe", hidden=256, experts=8, expert_intermediate=256, top_k=2, heads=4, kv_heads=2,
                  head_dim=64, depths=(2, 4), calib_samples=16, seq_len=128,
                  note="a smoke test of the benchmark itself"),
    "small": Shape("small", "qwen3_moe", hidden=1024, experts=16, expert_intermediate=512, top_k=4, heads=16,
                   kv_heads=4, head_dim=64, depths=(6, 12), calib_samples=32, seq_len=256),
    # Qwen3-30B-A3B's layer with half its experts (128 -> 64), half its depth (48 -> 24).
    "big": Shape("big", "qwen3_moe", hidden=2048, experts=64, expert_intermediate=768, top_k=8, heads=32, kv_heads=4,
                 head_dim=128, depths=(24,), calib_samples=32, seq_len=256,
                 note="15.4 GB in bf16 at 24 layers; --depths 12,24 adds the depth checks at scale"),
    # One Mixtral-8x7B decoder layer (the real model has 32 and a 32000-token vocabulary).
    "mixtral-layer": Shape("mixtral-layer", "mixtral", hidden=4096, experts=8, expert_intermediate=14336, top_k=2,
                           heads=32, kv_heads=8, head_dim=128, depths=(1,), calib_samples=4, seq_len=128,
                           methods=("gptq4",), project_to=32,
                           note="one Mixtral-8x7B layer, time and memory projected to 32 layers"),
}


def make_config(shape: Shape, depth: int, vocab_size: int):
    """The transformers config of ``shape`` at ``depth`` layers (bf16, untied embeddings, id 0 = eos)."""
    import torch
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=depth,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                  num_experts_per_tok=shape.top_k, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if shape.model_type == "qwen3_moe":
        config = Qwen3MoeConfig(**common, num_experts=shape.experts, moe_intermediate_size=shape.expert_intermediate,
                                intermediate_size=shape.expert_intermediate * shape.top_k, mlp_only_layers=[],
                                decoder_sparse_step=1, norm_topk_prob=True)
    elif shape.model_type == "mixtral":
        config = MixtralConfig(**common, num_local_experts=shape.experts, intermediate_size=shape.expert_intermediate)
    else:
        raise ValueError(f"unsupported model_type {shape.model_type!r} (qwen3_moe or mixtral)")
    config.dtype = torch.bfloat16
    return config


def layout(shape: Shape, depth: int, vocab_size: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of the hub checkpoint in writing order: (name, shape, init) with init 'normal' or 'ones'."""
    h, hd, i = shape.hidden, shape.head_dim, shape.expert_intermediate
    q, kv = shape.heads * hd, shape.kv_heads * hd
    out = [("model.embed_tokens.weight", (vocab_size, h), "normal")]
    for layer in range(depth):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,), "ones"),
                (p + "self_attn.q_proj.weight", (q, h), "normal"),
                (p + "self_attn.k_proj.weight", (kv, h), "normal"),
                (p + "self_attn.v_proj.weight", (kv, h), "normal"),
                (p + "self_attn.o_proj.weight", (h, q), "normal")]
        if shape.model_type == "qwen3_moe":
            out += [(p + "self_attn.q_norm.weight", (hd,), "ones"), (p + "self_attn.k_norm.weight", (hd,), "ones")]
        out.append((p + "post_attention_layernorm.weight", (h,), "ones"))
        if shape.model_type == "qwen3_moe":
            moe = p + "mlp."
            names = (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))
        else:
            moe = p + "block_sparse_moe."
            names = (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i)))
        out.append((moe + "gate.weight", (shape.experts, h), "normal"))  # the router
        for e in range(shape.experts):
            out += [(f"{moe}experts.{e}.{n}.weight", s, "normal") for n, s in names]
    out += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (vocab_size, h), "normal")]
    return out


def layer_params(shape: Shape) -> int:
    return sum(_numel(s) for n, s, _ in layout(shape, 1, 1) if ".layers." in n)


def model_bytes(shape: Shape, depth: int, vocab_size: int = 512) -> int:
    """bf16 bytes of the checkpoint's tensors."""
    return 2 * sum(_numel(s) for _, s, _ in layout(shape, depth, vocab_size))


def _numel(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def check_layout(shape: Shape) -> None:
    """Compare :func:`layout` with what transformers saves for the same architecture at tiny sizes
    (1 layer, every dimension distinct); raises if a key or a shape differs."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tiny = replace(shape, hidden=64, experts=3, expert_intermediate=40, heads=4, kv_heads=2, head_dim=24,
                   top_k=2)
    vocab = 100
    with tempfile.TemporaryDirectory(prefix="moepress-layout-") as tmp:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(tiny, 1, vocab), dtype=torch.float32)
        model.save_pretrained(tmp)
        saved = {}
        for f in os.listdir(tmp):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(tmp, f), "pt") as s:
                    saved.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
    mine = {n: tuple(s) for n, s, _ in layout(tiny, 1, vocab)}
    if saved != mine:
        missing, extra = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
        wrong = sorted(k for k in set(saved) & set(mine) if saved[k] != mine[k])
        raise RuntimeError(f"{shape.model_type} hub layout differs from transformers': missing {missing[:4]}, "
                           f"extra {extra[:4]}, shapes {[(k, saved[k], mine[k]) for k in wrong[:4]]}")


def train_tokenizer(vocab_size: int = 512):
    from moepress.data import load_text
    from moepress.data.tokenizer import train_byte_bpe

    return train_byte_bpe(load_text("builtin:calib")[:100_000], vocab_size=vocab_size)


def generate(shape: Shape, depth: int, out: str, *, tokenizer=None, seed: int = 0, shard_bytes: int = 1 << 30,
             log=None) -> dict:
    """Write the checkpoint to ``out`` (replaced if incomplete; re-used if complete with the same spec).
    Memory: about one shard (``shard_bytes``) plus one tensor. Returns the spec written to synthetic.json."""
    import torch
    from safetensors.torch import save_file

    log = log or (lambda msg: None)
    tokenizer = tokenizer or train_tokenizer()
    vocab = len(tokenizer)
    spec = {"shape": asdict(shape), "depth": depth, "vocab_size": vocab, "seed": seed, "std": STD,
            "bytes": model_bytes(shape, depth, vocab), "params": model_bytes(shape, depth, vocab) // 2}
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k != "seconds"} == json.loads(json.dumps(spec)):
            log(f"re-using {out}")
            return old
    check_layout(shape)
    if os.path.exists(out):
        shutil.rmtree(out)
    tmp = out + ".generating"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    started = time.time()
    make_config(shape, depth, vocab).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    gen = torch.Generator().manual_seed(seed)
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0

    def flush():
        nonlocal buffer, buffered
        if not buffer:
            return
        name = f"shard-{len(shards) + 1:05d}.safetensors"
        save_file(buffer, os.path.join(tmp, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in buffer})
        buffer, buffered = {}, 0

    last_layer = None
    for name, dims, init in layout(shape, depth, vocab):
        if init == "ones":
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = torch.empty(dims, dtype=torch.bfloat16).normal_(0.0, STD, generator=gen)
        size = t.numel() * 2
        if buffer and buffered + size > shard_bytes:
            flush()
        buffer[name] = t
        buffered += size
        layer = name.split(".")[2] if ".layers." in name else None
        if layer is not None and layer != last_layer:
            last_layer = layer
            if int(layer) % max(1, depth // 4) == 0:
                log(f"  layer {layer}/{depth} ({time.time() - started:.0f} s)")
    flush()
    # Hub names: model-0000i-of-0000n.safetensors.
    n = len(shards)
    renamed = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renamed.items():
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": spec["bytes"]},
                   "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}, f, indent=1)
    spec["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(spec, f, indent=1)
    os.rename(tmp, out)
    return spec


def verify_load(path: str, tokens: int = 16) -> dict:
    """Load with ``AutoModelForCausalLM.from_pretrained`` (no missing or unexpected key, no weight
    re-initialised) and run one forward pass; returns what was checked."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                            "error_msgs")}
    if problems:
        raise RuntimeError(f"{path} loads with {problems}")
    # Spot-check that the weights are the file's (not re-initialised): one expert tensor and the head.
    with open(os.path.join(path, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    state = model.state_dict()
    checked = 0
    for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        with safe_open(os.path.join(path, weight_map[key]), "pt") as s:
            if not torch.equal(s.get_tensor(key), state[key]):
                raise RuntimeError(f"{path}: {key} in memory differs from the file")
        checked += 1
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox jumps over the lazy dog, again and again.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids[:, :tokens]).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{path}: non-finite logits")
    return {"model_class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "tensors_checked": checked, "logits_shape": list(logits.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--depth", type=int, default=None, help="layers (default: the shape's first benchmark depth)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=1024, help="shard size, MB (default 1024)")
    p.add_argument("--verify", action="store_true", help="then load it with from_pretrained and run a forward pass")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    depth = args.depth or shape.depths[0]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{shape.name} x {depth} layers: {model_bytes(shape, depth) / GB:.2f} GB in bf16")
    spec = generate(shape, depth, args.out, seed=args.seed, shard_bytes=args.shard_mb << 20, log=log)
    log(f"wrote {args.out} in {spec.get('seconds')} s")
    if args.verify:
        log(f"from_pretrained: {verify_load(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
