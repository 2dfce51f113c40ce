"""The engines ``compress --target`` writes for, and the one place that picks a target's rules.

Each target is a module with the same functions, so ``compress`` (and the planners) ask it without
knowing which engine it is:

* ``check_config(config)``: the :class:`~moepress.compress.CompressConfig` flags the engine cannot
  express, refused in one line before any work;
* ``resolve(view, config)``: every unit's treatment under ``--bits`` (the engine's own types);
* ``check_trimming(view, trimming, config)`` and ``check_units(view, treatment_of, trimming)``: a
  plan's trims and treatments, one line naming the first unit or layer that breaks a rule;
* ``tied_units(view)``: groups of unit names that must share one treatment (what the engine stores
  or fuses as one tensor or one scheme);
* ``refusal(name, treatment, in_features)``: why the engine cannot hold ``treatment`` for unit
  ``name``, or None.

``llamacpp``: :mod:`moepress.export.llamacpp_target` (GGUF). ``vllm``: :mod:`moepress.export.vllm_target`
(compressed-tensors ``pack-quantized``).
"""

from __future__ import annotations

import importlib

from ..errors import MoepressError

TARGETS = {"llamacpp": "llamacpp_target", "vllm": "vllm_target"}


def target_rules(target: str):
    """The rules module of ``target``, or a one-line error naming the targets there are."""
    if target not in TARGETS:
        raise MoepressError(f"unknown target {target!r}; choose {', '.join(TARGETS)} (or none: moepress's own runtime)")
    return importlib.import_module(f".{TARGETS[target]}", __package__)


def check_config(config) -> None:
    """A config's target exists and its flags are ones that target can express."""
    if config.ggml_type is not None and config.target != "llamacpp":
        raise MoepressError("--ggml-type names a llama.cpp type; it needs --target llamacpp")
    if config.target is not None:
        target_rules(config.target).check_config(config)


__all__ = ["TARGETS", "check_config", "target_rules"]
