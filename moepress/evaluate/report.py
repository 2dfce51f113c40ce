"""``moepress eval``: quality and size of a (compressed) model, optionally against a reference."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import MoepressError
from .footprint import active_params, measure_footprint
from .metrics import compare_to_reference, perplexity


@dataclass
class EvalReport:
    model: str
    text: str
    windows: int
    seq_len: int
    tokens: int
    perplexity: float
    footprint: dict
    seconds: float
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    reference_footprint: dict | None = None
    compression: dict = field(default_factory=dict)  # from moepress.json when the model has one

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        fp = self.footprint
        rows = [("model", self.model), ("perplexity", f"{self.perplexity:.4f}")]
        if self.reference is not None:
            rows += [
                ("reference", self.reference),
                ("reference perplexity", f"{self.reference_perplexity:.4f}"),
                ("KL divergence (nats/token)", f"{self.kl_divergence:.5f}"),
                ("top-1 agreement", f"{self.top1_agreement:.4f}"),
            ]
        rows += [
            ("linear weight bytes", f"{fp['linear_bytes']:,} ({fp['bits_per_param']:.3f} bits/param)"),
            ("bits by kind", ", ".join(f"{k} {v:.3f}" for k, v in fp["bits_by_kind"].items())),
            ("active linear params per token", f"{fp['active_params']['active']:,}"),
            ("model bytes (all tensors)", f"{fp['model_bytes']:,}"),
        ]
        if self.reference_footprint:
            ref = self.reference_footprint
            rows.append(("reference linear bytes", f"{ref['linear_bytes']:,} ({ref['bits_per_param']:.3f} bits/param)"))
            if "active_params" in ref:
                rows.append(("reference active params per token", f"{ref['active_params']['active']:,}"))
        if self.compression:
            c = self.compression
            group = c.get("group_size") or "channel"
            rows.append(("compression", f"{c.get('method')} {c.get('bits')}-bit group {group}, {c.get('seconds')} s"))
        rows.append(("evaluated on", f"{self.text}: {self.windows} windows x {self.seq_len} tokens ({self.tokens:,} scored)"))
        rows.append(("eval wall time", f"{self.seconds:.1f} s"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(["| metric | value |", "| --- | --- |"] + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def _load(model, trust_remote_code: bool, dtype):
    from ..loading import load_model, load_tokenizer

    if isinstance(model, nn.Module):
        return model, None, getattr(model.config, "_name_or_path", type(model).__name__)
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    return loaded, load_tokenizer(model, trust_remote_code=trust_remote_code), model


def _vocab_size(model, trust_remote_code: bool) -> int | None:
    """The vocabulary size a model (in memory, or a folder or hub id: its config only) predicts over;
    None when the config cannot be read (loading the model then says why)."""
    if isinstance(model, nn.Module):
        config = model.config
    else:
        from transformers import AutoConfig

        from ..loading import check_model_source, hub_kwargs

        check_model_source(model)
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, **hub_kwargs(model))
        except Exception:
            return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_same_vocabulary(model, reference, trust_remote_code: bool = False) -> None:
    """Refuse a reference whose vocabulary differs from the model's before anything is evaluated:
    KL divergence and top-1 agreement compare the two distributions token by token."""
    sizes = _vocab_size(model, trust_remote_code), _vocab_size(reference, trust_remote_code)
    if None not in sizes and sizes[0] != sizes[1]:
        name = model if isinstance(model, str) else "the model"
        ref = reference if isinstance(reference, str) else "the reference"
        raise MoepressError(f"reference {ref} has a vocabulary of {sizes[1]:,} tokens but {name} has {sizes[0]:,}; "
                            "KL and top-1 agreement need the same tokens: give the model it was compressed from")


def _stored_dtype(model) -> torch.dtype | None:
    """The dtype a checkpoint folder holds float weights in (its config.json), to count bytes as
    stored even when evaluated in float32; None for an in-memory model (counted as held)."""
    if not isinstance(model, str) or not os.path.isfile(os.path.join(model, "config.json")):
        return None
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def evaluate(
    model,
    *,
    reference=None,
    text: str = "builtin:eval",
    tokenizer=None,
    seq_len: int = 512,
    samples: int | None = 64,
    seed: int | None = 0,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
) -> EvalReport:
    """Perplexity of ``model`` on ``text`` (non-overlapping windows of ``seq_len`` tokens; ``samples``
    of them chosen with ``seed`` from the whole text so every part of it is represented, or the
    first ``samples`` with ``seed=None``; all windows with ``samples=None``), and with a ``reference``: its perplexity, the KL divergence
    KL(reference || model) and top-1 agreement, all in one pass; plus measured weight bytes.

    Models given as paths load in ``dtype``; by default float32 on the CPU (whose 16-bit matmuls
    are slow) and the checkpoint's own dtype on a GPU. Both models load the same way.
    """
    from ..pipeline.device import resolve_device
    from ..data import load_text, token_windows

    if reference is not None:
        check_same_vocabulary(model, reference, trust_remote_code)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else "auto"
    model_obj, model_tok, model_name = _load(model, trust_remote_code, dtype)
    stored = _stored_dtype(model)
    tokenizer = tokenizer or model_tok
    if tokenizer is None:
        raise MoepressError("evaluate needs a tokenizer with an in-memory model: evaluate(model, tokenizer=...)")
    windows = token_windows(
        load_text(text, what="evaluation"), tokenizer, seq_len, samples, seed=seed, what="evaluation",
        advice="give a longer file, fewer --samples or a shorter --seq-len",
    )
    compression = {}
    if isinstance(model, str) and os.path.exists(os.path.join(model, "moepress.json")):
        from ..export import read_record

        record = read_record(model)
        compression = {k: record.get(k) for k in ("method", "bits", "group_size", "symmetric", "act_order", "seconds")}
        compression["calibration_tokens"] = record.get("calibration", {}).get("tokens")
    model_obj.to(dev)
    started = time.time()
    report = EvalReport(
        model=model_name,
        text=text if samples is None else f"{text} (seed {seed})",
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        tokens=0,
        perplexity=0.0,
        footprint={**measure_footprint(model_obj, stored).to_dict(), "active_params": active_params(model_obj)},
        seconds=0.0,
        compression=compression,
    )
    if reference is None:
        result = perplexity(model_obj, windows, batch_size=batch_size, device=dev, progress=progress)
        report.perplexity, report.tokens = result.perplexity, result.tokens
    else:
        ref_obj, _, ref_name = _load(reference, trust_remote_code, dtype)
        ref_obj.to(dev)
        result = compare_to_reference(model_obj, ref_obj, windows, batch_size=batch_size, device=dev, progress=progress)
        report.reference = ref_name
        report.perplexity, report.tokens = result.perplexity, result.tokens
        report.reference_perplexity = result.reference_perplexity
        report.kl_divergence, report.top1_agreement = result.kl_divergence, result.top1_agreement
        report.reference_footprint = {**measure_footprint(ref_obj, _stored_dtype(reference)).to_dict(),
                                      "active_params": active_params(ref_obj)}
    report.seconds = time.time() - started
    return report
