"""moepress export --format gguf: the checkpoint's bytes in llama.cpp's file, with the metadata
llama.cpp's own converter writes, and a perplexity in llama.cpp equal to moepress's own.

The converter and llama-perplexity come from ``benchmarks/peers/setup_llamacpp.sh``; tests that
need them are skipped, saying so, when they are not built.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import moepress
from moepress.cli import main
from moepress.export import llamacpp_tools
from moepress.export.gguf import export_gguf
from moepress.loading import load_model
from moepress.model.view import MoEView

from .gguf_helpers import converter_missing, convert_references, llamacpp_protocol_ppl, metadata, tensors
from .helpers import run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra: pip install moepress[gguf]")

SMALL = {"calib_samples": 4, "seq_len": 64}








def _compressed(source, calib_file, root):
    """``source`` compressed for llama.cpp at 4 (q4_1), 8 (q8_0) and 16 bits (kept), and exported."""
    out, files = {}, {}
    for bits in (4, 8, 16):
        out[bits] = str(root / f"q{bits}")
        moepress.compress(source, target="llamacpp", bits=bits, calib=calib_file, out=out[bits], progress=False,
                          **SMALL)
        files[bits] = export_gguf(out[bits], str(root / f"q{bits}.gguf"))
    return source, root, out, files


@pytest.fixture(scope="module")
def olmoe_dir(tokenizer, tmp_path_factory):
    """A tiny OLMoE llama.cpp can load: llama.cpp's OLMoE normalises k over all heads, so no
    grouped-query attention (the converter writes the GQA tiny OLMoE, llama.cpp refuses its k_norm)."""
    from moepress.model.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-olmoe")
    build_tiny_model("olmoe", vocab_size=len(tokenizer), num_key_value_heads=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixtral(tiny_model_dir, calib_file, tmp_path_factory):
    return _compressed(tiny_model_dir("mixtral"), calib_file, tmp_path_factory.mktemp("gguf-mixtral"))


@pytest.fixture(scope="module")
def olmoe(olmoe_dir, calib_file, tmp_path_factory):
    return _compressed(olmoe_dir, calib_file, tmp_path_factory.mktemp("gguf-olmoe"))


@pytest.fixture(scope="module")
def references(tiny_model_dir, olmoe_dir, tmp_path_factory):
    """{arch: {outtype: GGUF}}: llama.cpp's converter's f16 and q8_0 files of the float Mixtral and
    OLMoE, made in one converter run (its start is most of a tiny model's conversion)."""
    root = tmp_path_factory.mktemp("converter")
    jobs = {(arch, outtype): (source, root / f"{arch}-{outtype}.gguf", outtype)
            for arch, source in (("mixtral", tiny_model_dir("mixtral")), ("olmoe", olmoe_dir))
            for outtype in ("f16", "q8_0")}
    convert_references(list(jobs.values()))
    found: dict = {}
    for (arch, outtype), (_, out, _) in jobs.items():
        found.setdefault(arch, {})[outtype] = out
    return found


@pytest.fixture(scope="module")
def checkpoints(mixtral):
    return mixtral[:3]


@pytest.fixture(scope="module")
def exported(mixtral):
    return mixtral[3]


def _permuted(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_gguf_holds_the_checkpoints_bytes(checkpoints, exported):
    """Every quantized tensor of the file is the checkpoint's block bytes (experts stacked, q/k rows
    in llama's rotary order), so llama.cpp reads exactly the weights moepress computes with."""
    _, _, out = checkpoints
    model = load_model(out[4])  # the stored format as it is (no runtime conversion)
    view = MoEView(model)
    cfg = model.config
    found = tensors(exported[4])
    assert {t.tensor_type.name for n, t in found.items() if "blk." in n and n.endswith(("_exps.weight", "attn_q.weight"))} \
        == {"Q4_1"}
    assert found["token_embd.weight"].tensor_type.name == "F16" and found["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    for layer in range(view.num_layers):
        store = view.experts(layer)
        for linear, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            ours = torch.stack([store.module.packed_weight(e, linear).blocks for e in range(store.num_experts)])
            theirs = torch.from_numpy(np.array(found[f"blk.{layer}.ffn_{name}_exps.weight"].data))
            assert torch.equal(theirs.reshape(ours.shape), ours)
        for unit in view.attention_units(layer):
            blocks = model.get_submodule(unit.module_path).blocks
            short = unit.name.rsplit(".", 1)[1]
            gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}[short]
            if short in ("q_proj", "k_proj"):
                blocks = _permuted(blocks, cfg.num_attention_heads if short == "q_proj" else cfg.num_key_value_heads)
            theirs = torch.from_numpy(np.array(found[f"blk.{layer}.{gguf_name}.weight"].data))
            assert torch.equal(theirs.reshape(blocks.shape), blocks)
            values = gguf.quants.dequantize(np.array(found[f"blk.{layer}.{gguf_name}.weight"].data),
                                            gguf.GGMLQuantizationType.Q4_1)
            weight = model.get_submodule(unit.module_path).dequantize()
            if short in ("q_proj", "k_proj"):
                weight = _permuted(weight, cfg.num_attention_heads if short == "q_proj" else cfg.num_key_value_heads)
            assert np.array_equal(values.reshape(weight.shape), weight.numpy())


@pytest.mark.skipif(converter_missing() is not None, reason=str(converter_missing()))
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_metadata_equal_llamacpps_converter_key_by_key(arch, request, references):
    """Against convert_hf_to_gguf.py on the same float model (with the pre-tokenizer the converter
    cannot recognise named gpt-2, as the export names it): every key and value equal. The one key
    we differ on, deliberately: ``general.file_type`` of a q4_1 file (the converter writes no q4_1:
    it says f16 for its f16 file; ours says MOSTLY_Q4_1, as llama-quantize would)."""
    source, _, _, exported = request.getfixturevalue(arch)
    reference = {outtype: metadata(path) for outtype, path in references[arch].items()}
    for ours, theirs, differ in ((exported[16], reference["f16"], set()), (exported[8], reference["q8_0"], set()),
                                 (exported[4], reference["f16"], {"general.file_type"})):
        mine = metadata(ours)
        assert set(mine) == set(theirs), set(mine) ^ set(theirs)
        different = {k for k in mine if mine[k] != theirs[k]}
        assert different == differ, {k: (mine[k], theirs[k]) for k in different}
    assert metadata(exported[4])["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    assert metadata(exported[4])["tokenizer.ggml.pre"] == "gpt-2"
    # and the same tensors, names and shapes (types: ours are moepress's)
    theirs = tensors(references[arch]["f16"])
    assert {n: list(t.shape) for n, t in tensors(exported[4]).items()} == {n: list(t.shape) for n, t in theirs.items()}




@pytest.mark.skipif(llamacpp_tools.missing("llama-perplexity") is not None,
                    reason=str(llamacpp_tools.missing("llama-perplexity")))
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_llama_perplexity_equals_moepress_on_the_exported_file(arch, request, tmp_path):
    """The zoo's tiny Mixtral (trained: a meaningful perplexity) and a random tiny OLMoE, compressed
    to q4_1 (the Mixtral's blocks refined: their float16 values tuned on each layer's output) and
    exported: llama-perplexity's figure on a text is within 1% of moepress's own on the same
    checkpoint, the same tokens and the same scoring (llama.cpp multiplies with 8-bit activations
    and an f16 KV cache; measured 0.02% apart on both)."""
    from transformers import AutoTokenizer

    from moepress.data import load_text

    source = os.path.join(os.path.dirname(__file__), "..", "zoo", "models", "tiny-mixtral") \
        if arch == "mixtral" else request.getfixturevalue("olmoe_dir")
    out = str(tmp_path / "q4")
    refine = 4 if arch == "mixtral" else 0
    moepress.compress(source, target="llamacpp", bits=4, calib_samples=16, seq_len=128, out=out, progress=False,
                      refine=refine)
    if refine:
        assert json.load(open(os.path.join(out, "moepress.json")))["refine"]["steps"] == refine
    path = export_gguf(out, str(tmp_path / "q4.gguf"))
    text = load_text("builtin:eval")[:100_000]
    (tmp_path / "eval.txt").write_text(text)
    n_ctx, chunks = 128, 20
    theirs = llamacpp_tools.perplexity(path, str(tmp_path / "eval.txt"), n_ctx, chunks)
    ids = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"]
    ours = llamacpp_protocol_ppl(moepress.load(out).eval(), ids, n_ctx, chunks)
    assert abs(theirs - ours) / ours < 0.01, (theirs, ours)


def test_what_the_export_refuses(checkpoints, tiny_model_dir, calib_file, tmp_path, capsys):
    _, _, out = checkpoints
    own = str(tmp_path / "own")
    moepress.compress(tiny_model_dir("mixtral"), bits=4, calib=calib_file, out=own, progress=False, **SMALL)
    line = run_cli(capsys, "export", "--model", own, "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert "is 4b-g128, moepress's own format, which llama.cpp cannot read" in line
    assert not (tmp_path / "x.gguf").exists()
    # (--target llamacpp refuses these two before compressing; a checkpoint made without the target,
    # its weights kept, reaches the export's own refusal)
    qwen = str(tmp_path / "qwen")  # the tiny Qwen3-MoE's dense layer 0: llama.cpp's qwen3moe has none
    moepress.compress(tiny_model_dir("qwen3_moe"), bits=16, calib=calib_file, out=qwen, progress=False, **SMALL)
    line = run_cli(capsys, "export", "--model", qwen, "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert "qwen3_moe: layers [0] have a dense MLP; llama.cpp's qwen3moe has an MoE block in every layer" in line
    phimoe = str(tmp_path / "phimoe")
    moepress.compress(tiny_model_dir("phimoe"), bits=16, calib=calib_file, out=phimoe, progress=False, **SMALL)
    line = run_cli(capsys, "export", "--model", phimoe, "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert "phimoe: llama.cpp's phimoe weights the top two experts by a softmax over all" in line
    (tmp_path / "there.gguf").write_bytes(b"")
    line = run_cli(capsys, "export", "--model", out[4], "--format", "gguf", "--out", str(tmp_path / "there.gguf"))
    assert "exists; pass --overwrite" in line
    assert main(["export", "--model", out[4], "--format", "gguf", "--out", str(tmp_path / "there.gguf"),
                 "--overwrite"]) == 0
    assert "tokenizer.ggml.tokens" in metadata(tmp_path / "there.gguf")


def test_an_interrupted_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    _, _, out = checkpoints
    calls = {"n": 0}
    original = gguf.GGUFWriter.write_tensor_data

    def dies_on_the_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(out[4], str(tmp_path / "model.gguf"))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(llamacpp_tools.missing("llama-perplexity") is not None,
                    reason=str(llamacpp_tools.missing("llama-perplexity")))
@pytest.mark.parametrize("bits, types", [(4, {"q4_K"}), (6, {"q6_K"}), (5, {"q5_K"}), (3, {"q3_K"}), (2, {"q2_K"})])
def test_k_quants_where_rows_are_256_wide(bits, types, tokenizer, tmp_path):
    """A tiny Mixtral whose hidden and expert sizes are multiples of 256: --bits picks the k-quant
    for every unit, the GGUF holds it, and llama-perplexity agrees with moepress within 1%."""
    from transformers import AutoTokenizer

    from moepress.data import load_text
    from moepress.model.tiny import build_tiny_model

    source = tmp_path / "wide"
    build_tiny_model("mixtral", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = str(tmp_path / "q")
    result = moepress.compress(str(source), target="llamacpp", bits=bits, calib_samples=8, seq_len=64, out=out,
                               progress=False)
    assert {t.label for t in result.units.values()} == types
    path = export_gguf(out, str(tmp_path / "q.gguf"))
    assert {t.tensor_type.name.lower() for n, t in tensors(path).items() if n.endswith("_exps.weight")} == \
        {t.lower() for t in types}
    text = load_text("builtin:eval")[:30_000]
    (tmp_path / "eval.txt").write_text(text)
    n_ctx, chunks = 128, 8
    theirs = llamacpp_tools.perplexity(path, str(tmp_path / "eval.txt"), n_ctx, chunks)
    ids = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"]
    ours = llamacpp_protocol_ppl(moepress.load(out).eval(), ids, n_ctx, chunks)
    assert abs(theirs - ours) / ours < 0.01, (theirs, ours)


def test_a_template_adding_no_special_token_means_no_bos(checkpoints, tmp_path):
    """A tokenizer whose post-processor template adds no special token (SmolLM2's) makes llama.cpp add
    no BOS either (tokenizer.ggml.add_bos_token false, as the converter writes for SmolLM2): else
    llama.cpp would prepend a token the model never saw."""
    import json
    import shutil

    _, _, out = checkpoints
    assert "tokenizer.ggml.add_bos_token" in metadata(export_gguf(out[16], str(tmp_path / "byte-level.gguf")))
    templated = tmp_path / "templated"
    shutil.copytree(out[16], templated)
    tok = json.loads((templated / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {}}
    (templated / "tokenizer.json").write_text(json.dumps(tok))
    found = metadata(export_gguf(str(templated), str(tmp_path / "templated.gguf")))
    assert found["tokenizer.ggml.add_bos_token"] is False
