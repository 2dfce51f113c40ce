"""Active parameters per token, counted from the modules as the model computes them."""

from __future__ import annotations

import moepress
from moepress.evaluate import active_params
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.trim import drop_experts, set_top_k
from moepress.trim.layer_drop import drop_block

SMALL = dict(calib_samples=4, seq_len=64)


def _parts(model):
    """(attention and dense-MLP params per layer, routed-expert params per layer, top-k / experts)."""
    view = MoEView(model)
    dense, routed = {}, {}
    for layer in range(view.num_layers):
        dense[layer] = sum(u.out_features * u.in_features for u in view.linear_units(layer))
        store = view.experts(layer)
        routed[layer] = 0 if store is None else store.num_experts * sum(
            o * i for o, i in (store.shape(lin) for lin in ("gate_proj", "up_proj", "down_proj")))
    return dense, routed


def test_active_params_follow_top_k_expert_drop_and_block_drop():
    model = build_tiny_model("mixtral")  # 4 experts, top-2
    dense, routed = _parts(model)
    assert active_params(model) == {"active": sum(dense.values()) + sum(routed.values()) // 2,
                                    "total": sum(dense.values()) + sum(routed.values())}
    set_top_k(model, 0, 1)  # a quarter of layer 0's experts per token
    assert active_params(model)["active"] == sum(dense.values()) + routed[0] // 4 + (routed[1] + routed[2]) // 2
    drop_experts(model, 1, [0, 1, 2])  # top-2 of 3: the same expert compute per token, fewer bytes
    assert active_params(model)["active"] == sum(dense.values()) + routed[0] // 4 + (routed[1] + routed[2]) // 2
    assert active_params(model)["total"] == sum(dense.values()) + sum(routed.values()) - routed[1] // 4
    drop_block(model, 2)  # nothing of layer 2 is computed
    assert active_params(model)["active"] == dense[0] + dense[1] + routed[0] // 4 + routed[1] // 2


def test_pruned_experts_count_their_kept_weights(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    moepress.compress(tiny_model_dir("mixtral"), bits=4, prune="2:4", calib=calib_file, out=out, progress=False,
                      **SMALL)
    source = moepress.load(tiny_model_dir("mixtral"))
    dense, routed = _parts(source)
    assert active_params(moepress.load(out)) == {"active": sum(dense.values()) + sum(routed.values()) // 4,
                                                 "total": sum(dense.values()) + sum(routed.values()) // 2}
    report = moepress.evaluate(out, reference=tiny_model_dir("mixtral"), text=calib_file, seq_len=32, samples=2,
                               progress=False)
    assert report.footprint["active_params"]["active"] == sum(dense.values()) + sum(routed.values()) // 4
    assert report.reference_footprint["active_params"]["active"] == sum(dense.values()) + sum(routed.values()) // 2
