"""QuantSpec, QuantizedWeight, RTN and batched GPTQ.

The GPTQ tests use *correlated*, non-isotropic calibration activations:
with isotropic X (H ~ I) GPTQ's error feedback does nothing and any bug in
it would go unnoticed.
"""

import math

import pytest
import torch

from moepress.quantize import (
    QuantizedWeight,
    QuantSpec,
    gptq_quantize,
    hessian_weighted_error,
    rtn_quantize,
)
from moepress.quantize.grid import find_params, quantize_codes


def correlated_hessian(E, C, n_tokens, seed, outliers=4):
    """H = X^T X per expert with X = Z A + noise: strongly correlated columns,
    a non-flat spectrum and a few outlier channels (as in real LLM inputs)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(E, n_tokens, C, generator=g)
    A = torch.randn(E, C, C, generator=g) / math.sqrt(C)
    X = Z @ A + 0.3 * torch.randn(E, n_tokens, C, generator=g)
    X[:, :, :outliers] *= 20
    return X.mT @ X


def rand_weight(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(*shape, generator=g)


def damped(H, damp_used):
    lam = damp_used * H.diagonal(dim1=-2, dim2=-1).mean(-1)
    return H + lam[..., None, None] * torch.eye(H.shape[-1])


# --------------------------------------------------------------------- spec
def test_spec_rejects_bad_bits():
    with pytest.raises(ValueError, match=r"bits must be one of 2, 3, 4, 8 \(got 5\)"):
        QuantSpec(bits=5)


def test_spec_rejects_bad_group_size():
    with pytest.raises(ValueError, match=r"group size must be 32, 64, 128 .*\(got 48\)"):
        QuantSpec(bits=4, group_size=48)


def test_spec_group_size_not_dividing_in_features():
    spec = QuantSpec(bits=4, group_size=128)
    with pytest.raises(ValueError) as ei:
        spec.check_in_features(96, "layers.0.experts.0.down_proj")
    assert str(ei.value) == (
        "group size 128 does not divide the input dimension 96 of layers.0.experts.0.down_proj; "
        "use a group size that divides it or per-channel (--group-size 0)"
    )
    spec.check_in_features(256, "x")  # fine
    # and the quantizers enforce it
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(4, 96), QuantSpec(4, 128, method="rtn"))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), spec)


def test_spec_other_validation_and_dict_round_trip():
    assert QuantSpec(bits=4, group_size=-1).group_size is None
    assert QuantSpec(bits=4, group_size=0).group_size is None
    assert QuantSpec(bits=3).maxq == 7
    for kwargs in ({"damp": -0.1}, {"method": "awq"}, {"method": "rtn", "act_order": True}, {"symmetric": 1}):
        with pytest.raises(ValueError):
            QuantSpec(bits=4, **kwargs)
    s = QuantSpec(bits=3, group_size=64, symmetric=True, act_order=True, damp=0.05)
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown quantization spec keys"):
        QuantSpec.from_dict({**s.to_dict(), "foo": 1})


# ---------------------------------------------------------------------- RTN
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_below_half_scale(bits, group_size, symmetric):
    W = torch.randn(3, 16, 128) * torch.logspace(-3, 0, 16)[:, None]  # rows of very different range
    W[0, 0, :] = 0.0  # an all-zero row must stay exactly zero
    W[1, 1, :] = W[1, 1, :].abs()  # an all-positive row
    qw = rtn_quantize(W, QuantSpec(bits, group_size, symmetric, method="rtn"))
    deq = qw.dequantize()
    assert deq.shape == W.shape and qw.scales.dtype == torch.float16
    scale = qw._per_column(qw.scales.float())
    # the fp16-stored scale is what the codes were computed against
    assert ((W - deq).abs() <= scale / 2 * (1 + 1e-5) + 1e-9).all()
    assert (deq[0, 0] == 0).all()
    assert (qw.zeros is None) == symmetric


def test_nbytes_3bit_group128_overhead():
    qw = rtn_quantize(rand_weight(8, 256, 512), QuantSpec(3, 128, method="rtn"))
    n_weights = 8 * 256 * 512
    bits_per_weight = qw.nbytes() * 8 / n_weights
    # exactly 3 bits per weight of codes + (16-bit scale + 3-bit zero) per 128 weights
    assert qw.qweight.shape == (8, 256, 192)
    assert bits_per_weight == pytest.approx(3 + 19 / 128, abs=1e-9)
    assert bits_per_weight < 3.25
    # symmetric drops the zeros
    qs = rtn_quantize(rand_weight(8, 256, 512), QuantSpec(3, 128, symmetric=True, method="rtn"))
    assert qs.nbytes() * 8 / n_weights == pytest.approx(3 + 16 / 128, abs=1e-9)


# --------------------------------------------------------- QuantizedWeight
def test_from_tensors_round_trip_and_select():
    W, H = rand_weight(4, 32, 128), correlated_hessian(4, 128, 256, seed=1)
    qw = gptq_quantize(W, H, QuantSpec(4, 32, act_order=True)).weight
    assert set(qw.tensors()) == {"qweight", "scales", "zeros", "g_idx"}
    assert qw.g_idx.dtype == torch.int16 and qw.g_idx.shape == (4, 128)
    back = QuantizedWeight.from_tensors({k: v.clone() for k, v in qw.tensors().items()}, qw.meta())
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert back.nbytes() == qw.nbytes()
    full = qw.dequantize(torch.float32)
    for e in range(4):
        assert torch.equal(qw.dequantize_expert(e), full[e])
        assert qw.select(e).shape == (32, 128)
    assert torch.equal(qw.select([2, 0]).dequantize(), full[[2, 0]])
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_from_tensors_rejects_corruption():
    qw = rtn_quantize(rand_weight(2, 8, 64), QuantSpec(3, 32, method="rtn"))
    t, meta = qw.tensors(), qw.meta()
    with pytest.raises(ValueError, match="qweight has shape"):
        QuantizedWeight.from_tensors({**t, "qweight": t["qweight"][..., :-1]}, meta)
    with pytest.raises(ValueError, match="scales has dtype"):
        QuantizedWeight.from_tensors({**t, "scales": t["scales"].float()}, meta)
    with pytest.raises(ValueError, match="zeros tensor is missing"):
        QuantizedWeight.from_tensors({"qweight": t["qweight"], "scales": t["scales"]}, meta)
    with pytest.raises(ValueError, match="missing 'bits'"):
        QuantizedWeight.from_tensors(t, {k: v for k, v in meta.items() if k != "bits"})
    bad_g = torch.full((2, 64), 5, dtype=torch.int16)
    with pytest.raises(ValueError, match="g_idx values"):
        QuantizedWeight.from_tensors({**t, "g_idx": bad_g}, meta)
    with pytest.raises(ValueError, match="qweight has shape"):
        QuantizedWeight.from_tensors(t, {**meta, "in_features": 72})
    with pytest.raises(ValueError, match="symmetric but a zeros"):
        QuantizedWeight.from_tensors(t, {**meta, "symmetric": True})


# --------------------------------------------------------------------- GPTQ
E, R, C = 2, 32, 256


@pytest.fixture(scope="module")
def calib():
    return rand_weight(E, R, C, seed=3), correlated_hessian(E, C, 512, seed=4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [128, None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", ["off", "dynamic", "static"])
def test_gptq_beats_rtn_on_correlated_activations(calib, bits, group_size, symmetric, act_order):
    W, H = calib
    ordered, static = QuantSpec.act_order_flags(act_order)
    res = gptq_quantize(W, H, QuantSpec(bits, group_size, symmetric, ordered, static_groups=static))
    rtn = rtn_quantize(W, QuantSpec(bits, group_size, symmetric, method="rtn"))
    err_gptq = hessian_weighted_error(W, res.weight.dequantize(), H)
    err_rtn = hessian_weighted_error(W, rtn.dequantize(), H)
    assert err_gptq.shape == (E,)
    # per expert, and by a clear margin (typically 0.25-0.4x)
    assert (err_gptq < 0.6 * err_rtn).all(), (err_gptq / err_rtn).tolist()
    # GPTQ's accumulated loss is exactly half the error under the damped Hessian
    # (sequential OBS updates telescope): checks the Cholesky factor, the error
    # feedback, the lazy block updates and the act_order un-permutation at once.
    expected = hessian_weighted_error(W, res.weight.dequantize(), damped(H, res.damp_used)) / 2
    torch.testing.assert_close(res.loss, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(res.damp_used, torch.full((E,), 0.01))
    if act_order == "dynamic" and group_size is not None:
        # each group holds exactly group_size columns, scattered by the permutation
        counts = torch.stack([torch.bincount(g.long(), minlength=C // group_size) for g in res.weight.g_idx])
        assert (counts == group_size).all()
    else:
        assert res.weight.g_idx is None


def naive_gptq_per_channel(w, h, bits, damp):
    """Textbook GPTQ without lazy blocks for one expert, per-channel asymmetric."""
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w.clone()
    scale, zero = find_params(w, bits, False)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        q = scale * (quantize_codes(w[:, j], scale, zero, bits) - zero)
        out[:, j] = q
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return out


def test_lazy_blocks_match_textbook_gptq():
    W, H = rand_weight(64, 96, seed=5), correlated_hessian(1, 96, 256, seed=6)[0]
    ref = naive_gptq_per_channel(W, H, 3, 0.01)
    got = gptq_quantize(W, H, QuantSpec(3), block_size=32).weight.dequantize()
    assert (torch.isclose(got, ref, atol=1e-5).float().mean() >= 0.999)


def test_batched_equals_per_expert():
    W, H = rand_weight(4, 48, 128, seed=7), correlated_hessian(4, 128, 256, seed=8)
    for spec in (QuantSpec(3, 32, act_order=True), QuantSpec(4, None, symmetric=True)):
        batched = gptq_quantize(W, H, spec, block_size=32)
        for e in range(4):
            alone = gptq_quantize(W[e], H[e], spec, block_size=32)
            assert alone.weight.lead_shape == () and alone.loss.shape == ()
            torch.testing.assert_close(
                batched.weight.dequantize_expert(e), alone.weight.dequantize(), atol=1e-5, rtol=0
            )
            same = (batched.weight.select(e).codes() == alone.weight.codes()).float().mean()
            assert same >= 0.999
            torch.testing.assert_close(batched.loss[e], alone.loss, rtol=1e-4, atol=1e-5)


def test_indefinite_hessian_triggers_damp_retry_only_for_that_expert():
    W, H = rand_weight(3, 32, 64, seed=9), correlated_hessian(3, 64, 256, seed=10)
    v = torch.randn(64, generator=torch.Generator().manual_seed(11))
    v /= v.norm()
    m = H[1].diagonal().mean()
    # make v^T H v = -0.5 * mean(diag) for expert 1: indefinite, damp 0.01 cannot fix it
    H[1] = H[1] - (v @ H[1] @ v + 0.5 * m) * torch.outer(v, v)
    assert torch.linalg.eigvalsh(H[1])[0] < -0.1 * H[1].diagonal().mean()
    res = gptq_quantize(W, H, QuantSpec(4, 32))
    assert res.damp_used[0] == pytest.approx(0.01) and res.damp_used[2] == pytest.approx(0.01)
    assert res.damp_used[1] > 0.01
    assert torch.isfinite(res.weight.dequantize()).all() and torch.isfinite(res.loss).all()
    # the healthy experts are untouched by expert 1's retries
    alone = gptq_quantize(W[2], H[2], QuantSpec(4, 32))
    torch.testing.assert_close(res.weight.dequantize_expert(2), alone.weight.dequantize(), atol=1e-5, rtol=0)


def test_rank_deficient_hessian_without_damp_is_retried():
    # 8 tokens for 64 inputs: H has rank 8; with damp=0 the first Cholesky must fail
    g = torch.Generator().manual_seed(12)
    X = torch.randn(2, 8, 64, generator=g)
    X[:, :, 32:] = X[:, :, :32]  # exactly duplicated inputs: singular
    H = X.mT @ X
    res = gptq_quantize(rand_weight(2, 16, 64, seed=13), H, QuantSpec(3, 32, damp=0.0))
    assert (res.damp_used > 0).all()
    assert torch.isfinite(res.weight.dequantize()).all()


def test_hopeless_hessian_names_the_expert():
    H = torch.eye(64).repeat(3, 1, 1)
    H[1, 0, 1] = H[1, 1, 0] = 1e7  # eigenvalue ~ -1e7 against a mean diagonal of 1
    with pytest.raises(ValueError, match=r"experts \[1\]"):
        gptq_quantize(rand_weight(3, 8, 64), H, QuantSpec(4), name="layers.3.experts")


def test_empty_expert_degrades_to_rtn_and_dead_columns_are_zero():
    W, H = rand_weight(3, 32, 128, seed=14), correlated_hessian(3, 128, 256, seed=15)
    H[1] = 0.0  # no calibration token routed to expert 1
    H[2, 5, :] = H[2, :, 5] = 0.0  # input 5 of expert 2 is always zero
    spec = QuantSpec(3, 32)
    res = gptq_quantize(W, H, spec)
    rtn = rtn_quantize(W[1], QuantSpec(3, 32, method="rtn"))
    assert torch.equal(res.weight.select(1).codes(), rtn.codes())
    assert torch.equal(res.weight.dequantize_expert(1), rtn.dequantize())
    assert (res.weight.dequantize_expert(2)[:, 5] == 0).all()
    assert torch.isfinite(res.loss).all()


def test_gptq_input_dtype_and_shape_checks():
    W, H = rand_weight(2, 16, 64).bfloat16(), correlated_hessian(2, 64, 128, seed=16)
    res = gptq_quantize(W, H, QuantSpec(4))  # computes in float32 whatever the input dtype
    assert res.weight.dequantize().dtype == torch.float32
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(W, H[:, :32, :32], QuantSpec(4))
    H[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"inf or nan for experts \[0\]"):
        gptq_quantize(W, H, QuantSpec(4))


def test_static_act_order_keeps_plain_bytes_and_fixes_grids_before_gptq():
    """Static act-order (llm-compressor's and GPTQModel's default): columns in act-order, each
    original group's grid fixed from the original weights, no group index stored. On inputs whose
    scales differ a lot across columns it beats storage-order GPTQ at exactly the same bytes."""
    g = torch.Generator().manual_seed(11)
    cols = 512
    x = torch.randn(2048, cols, generator=g) * torch.rand(cols, generator=g).pow(3) * 3
    x = x @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))
    H = (x.T @ x / len(x)).expand(2, cols, cols)
    W = torch.randn(2, 64, cols, generator=g)
    plain = gptq_quantize(W, H, QuantSpec(3, 128)).weight
    static = gptq_quantize(W, H, QuantSpec(3, 128, act_order=True, static_groups=True)).weight
    assert static.g_idx is None and static.nbytes() == plain.nbytes()
    assert (hessian_weighted_error(W, static.dequantize(), H) < 0.9 * hessian_weighted_error(W, plain.dequantize(), H)).all()
    # The grids are the round-to-nearest grids of the original weights, group by group.
    rtn = rtn_quantize(W, QuantSpec(3, 128, method="rtn"))
    assert torch.equal(static.scales, rtn.scales) and torch.equal(static.zeros, rtn.zeros)
    assert not QuantSpec(3, 128, act_order=True, static_groups=True).stores_group_index
    assert QuantSpec(3, 128, act_order=True).stores_group_index and not QuantSpec(3, None, act_order=True).stores_group_index
    with pytest.raises(ValueError, match="off, static or dynamic"):
        QuantSpec.act_order_flags("sometimes")
