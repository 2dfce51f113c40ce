#!/usr/bin/env python3
"""Speed of the Triton routed-experts kernel (moepress.runtime.triton_moe) on one GPU: a layer call's
time, its achieved memory bandwidth against the GPU's limit, and bf16 torch matmuls of the same
experts, on a Mixtral-shaped layer (hidden 4096, expert 14336, 8 experts, top-2).

    python benchmarks/triton_moe.py                     # on a CUDA GPU, about 2-3 minutes
    python benchmarks/triton_moe.py --shape tiny        # anywhere: the interpreter on CPU (checks the script)

Layers: every expert at 4, 3 or 2 bits, and a mixed one (experts at 4, 3, 2, 8, 4, 3, 2, 4 bits,
gate/up/down of an expert at its width), groups of 128 (32 at the tiny shape) with zero points, random codes and scales;
routing is random top-2 (seeded) at batch 1 and 16. For each layer and batch: the kernel's time
per call from CUDA events, replaying a CUDA graph of the call (the GPU's time, no Python launch
cost) and eagerly; the bytes it must read (codes, scales and zeros of the experts the batch hits);
bytes/s and its fraction of ``--peak-tbps`` (the H200's HBM3e: 4.8 TB/s; the issue's goal is 70% at
batch 1 on an H100-class GPU); a device-to-device copy's bandwidth for the practical ceiling; the
same experts in bf16 through torch (one matmul per hit expert and projection, rows grouped before
timing) and the ratio; and the kernel's error against the reference runtime's float32 output.
With time left under ``--budget-s`` it sweeps launch configurations on the 4-bit layer at batch 1.
Writes benchmarks/results/triton-moe-<shape>-<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SHAPES = {  # experts, hidden, intermediate, top-k, group size
    "mixtral": (8, 4096, 14336, 2, 128),
    "tiny": (4, 64, 128, 2, 32),
}
LAYERS = {"4b": [4], "3b": [3], "2b": [2], "mixed": [4, 3, 2, 8, 4, 3, 2, 4]}
SWEEP = [dict(block_n_gate_up=bg, block_n_down=bd, num_warps=w, num_stages=s)
         for bg, bd, w, s in [(32, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 2, 2), (64, 128, 8, 3),
                              (128, 128, 8, 3)]]


def fail(message: str) -> None:
    print(f"benchmarks/triton_moe.py: {message}", file=sys.stderr)
    sys.exit(2)


def build_layer(widths, experts, hidden, inter, group_size, device, seed):
    """A PackedExperts with random codes: expert e at widths[e % len(widths)], asymmetric groups."""
    from transformers.activations import ACT2FN

    from moepress.quantize import QuantizedWeight
    from moepress.runtime import PackedExperts

    g = torch.Generator(device=device).manual_seed(seed)

    def weight(out, inp, bits):
        codes = torch.randint(0, 2**bits, (out, inp), generator=g, device=device, dtype=torch.uint8)
        groups = inp // group_size
        scales = (torch.rand(out, groups, generator=g, device=device) + 0.5) / (2**bits * inp**0.5)
        zeros = torch.randint(0, 2**bits, (out, groups), generator=g, device=device, dtype=torch.uint8)
        return QuantizedWeight.from_codes(codes, scales, zeros, bits, group_size)

    packed = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for e in range(experts):
        bits = widths[e % len(widths)]
        packed["gate_proj"].append(weight(inter, hidden, bits))
        packed["up_proj"].append(weight(inter, hidden, bits))
        packed["down_proj"].append(weight(hidden, inter, bits))
    return PackedExperts(experts, hidden, inter, ACT2FN["silu"], packed)


def routing(tokens, experts, top_k, hidden, device, seed, dtype):
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g, device=device)
    weights, index = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
    x = torch.randn(tokens, hidden, generator=g, device=device)
    return x.to(dtype), index, (weights / weights.sum(-1, keepdim=True)).to(dtype)


class DenseExperts:
    """The same experts dequantized to bf16 (the activations' dtype): per hit expert, x @ [gate; up].T, SiLU, @ down.T, as
    transformers' eager loop computes them (rows per expert found before timing)."""

    def __init__(self, packed, index, dtype):
        self.gate_up = [torch.cat([packed[e].gate_proj.dequantize(dtype), packed[e].up_proj.dequantize(dtype)])
                        for e in range(packed.num_experts)]
        self.down = [packed[e].down_proj.dequantize(dtype) for e in range(packed.num_experts)]
        self.inter = packed.intermediate_size
        flat = index.reshape(-1)
        self.groups = [(e, torch.nonzero(flat == e).flatten()) for e in range(packed.num_experts) if bool((flat == e).any())]
        self.top_k = index.shape[1]

    def __call__(self, x, weights):
        out = torch.zeros_like(x)
        flat_weights = weights.reshape(-1)
        for e, pairs in self.groups:
            tokens = pairs // self.top_k
            h = x[tokens] @ self.gate_up[e].T
            h = torch.nn.functional.silu(h[:, :self.inter]) * h[:, self.inter:]
            out.index_add_(0, tokens, (h @ self.down[e].T) * flat_weights[pairs, None])
        return out

    def hit_bytes(self):
        return sum(self.gate_up[e].numel() * 2 + self.down[e].numel() * 2 for e, _ in self.groups)


def time_call(fn, iters, cuda, graph=True):
    """Seconds per call (median over ``iters`` CUDA-event timings; wall clock on CPU)."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters, None
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    call, graph_error = fn, None
    if graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
            call = cuda_graph.replay
        except Exception as error:  # noqa: BLE001 - recorded, and the eager time still measured
            graph_error = f"{type(error).__name__}: {error}"[:200]
            call = fn
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2], graph_error


def copy_bandwidth(cuda):
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), the practical ceiling."""
    if not cuda:
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds, _ = time_call(lambda: dst.copy_(src), 10, True, graph=False)
    return 2 * (1 << 30) / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"some of {', '.join(LAYERS)}")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--peak-tbps", type=float, default=4.8, help="the GPU's memory bandwidth limit (H200: 4.8)")
    parser.add_argument("--budget-s", type=float, default=150, help="no launch-config sweep past this many seconds")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default=None,
                        help="activations (default bfloat16; float16 in the interpreter, whose bfloat16 dot is wrong)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and args.shape != "tiny":
        fail(f"--shape {args.shape} needs a CUDA GPU (none visible); on a CPU, --shape tiny runs the kernel in "
             "Triton's interpreter to check this script")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("triton is not installed (pip install 'moepress[gpu]')")
    from moepress.runtime.triton_moe import KernelConfig, TritonExperts

    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float16"))
    began = time.perf_counter()
    device = "cuda" if cuda else "cpu"
    experts, hidden, inter, top_k, group_size = SHAPES[args.shape]
    iters = args.iters if cuda else 1
    batches = [int(b) for b in args.batches.split(",")]
    layers = args.layers.split(",")
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown:
        fail(f"unknown layers {unknown}; choose from {', '.join(LAYERS)}")
    peak = args.peak_tbps * 1e12
    result = dict(shape=dict(experts=experts, hidden=hidden, intermediate=inter, top_k=top_k, group_size=group_size),
                  device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: times not meaningful)",
                  torch=torch.__version__, triton=triton.__version__, dtype=str(dtype), peak_bytes_per_s=peak,
                  copy_bytes_per_s=copy_bandwidth(cuda), rows=[], sweep=[])
    print(f"# {result['device']}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for name in layers:
        packed = build_layer(LAYERS[name], experts, hidden, inter, group_size, device, seed=1)
        kernel = TritonExperts(packed)
        for batch in batches:
            x, index, weights = routing(batch, experts, top_k, hidden, device, batch, dtype)
            compiled = time.perf_counter()
            out = kernel(x, index, weights)
            compiled = time.perf_counter() - compiled
            reference = packed(x.float(), index, weights.float())
            error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            hit = sorted(set(index.reshape(-1).tolist()))
            read = sum(kernel.expert_bytes(e) for e in hit)
            seconds, graph_error = time_call(lambda: kernel(x, index, weights), iters, cuda)
            eager, _ = time_call(lambda: kernel(x, index, weights), iters, cuda, graph=False)
            dense = DenseExperts(packed, index, dtype)
            dense_error = ((dense(x, weights).float() - reference).abs().max() / reference.abs().max()).item()
            dense_seconds, _ = time_call(lambda: dense(x, weights), iters, cuda)
            row = dict(layer=name, batch=batch, experts_hit=len(hit), bytes_read=read, seconds=seconds,
                       eager_seconds=eager, bytes_per_s=read / seconds, peak_fraction=read / seconds / peak,
                       bf16_seconds=dense_seconds, bf16_bytes=dense.hit_bytes(),
                       bf16_peak_fraction=dense.hit_bytes() / dense_seconds / peak, speedup_vs_bf16=dense_seconds / seconds,
                       max_rel_error=error, bf16_max_rel_error=dense_error, first_call_seconds=compiled,
                       graph_error=graph_error, config=vars(kernel.config), split_k=kernel.split_k(batch, top_k))
            result["rows"].append(row)
            print(f"{name:>5} batch {batch:>2}: {seconds * 1e6:9.1f} us ({eager * 1e6:.1f} eager), "
                  f"{read / seconds / 1e9:8.1f} GB/s = {row['peak_fraction']:.0%} of peak; {dtype} {dense_seconds * 1e6:.1f} us "
                  f"-> {row['speedup_vs_bf16']:.2f}x; error {error:.2e} ({dtype} {dense_error:.2e}); "
                  f"first call {compiled:.1f} s", flush=True)
            dense = None  # its bf16 weights freed before the next layer is built
        del packed, kernel
        if cuda:
            torch.cuda.empty_cache()
    if cuda and "4b" in layers and 1 in batches:
        packed = build_layer(LAYERS["4b"], experts, hidden, inter, group_size, device, seed=1)
        x, index, weights = routing(1, experts, top_k, hidden, device, 1, dtype)
        for config in SWEEP:
            if time.perf_counter() - began > args.budget_s:
                break
            kernel = TritonExperts(packed, KernelConfig(**config))
            hit = sorted(set(index.reshape(-1).tolist()))
            read = sum(kernel.expert_bytes(e) for e in hit)
            try:
                seconds, _ = time_call(lambda: kernel(x, index, weights), iters, cuda)
            except Exception as error:  # noqa: BLE001 - a config the GPU refuses (registers, shared memory)
                result["sweep"].append(dict(config=config, error=f"{type(error).__name__}: {error}"[:200]))
                continue
            result["sweep"].append(dict(config=config, seconds=seconds, peak_fraction=read / seconds / peak))
            print(f"sweep 4b batch 1 {config}: {seconds * 1e6:.1f} us = {read / seconds / peak:.0%} of peak", flush=True)
            del kernel
    result["total_seconds"] = time.perf_counter() - began
    print()
    print("| layer | batch | experts hit | MB read | us/call (graph) | us eager | GB/s | of peak | bf16 us | vs bf16 | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['layer']} | {r['batch']} | {r['experts_hit']} | {r['bytes_read'] / 1e6:.1f} | {r['seconds'] * 1e6:.1f} | "
              f"{r['eager_seconds'] * 1e6:.1f} | {r['bytes_per_s'] / 1e9:.0f} | {r['peak_fraction']:.0%} | "
              f"{r['bf16_seconds'] * 1e6:.1f} | {r['speedup_vs_bf16']:.2f}x | {r['max_rel_error']:.1e} |")
    if result["copy_bytes_per_s"]:
        print(f"\ndevice copy: {result['copy_bytes_per_s'] / 1e9:.0f} GB/s "
              f"({result['copy_bytes_per_s'] / peak:.0%} of {args.peak_tbps} TB/s)")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"triton-moe-{args.shape}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
