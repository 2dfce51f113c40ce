"""Pruning patterns, Wanda / magnitude masks, batched SparseGPT and the SparseWeight storage.

The quality tests run on REAL activations of the trained zoo Mixtral (layer 0): on random
isotropic inputs H ~ I, Wanda, magnitude and SparseGPT coincide and an ordering between them
would prove nothing.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from moepress.prune import (
    SparseWeight,
    check_pattern,
    kept_per_row,
    magnitude_mask,
    sparsegpt_prune,
    sparsify,
    wanda_mask,
)
from moepress.quantize import QuantSpec, hessian_weighted_error

ZOO_MIXTRAL = Path(__file__).resolve().parent.parent / "zoo" / "models" / "tiny-mixtral"
PATTERNS = [dict(sparsity=0.5), dict(sparsity=0.37), dict(n=2, m=4), dict(n=4, m=8)]


def pattern_id(p):
    return f"{p['sparsity']:g}" if "sparsity" in p else f"{p['n']}:{p['m']}"


def correlated_hessian(E, C, n_tokens=256, seed=0):
    """H = X^T X per expert with correlated columns and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, n_tokens, C, generator=g) @ (torch.randn(E, C, C, generator=g) / math.sqrt(C))
    X = X + 0.3 * torch.randn(E, n_tokens, C, generator=g)
    X[:, :, :3] *= 10
    return X.mT @ X


def rand_weight(*shape, seed=0):
    return 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tied_weight(*shape, seed=0):
    """Weights with massive ties (5 distinct values): a threshold would keep the wrong count."""
    return 0.01 * torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).float()


def damped(H, damp_used):
    lam = damp_used * H.diagonal(dim1=-2, dim2=-1).mean(-1)
    return H + lam[..., None, None] * torch.eye(H.shape[-1])


def assert_pattern(mask, pattern):
    """Every row keeps exactly kept_per_row; for N:M every group of m columns keeps exactly n."""
    in_features = mask.shape[-1]
    assert mask.dtype == torch.bool
    assert (mask.sum(-1) == kept_per_row(in_features, **pattern)).all()
    if "m" in pattern:
        groups = mask.reshape(*mask.shape[:-1], in_features // pattern["m"], pattern["m"])
        assert (groups.sum(-1) == pattern["n"]).all()


# ------------------------------------------------------------------ patterns
@pytest.mark.parametrize(
    "pattern, in_features, says",
    [
        (dict(sparsity=0), 64, "strictly between 0 and 1"),
        (dict(sparsity=1), 64, "strictly between 0 and 1"),
        (dict(sparsity=1.5), 64, "strictly between 0 and 1"),
        (dict(sparsity=-0.1), 64, "strictly between 0 and 1"),
        (dict(sparsity=float("nan")), 64, "must be a number"),
        (dict(sparsity=0.001), 64, "prunes no weight"),
        (dict(sparsity=0.995), 64, "keeps no weight"),
        (dict(n=2, m=4), 66, "does not divide the input dimension 66"),
        (dict(n=4, m=4), 64, "0 < n < m"),
        (dict(n=5, m=4), 64, "0 < n < m"),
        (dict(n=0, m=4), 64, "0 < n < m"),
        (dict(n=1, m=1), 64, "m >= 2"),
        (dict(n=2), 64, "integers n and m"),
        (dict(sparsity=0.5, n=2, m=4), 64, "not both"),
        (dict(), 64, "give a sparsity"),
    ],
)
def test_bad_patterns_raise_one_line(pattern, in_features, says):
    args = dict(sparsity=None, n=None, m=None) | pattern
    with pytest.raises(ValueError) as ei:
        check_pattern(args["sparsity"], args["n"], args["m"], in_features, "layers.0.attn.q_proj")
    msg = str(ei.value)
    assert "\n" not in msg and "layers.0.attn.q_proj" in msg and says in msg


def test_every_entry_point_checks_the_pattern():
    W, H = rand_weight(8, 66), correlated_hessian(1, 66)[0]
    for call in (
        lambda: magnitude_mask(W, sparsity=1.0, name="u"),
        lambda: wanda_mask(W, H.diagonal(), n=2, m=4, name="u"),
        lambda: sparsegpt_prune(W, H, sparsity=0, name="u"),
    ):
        with pytest.raises(ValueError, match="^u: "):
            call()


def test_sparsegpt_refuses_act_order_in_one_line():
    W, H = rand_weight(8, 64), correlated_hessian(1, 64)[0]
    with pytest.raises(ValueError) as ei:
        sparsegpt_prune(W, H, sparsity=0.5, spec=QuantSpec(bits=4, act_order=True), name="layers.0.attn.o_proj")
    assert "\n" not in str(ei.value) and "layers.0.attn.o_proj" in str(ei.value) and "act-order" in str(ei.value)


def test_kept_per_row():
    assert kept_per_row(64, sparsity=0.5) == 32
    assert kept_per_row(96, sparsity=0.37) == 96 - 36  # round(35.52)
    assert kept_per_row(64, n=2, m=4) == 32
    assert kept_per_row(64, n=3, m=8) == 24


# ------------------------------------------------------------- exact patterns
def sparsegpt_mask(W, H, pattern, spec=None):
    # block 40 is rounded up (to 40 or 64 with groups of 32) and leaves a short last block of 96
    return sparsegpt_prune(W, H, spec=spec, block_size=40, **pattern).weight.mask_bool()


METHODS = {
    "magnitude": lambda W, H, p: magnitude_mask(W, **p),
    "wanda": lambda W, H, p: wanda_mask(W, H.diagonal(dim1=-2, dim2=-1), **p),
    "sparsegpt": lambda W, H, p: sparsegpt_mask(W, H, p),
    "sparsegpt-4bit": lambda W, H, p: sparsegpt_mask(W, H, p, QuantSpec(bits=4, group_size=32)),
}


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_id)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batched", [True, False], ids=["E3", "single"])
def test_exact_sparsity_per_row_and_n_m(method, pattern, batched):
    W, H = tied_weight(3, 8, 96), correlated_hessian(3, 96)
    if not batched:
        W, H = W[0], H[0]
    mask = METHODS[method](W, H, pattern)
    assert mask.shape == W.shape
    assert_pattern(mask, pattern)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)], ids=pattern_id)
def test_wanda_and_magnitude_keep_the_highest_scores_of_each_row(pattern):
    W, H = rand_weight(2, 8, 64), correlated_hessian(2, 64)
    sq = H.diagonal(dim1=-2, dim2=-1)
    for mask, score in ((wanda_mask(W, sq, **pattern), W.abs() * sq.sqrt().unsqueeze(-2)),
                        (magnitude_mask(W, **pattern), W.abs())):
        if "m" in pattern:  # the comparison is within each group of m columns
            mask, score = mask.reshape(2, 8, 16, 4), score.reshape(2, 8, 16, 4)
        kept_min = score.masked_fill(~mask, float("inf")).amin(-1)
        pruned_max = score.masked_fill(mask, -float("inf")).amax(-1)
        assert (kept_min >= pruned_max).all()


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    """H = I: no correlation to compensate through, the OBS saliency is w^2 up to a constant."""
    W = rand_weight(3, 8, 64)
    H = torch.eye(64).expand(3, 64, 64)
    result = sparsegpt_prune(W, H, sparsity=0.5, block_size=64)
    mask = magnitude_mask(W, sparsity=0.5)
    assert torch.equal(result.weight.mask_bool(), mask)
    assert torch.equal(result.weight.dequantize(), W * mask)


@pytest.mark.parametrize("spec", [None, QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, symmetric=True)],
                         ids=["prune", "4bit-g32", "3bit-sym-channel"])
@pytest.mark.parametrize("pattern", [dict(sparsity=0.37), dict(n=2, m=4)], ids=pattern_id)
def test_sparsegpt_loss_is_the_error_of_the_stored_weight(pattern, spec):
    """trace(D H_damped D^T) = 2 * loss exactly for OBS updates (D = Err U, U H U^T = I): this
    holds only if dequantize() returns exactly what the column loop decided."""
    W, H = rand_weight(3, 16, 96), correlated_hessian(3, 96)
    result = sparsegpt_prune(W, H, spec=spec, block_size=40, **pattern)
    err = hessian_weighted_error(W, result.weight.dequantize(), damped(H, result.damp_used))
    torch.testing.assert_close(err, 2 * result.loss, rtol=1e-4, atol=0)


# ------------------------------------------------------ quality on real inputs
@pytest.fixture(scope="module")
def zoo_units():
    """(weight, H = X^T X) of layer 0's q_proj and fused experts, from a few hundred real tokens."""
    if not (ZOO_MIXTRAL / "model.safetensors").exists():
        pytest.skip("zoo/models/tiny-mixtral is not built (run zoo/tiny_mixtral.py)")
    import moepress  # noqa: F401  (registers moepress with transformers; harmless here)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moepress.data import load_text

    model = AutoModelForCausalLM.from_pretrained(ZOO_MIXTRAL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ZOO_MIXTRAL)
    ids = tokenizer(load_text("builtin:calib")[:20_000], return_tensors="pt").input_ids[:, :512]
    layer, seen = model.model.layers[0], {}

    def q_input(module, args):
        seen["q"] = args[0].reshape(-1, args[0].shape[-1])

    def expert_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["routes"] = args[1] if len(args) > 1 else kwargs["top_k_index"]

    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(q_input),
             layer.mlp.experts.register_forward_pre_hook(expert_input, with_kwargs=True)]
    with torch.no_grad():
        model(ids.reshape(2, -1))
    for h in hooks:
        h.remove()
    experts = layer.mlp.experts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    H_gate_up, H_down = [], []
    for e in range(gate_up.shape[0]):
        x = seen["x"][(seen["routes"] == e).any(-1)]
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * up  # what down_proj of expert e sees
        H_gate_up.append(x.T @ x)
        H_down.append(hidden.T @ hidden)
    return {
        "q_proj": (layer.self_attn.q_proj.weight.detach(), seen["q"].T @ seen["q"]),
        "experts.gate_up_proj": (gate_up, torch.stack(H_gate_up)),
        "experts.down_proj": (down, torch.stack(H_down)),
    }


UNITS = ["q_proj", "experts.gate_up_proj", "experts.down_proj"]
QUALITY_PATTERNS = [dict(sparsity=0.5), dict(n=2, m=4)]


@pytest.mark.parametrize("pattern", QUALITY_PATTERNS, ids=pattern_id)
@pytest.mark.parametrize("unit", UNITS)
def test_sparsegpt_beats_wanda_beats_magnitude_on_real_activations(zoo_units, unit, pattern):
    W, H = zoo_units[unit]
    sparse_gpt = sparsegpt_prune(W, H, name=unit, **pattern).weight.dequantize()
    wanda = W * wanda_mask(W, H.diagonal(dim1=-2, dim2=-1), **pattern)
    magnitude = W * magnitude_mask(W, **pattern)
    errors = [hessian_weighted_error(W, pruned, H) for pruned in (sparse_gpt, wanda, magnitude)]
    # per expert: every expert's own reconstruction, not just the sum
    assert (errors[0] < errors[1]).all() and (errors[1] < errors[2]).all(), errors


@pytest.mark.parametrize("pattern", QUALITY_PATTERNS, ids=pattern_id)
@pytest.mark.parametrize("unit", UNITS)
def test_joint_sparsegpt_4bit_beats_wanda_plus_rtn(zoo_units, unit, pattern):
    W, H = zoo_units[unit]
    spec = QuantSpec(bits=4, group_size=32)
    joint = sparsegpt_prune(W, H, spec=spec, name=unit, **pattern).weight
    baseline = sparsify(W, wanda_mask(W, H.diagonal(dim1=-2, dim2=-1), **pattern), spec)
    assert (hessian_weighted_error(W, joint.dequantize(), H) < hessian_weighted_error(W, baseline.dequantize(), H)).all()
    for sw in (joint, baseline):
        dense, mask = sw.dequantize(), sw.mask_bool()
        assert_pattern(mask, pattern)
        assert (dense[~mask] == 0).all()
        assert_on_grid(sw, dense, mask)


def assert_on_grid(sw: SparseWeight, dense, mask):
    """Every kept value is scale * (code - zero) for an integer code in [0, maxq] of its group."""
    gs = sw.group_size or sw.in_features
    scale = sw.scales.float().repeat_interleave(gs, dim=-1)
    zero = sw.zeros.float().repeat_interleave(gs, dim=-1) if sw.zeros is not None else 2.0 ** (sw.bits - 1)
    code = (dense / scale + zero).expand(mask.shape)[mask]
    assert (code - code.round()).abs().max() < 1e-3
    assert code.round().min() >= 0 and code.round().max() <= 2**sw.bits - 1


# ------------------------------------------------------------------- storage
def storage_cases():
    W, H = rand_weight(3, 8, 64), correlated_hessian(3, 64)
    mask = wanda_mask(W, H.diagonal(dim1=-2, dim2=-1), sparsity=0.5)
    return {
        "bf16-prune": sparsify(W.bfloat16(), mask),
        "4bit-g32": sparsify(W, mask, QuantSpec(bits=4, group_size=32)),
        "3bit-sym-channel": sparsify(W, mask, QuantSpec(bits=3, symmetric=True)),
        "sparsegpt-2:4-8bit": sparsegpt_prune(W, H, n=2, m=4, spec=QuantSpec(bits=8, group_size=32)).weight,
        "sparsegpt-0.37": sparsegpt_prune(W, H, sparsity=0.37).weight,
    }


@pytest.mark.parametrize("case", list(storage_cases()))
def test_sparse_weight_round_trip(case):
    sw = storage_cases()[case]
    back = SparseWeight.from_tensors(dict(sw.tensors()), json.loads(json.dumps(sw.meta())), name="u")
    assert torch.equal(back.dequantize(), sw.dequantize())
    assert sw.nbytes() == sum(t.numel() * t.element_size() for t in sw.tensors().values())
    assert torch.equal(sw.select(1).dequantize(), sw.dequantize()[1])
    assert torch.equal(sw.select([2, 0]).dequantize(), sw.dequantize()[[2, 0]])
    assert torch.equal(sw.to("cpu").dequantize(), sw.dequantize())
    assert sw.sparsity == 1 - sw.kept_per_row / 64


def test_prune_only_storage_keeps_the_weights_exactly_at_9_bits():
    W = rand_weight(3, 8, 64).bfloat16()
    mask = magnitude_mask(W, sparsity=0.5)
    sw = sparsify(W, mask)
    assert sw.values.dtype == torch.bfloat16
    assert torch.equal(sw.dequantize(torch.bfloat16), W * mask)
    # 16 bits for each of the half kept + a 1-bit mask for every weight
    assert sw.nbytes() * 8 / W.numel() == 9.0
    assert sw.nbytes() < W.numel() * 2


def corrupt(tensors, key, fn):
    out = dict(tensors)
    out[key] = fn(out[key])
    return out


def flip_one_bit_of_row_0(mask):
    mask = mask.clone()
    mask[0, 0, 0] ^= 1
    return mask


@pytest.mark.parametrize(
    "case, make_bad, names",
    [
        ("bf16-prune", lambda t: corrupt(t, "values", lambda v: v[..., :-1]), "values has shape"),
        ("bf16-prune", lambda t: corrupt(t, "values", lambda v: v.to(torch.int16)), "values has dtype"),
        ("bf16-prune", lambda t: corrupt(t, "mask", lambda v: v.to(torch.int16)), "mask has dtype"),
        ("bf16-prune", lambda t: corrupt(t, "mask", lambda v: v[..., :-1]), "mask has shape"),
        ("bf16-prune", lambda t: corrupt(t, "mask", flip_one_bit_of_row_0), "mask rows keep"),
        ("bf16-prune", lambda t: t | {"scales": torch.ones(3, 8, 1, dtype=torch.float16)}, "'scales'"),
        ("bf16-prune", lambda t: t | {"extra": torch.ones(1)}, "unexpected tensors ['extra']"),
        ("4bit-g32", lambda t: corrupt(t, "scales", lambda v: v.float()), "scales has dtype"),
        ("4bit-g32", lambda t: corrupt(t, "scales", lambda v: v[..., :1]), "scales has shape"),
        ("4bit-g32", lambda t: corrupt(t, "qvalues", lambda v: v[..., :-1]), "qvalues has shape"),
        ("4bit-g32", lambda t: corrupt(t, "zeros", lambda v: v.to(torch.int32)), "zeros has dtype"),
        ("4bit-g32", lambda t: {k: v for k, v in t.items() if k != "zeros"}, "missing tensor 'zeros'"),
        ("4bit-g32", lambda t: corrupt(t, "mask", flip_one_bit_of_row_0), "mask rows keep"),
    ],
)
def test_corrupt_tensors_raise_naming_the_tensor(case, make_bad, names):
    sw = storage_cases()[case]
    with pytest.raises(ValueError) as ei:
        SparseWeight.from_tensors(make_bad(sw.tensors()), sw.meta(), name="layers.1.experts.down_proj")
    msg = str(ei.value)
    assert "\n" not in msg and "layers.1.experts.down_proj" in msg and names in msg


def test_mask_padding_bits_are_refused():
    W = rand_weight(4, 12)  # 12 columns: the second mask byte has 4 padding bits
    sw = sparsify(W, magnitude_mask(W, sparsity=0.5))
    bad = corrupt(sw.tensors(), "mask", lambda v: v | torch.tensor([0, 0x80], dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask sets padding bits"):
        SparseWeight.from_tensors(bad, sw.meta(), name="u")


def test_sparsify_refuses_ragged_masks():
    W = rand_weight(4, 16)
    mask = magnitude_mask(W, sparsity=0.5)
    mask[0, mask[0].nonzero()[0]] = False  # row 0 keeps one less
    with pytest.raises(ValueError, match="same number of weights"):
        sparsify(W, mask, name="u")


def test_mask_packing_layout_and_round_trip():
    """Column 8*j + b is bit b of byte j (pack_bits' little-endian layout at 1 bit)."""
    from moepress.prune import pack_mask, unpack_mask

    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = mask[1, 7] = True
    packed = pack_mask(mask)
    assert packed.tolist() == [[1, 2], [128, 0]]
    assert torch.equal(unpack_mask(packed, 10), mask)


def test_kept_per_row_is_read_back_when_not_given():
    """Callers that hold the tensors (runtime buffers) build a SparseWeight without k."""
    for case in ("bf16-prune", "4bit-g32"):
        sw = storage_cases()[case]
        rebuilt = SparseWeight(**{f: getattr(sw, f) for f in ("mask", "values", "qvalues", "scales", "zeros", "bits",
                                                             "group_size", "in_features", "out_features")})
        assert rebuilt.kept_per_row == sw.kept_per_row
        assert torch.equal(rebuilt.dequantize(), sw.dequantize())
