"""llama-quantize's mixes: which ggml type every tensor of a model gets for a file type (Q4_K_M, ...).

``llama-quantize model-f16.gguf out.gguf Q4_K_M`` does not put every tensor in Q4_K: it gives the
more sensitive tensors more bits (attn_v and ffn_down of the first, last and every third layer
Q6_K, the output head Q6_K, ...), by rules that read the tensor's name, its layer, the model's
expert and head counts and the row width. This module is a port of those rules, so that
``compress --target llamacpp --ggml-type q4_K_M`` assigns every tensor exactly the type
llama-quantize would, and a moepress GGUF differs from llama-quantize's of the same mix only in
the rounding (moepress's GPTQ against llama.cpp's RTN or importance-weighted search), not in its
types or its size (``tests/test_llamacpp_presets.py`` compares them with llama-quantize's files).

Ported from ``src/llama-quant.cpp`` of the llama.cpp tree vendored in llama-cpp-python 0.3.36
(``llama_tensor_get_type``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
``tensor_get_category``, ``tensor_allows_quantization``, ``llama_ftype_get_default_type``), for
the file types moepress writes (the legacy types and the k-quant mixes; not the IQ, TQ or MXFP4
ones) and without llama-quantize's overrides (``--tensor-type``, ``--output-tensor-type``,
``--token-embedding-type``, ``--pure``, ``--leave-output-tensor``). What the rules read:

* the tensor's category, from its GGUF name (``attn_v``, ``ffn_down``, ``attn_output``, ``output``,
  ``token_embd``, ...: substrings, as llama.cpp matches them);
* its layer: parsed from ``blk.N.`` in MoE models (more than one expert), else a counter over the
  tensors of its category in llama.cpp's order (by layer, then by name); attn_v's rules always use
  the counter (its position among the model's attn_v tensors);
* ``use_more_bits(i, n)``: the first eighth of layers, the last eighth, and every third in between;
* the model's expert count (8 experts: attn_v and attn_k Q8_0, attn_output Q5_K for the 2- to
  4-bit mixes), its GQA ratio (Q2_K's attn_v), the 70B Llama rule, and whether the output head is
  tied to the token embeddings (a tied table takes the head's rule);
* the row width: a type whose block does not divide it falls back (Q2_K, Q3_K -> Q4_0; Q4_K ->
  Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; F16 when even that does not divide it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MoepressError

# llama-quantize's file type -> its default tensor type (llama_ftype_get_default_type)
FILE_TYPES = {
    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
    "q2_K": "q2_K", "q2_K_S": "q2_K",
    "q3_K_S": "q3_K", "q3_K_M": "q3_K", "q3_K_L": "q3_K",
    "q4_K_S": "q4_K", "q4_K_M": "q4_K",
    "q5_K_S": "q5_K", "q5_K_M": "q5_K",
    "q6_K": "q6_K",
}
_BLOCK = {"q2_K": 256, "q3_K": 256, "q4_K": 256, "q5_K": 256, "q6_K": 256,
          "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "f16": 1}
_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}
# the file types whose attn_output is Q5_K in an 8-expert model (the ones moepress writes)
_ATTN_OUTPUT_Q5_K_8_EXPERTS = ("q2_K", "q3_K_S", "q3_K_M", "q4_K_S", "q4_K_M")


def file_type(name: str) -> str:
    """``name`` as :data:`FILE_TYPES` spells it (case-insensitive: ``Q4_K_M`` -> ``q4_K_M``), or one line
    listing them."""
    for known in FILE_TYPES:
        if known.lower() == str(name).lower():
            return known
    raise MoepressError(f"unknown llama-quantize file type {name!r}; moepress writes {', '.join(FILE_TYPES)}")


def gguf_file_type(name: str) -> str:
    """The ``gguf.LlamaFileType`` member of a file type (``general.file_type``): ``MOSTLY_Q4_K_M``."""
    return "MOSTLY_" + file_type(name).upper()


@dataclass(frozen=True)
class Hparams:
    """What llama.cpp's rules read of a model (its GGUF hyperparameters).

    arch:      the GGUF architecture (``llama`` for Mixtral, ``olmoe``, ``qwen2moe``, ``qwen3moe``,
               ``deepseek2``); only ``llama`` (its 70B rule) and ``falcon`` change a rule
    n_layer:   ``block_count``
    n_head, n_head_kv: attention heads and key/value heads (the GQA ratio ``n_head // n_head_kv``)
    n_expert:  ``expert_count`` (0 or 1: a dense model)
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama_quant_model_from_metadata's inference of LLM_TYPE_70B
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


@dataclass(frozen=True)
class TensorInfo:
    """One GGUF tensor: its name, its row width (``ne[0]``) and its number of dimensions."""

    name: str
    ne0: int
    n_dims: int = 2


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: a broad category from substrings of the name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                      ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def quantizable(tensor: TensorInfo) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the tensors our architectures have: weights of
    two or more dimensions, but no norms and no router."""
    name = tensor.name
    return (tensor.n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "ffn_gate_tid2eid.weight" not in name)


def _layer_order(name: str):
    """llama.cpp's ``weight_name_comparer``: tensors outside a block first, then by block, then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (-1 if m is None else int(m.group(1)), name)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(ne0: int, ggml_type: str) -> str:
    """``tensor_type_fallback``: the type a tensor of rows of ``ne0`` gets when ``ggml_type``'s block
    does not divide them."""
    if ne0 % _BLOCK[ggml_type] == 0:
        return ggml_type
    smaller = _FALLBACK.get(ggml_type, ggml_type)
    return smaller if ne0 % _BLOCK[smaller] == 0 else "f16"


def tensor_types(hparams: Hparams, tensors: list[TensorInfo], ftype: str, *, has_imatrix: bool = False) -> dict:
    """GGUF tensor name -> the ggml type (moepress's name: ``q4_K``, ``q8_0``, ``f16``) llama-quantize
    gives it for file type ``ftype``, for every tensor it quantizes (norms, routers and 1-D tensors
    are left out: llama-quantize copies them)."""
    ftype = file_type(ftype)
    default = FILE_TYPES[ftype]
    ordered = sorted(tensors, key=lambda t: _layer_order(t.name))
    cats = {t.name: category(t.name) for t in ordered}
    n_attention_wv = sum(_is_attn_v(c) for c in cats.values())
    tied = "output" not in cats.values()  # no output.weight: token_embd is the head too
    n_expert = max(1, hparams.n_expert)
    state = {"wv": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def layer_info(counter: str, name: str) -> tuple[int, int]:
        n_layer = hparams.n_layer
        if n_expert > 1:  # (experts of Mixtral are not in order in old files: llama.cpp parses the name)
            m = re.match(r"blk\.(\d+)\.", name)
            if m is None:
                raise MoepressError(f"{name}: llama.cpp's rules need a layer number in this tensor's name")
            return int(m.group(1)), n_layer
        return state[counter], n_layer

    def choose(tensor: TensorInfo) -> str:
        name, cat, new = tensor.name, cats[tensor.name], default
        falcon = hparams.arch == "falcon"
        if cat == "output" or (tied and cat == "token_embd"):
            if falcon or tensor.ne0 % _BLOCK[new]:
                new = "q8_0"
            elif new != "q8_0":
                new = "q6_K"
        elif cat == "token_embd":
            pass  # the default type (only the IQ/TQ mixes change it)
        elif _is_attn_v(cat):
            i, n = state["wv"], n_attention_wv
            if ftype == "q2_K":
                new = "q4_K" if hparams.n_gqa >= 4 else "q3_K"
            elif ftype == "q2_K_S" and hparams.n_gqa >= 4:
                new = "q4_K"
            elif ftype == "q3_K_M":
                new = "q5_K" if i < 2 else "q4_K"
            elif ftype == "q3_K_L":
                new = "q5_K"
            elif ftype in ("q4_K_M", "q5_K_M") and _use_more_bits(i, n):
                new = "q6_K"
            elif ftype == "q4_K_S" and i < 4:
                new = "q5_K"
            if hparams.is_70b and new in ("q3_K", "q4_K"):
                new = "q5_K"
            if hparams.n_expert == 8:
                new = "q8_0"
            state["wv"] += 1
        elif cat == "attn_k":
            if hparams.n_expert == 8:
                new = "q8_0"
        elif cat == "ffn_down":
            i, n = layer_info("ffn_down", name)
            if ftype == "q2_K":
                new = "q3_K"
            elif ftype == "q2_K_S":
                if i < n // 8:
                    new = "q4_K"
            elif ftype == "q3_K_M":
                new = "q5_K" if i < n // 16 else "q4_K" if not falcon or _use_more_bits(i, n) else "q3_K"
            elif ftype == "q3_K_L":
                new = "q4_K" if falcon else "q5_K"
            elif ftype == "q4_K_M":
                if falcon:
                    new = "q6_K" if i < n // 16 else "q5_K" if _use_more_bits(i, n) else "q4_K"
                elif _use_more_bits(i, n):
                    new = "q6_K"
            elif ftype == "q5_K_M" and _use_more_bits(i, n):
                new = "q6_K"
            elif ftype == "q4_K_S" and not falcon and i < n // 8:
                new = "q5_K"
            elif ftype in ("q4_0", "q5_0") and has_imatrix and i < n // 8:
                new = "q4_1" if ftype == "q4_0" else "q5_1"
            state["ffn_down"] += 1
        elif cat == "attn_output":
            if not falcon:
                if hparams.n_expert == 8:
                    if ftype in _ATTN_OUTPUT_Q5_K_8_EXPERTS:
                        new = "q5_K"
                else:
                    new = {"q2_K": "q3_K", "q3_K_M": "q4_K", "q3_K_L": "q5_K"}.get(ftype, new)
            elif ftype == "q3_K_L":
                new = "q4_K"
        elif cat in ("ffn_gate", "ffn_up"):
            layer_info(cat, name)  # (only the IQ3_XS mix has rules here)
            state[cat] += 1
        return fallback(tensor.ne0, new)

    return {t.name: choose(t) for t in ordered if quantizable(t)}


def is_preset(ggml_type: str | None) -> bool:
    """Whether ``--ggml-type`` names one of llama-quantize's mixes (``q4_K_M``, ``q2_K``, ``q4_0``: its
    file types, :data:`FILE_TYPES`) rather than one type for every unit (``q3_K``, ``q4_K``, ``q5_K``:
    llama-quantize takes these only as aliases of the ``_M`` mixes)."""
    return ggml_type is not None and any(ggml_type.lower() == f.lower() for f in FILE_TYPES) \
        and ggml_type.lower() not in ("q3_k", "q4_k", "q5_k")


__all__ = ["FILE_TYPES", "Hparams", "TensorInfo", "category", "fallback", "file_type", "gguf_file_type", "is_preset",
           "quantizable", "tensor_types"]
