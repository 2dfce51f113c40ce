"""End-to-end refinement of a compressed model's scales on the unquantized model's outputs (``moepress distill``).

``--refine`` tunes each decoder layer on that layer's own output, one layer at a time, which is what
lets compression stream a model larger than memory. Once the whole compressed model is there, its
scales can be tuned together on what the user sees: the next-token distribution. This is
EfficientQAT's end-to-end training of the quantization parameters (E2E-QP, arXiv 2407.11062: the
integer codes frozen, only the step sizes trained), with the unquantized model as the teacher
(the KL divergence of its next-token distribution to the student's) instead of the next-token
loss, since calibration text is all we have.

- What is learned is what ``--refine-params scales`` learns, for every quantized unit at once: each
  group's float16 scale (moepress's grids, :class:`~moepress.quantize.signround.SignRoundWeight`) or a
  llama.cpp block's float16 values (:class:`~moepress.quantize.block_scales.BlockScalesWeight`). Codes,
  zero points, g_idx and the k-quants' integer sub-block scales are held, so the checkpoint's format,
  layout and size do not change, and neither does anything llama.cpp or vLLM reads besides the scales.
- Adam's step is :data:`DISTILL_LR_SCALE` of the layer-wise one: every scale moves the whole model's
  output at once (measured on tiny-mixtral 2-bit: 1e-3 on moepress's grids; 3e-3 was worse).
- One step is one batch of calibration windows; the teacher's logits are recomputed per batch (a
  vocabulary-wide copy of every window would not fit).
- A quarter of the calibration windows (:data:`VALIDATION_SHARE`) is never trained on: the result is
  kept only if the KL on those went down; otherwise the checkpoint is copied unchanged, and says so.
  Measured on tiny-mixtral at 4 bits, the KL on the training windows fell while the held-out
  evaluation's rose 8%: the scales fit the windows, not the model, once the KL is that small.
- Memory: both models in float32 and a float32 copy of every quantized weight with its gradient graph.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoepressError

DISTILL_LR_SCALE = 0.1  # Adam's step: a tenth of the layer-wise refinement's (SCALES_LR, block_scales.learning_rate)
VALIDATION_SHARE = 0.25  # of the calibration windows: held out of training, to decide whether the result is kept
DEFAULT_PASSES = 4  # over the training windows, when --steps is not given (benchmarks/distill.py --passes 1 2 4)


def _learnables(model: nn.Module):
    """Every quantized unit of ``model`` as (learnable weight, the modules whose stored tensors it writes),
    and the stand-ins that compute with the learnables' current weights: {path: module}."""
    from .model.view import EXPERT_LINEARS, MoEView
    from .refine import RefinedExperts, RefinedLinear, experts_by_format, refinable, stack_quantized
    from .runtime.block_weight import BlockLinear
    from .runtime.packed_linear import PackedLinear

    current: dict = {}
    learnables: dict = {}  # key -> (learnable, [stored modules, one per stacked row])
    stand_ins: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if type(module) in (PackedLinear, BlockLinear):
            learnables[path] = (refinable(None, module.quantized(), "gptq", "scales"), [module])
            stand_ins[path] = RefinedLinear(current, path, module.bias)
    view = MoEView(model)
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None or store.layout != "packed":
            continue
        packed = store.module
        where: dict[tuple[int, str], tuple[object, int]] = {}
        for linear in EXPERT_LINEARS:
            for fmt, experts in experts_by_format(packed, linear, range(store.num_experts)).items():
                key = (layer, linear, fmt)
                modules = [packed.packed_weight(e, linear) for e in experts]
                learnables[key] = (refinable(None, stack_quantized([m.quantized() for m in modules]), "gptq",
                                             "scales"), modules)
                for row, e in enumerate(experts):
                    where[e, linear] = (key, row)

        def weight_of(e, linear, packed=packed, where=where):
            spot = where.get((e, linear))
            return packed.packed_weight(e, linear).dequantize(torch.float32) if spot is None \
                else current[spot[0]][spot[1]]

        stand_ins[store.module_path] = RefinedExperts(weight_of, store.num_experts, store.act_fn)
    return current, learnables, stand_ins


def validation_windows(windows: int) -> int:
    """How many of ``windows`` calibration windows are held out of training (at least one)."""
    return max(1, round(windows * VALIDATION_SHARE))


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    logp = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()


def distill_scales(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, steps: int, *,
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Tune every quantized unit's scales of ``student`` (a moepress model, reference runtime, float32)
    for ``steps`` Adam steps on KL(``teacher`` || ``student``) over the first windows of ``tokens``
    [windows, seq_len]; write them into the student's stored tensors if the KL on the last
    :data:`VALIDATION_SHARE` of the windows (never trained on) fell. Returns what was done."""
    from tqdm.auto import tqdm

    from .runtime.install import swap_module

    held = validation_windows(len(tokens))
    if len(tokens) - held < 1:
        raise MoepressError(f"distill needs at least 2 calibration windows (one to train on, one to check on); got "
                            f"{len(tokens)}")
    train, validation = tokens[:len(tokens) - held], tokens[len(tokens) - held:]
    batches = [train[i:i + batch_size] for i in range(0, len(train), batch_size)]
    checks = [validation[i:i + batch_size] for i in range(0, len(validation), batch_size)]
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in flags:
        p.requires_grad_(False)
    current, learnables, stand_ins = _learnables(student)
    if not learnables:
        raise MoepressError("the checkpoint has no quantized units whose scales can be tuned (all 16-bit, pruned "
                            "or split)")
    for learnable, _ in learnables.values():
        learnable.lr *= DISTILL_LR_SCALE

    def refresh(grad: bool):
        with torch.set_grad_enabled(grad):
            for key, (learnable, _) in learnables.items():
                current[key] = learnable.dequantize()

    def teacher_of(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(teacher(input_ids=batch).logits.float(), -1)

    def validation_kl() -> float:
        refresh(False)
        total = 0.0
        with torch.no_grad():
            for batch in checks:
                total += float(_kl(student(input_ids=batch).logits, teacher_of(batch))) * len(batch)
        return total / len(validation)

    started = time.time()
    swapped = {path: swap_module(student, path, module) for path, module in stand_ins.items()}
    try:
        before = validation_kl()
        start = {key: learnable.state() for key, (learnable, _) in learnables.items()}
        bar = tqdm(range(steps), desc="distill", unit="step", disable=not progress)
        for step in bar:
            i = step % len(batches)
            target = teacher_of(batches[i])
            refresh(True)
            with torch.enable_grad():
                loss = _kl(student(input_ids=batches[i]).logits, target)
                loss.backward()
            for learnable, _ in learnables.values():
                learnable.refine_step(step, steps)
            bar.set_postfix(kl=f"{loss.item():.2e}")
        after = validation_kl()
        kept = after < before
        if not kept:  # (the record keeps the KL the tuned scales reached, to say why they were not kept)
            for key, (learnable, _) in learnables.items():
                learnable.restore(start[key])
    finally:
        for path, module in swapped.items():
            swap_module(student, path, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if kept:
        _write_back(learnables)
    return {"steps": steps, "batch_size": batch_size, "windows": int(len(train)), "validation_windows": int(held),
            "seq_len": int(tokens.shape[1]), "validation_kl": [round(before, 8), round(after, 8)], "kept": kept,
            "seconds": round(time.time() - started, 1)}


@torch.no_grad()
def _write_back(learnables: dict) -> None:
    """The tuned values into the stored tensors of the modules they came from (their float16 ``scales``;
    a block format's bytes), in place: the module tree and every other tensor stay as loaded."""
    from .quantize.ggml_blocks import BlockQuantizedWeight

    for learnable, modules in learnables.values():
        refined = learnable.quantized()
        for row, module in enumerate(modules):
            one = refined.select(row) if refined.lead_shape else refined
            if isinstance(one, BlockQuantizedWeight):
                module.blocks.copy_(one.blocks)
            else:
                module.scales.copy_(one.scales.to(module.scales.dtype))


def distill_checkpoint(checkpoint: str, out: str, *, reference: str | None = None, calib: str | None = None,
                       calib_samples: int | None = None, seq_len: int | None = None, seed: int | None = None,
                       steps: int | None = None, batch_size: int = 8, overwrite: bool = False, progress: bool = True,
                       trust_remote_code: bool = False, device: str | None = None) -> dict:
    """``moepress distill``: ``checkpoint``'s scales tuned on ``reference`` (default: the model it was
    compressed from, as its moepress.json records), written as a new checkpoint ``out`` (a temporary
    folder renamed when complete). The calibration text and windows default to the checkpoint's own;
    ``steps`` to :data:`DEFAULT_PASSES` passes over the windows it trains on."""
    from .data import load_text, token_windows
    from .export.checkpoint import check_output_dir
    from .export.record import read_record
    from .loading import load_model, load_tokenizer

    record = read_record(checkpoint)
    if record.get("activations"):  # (the stand-ins that compute with the learned scales keep float inputs)
        raise MoepressError("distill does not tune a checkpoint with --activations int8 yet; distill the weight-only "
                            "checkpoint (compress without --activations)")
    calibration = record.get("calibration") or {}
    calib = calib or calibration.get("source") or "builtin:calib"
    calib_samples = calib_samples or calibration.get("samples") or 128
    seq_len = seq_len or calibration.get("seq_len") or 512
    seed = calibration.get("seed", 0) if seed is None else seed
    reference = reference or record.get("source_model")
    if not reference:
        raise MoepressError(f"{checkpoint} does not record the model it was compressed from; give --reference")
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise MoepressError("distill writes a new checkpoint: give an --out other than the checkpoint itself")
    check_output_dir(out, overwrite)
    if steps is not None and steps < 1:
        raise MoepressError(f"--steps takes a number of steps >= 1 (got {steps})")
    tokenizer = load_tokenizer(checkpoint)
    tokens = token_windows(load_text(calib), tokenizer, seq_len, calib_samples, seed=seed, what="calibration")
    steps = steps or DEFAULT_PASSES * -(-(len(tokens) - validation_windows(len(tokens))) // batch_size)
    from contextlib import nullcontext

    from .pipeline.device import resolve_device
    from .pipeline.source import quiet_transformers

    where = resolve_device(device)
    with nullcontext() if progress else quiet_transformers():  # (--quiet: no 'Loading weights' bars either)
        teacher = load_model(reference, dtype=torch.float32, trust_remote_code=trust_remote_code).eval().to(where)
        _check_memory(teacher, where)
        student = load_model(checkpoint, dtype=torch.float32).eval().to(where)
    tokens = tokens.to(where)
    if progress:
        import sys

        print(f"distill: {steps} steps of {batch_size} windows x {seq_len} tokens, teacher {reference}", file=sys.stderr)
    done = distill_scales(student, teacher, tokens, steps, batch_size=batch_size, progress=progress)
    done.update({"reference": str(reference), "calib": calib, "seed": seed, "lr_scale": DISTILL_LR_SCALE})
    _save_like(checkpoint, out, student, done, overwrite)
    return done


def _check_memory(teacher: nn.Module, device: torch.device) -> None:
    """Refuse in one line, before the student is loaded, a model whose distillation cannot fit: beside
    the teacher, a float32 copy of every weight and its gradient graph (about twice the teacher)."""
    from .pipeline.memory import memory_available

    if device.type != "cpu":
        return
    needed = 2 * sum(p.numel() for p in teacher.parameters()) * 4
    available = memory_available()
    if available is not None and needed > available:
        raise MoepressError(f"distill keeps both models in memory and needs about {needed / 1e9:.1f} GB more; "
                            f"{available / 1e9:.1f} GB are available (use a machine with more memory, or skip distill)")


def _save_like(checkpoint: str, out: str, student: nn.Module, done: dict, overwrite: bool) -> None:
    """``checkpoint``'s files with the student's changed tensors, and ``distill`` in moepress.json, as ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .export.record import MOEPRESS_JSON

    state = student.state_dict()
    parent = os.path.dirname(os.path.abspath(out))
    work = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.distill-partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(checkpoint, work)
    changed = 0
    for name in sorted(os.listdir(work)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(work, name)
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        differs = {k for k, v in tensors.items()
                   if k in state and (k.endswith(".scales") or k.endswith(".blocks"))
                   and not torch.equal(state[k].to(v.dtype), v)}
        if differs:
            save_file({k: (state[k].to(v.dtype).contiguous() if k in differs else v) for k, v in tensors.items()},
                      path, metadata=metadata)
            changed += len(differs)
    record_path = os.path.join(work, MOEPRESS_JSON)
    with open(record_path) as f:
        record = json.load(f)
    record["distill"] = {**done, "tensors_changed": changed}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)  # (check_output_dir allowed it: --overwrite)
    os.replace(work, out)


__all__ = ["DEFAULT_PASSES", "DISTILL_LR_SCALE", "VALIDATION_SHARE", "distill_checkpoint", "distill_scales", "validation_windows"]
