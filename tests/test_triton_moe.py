"""The Triton routed-experts kernel (moepress.runtime.triton_moe) computes what the reference runtime
computes, for every width and a mix of widths in one launch, and its repacking is exact.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton
is imported) on CPU tensors, so the shapes are tiny; with one they run compiled on it. Tolerances:
in float32 the kernel dequantizes the reference's weights bit for bit and only sums in another
order (and computes SiLU as x * sigmoid(x)), so outputs agree to float32 rounding (1e-5 of the
output's scale). In half precision the bound is the reference's own rounding (its outputs against
float32) times 2. bfloat16 is checked on a GPU only: Triton 3.6's interpreter multiplies bfloat16
matrices wrongly (a 16x16 ``tl.dot`` is off by 1e10), which says nothing about the compiled kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import

pytest.importorskip("triton", reason="triton is not installed (pip install 'moepress[gpu]'): the Triton "
                                     "expert kernel is not tested")

from transformers.activations import ACT2FN  # noqa: E402

from moepress.quantize import QuantizedWeight  # noqa: E402
from moepress.runtime import PackedExperts  # noqa: E402
from moepress.runtime.kept_weight import KeptWeight  # noqa: E402
from moepress.runtime.triton_moe import (  # noqa: E402
    ExpertMatrices, KernelConfig, TritonExperts, choose_unit, pack_codes, prepare_cuda, unpack_codes)

DEVICE = "cuda" if CUDA else "cpu"
EXPERTS, HIDDEN, INTER, TOP_K = 4, 64, 32, 2
LINEARS = ("gate_proj", "up_proj", "down_proj")


def _weight(out, inp, bits, group_size, symmetric=False, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    groups = 1 if group_size is None else -(-inp // group_size)
    scales = (torch.rand(out, groups, generator=g) + 0.5) / 2**bits  # weights of about unit size
    zeros = None if symmetric else torch.randint(0, 2**bits, (out, groups), generator=g)
    g_idx = None
    if act_order:  # GPTQ act-order: groups contiguous in a permuted column order
        perm = torch.randperm(inp, generator=g)
        g_idx = torch.empty(inp, dtype=torch.int16)
        g_idx[perm] = (torch.arange(inp) // group_size).to(torch.int16)
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, group_size, g_idx)


def _experts(widths, group_size=32, act_order=False, intermediate=INTER, experts=EXPERTS):
    """Experts cycling through ``widths`` (gate, up and down of one expert at different widths
    too), asymmetric gate, symmetric up, per-channel down."""
    packed = {lin: [] for lin in LINEARS}
    for e in range(experts):
        bits = [widths[(e + k) % len(widths)] for k in range(3)]
        packed["gate_proj"].append(_weight(intermediate, HIDDEN, bits[0], group_size, act_order=act_order, seed=3 * e))
        packed["up_proj"].append(_weight(intermediate, HIDDEN, bits[1], group_size, symmetric=True, seed=3 * e + 1))
        packed["down_proj"].append(_weight(HIDDEN, intermediate, bits[2], None, seed=3 * e + 2))
    return PackedExperts(experts, HIDDEN, intermediate, ACT2FN["silu"], packed).to(DEVICE)


def _routing(tokens, experts=EXPERTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)])
    weights = torch.rand(tokens, TOP_K, generator=g)
    x = torch.randn(tokens, HIDDEN, generator=g)
    return x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)


def _close(out, ref, rel=1e-5):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), f"max error {err:.3g} vs output scale {ref.abs().max():.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("unit", [16, 32, 64])
def test_layout_round_trips_exactly(bits, unit):
    if bits == 3 and unit < 32:
        pytest.skip("3-bit codes need a unit of at least 32")
    codes = torch.randint(0, 2**bits, (5, 200), dtype=torch.uint8)  # 200: a partial last chunk
    packed = pack_codes(codes, bits, unit)
    width = {2: 4 * unit, 3: 4 * unit, 4: 2 * unit, 8: unit}[bits]
    assert packed.shape == (-(-200 // width), 5, bits * width // 8)
    assert torch.equal(unpack_codes(packed, bits, unit, 200), codes)


def test_expert_matrices_give_back_the_stored_weights():
    weights = [_weight(24, 256, 2, 32), _weight(24, 256, 3, 32, symmetric=True), _weight(24, 256, 4, 32, act_order=True),
               _weight(24, 256, 8, None), _weight(24, 256, 4, 64, symmetric=True, act_order=True)]
    matrices = ExpertMatrices(weights, choose_unit(weights))
    assert matrices.widths == (2, 3, 4, 8)
    for i, w in enumerate(weights):
        back = matrices.matrix(i)
        for name in ("qweight", "scales", "zeros", "g_idx"):
            a, b = getattr(back, name), getattr(w, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        assert (back.bits, back.group_size) == (w.bits, w.group_size)
    # rows a multiple of every chunk: the kernel holds exactly the stored code, scale and zero bytes
    assert matrices.codes.numel() == sum(w.qweight.numel() for w in weights)
    assert matrices.scales.numel() == sum(w.scales.numel() for w in weights)
    assert matrices.zeros.numel() == sum(w.zeros.numel() for w in weights if w.zeros is not None)


@pytest.mark.parametrize("widths", [[2], [3], [4], [8], [2, 3, 4, 8]], ids=["2b", "3b", "4b", "8b", "mixed"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_float32_equals_reference(widths, tokens):
    reference = _experts(widths)
    kernel = TritonExperts(reference, KernelConfig(block_n_gate_up=16, block_n_down=32))
    x, index, weights = _routing(tokens)
    _close(kernel(x, index, weights), reference(x, index, weights))


def test_tokens_sharing_experts_and_more_rows_than_a_block():
    """20 tokens all on experts 1 and 2: each program loops over two blocks of 16 rows."""
    reference = _experts([4, 2])
    kernel = TritonExperts(reference, KernelConfig(block_n_gate_up=32, block_n_down=64))
    x, _, weights = _routing(20)
    index = torch.tensor([[1, 2], [2, 1]] * 10, device=DEVICE)
    _close(kernel(x, index, weights), reference(x, index, weights))


def test_split_k_and_act_order():
    """The down projection's K split three ways (and the automatic split), act-order gates."""
    reference = _experts([3, 4], group_size=32, act_order=True, intermediate=384)
    x, index, weights = _routing(2)
    expected = reference(x, index, weights)
    for split in (3, None):
        kernel = TritonExperts(reference, KernelConfig(block_n_gate_up=64, block_n_down=64, split_k=split))
        assert kernel.split_k(2, TOP_K) == 3  # 384 columns: three units of 4 * 32
        _close(kernel(x, index, weights), expected)


def test_zero_gate_slots_add_nothing():
    """Dynamic pruning gives skipped slots a zero gate; they must add nothing even when their
    expert (here: only chosen by them, with infinite scales) would give inf or nan."""
    reference = _experts([4])
    for linear in LINEARS:
        reference[3].get_submodule(linear).scales.fill_(float("inf"))
    kernel = TritonExperts(reference)
    x, _, weights = _routing(3)
    index = torch.tensor([[0, 3], [1, 2], [3, 2]], device=DEVICE)
    weights[0, 1] = weights[2, 0] = 0
    out = kernel(x, index, weights)
    assert torch.isfinite(out).all()
    _close(out, reference(x, index, weights))


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("tokens", [1, 4])
def test_half_precision_within_the_references_own_rounding(dtype, tokens):
    reference = _experts([2, 3, 4, 8])
    kernel = TritonExperts(reference)
    x, index, weights = _routing(tokens)
    exact = reference(x, index, weights)
    own = (reference(x.to(dtype), index, weights.to(dtype)).float() - exact).abs().max().item()
    err = (kernel(x.to(dtype), index, weights.to(dtype)).float() - exact).abs().max().item()
    assert err <= 2 * own, f"kernel error {err:.3g}, the reference's own {dtype} rounding {own:.3g}"


def test_ineligible_experts_are_refused_in_one_line():
    gelu = _experts([4])
    gelu.act_fn = ACT2FN["gelu"]
    assert "SiLU" in TritonExperts.ineligible(gelu)
    small_groups = _experts([4], group_size=8)
    assert "unit" in TritonExperts.ineligible(small_groups)
    kept = _experts([4])
    kept[0].gate_proj = KeptWeight(torch.zeros(INTER, HIDDEN))
    assert "KeptWeight" in TritonExperts.ineligible(kept)
    with pytest.raises(ValueError, match="cannot compute"):
        TritonExperts(kept)


@pytest.mark.skipif(CUDA, reason="checks that a CPU model is left alone")
def test_prepare_cuda_leaves_a_cpu_model_unchanged():
    model = torch.nn.Sequential(_experts([4]))
    assert type(prepare_cuda(model)[0]) is PackedExperts


_COMPILE_FOR_H100 = r'''
import collections, re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moepress.runtime import triton_moe as m
names = list(m._moe_matmul_kernel.arg_names)
types = dict(x_stride="i32", out_ptr="*fp32", out_stride="i32", split_stride="i32", ids_ptr="*i64",
             gates_ptr="*bf16", P="i32", TOP_K="i32", meta_ptr="*i64", codes_ptr="*u8", scales_ptr="*fp16",
             zeros_ptr="*u8", perm_ptr="*i32", N="i32", K="i32")
aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in list(types) + ["x_ptr"] if n not in ("P", "TOP_K")}  # as the JIT sees them
for block_m, gated, widths in ((1, True, (4,)), (16, False, (2, 3, 4, 8))):
    const = dict(S=64, BLOCK_M=block_m, BLOCK_N=64, P_BLOCK=32, SPLIT_K=1, GATED=gated, X_BY_TOKEN=gated,
                 HAS2=2 in widths, HAS3=3 in widths, HAS4=4 in widths, HAS8=8 in widths, HAS_PERM=False,
                 ACT=tl.bfloat16, IEEE=False)
    signature = {n: types.get(n, "constexpr") for n in names}
    signature["x_ptr"] = "*bf16" if gated else "*fp32"  # gate_up reads the model's activations, down float32
    kernel = triton.compile(ASTSource(m._moe_matmul_kernel, signature, const, aligned),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    loads = collections.Counter(re.findall(r"ld\.global[\w.]*", kernel.asm["ptx"]))
    print(block_m, dict(loads))
'''


@pytest.mark.skipif(CUDA, reason="on a GPU the tests above run the compiled kernel itself")
def test_compiles_for_an_h100_without_a_gpu():
    """The interpreter does not compile: build the PTX for sm_90 (triton's own LLVM and ptxas need no
    GPU), decode at batch 1 and a mixed-width layer at batch 16, in a process without
    TRITON_INTERPRET; at batch 1 a tile's codes are read with 16-byte vector loads."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    batch_one = run.stdout.splitlines()[0]
    assert "ld.global.v4" in batch_one, run.stdout
