"""GGUF export: a ``compress --target llamacpp`` checkpoint as a file llama.cpp runs.

:func:`export_gguf` reads the checkpoint's tensors one at a time from its safetensors shards and
writes them with the ``gguf`` package (llama.cpp's own gguf-py): names from its
``TensorNameMap``, a layer's routed experts stacked into the 3-D ``blk.N.ffn_{gate,up,down}_exps``
tensors, the block-format units' bytes written exactly as the checkpoint holds them (moepress's
model computes with these values; nothing is rounded again), kept weights in F16, norms and
routers in F32 (as llama.cpp's converter and llama-quantize keep them). The metadata are the keys
llama.cpp's ``convert_hf_to_gguf.py`` writes for the same model (checked key by key in
``tests/test_gguf_export.py`` and ``tests/test_gguf_archs.py``), with ``general.file_type`` naming
the checkpoint's type.

The tokenizer is written as the converter's ``gpt2`` (byte-level BPE) vocabulary. The converter
recognises a BPE pre-tokenizer by hashing its output on a test text and refuses ones it does not
know (the zoo's own byte-level BPE); a byte-level BPE with GPT-2's split regex is what llama.cpp
calls ``gpt-2``, which the export writes; any other pre-tokenizer must be named
(``tokenizer_pre``, ``--tokenizer-pre``: llama.cpp's name for it, e.g. ``llama-bpe``, ``qwen2``).

Architectures: one small entry per architecture llama.cpp runs (:data:`ARCHITECTURES`: Mixtral,
OLMoE, DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE, GraniteMoE; not PhiMoE, whose router llama.cpp
computes differently: :data:`RUN_DIFFERENTLY`), each the hyperparameters its converter class
adds and the configurations llama.cpp would run differently from transformers (refused in one
line, from the config alone: :func:`architecture`); another architecture is refused too. DeepSeek's latent
attention is written as the converter splits it: ``kv_b_proj`` into ``attn_v_b`` (the value rows
of each head: whole rows, so a block format's bytes as they are) and ``attn_k_b`` (the key rows,
transposed: a block row cannot be transposed, so it holds the float values moepress computes
with, F32, when ``kv_b_proj`` is quantized). Where the converter's metadata would make llama.cpp
compute something else than transformers does, the export writes what transformers computes, and
the test names the key: DeepSeek-V3's sigmoid router (``expert_gating_func``: transformers'
config drops ``scoring_func``, and llama.cpp's default is softmax), DeepSeek-V2's greedy router
(no expert groups, no top-k renormalisation: transformers' V2 ignores both), and a
``q_lora_rank`` of 0 for a V2 without q LoRA (llama.cpp's loader demands the key).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoepressError

EXPERT = re.compile(r"\.experts\.(\d+)\.")
SUFFIXES = (".weight", ".bias", ".blocks")
FUSED_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")  # transformers' 3-D experts, kept as they are


@dataclass(frozen=True)
class Architecture:
    """How one of moepress's architectures is written for llama.cpp.

    gguf_arch:   the gguf-py ``MODEL_ARCH`` name (``"LLAMA"`` for Mixtral: llama.cpp runs Mixtral
                 as a llama model with experts)
    permute_qk:  llama's rotary layout: q/k rows permuted from Hugging Face's halves to
                 interleaved pairs (the converter's ``LlamaModel.permute``)
    hparams:     the keys the architecture's converter class writes after the common ones
                 (:func:`_common_hparams`), as (GGUFWriter ``add_<key>``, config key or a function
                 of the config); a later entry replaces an earlier one, None writes nothing
    refuse:      (config -> bool, why): configurations llama.cpp runs differently from
                 transformers, refused in one line
    latent_attention: DeepSeek's MLA, ``kv_b_proj`` split into ``attn_k_b`` and ``attn_v_b``
    renames:     (old, new) parts of stored names, replaced before gguf's name map reads them
                 (transformers 5's names it does not know yet, as the converter renames them)
    """

    gguf_arch: str
    permute_qk: bool = False
    hparams: tuple = ()
    refuse: tuple = ()
    latent_attention: bool = False
    renames: tuple = ()


def _dense_layers(cfg: dict) -> list[int]:
    """Qwen-MoE's layers with a dense MLP (``mlp_only_layers``, ``decoder_sparse_step``)."""
    step = cfg.get("decoder_sparse_step") or 1
    only = set(cfg.get("mlp_only_layers") or ())
    return [i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step != 0]


def _qwen_moe(arch: str, normalises: bool) -> Architecture:
    """Qwen2-MoE and Qwen3-MoE: llama.cpp has an MoE block in every layer and fixes whether the
    top-k weights are renormalised (qwen2moe: never, qwen3moe: always)."""
    return Architecture(arch, hparams=(
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    ), refuse=(
        (lambda c: _dense_layers(c), lambda c: f"layers {_dense_layers(c)} have a dense MLP; llama.cpp's "
                                                f"{arch.lower()} has an MoE block in every layer"),
        (lambda c: bool(c.get("norm_topk_prob")) != normalises,
         lambda c: f"norm_topk_prob={c.get('norm_topk_prob')}: llama.cpp's {arch.lower()} "
                   f"{'always' if normalises else 'never'} renormalises the top-k weights"),
    ))


def _deepseek(v3: bool) -> Architecture:
    """DeepSeek-V2/V3 as the converter's ``DeepseekV2Model`` writes them (llama.cpp's deepseek2:
    MLA as MQA over the latent, leading dense blocks, shared experts), with the router as
    transformers runs it: V3 sigmoid scores with a selection bias, expert groups scored by their
    top two, top-k renormalised if ``norm_topk_prob``; V2 softmax, greedy top-k, never
    renormalised (llama.cpp scores a group by its top two, V2's ``group_limited_greedy`` by its
    best one: refused where groups are skipped)."""
    hparams = (
        ("head_count_kv", lambda c: 1),
        ("leading_dense_block_count", lambda c: c.get("first_k_dense_replace") or 0),
        ("vocab_size", "vocab_size"),
        # without q LoRA (V2-Lite's plain q_proj) the converter writes no q_lora_rank, which llama.cpp's
        # loader demands of every model but the Lite's own layer counts; 0 is its "no q LoRA"
        ("q_lora_rank", lambda c: c.get("q_lora_rank") or 0),
        ("kv_lora_rank", "kv_lora_rank"),
        ("key_length", lambda c: c["kv_lora_rank"] + c["qk_rope_head_dim"]),
        ("value_length", "kv_lora_rank"),
        ("key_length_mla", lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"]),
        ("value_length_mla", "v_head_dim"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_count", lambda c: c.get("n_shared_experts") or 0),
        ("expert_weights_scale", "routed_scaling_factor"),
        ("rope_dimension_count", "qk_rope_head_dim"),
        # yarn's softmax scale: the converter writes 0.1 x mscale_all_dim (and llama.cpp divides the 0.1 out)
        ("rope_scaling_yarn_log_mul", lambda c: None if (m := (c.get("rope_parameters") or {}).get("mscale_all_dim"))
         is None else 0.1 * m),
    )
    if v3:
        hparams += (("expert_weights_norm", lambda c: True if c.get("norm_topk_prob") else None),
                    ("expert_gating_func", lambda c: _gguf().ExpertGatingFuncType.SIGMOID))
        refuse = ((lambda c: c.get("rope_interleave") is False,
                   lambda c: "rope_interleave=false: llama.cpp's deepseek2 rotates interleaved pairs"),)
    else:
        greedy = (lambda c: None if c.get("topk_method", "greedy") == "greedy" else c.get("n_group"))
        hparams += (("expert_group_count", greedy),
                    ("expert_group_used_count", lambda c: greedy(c) and c.get("topk_group")))
        refuse = ((lambda c: c.get("topk_method") == "group_limited_greedy" and c.get("topk_group") != c.get("n_group"),
                   lambda c: f"topk_method group_limited_greedy with {c.get('topk_group')} of {c.get('n_group')} "
                             "groups: llama.cpp scores a group by its top two experts, DeepSeek-V2 by its best one"),)
    return Architecture("DEEPSEEK2", hparams=hparams, refuse=refuse, latent_attention=True,
                        renames=((".e_score_correction_bias", ".e_score_correction.bias"),))


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


ARCHITECTURES = {
    "mixtral": Architecture("LLAMA", permute_qk=True, hparams=(("vocab_size", "vocab_size"),
                                                                ("rope_dimension_count", _head_dim))),
    "olmoe": Architecture("OLMOE"),
    "deepseek_v3": _deepseek(v3=True),
    "deepseek_v2": _deepseek(v3=False),
    "qwen3_moe": _qwen_moe("QWEN3MOE", normalises=True),
    "qwen2_moe": _qwen_moe("QWEN2MOE", normalises=False),
    # Granite: llama with four multipliers; the converter drops head_dim
    "granitemoe": Architecture("GRANITE_MOE", permute_qk=True, hparams=(
        ("key_length", lambda c: None), ("value_length", lambda c: None), ("vocab_size", "vocab_size"),
        ("rope_dimension_count", lambda c: c["hidden_size"] // c["num_attention_heads"]),
        *((key, lambda c, name=name: c.get(name) or None) for key, name in (
            ("attention_scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling"),
            ("expert_shared_feed_forward_length", "shared_intermediate_size")))),
        renames=((".block_sparse_moe.", ".mlp."),)),
}
# moepress architectures llama.cpp has, but runs differently from transformers: refused, saying how
RUN_DIFFERENTLY = {
    "phimoe": "llama.cpp's phimoe weights the top two experts by a softmax over all, renormalised; PhiMoE's "
              "sparsemixer weights each by a softmax over the experts within 2 x router_jitter_noise of it",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoepressError("the GGUF export needs the gguf package: pip install 'moepress[gguf]'") from None
    return gguf


class _Checkpoint:
    """A moepress checkpoint folder, its tensors read one at a time (never the whole model)."""

    def __init__(self, path: str):
        from .record import read_record

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise MoepressError(f"{path} is not a model folder (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        self.record = read_record(str(path))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.shard_of = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                self.shard_of = {name: "model.safetensors" for name in f.keys()}
        self._open: dict[str, object] = {}

    def _file(self, name: str):
        from safetensors import safe_open

        shard = self.shard_of[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._open[shard]

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())


@dataclass
class _Tensor:
    """One GGUF tensor to write: its name, ggml type and a function producing its data."""

    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple  # numpy shape of the data (bytes for block types)
    dtype: object  # numpy dtype of the data
    load: object  # () -> numpy array

    @property
    def nbytes(self) -> int:
        import numpy as np

        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for a q or k projection (Hugging Face stores the two halves of
    every head apart; ggml's rope wants them as interleaved pairs)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _check_expressible(ckpt: _Checkpoint) -> None:
    from ..treatment import Treatment

    record = ckpt.record
    if record.get("activations"):
        raise MoepressError(f"the checkpoint quantizes activations ({record['activations']}, compress --activations); "
                            "a GGUF stores weight types only: compress again without it")
    for name, entry in record.get("units", {}).items():
        t = Treatment.from_unit_map(entry, name)
        if not (t.keep or (t.kind == "quantize" and t.format is not None)):
            raise MoepressError(f"{name} is {t.label}, moepress's own format, which llama.cpp cannot read; compress "
                                "with --target llamacpp (llama.cpp's q4_0/q4_1/q5_0/q5_1/q8_0) to export a GGUF")
    for key, what in (("dropped_blocks", "dropped blocks"), ("dropped_moe_layers", "dropped MoE sublayers")):
        if record.get(key):
            raise MoepressError(f"the checkpoint has {what} {record[key]}; the GGUF export does not renumber layers yet")
    if record.get("dynamic_pruning"):
        raise MoepressError("the checkpoint carries dynamic expert skipping, which llama.cpp cannot run")


def _tensors(ckpt: _Checkpoint, arch: Architecture, gguf) -> list[_Tensor]:
    """Every GGUF tensor, in the converter's order of names (embeddings and head first, then blocks)."""
    import numpy as np

    from ..quantize.ggml_blocks import block_format
    from ..treatment import Treatment

    cfg = ckpt.config
    n_layers = cfg["num_hidden_layers"]
    n_head, n_head_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    names = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch.gguf_arch), n_layers)
    units = ckpt.record.get("units", {})
    formats = {name: Treatment.from_unit_map(e, name).format for name, e in units.items()}
    # moepress's canonical unit of a state-dict base name (for its block format)
    groups: dict[str, list[tuple[int | None, str]]] = {}  # base name -> [(expert, stored name)]
    for stored in ckpt.shard_of:
        key = stored
        for old, new in arch.renames:
            key = key.replace(old, new)
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None and stored.endswith(FUSED_EXPERTS):
            suffix = ""
        if suffix is None:
            raise MoepressError(f"{stored}: a tensor the GGUF export does not know how to write")
        base = key[: len(key) - len(suffix)]
        m = EXPERT.search(base + ".")
        expert = None
        if m is not None:
            expert = int(m.group(1))
            base = EXPERT.sub(".experts.", base + ".", count=1)[:-1]
        groups.setdefault(base + suffix, []).append((expert, stored))
    force_f32 = {gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP}

    def gguf_name(base: str, suffix: str) -> tuple[str, object]:
        found = names.get_type_and_name(base, try_suffixes=())
        if found is None:
            raise MoepressError(f"{base}: no llama.cpp tensor of architecture {arch.gguf_arch} has this name")
        kind, name = found
        return name + (".bias" if suffix == ".bias" else ".weight"), kind

    out: list[_Tensor] = []
    for key in sorted(groups, key=_converter_order):
        members = sorted(groups[key], key=lambda m: -1 if m[0] is None else m[0])
        suffix = next((s for s in SUFFIXES if key.endswith(s)), "")
        base = key[: len(key) - len(suffix)]
        if base.endswith(".experts.gate_up_proj"):  # fused kept experts: gate and up are two GGUF tensors
            stored = members[0][1]
            inter = ckpt.shape(stored)[1] // 2
            for part, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
                name, _ = gguf_name(base.replace("gate_up_proj", part), suffix)
                shape = tuple(ckpt.shape(stored))
                out.append(_Tensor(name, gguf.GGMLQuantizationType.F16, (shape[0], inter, shape[2]), np.float16,
                                   lambda s=stored, r=rows: ckpt.tensor(s)[:, r].to(torch.float16).numpy()))
            continue
        name, kind = gguf_name(base, suffix)
        layer = _layer_of(base)
        rotary = arch.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K)
        heads = n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else n_head_kv
        stored_names = [s for _, s in members]
        experts = members[0][0] is not None
        first_shape = ckpt.shape(stored_names[0])
        shape = tuple([len(stored_names)] + first_shape if experts else first_shape)

        def load(stored_names=stored_names, experts=experts, rotary=rotary, heads=heads, f16=None):
            data = [ckpt.tensor(s) for s in stored_names]
            data = torch.stack(data) if experts else data[0]
            if rotary:
                data = _permute(data, heads)
            if f16 is not None:
                data = data.to(f16)
            return data.contiguous().numpy()

        if arch.latent_attention and kind == gguf.MODEL_TENSOR.ATTN_KV_B:
            fmt = _unit_format(formats, base, layer, members) if suffix == ".blocks" else None
            out.extend(_latent_kv_b(ckpt, stored_names[0], base, fmt, names, gguf))
            continue
        if suffix == ".blocks":  # (token_embd and output: the types moepress.json's embeddings names)
            fmt = (ckpt.record.get("embeddings") or {}).get(name[: -len(".weight")]) or \
                _unit_format(formats, base, layer, members)
            qtype = gguf.GGMLQuantizationType(block_format(fmt).ggml_type)
            out.append(_Tensor(name, qtype, shape, np.uint8, load))
        elif len(shape) <= 1 or kind in force_f32 or suffix == ".bias" or name.endswith("_norm.weight"):
            out.append(_Tensor(name, gguf.GGMLQuantizationType.F32, shape, np.float32,
                               lambda load=load: load(f16=torch.float32)))
        else:
            out.append(_Tensor(name, gguf.GGMLQuantizationType.F16, shape, np.float16,
                               lambda load=load: load(f16=torch.float16)))
    return out


def _latent_kv_b(ckpt: _Checkpoint, stored: str, base: str, fmt: str | None, names, gguf) -> list[_Tensor]:
    """DeepSeek's ``kv_b_proj`` [n_head * (qk_nope + v), kv_lora] as the converter splits it for
    llama.cpp's MLA: ``attn_v_b`` [n_head, v, kv_lora], each head's value rows (whole rows: a block
    format's bytes as stored), and ``attn_k_b`` [n_head, kv_lora, qk_nope], each head's key rows
    transposed (llama.cpp multiplies by it from the other side). A block row cannot be transposed,
    so a quantized ``attn_k_b`` holds the float32 values moepress computes with (``fmt``'s
    dequantized bytes); a kept one is F16, as the converter writes it."""
    import numpy as np

    from ..quantize.ggml_blocks import BlockQuantizedWeight, block_format

    cfg = ckpt.config
    n_head, nope, v, rank = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank"))
    if ckpt.shape(stored)[0] != n_head * (nope + v):
        raise MoepressError(f"{stored}: {ckpt.shape(stored)[0]} rows, expected num_attention_heads x "
                            f"(qk_nope_head_dim + v_head_dim) = {n_head * (nope + v)}")
    k_name = names.get_name(base.replace("kv_b_proj", "k_b_proj"), try_suffixes=()) + ".weight"
    v_name = names.get_name(base.replace("kv_b_proj", "v_b_proj"), try_suffixes=()) + ".weight"

    def heads() -> torch.Tensor:  # [n_head, nope + v, row]
        return ckpt.tensor(stored).view(n_head, nope + v, -1)

    def weights() -> torch.Tensor:  # [n_head, nope + v, kv_lora], the values moepress computes with
        if fmt is None:
            return heads().float()
        return BlockQuantizedWeight(ckpt.tensor(stored), block_format(fmt), rank, n_head * (nope + v)).dequantize() \
            .view(n_head, nope + v, rank)

    def k_b(dtype):
        return weights()[:, :nope].transpose(1, 2).to(dtype).contiguous().numpy()

    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    if fmt is None:
        v_b = _Tensor(v_name, F16, (n_head, v, rank), np.float16,
                      lambda: heads()[:, nope:].to(torch.float16).contiguous().numpy())
        return [_Tensor(k_name, F16, (n_head, rank, nope), np.float16, lambda: k_b(torch.float16)), v_b]
    qtype = gguf.GGMLQuantizationType(block_format(fmt).ggml_type)
    row = ckpt.shape(stored)[1]
    v_b = _Tensor(v_name, qtype, (n_head, v, row), np.uint8, lambda: heads()[:, nope:].contiguous().numpy())
    return [_Tensor(k_name, F32, (n_head, rank, nope), np.float32, lambda: k_b(torch.float32)), v_b]


def _layer_of(base: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", base)
    return None if m is None else int(m.group(1))


def _converter_order(key: str):
    layer = _layer_of(key)
    return (-1, key) if layer is None else (layer, key)


def _unit_format(formats: dict, base: str, layer, members) -> str:
    """The block format of the stored tensors of ``base``, from the unit map (one for all experts)."""
    tail = base.rsplit(".", 1)[-1]
    if ".experts." in base + ".":
        found = {formats.get(f"layers.{layer}.experts.{e}.{tail}") for e, _ in members}
    else:
        kind = "attn" if any(p in base for p in (".self_attn.", ".attention.")) else \
            "shared" if "shared" in base else "mlp"
        found = {formats.get(f"layers.{layer}.{kind}.{tail}")}
    found.discard(None)
    if len(found) != 1:
        raise MoepressError(f"{base}: the unit map gives {sorted(found) or 'no'} llama.cpp type(s) for these weights; "
                            "a GGUF tensor has one")
    return found.pop()


def _file_type(tensors: list[_Tensor], gguf, mix: str | None = None) -> int:
    """``general.file_type``: the llama-quantize mix the checkpoint was made as (``mix``, its
    ``--ggml-type``: MOSTLY_Q4_K_M), else the LlamaFileType of the type holding most of the weights
    (F16 when every linear is kept), as llama-quantize names the file after the type it was asked for."""
    import numpy as np

    from .llamacpp_presets import is_preset

    if is_preset(mix):
        from .llamacpp_presets import gguf_file_type

        return int(gguf.LlamaFileType[gguf_file_type(mix)])

    by_type: dict = {}
    for t in tensors:
        if t.qtype not in (gguf.GGMLQuantizationType.F32,):
            by_type[t.qtype] = by_type.get(t.qtype, 0) + int(np.prod(t.shape))
    quantized = {q: n for q, n in by_type.items() if q != gguf.GGMLQuantizationType.F16}
    main = max(quantized, key=quantized.get) if quantized else gguf.GGMLQuantizationType.F16
    # a pure k-quant is named as its _S mix (LlamaFileType has no MOSTLY_Q3_K, MOSTLY_Q4_K, MOSTLY_Q5_K)
    name = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(main.name, main.name)
    return int(gguf.LlamaFileType[f"MOSTLY_{name}"])


def _tokenizer_pre(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    file = path / "tokenizer.json"
    pre = json.loads(file.read_text()).get("pre_tokenizer") if file.is_file() else None
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE split by GPT-2's regex: what llama.cpp calls gpt-2
    raise MoepressError(f"{path}: the tokenizer's pre-tokenizer is not GPT-2's byte-level one; name it as llama.cpp "
                        "does (--tokenizer-pre llama-bpe, qwen2, deepseek-v3, ...)")


def _write_vocab(writer, path: Path, vocab_size: int, pre: str, gguf) -> None:
    """The converter's ``_set_vocab_gpt2``: tokens by id, their types, merges and special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    reverse = {i: tok for tok, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (
                token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            if decoder[i].special or looks_special:
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(path), load_merges=True)
    # A byte-level post-processor adds no BOS/EOS. gguf-py releases before llama.cpp's vendored one do
    # not read that, and llama.cpp then prepends a BOS the model never saw: say it, as the converter does.
    post = json.loads((path / "tokenizer.json").read_text()).get("post_processor") \
        if (path / "tokenizer.json").is_file() else None
    processors = (post or {}).get("processors", [post] if post else [])
    if processors and all(p.get("type") == "ByteLevel" for p in processors):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    elif processors and all(p.get("type") == "TemplateProcessing" and not any("SpecialToken" in part for part in
                                                                              p.get("single", [])) for p in processors):
        # a template adding no special token (SmolLM2's): no BOS either. The converter writes this
        # key only (for Llama-architecture vocabularies of 49,152 tokens, SmolLM2's and Granite's)
        special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer)


def _first(cfg: dict, *keys):
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def _common_hparams(cfg: dict, gguf) -> dict:
    """The hyperparameters every converter class writes (``TextModel.set_gguf_parameters``), as
    {GGUFWriter ``add_<key>``: value}."""
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") not in (None, "default", *ROPE_SCALING):
        raise MoepressError(f"rope type {rope['rope_type']!r}: the GGUF export writes default, linear and yarn rope")
    score = _first(cfg, "score_function", "scoring_func", "score_func")
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX,
              None: None}
    if score not in gating:
        raise MoepressError(f"router scoring {score!r}: llama.cpp's experts are scored by softmax or sigmoid")
    return {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": _first(cfg, "prefix_dense_intermediate_size", "dense_intermediate_size",
                                      "intermediate_size"),
        "head_count": cfg["num_attention_heads"],
        "head_count_kv": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "rope_freq_base": rope.get("rope_theta", cfg.get("rope_theta")),
        "layer_norm_rms_eps": cfg["rms_norm_eps"],
        "expert_count": _first(cfg, "num_local_experts", "num_experts", "n_routed_experts"),
        "expert_used_count": _first(cfg, "num_experts_per_tok"),
        "expert_group_count": cfg.get("n_group"),
        "expert_group_used_count": cfg.get("topk_group"),
        "expert_gating_func": gating[score],
        "key_length": cfg.get("head_dim"),
        "value_length": cfg.get("head_dim"),
        **_rope_scaling(rope, gguf),
    }


ROPE_SCALING = ("linear", "yarn")


def _rope_scaling(rope: dict, gguf) -> dict:
    """The converter's rope scaling keys (linear, yarn; a scaling without a factor is none)."""
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind not in ROPE_SCALING or factor is None:
        return {}
    keys = {"rope_scaling_type": gguf.RopeScalingType(kind), "rope_scaling_factor": factor}
    if kind == "yarn":
        keys.update(rope_scaling_orig_ctx_len=rope["original_max_position_embeddings"],
                    rope_scaling_yarn_ext_factor=rope.get("extrapolation_factor"),
                    rope_scaling_yarn_attn_factor=rope.get("attention_factor", rope.get("attn_factor")),
                    rope_scaling_yarn_beta_fast=rope.get("beta_fast"),
                    rope_scaling_yarn_beta_slow=rope.get("beta_slow"))
    return keys


def _hparams(cfg: dict, arch: Architecture, gguf) -> dict:
    """The hyperparameters the converter writes for ``arch``: the common ones, then the
    architecture's (replacing, or with None removing, a common one)."""
    values = _common_hparams(cfg, gguf)
    for key, source in arch.hparams:
        values[key] = source(cfg) if callable(source) else cfg.get(source)
    return {key: value for key, value in values.items() if value is not None}


def architecture(cfg: dict) -> Architecture:
    """The entry for a model of config ``cfg`` (a ``config.json`` as a dict), or one line saying
    why llama.cpp cannot run it as transformers does. Needs only the config, so it can be asked
    before any work (``compress --target llamacpp`` may ask it too)."""
    model_type = cfg.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if model_type in RUN_DIFFERENTLY:
        raise MoepressError(f"{model_type}: {RUN_DIFFERENTLY[model_type]}; the GGUF export cannot write this model")
    if arch is None:
        raise MoepressError(f"the GGUF export does not know architecture {model_type!r} yet; it writes "
                            f"{', '.join(sorted(ARCHITECTURES))}")
    for bad, why in arch.refuse:
        if bad(cfg):
            raise MoepressError(f"{model_type}: {why(cfg)}; the GGUF export cannot write this model")
    _hparams(cfg, arch, _gguf())  # (its own refusals: rope scaling, router scoring)
    return arch


def export_gguf(path: str, out: str, *, tokenizer_pre: str | None = None) -> str:
    """Write the moepress checkpoint at ``path`` (made with ``compress --target llamacpp``, or any
    whose units are all kept or in llama.cpp types) as the GGUF file ``out``; returns ``out``.

    Written to a temporary file beside ``out`` and renamed when complete. One-line
    :class:`MoepressError` for what llama.cpp cannot run (moepress's own formats, an architecture
    without an entry, a tokenizer whose pre-tokenizer is not named).
    """
    gguf = _gguf()
    ckpt = _Checkpoint(path)
    arch = architecture(ckpt.config)
    hparams = _hparams(ckpt.config, arch, gguf)
    _check_expressible(ckpt)
    pre = _tokenizer_pre(ckpt.path, tokenizer_pre)
    tensors = _tensors(ckpt, arch, gguf)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    try:
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.qtype)
        _write_metadata(writer, ckpt, hparams, tensors, pre, gguf)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:  # one tensor in memory at a time
            data = t.load()
            if data.shape != tuple(t.shape) or data.dtype != t.dtype:
                raise MoepressError(f"{t.name}: read {data.shape} {data.dtype}, expected {t.shape} {t.dtype}")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def _write_metadata(writer, ckpt: _Checkpoint, hparams: dict, tensors, pre: str, gguf) -> None:
    """general.* as the converter derives them (gguf's Metadata heuristics, on the source model's
    folder when it is at hand, so the name is the model's, not the output folder's), then the
    hyperparameters and the tokenizer."""
    total, shared, expert, count = writer.get_total_parameter_count()
    source = ckpt.record.get("source_model") or ""
    folder = Path(source) if source and Path(source).is_dir() else ckpt.path
    metadata = gguf.Metadata.load(None, folder, None, total)
    if metadata.name is None:
        metadata.name = folder.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    for key, value in hparams.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(_file_type(tensors, gguf, ckpt.record.get("ggml_type")))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(writer, ckpt.path, ckpt.config["vocab_size"], pre, gguf)


__all__ = ["ARCHITECTURES", "RUN_DIFFERENTLY", "Architecture", "architecture", "export_gguf"]
