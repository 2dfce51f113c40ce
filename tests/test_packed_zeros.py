"""Zero points stored at the codes' own width (checkpoint format 3): exact round trips for plain and
fused weights, dense and sparse; format 1/2 checkpoints (one uint8 per group) still load to the same
weights; a corrupt zeros tensor is refused by name; the bytes saved are (8 - bits)/group_size bits
per weight."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import moepress
from moepress.errors import MoepressError
from moepress.export.checkpoint import read_tensors
from moepress.export.format import FORMAT_VERSION
from moepress.prune.sparse import SparseWeight
from moepress.quantize import QuantizedWeight, QuantSpec, rtn_quantize
from moepress.quantize.packing import pack_matrix, packed_width, unpack_matrix
from moepress.runtime.packed_weight import PackedWeight
from moepress.treatment import Treatment

from .helpers import legacy_copy

SMALL = dict(calib_samples=4, seq_len=64, batch_size=4, progress=False, method="rtn")


def random_weight(bits: int, lead=(), out=12, in_=160, group_size=32, seed=0) -> QuantizedWeight:
    """Random codes, scales and zero points: 160 columns in groups of 32 is 5 groups a row, and
    out*5 = 60 zeros per matrix, not a multiple of 8, so every packed run carries padding."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size is None else -(-in_ // group_size)
    codes = torch.randint(0, 2**bits, (*lead, out, in_), generator=g)
    scales = torch.rand(*lead, out, n_groups, generator=g) + 0.01
    zeros = torch.randint(0, 2**bits, (*lead, out, n_groups), generator=g)
    zeros[..., 0, 0] = 2**bits - 1  # the extreme codes are stored too
    zeros[..., -1, -1] = 0
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, group_size)


# ------------------------------------------------------------------------ the layout
def test_pack_matrix_layout_is_pack_bits_over_the_flattened_matrix():
    """2-bit zeros z_0..z_7 of a [2, 4] matrix form one 16-bit word sum z_k << 2k, low byte first."""
    z = torch.tensor([[3, 0, 1, 2], [2, 2, 0, 1]], dtype=torch.uint8)
    word = sum(int(v) << (2 * k) for k, v in enumerate(z.flatten()))
    packed = pack_matrix(z, 2)
    assert packed.tolist() == [word & 0xFF, word >> 8]
    assert torch.equal(unpack_matrix(packed, 2, 2, 4), z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("lead", [(), (3,)], ids=["linear", "experts"])
def test_zeros_round_trip_exactly_through_a_file(bits, lead, tmp_path):
    q = random_weight(bits, lead)
    stored = q.tensors()
    # bits bits per zero, each matrix's 60 zeros padded once to 64: ceil(60/8)*bits bytes
    assert stored["zeros"].dtype == torch.uint8 and tuple(stored["zeros"].shape) == (*lead, 8 * bits)
    assert q.nbytes() == sum(t.numel() * t.element_size() for t in stored.values())
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp_path / "w.safetensors"))
    back = QuantizedWeight.from_tensors(load_file(str(tmp_path / "w.safetensors")), json.loads(json.dumps(q.meta())))
    assert torch.equal(back.zeros, q.zeros) and back.zeros.shape == (*lead, 12, 5)
    assert torch.equal(back.dequantize(), q.dequantize())
    module = PackedWeight(q)  # the module a model holds: the packed bytes, as stored
    assert torch.equal(module.zeros, stored["zeros"]) and module.nbytes() == q.nbytes()
    assert torch.equal(module.quantized().zeros, q.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_bytes_saved_are_8_minus_bits_per_group(bits):
    q = random_weight(bits, (2,), out=16, in_=512, group_size=128)  # 16*4 zeros a matrix: no padding
    legacy = q.zeros.numel()  # formats 1 and 2: one uint8 per group
    assert legacy * 8 - q.stored_zeros().numel() * 8 == (8 - bits) * q.zeros.numel()
    t = Treatment.quantize(bits, 128, symmetric=False, act_order="off")
    assert t.nbytes(16, 512) * 2 == q.nbytes()


def test_per_channel_zeros_are_not_padded_per_row():
    q = random_weight(2, (), out=64, in_=96, group_size=None)
    assert q.stored_zeros().numel() == 64 * 2 // 8  # 2 bits a row, not a row padded to 8 zeros


def sparse_weight(bits: int) -> SparseWeight:
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 12, 160, generator=g).argsort(-1) < 80  # 80 of 160 kept in every row
    codes = torch.randint(0, 2**bits, (2, 12, 80), generator=g)
    zeros = torch.randint(0, 2**bits, (2, 12, 5), generator=g)
    return SparseWeight.from_kept(keep, codes=codes, scales=torch.rand(2, 12, 5) + 0.1, zeros=zeros, bits=bits,
                                  group_size=32)


@pytest.mark.parametrize("bits", [2, 3])
def test_sparse_quantized_zeros_round_trip(bits):
    sw = sparse_weight(bits)
    stored = sw.tensors()
    assert tuple(stored["zeros"].shape) == (2, packed_width(60, bits))
    assert sw.nbytes() == sum(t.numel() * t.element_size() for t in stored.values())
    back = SparseWeight.from_tensors(dict(stored), sw.meta(), name="w")
    assert torch.equal(back.zeros, sw.zeros) and torch.equal(back.dequantize(), sw.dequantize())
    legacy = SparseWeight.from_tensors({**stored, "zeros": sw.zeros.clone()}, sw.meta(), name="w")
    assert torch.equal(legacy.dequantize(), sw.dequantize())
    with pytest.raises(ValueError, match="corrupt sparse weight w: zeros has shape"):
        SparseWeight.from_tensors({**stored, "zeros": stored["zeros"][..., 1:]}, sw.meta(), name="w")


def test_format_1_2_zeros_read_and_anything_else_refused():
    q = random_weight(3, (2,))
    meta = q.meta()
    legacy = {**q.tensors(), "zeros": q.zeros.clone()}  # [2, 12, 5] uint8: formats 1 and 2
    assert torch.equal(QuantizedWeight.from_tensors(legacy, meta).dequantize(), q.dequantize())
    too_big = q.zeros.clone()
    too_big[0, 0, 0] = 8
    with pytest.raises(ValueError, match="zeros exceed the 3-bit range"):
        QuantizedWeight.from_tensors({**legacy, "zeros": too_big}, meta)
    stored = q.tensors()
    for shape in [(2, 23), (2, 12, 3), (24,)]:
        with pytest.raises(ValueError, match=r"corrupt quantized weight w: zeros has shape .* \(zero points packed"):
            QuantizedWeight.from_tensors({**stored, "zeros": torch.zeros(shape, dtype=torch.uint8)}, meta, name="w")
    with pytest.raises(ValueError, match="zeros has dtype"):
        QuantizedWeight.from_tensors({**stored, "zeros": stored["zeros"].to(torch.int16)}, meta)
    padded = stored["zeros"].clone()
    padded[:, -1] |= 0x80  # a bit of the last (padding) zero
    with pytest.raises(ValueError, match="padding codes are not 0"):
        QuantizedWeight.from_tensors({**stored, "zeros": padded}, meta)


def test_held_weights_pack_format_1_2_zeros_as_they_load():
    """A module told to expect format 1/2's zeros loads them and holds them packed after validate()."""
    from moepress.runtime.sparse_weight import SparsePackedWeight

    dense, sparse = random_weight(3), sparse_weight(2).select(0)
    for module, zeros in [(PackedWeight(dense), dense.zeros), (SparsePackedWeight(sparse), sparse.zeros)]:
        fresh = type(module)(dense if isinstance(module, PackedWeight) else sparse)
        fresh.expect_legacy_zeros()
        fresh.load_state_dict({**module.state_dict(), "zeros": zeros.clone()})
        fresh.validate("w")
        assert torch.equal(fresh.zeros, module.zeros) and fresh.zeros.ndim == 1
        assert torch.equal(fresh.dequantize(), module.dequantize()) and fresh.nbytes() == module.nbytes()


def test_kernel_layouts_read_the_packed_zeros():
    """The fast CPU kernels and the Triton layout unpack a held weight's zeros (their own copy)."""
    from moepress.runtime.kernels import build_fused, build_matmul
    from moepress.runtime.triton_moe import ExpertMatrices, choose_unit

    weights = [PackedWeight(random_weight(b, (), out=24, in_=256, group_size=32, seed=b)) for b in (2, 3, 4, 8)]
    layout = ExpertMatrices(weights, choose_unit(weights))
    x = torch.randn(3, 256)
    for i, w in enumerate(weights):
        assert torch.equal(layout.matrix(i).zeros, w.zero_points())
        kernel = build_matmul(w, torch.float32, exact=True)
        torch.testing.assert_close(kernel(x), x @ w.dequantize().T)
    pair = [PackedWeight(random_weight(4, (), out=24, in_=256, group_size=32, seed=s)) for s in (5, 6)]
    fused = build_fused(pair, torch.bfloat16)  # one int4 kernel over both weights' rows
    assert fused is not None and fused.kind.startswith("int4")
    want = x.bfloat16().float() @ torch.cat([p.dequantize() for p in pair]).T
    assert (fused(x.bfloat16()).float() - want).abs().max() <= 1e-2 * want.abs().max()  # bf16 arithmetic


# ------------------------------------------------------------------------ checkpoints
MIXED = {0: "3b-g32", 1: "4b-ch", 2: "8b-g64"}  # expert -> option; every other linear 2b-g128


def unit_weights(model) -> dict:
    """Canonical unit name -> the model's weight there (a float tensor, or the packed module)."""
    view = moepress.MoEView(model)
    found = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            module = model.get_submodule(unit.module_path)
            found[unit.name] = module if isinstance(module, PackedWeight) else module.weight.float()
        store = view.experts(layer)
        for e in range(store.num_experts if store is not None else 0):
            for linear in ("gate_proj", "up_proj", "down_proj"):
                found[store.unit_name(e, linear)] = (store.module.packed_weight(e, linear) if store.layout == "packed"
                                                     else store.weight(linear)[e].float())
    return found


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    return tiny_model_dir("mixtral")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, source, calib_file):
    """The tiny Mixtral (fused experts), RTN, asymmetric: 2 bits group 128 except three experts at
    3 bits group 32, 4 bits per channel and 8 bits group 64."""
    import yaml

    units = {}
    view = moepress.MoEView(moepress.load(source, runtime="reference"))
    for layer in range(view.num_layers):
        units.update({unit.name: "2b-g128" for unit in view.linear_units(layer)})
        units.update({f"layers.{layer}.experts.{e}": MIXED.get(e, "2b-g128") for e in range(view.experts(layer).num_experts)})
    plan = tmp_path_factory.mktemp("plan") / "plan.yaml"
    plan.write_text(yaml.safe_dump({"moepress_plan": 1, "quantization": {"method": "rtn", "symmetric": False},
                                    "units": units}))
    out = str(tmp_path_factory.mktemp("zeros") / "out")
    moepress.compress(source, plan=str(plan), calib=calib_file, out=out, **SMALL)
    return out


def test_checkpoint_stores_rtns_zero_points_packed(checkpoint, source):
    """Every unit's zero points, through compress -> save -> load, are RTN's of the source weight,
    stored at the unit's width."""
    record = json.load(open(os.path.join(checkpoint, "moepress.json")))
    assert record["format_version"] == FORMAT_VERSION == 3
    originals, loaded = unit_weights(moepress.load(source, runtime="reference")), unit_weights(
        moepress.load(checkpoint, runtime="reference"))
    widths = set()
    for name, module in loaded.items():
        t = Treatment.from_unit_map(record["units"][name])
        want = rtn_quantize(originals[name], QuantSpec(t.bits, t.group_size, symmetric=False, method="rtn"))
        assert module.zeros.shape == (packed_width(module.out_features * want.n_groups, t.bits),), name
        assert torch.equal(module.zero_points(), want.zeros), name
        assert torch.equal(module.dequantize(), want.dequantize()), name
        widths.add((t.bits, t.group_size))
    assert widths == {(2, 128), (3, 32), (4, None), (8, 64)}


def test_format_2_checkpoint_loads_to_the_same_weights(checkpoint, tmp_path):
    old = legacy_copy(checkpoint, str(tmp_path / "v2"))
    stored = read_tensors(old)["model.layers.0.mlp.experts.0.down_proj.zeros"]
    assert stored.shape == (128, 4)  # 128 rows, 4 groups of 32: one uint8 each
    new, back = unit_weights(moepress.load(checkpoint, runtime="reference")), unit_weights(
        moepress.load(old, runtime="reference"))
    for name, module in new.items():
        assert torch.equal(back[name].zeros, module.zeros), name  # packed as it loaded
        assert torch.equal(back[name].dequantize(), module.dequantize()), name
    fast = moepress.load(old)  # the CPU kernels built from the loaded weights
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, moepress.load(checkpoint)(ids).logits, rtol=0, atol=0)


def test_zeros_in_the_other_formats_layout_are_refused_by_name(checkpoint, tmp_path):
    """The format version says the layout; zeros in the other one are refused, naming the tensor."""
    name = re.escape("model.layers.0.mlp.experts.0.down_proj.zeros")  # the first in order: 3 bits, 4 groups
    old_zeros_as_3 = legacy_copy(checkpoint, str(tmp_path / "v3-old-zeros"), version=3)
    with pytest.raises(MoepressError, match=name + r" is stored as \[128, 4\] U8, the unit map and config imply "
                                                 r"\[192\] U8.*format_version"):
        moepress.load(old_zeros_as_3)
    packed = {k: v for k, v in read_tensors(checkpoint).items() if k.endswith(".zeros")}
    packed_as_2 = replaced_copy(legacy_copy(checkpoint, str(tmp_path / "v2")), str(tmp_path / "v2-packed"), packed)
    with pytest.raises(MoepressError, match=name + r" is stored as \[192\] U8, the unit map and config imply \[128, 4\]"):
        moepress.load(packed_as_2)


def test_corrupt_zeros_are_refused_by_name(checkpoint, tmp_path):
    name = "model.layers.1.self_attn.q_proj.zeros"
    stored = read_tensors(checkpoint)[name]
    short = replaced_copy(checkpoint, str(tmp_path / "short"), {name: stored[:-1].clone()})
    with pytest.raises(MoepressError, match=re.escape(f"tensor {name} is stored as [{stored.numel() - 1}] U8")):
        moepress.load(short)
    old = legacy_copy(checkpoint, str(tmp_path / "v2"))
    legacy = read_tensors(old)[name].clone()
    legacy[3, 0] = 4  # no 2-bit code
    bad = replaced_copy(old, str(tmp_path / "range"), {name: legacy})
    with pytest.raises(MoepressError, match=re.escape("model.layers.1.self_attn.q_proj: zeros exceed the 2-bit range")):
        moepress.load(bad)


def test_two_bit_group_128_bits_per_param_drop_by_6_over_128(tmp_path, source, calib_file):
    """Uniform 2 bits, group 128, asymmetric: (16 + 2)/128 bits per weight beside the codes, where
    formats 1/2 spent (16 + 8)/128: 6/128 = 0.046875 bits/param less, on disk and in memory."""
    out = str(tmp_path / "2b")
    result = moepress.compress(source, bits=2, group_size=128, calib=calib_file, out=out, **SMALL)
    params = result.footprint().linear_params
    assert result.footprint().bits_per_param == 2 + 18 / 128
    old = legacy_copy(out, str(tmp_path / "v2"))
    zero_bytes = [sum(t.numel() for k, t in read_tensors(p).items() if k.endswith(".zeros")) for p in (old, out)]
    assert (zero_bytes[0] - zero_bytes[1]) * 8 == params * 6 / 128
    from moepress.evaluate import measure_footprint

    assert measure_footprint(moepress.load(old, runtime="reference")).bits_per_param == 2 + 18 / 128


def replaced_copy(src: str, dst: str, replace: dict) -> str:
    """A copy of checkpoint ``src`` with the tensors in ``replace`` stored instead of its own."""
    import shutil

    shutil.copytree(src, dst)
    for file in glob.glob(os.path.join(dst, "*.safetensors")):
        state = load_file(file)
        state.update({k: v for k, v in replace.items() if k in state})
        save_file(state, file, metadata={"format": "pt"})
    return dst
