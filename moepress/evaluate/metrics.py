"""Quality metrics for causal language models: perplexity and divergence from a reference.

Everything here is a pure function over a causal LM (anything callable as
``model(input_ids=ids)`` returning an object with ``.logits`` of shape ``[B, T, V]``) and a
tensor of token windows ``[N, seq_len]``. Nothing here knows about quantization: a compressed
model and its original are just two models.

Windows are scored independently and non-overlapping: each window is one forward pass with no
context carried over from the previous one, and every position except the first is predicted.
Log-probabilities are always computed in float32 (even for a bf16 model), a bounded number of
positions at a time, so a 150k vocabulary never materialises more than one batch of logits.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "ComparisonResult", "perplexity", "compare_to_reference"]

# Positions converted to float32 log-probabilities at once: 1024 x 150k x 4 B = 600 MB at most.
_POSITION_CHUNK = 1024


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model over a set of windows.

    ``nll`` is the mean negative log-likelihood per predicted token in nats, ``perplexity`` is
    ``exp(nll)``, ``tokens`` the number of predicted tokens (``N * (seq_len - 1)``) and
    ``seconds`` the wall-clock time of the whole evaluation.
    """

    perplexity: float
    nll: float
    tokens: int
    seconds: float


@dataclass(frozen=True)
class ComparisonResult:
    """How far a model's next-token distributions are from a reference model's.

    ``kl_divergence`` is the mean over predicted positions of ``KL(P_reference || P_model)`` in
    nats; ``top1_agreement`` the fraction of positions where both models' most likely next
    token is the same; ``perplexity`` and ``reference_perplexity`` the two models' perplexities
    on the same windows (computed in the same pass).
    """

    kl_divergence: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    tokens: int
    seconds: float


def perplexity(
    model: Callable,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` over non-overlapping token windows.

    Each window of ``windows`` (``LongTensor [N, seq_len]``) is scored on its own: no context is
    carried between windows, and every position except the first is predicted, so ``N *
    (seq_len - 1)`` tokens are scored. Because the windows do not overlap, the first tokens of
    each window are predicted with little context, which makes the result slightly higher than
    a sliding-window evaluation would give; in exchange it is simple, fast, and comparable
    across tools that use the same convention.

    The model runs under :func:`torch.inference_mode` in eval mode (its previous mode is
    restored afterwards) with batches moved to ``device`` (default: the device of the model's
    first parameter). Log-softmax is computed in float32 whatever the model's dtype.
    """
    windows = _check_windows(windows)
    _check_batch_size(batch_size)
    dev = _resolve_device(model, device)
    start = time.perf_counter()
    nll_sum = 0.0
    tokens = 0
    with _eval_mode(model), torch.inference_mode():
        for ids in _batches(windows, batch_size, progress):
            logits = _forward(model, ids, dev)
            targets = ids[:, 1:].to(logits.device)
            for lg, tg in _position_chunks(logits, targets):
                nll_sum += _nll_sum(lg.float().log_softmax(-1), tg)
            tokens += targets.numel()
            del logits
    nll = nll_sum / tokens
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens=tokens, seconds=time.perf_counter() - start
    )


def compare_to_reference(
    model: Callable,
    reference: Callable,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Compare ``model``'s next-token distributions with ``reference``'s on the same windows.

    Both models run batch by batch over the non-overlapping windows (see :func:`perplexity` for
    the conventions); only one batch of logits per model is alive at a time. At every predicted
    position (all but the first of each window) this measures ``KL(P_reference || P_model)`` in
    nats from float32 log-softmax, whether the two argmax tokens agree, and both models'
    negative log-likelihood of the true next token, giving both perplexities in one pass.

    ``device``, when given, is used for both models; otherwise each model gets its batches on
    the device of its own first parameter, and the reference's logits are moved to the model's
    device for the comparison.
    """
    windows = _check_windows(windows)
    _check_batch_size(batch_size)
    dev = _resolve_device(model, device)
    ref_dev = _resolve_device(reference, device)
    start = time.perf_counter()
    kl_sum = 0.0
    agree = 0
    nll_sum = 0.0
    ref_nll_sum = 0.0
    tokens = 0
    with _eval_mode(model), _eval_mode(reference), torch.inference_mode():
        for ids in _batches(windows, batch_size, progress):
            ref_logits = _forward(reference, ids, ref_dev)
            logits = _forward(model, ids, dev)
            if ref_logits.shape != logits.shape:
                raise ValueError(
                    f"model and reference logits differ in shape: {tuple(logits.shape)} vs "
                    f"{tuple(ref_logits.shape)}"
                )
            ref_logits = ref_logits.to(logits.device)
            targets = ids[:, 1:].to(logits.device)
            chunks = zip(_position_chunks(logits, targets), _position_chunks(ref_logits, targets))
            for (lg, tg), (ref_lg, _) in chunks:
                logp = lg.float().log_softmax(-1)
                ref_logp = ref_lg.float().log_softmax(-1)
                # KL(P_ref || P_model) = sum_v p_ref * (log p_ref - log p_model); the
                # log-space kl_div handles p_ref == 0 terms exactly.
                kl_sum += F.kl_div(logp, ref_logp, reduction="sum", log_target=True).item()
                agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
                nll_sum += _nll_sum(logp, tg)
                ref_nll_sum += _nll_sum(ref_logp, tg)
            tokens += targets.numel()
            del logits, ref_logits
    return ComparisonResult(
        kl_divergence=kl_sum / tokens,
        top1_agreement=agree / tokens,
        perplexity=math.exp(nll_sum / tokens),
        reference_perplexity=math.exp(ref_nll_sum / tokens),
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# helpers


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D tensor of token ids [N, seq_len]")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    n, seq_len = windows.shape
    if n == 0:
        raise ValueError("windows is empty: nothing to evaluate")
    if seq_len < 2:
        raise ValueError(f"windows need at least 2 tokens to predict one, got seq_len={seq_len}")
    return windows.long()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _resolve_device(model: Callable, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


class _eval_mode:
    """Put a module in eval mode for the duration of a ``with`` block, then restore its mode."""

    def __init__(self, model: Callable):
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.was_training = False

    def __enter__(self) -> None:
        if self.model is not None:
            self.was_training = self.model.training
            self.model.eval()

    def __exit__(self, *exc) -> None:
        if self.model is not None and self.was_training:
            self.model.train()


def _batches(windows: torch.Tensor, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    n = windows.shape[0]
    bar = tqdm(
        total=n,
        desc="eval",
        unit="window",
        file=sys.stderr,
        disable=None if progress else True,
        leave=False,
    )
    try:
        for i in range(0, n, batch_size):
            batch = windows[i : i + batch_size]
            yield batch
            bar.update(batch.shape[0])
    finally:
        bar.close()


def _forward(model: Callable, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits of ``model`` on ``ids`` with the last position (which predicts nothing) dropped."""
    kwargs = {}
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        kwargs["use_cache"] = False  # a transformers model: no KV cache to build
    out = model(input_ids=ids.to(device), **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"expected logits of shape [B, T, V] with [B, T] = {tuple(ids.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    return logits[:, :-1]


def _position_chunks(
    logits: torch.Tensor, targets: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits [P, V], targets [P])`` over all predicted positions, a bounded number at a time.

    Slices one window at a time so that every chunk is a view of ``logits`` (flattening the
    batch of ``logits[:, :-1]`` would copy the whole batch of logits).
    """
    for row_logits, row_targets in zip(logits, targets):
        for i in range(0, row_targets.shape[0], _POSITION_CHUNK):
            yield row_logits[i : i + _POSITION_CHUNK], row_targets[i : i + _POSITION_CHUNK]


def _nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` under float32 log-probabilities ``logp``."""
    return -logp.gather(-1, targets.unsqueeze(-1)).double().sum().item()
