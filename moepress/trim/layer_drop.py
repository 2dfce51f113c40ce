"""Layer drop and block drop (He et al.'s Layer Drop and Block Drop): an MoE sublayer replaced by
nothing (the residual stream passes through: attention kept), or a whole decoder layer removed.

Both keep the decoder's numbering: the dropped part is replaced in place by a module without
weights (:class:`DroppedMoE` returns zeros where the MoE block's output is added to the residual;
:class:`DroppedBlock` returns its input), so unit names, checkpoint shards, the KV cache's layer
indices and every per-layer config list stay valid. The checkpoint records which were dropped and
the loaders put the same stand-ins into a freshly built model before its weights are read.

What to drop is ranked as He et al. do, by how little a part changes the hidden states on the
calibration tokens (:func:`similarity_scores`): for a block, the mean cosine similarity of its
input and output; for an MoE sublayer, of the layer's output with and without it (the residual
form: architectures that scale the residual are measured as they compute). The most similar go
first. Block 0 is never dropped: transformers' KV cache counts the sequence length in layer 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoepressError
from ..model.view import MoEView
from ..runtime.install import install_stand_in


class DroppedMoE(nn.Module):
    """Stands where an MoE block was: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class DroppedBlock(nn.Module):
    """Stands where a decoder layer was: passes its input through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def drop_moe_layer(model: nn.Module, layer: int) -> None:
    """Replace MoE layer ``layer``'s MoE block (router, routed and shared experts) by nothing."""
    view = MoEView(model)
    check_moe_drop(view, layer)
    install_stand_in(model, f"{view.layer_path(layer)}.{view.spec.moe_block}", DroppedMoE())


def drop_block(model: nn.Module, layer: int) -> None:
    """Replace decoder layer ``layer`` by a pass-through."""
    view = MoEView(model)
    check_block_drop(view, layer)
    install_stand_in(model, view.layer_path(layer), DroppedBlock())


def check_moe_drop(view: MoEView, layer: int) -> None:
    """One line naming the layer when :func:`drop_moe_layer` cannot drop its MoE sublayer."""
    _check_layer(view, layer)
    if view.experts(layer) is None:
        raise MoepressError(f"layers.{layer}: not an MoE layer; layer drop removes MoE sublayers")


def check_block_drop(view: MoEView, layer: int) -> None:
    """One line naming the layer when :func:`drop_block` cannot drop it."""
    _check_layer(view, layer)
    if layer == 0:
        raise MoepressError("layers.0 cannot be dropped: transformers' KV cache counts the sequence length in the "
                            "first layer; drop another block")


def restore_dropped(model: nn.Module, blocks=(), moe_layers=()) -> None:
    """Put the stand-ins a checkpoint records into a freshly built model (layer keys may be strings)."""
    for layer in moe_layers:
        drop_moe_layer(model, int(layer))
    for layer in blocks:
        drop_block(model, int(layer))


def dropped_parts(model: nn.Module) -> tuple[list[int], list[int]]:
    """(dropped blocks, dropped MoE sublayers) of ``model``, as its modules say."""
    view = MoEView(model)
    blocks, moe = [], []
    for layer in range(view.num_layers):
        if isinstance(view.layers[layer], DroppedBlock):
            blocks.append(layer)
        elif isinstance(view.moe_block(layer), DroppedMoE):
            moe.append(layer)
    return blocks, moe


def _check_layer(view: MoEView, layer: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < view.num_layers:
        raise MoepressError(f"layers.{layer}: no such layer; the model has layers 0..{view.num_layers - 1}")


def similarity_scores(source, tokens: torch.Tensor, *, device=None, batch_size: int = 8,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """One pass over the uncompressed ``source`` (a streamed or resident model), layer by layer:
    ``block`` [L], the mean cosine similarity of each layer's input and output, and ``moe`` [L], of
    each layer's output with and without its MoE sublayer (NaN for a dense layer)."""
    from ..pipeline.runner import LayerLoop

    view = MoEView(source.model)
    block = torch.full((view.num_layers,), float("nan"), dtype=torch.float64)
    moe = torch.full((view.num_layers,), float("nan"), dtype=torch.float64)

    def step(layer: int, runner):
        before = [h.clone() for h in runner.hidden]
        store = view.experts(layer)
        if store is not None:
            without = []
            silence = view.moe_block(layer).register_forward_hook(lambda _m, _a, out: torch.zeros_like(
                out[0] if isinstance(out, tuple) else out))
            try:
                runner.run_layer(layer, update=True)
                without = [h.clone() for h in runner.hidden]
            finally:
                silence.remove()
            runner.hidden.replace_all(before)
            before = [h.clone() for h in runner.hidden]
        runner.run_layer(layer, update=True)
        block[layer] = _mean_cosine(before, list(runner.hidden))
        if store is not None:
            moe[layer] = _mean_cosine(without, list(runner.hidden))
        return {}, {}

    loop = LayerLoop(source, tokens, device=device, batch_size=batch_size, keep_layers=False, progress=progress,
                     desc="layer similarity")
    loop.run(step)
    return {"block": block, "moe": moe}


def _mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for x, y in zip(a, b):
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return total / max(count, 1)


def most_similar(scores: torch.Tensor, n: int, *, exclude=(), what: str = "layers") -> list[int]:
    """The ``n`` layers with the highest finite ``scores`` (the ones that change the hidden states
    least), outside ``exclude``; one line when fewer are available."""
    candidates = [i for i in range(len(scores)) if torch.isfinite(scores[i]) and i not in set(exclude)]
    if n > len(candidates):
        raise MoepressError(f"cannot drop {n} {what}: only {len(candidates)} can be dropped")
    return sorted(sorted(candidates, key=lambda i: (-float(scores[i]), i))[:n])
