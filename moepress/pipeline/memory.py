"""How much memory a streamed compression needs: the formula the README gives, as code.

A streamed run holds one decoder layer at a time, so its peak is (bytes, CPU, float32 compute)::

    runtime      R  = 0.40 GB: Python, torch, transformers, the tokenizer, the calibration text
    weights      W  = 4 x P_layer + 2 x P_largest     one layer in float32 (+ the bf16 tensor being cast)
    Hessians     G  = 4 x C x (H^2 + I^2) + 4 x sum over attention linears of in^2
    quantizer    Q  = GPTQ: 4 x (4 x C x in^2 + 4 x C x out x in) of its largest call (H, its damped
                      copy, Cholesky and inverse; W, its permuted copy, codes, error)
                      RTN:  4 x 3 x C x out x in (dequantized weight, difference, difference x H)
    activations A  = 4 x N x H (x 2 with --expert-chunk: the experts' inputs are kept for the chunks)
    forward      F  = 4 x b x T x (2 x heads x T + 3 x k x I + 4 x H)   one batch through the layer
    refinement   S  = 4 x N x H + 4 x P_layer + 20 x (P_dense + 3 x C x I x H) + 2 x F   (--refine only)
                      the unquantized layer's outputs; every expert's dequantized weight; per weight
                      refined at once (the dense units and one chunk of experts) its GPTQ offset, rounding
                      offset and gradient, dequantized value and gradient; the activations the backward keeps

    peak = R + W + G + Q + A + F + S

with P_layer the parameters of the largest decoder layer, P_largest its largest tensor, E experts of
intermediate size I, hidden size H, C = --expert-chunk (default E), N calibration tokens, b windows of
T tokens per forward pass, k experts per token, P_dense the layer's parameters outside its routed
experts. ``--offload-activations`` moves A to memory-mapped files (not anonymous memory). The depth of the model appears nowhere: that is the point.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIME_BYTES = 400 * 1024**2


@dataclass
class MemoryEstimate:
    runtime: int
    weights: int
    hessians: int
    quantizer: int
    activations: int
    forward: int
    refinement: int = 0

    @property
    def peak(self) -> int:
        return (self.runtime + self.weights + self.hessians + self.quantizer + self.activations + self.forward
                + self.refinement)

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
        return (f"about {gb(self.peak)} GB: runtime {gb(self.runtime)} + one layer {gb(self.weights)} + Hessians "
                f"{gb(self.hessians)} + quantizer {gb(self.quantizer)} + activations {gb(self.activations)} + "
                f"forward {gb(self.forward)}" + (f" + refinement {gb(self.refinement)}" if self.refinement else ""))


def estimate(source, *, calib_samples: int, seq_len: int, method: str = "gptq", batch_size: int = 8,
             expert_chunk: int | None = None, offload_activations: bool = False, refine: int = 0) -> MemoryEstimate:
    """The formula of the module docstring for a :class:`~moepress.pipeline.source.StreamedModel`
    (or anything with a ``model`` whose parameters carry shapes, on ``meta`` or not)."""
    from ..model.view import MoEView

    model = source.model
    view = MoEView(model)
    config = model.config
    layers_prefix = view.spec.layers
    per_layer: dict[int, int] = {}
    largest: dict[int, int] = {}
    for name, p in model.named_parameters():
        if name.startswith(layers_prefix + "."):
            layer = int(name[len(layers_prefix) + 1:].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + p.numel()
            largest[layer] = max(largest.get(layer, 0), p.numel())
    layer = max(per_layer, key=per_layer.get)
    weights = 4 * per_layer[layer] + 2 * largest[layer]

    hidden = int(config.hidden_size)
    store = next((view.experts(l) for l in range(view.num_layers) if view.experts(l) is not None), None)
    experts = store.num_experts if store is not None else 0
    inter = store.intermediate_size if store is not None else 0
    chunk = min(expert_chunk or experts, experts) if experts else 0
    attention_in = [u.in_features for l in range(view.num_layers) for u in view.attention_units(l)
                    if u.layer == layer] or [hidden]
    hessians = 4 * chunk * (hidden ** 2 + inter ** 2) + 4 * sum(n * n for n in attention_in)
    calls = [(inter, hidden), (hidden, inter)] if experts else [(hidden, hidden)]  # (out, in) of gate/up, down
    if method == "gptq":
        quantizer = max(4 * (4 * max(chunk, 1) * i * i + 4 * max(chunk, 1) * o * i) for o, i in calls)
    else:
        quantizer = max(4 * 3 * max(chunk, 1) * o * i for o, i in calls)
    tokens = calib_samples * seq_len
    chunked = experts and chunk < experts
    activations = 0 if offload_activations else 4 * tokens * hidden * (2 if chunked else 1)
    heads = int(getattr(config, "num_attention_heads", 1))
    top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    b = min(batch_size, calib_samples)
    forward = 4 * b * seq_len * (2 * heads * seq_len + 3 * top_k * inter + 4 * hidden)
    refinement = 0
    if refine:
        dense = per_layer[layer] - 3 * experts * inter * hidden
        refinement = 4 * tokens * hidden + 4 * per_layer[layer] + 20 * (dense + 3 * chunk * inter * hidden) + 2 * forward
    return MemoryEstimate(RUNTIME_BYTES, weights, hessians, quantizer, activations, forward, refinement)


def memory_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def predicted_peak_bytes(model_dir: str, calib_samples: int = 128, seq_len: int = 512, method: str = "gptq",
                         batch_size: int = 8, expert_chunk: int | None = None) -> int:
    """The predicted peak anonymous memory of ``moepress compress`` on ``model_dir`` (for benchmarks)."""
    from .source import StreamedModel

    return estimate(StreamedModel(model_dir), calib_samples=calib_samples, seq_len=seq_len, method=method,
                    batch_size=batch_size, expert_chunk=expert_chunk).peak


__all__ = ["MemoryEstimate", "estimate", "memory_available", "predicted_peak_bytes"]
