#!/usr/bin/env python3
"""The speed harness: greedy decoding tokens/s of models side by side, in one run, as ratios.

    python benchmarks/speed.py --reference zoo/models/tiny-mixtral --models OUT1 OUT2 --threads 1
    python benchmarks/speed.py --runtimes --threads 1     # bf16 transformers vs moepress's runtimes

Every model (the uncompressed reference first, then each moepress checkpoint) is loaded with
``moepress.load`` (``--runtime``: fast by default, or reference) and decodes ``--new-tokens`` tokens greedily with the KV cache from the same
prompts, at batch 1 and at ``--batch`` (default 16), ``--repeats`` times after one warm-up; the
median tokens/s is reported, with the ratio to the reference measured in the same run (these
machines are noisy: compare ratios, not absolute figures). The models are interleaved repeat by
repeat so that a change in machine load hits all of them alike. Writes
benchmarks/results/speed-<date>.json and prints a markdown table. Not run in CI.

``--runtimes`` compares moepress's two runtimes with the uncompressed model on each zoo model
(``--zoo``, default tiny-mixtral, tiny-deepseek and moefied-smollm2 where present): it compresses
4-, 3- and 2-bit checkpoints and a mixed plan at ``--mixed-budget`` (default 3 bits) into
``--work`` (reused when there), and measures, for every checkpoint, the reference runtime
(dequantize per call) and the fast one (``moepress.runtime.fast``; with ``widen`` too for the
2- and 3-bit ones), all in bf16, against transformers in bf16 with each of its expert
implementations (the fastest is the baseline: ``vs bf16``) and in float32 (``vs fp32``). Each row
also gets its memory from a process of its own (resident after loading, and the peak while
decoding at each batch size) and, for moepress's runtimes, how far its logits are from the
reference runtime's in bf16 (with the reference's own bf16-vs-float32 distance for scale). Writes
benchmarks/results/speed-fast-<date>.json.

``--llamacpp`` (with ``--runtimes``) adds llama.cpp itself: moepress's f16, 4- and 3-bit GGUFs
(``compress --target llamacpp`` + ``export --format gguf``) decoded by ``llama-batched-bench`` at
the same prompt and generation lengths, batch sizes and thread count (its generation-only
tokens/s), as ratios to the same bf16 transformers row and to llama.cpp's own f16 file. Those rows
run after the torch rows, not interleaved with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import moepress  # noqa: E402

EXPERT_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers 5's CPU choices
ZOO = ("tiny-mixtral", "tiny-deepseek", "tiny-qwen3moe", "moefied-smollm2")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: None}


@dataclass
class Entry:
    """One row: a model folder loaded one way. ``runtime`` None is the uncompressed model through
    transformers (with ``experts`` as its expert implementation); else a moepress runtime
    (``reference``, ``fast``, ``fast-widen``)."""

    label: str
    path: str
    dtype: str | None = "bfloat16"
    runtime: str | None = None
    experts: str | None = None

    def load(self):
        from moepress.runtime.fast import FastOptions

        runtime = {None: "reference", "fast-widen": FastOptions(widen=True)}.get(self.runtime, self.runtime)
        model = moepress.load(self.path, dtype=DTYPES[self.dtype], runtime=runtime).eval()
        if self.experts is not None:
            model.set_experts_implementation(self.experts)
        return model


def decode_seconds(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of greedy decoding ``new_tokens`` after ``prompts`` [B, T] with the KV cache."""
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    seconds = time.perf_counter() - started
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return seconds


def measure(entries: list[Entry], args, baselines: dict[str, str] | None = None) -> list[dict]:
    """Tokens/s of every entry at batch 1 and ``args.batch``, interleaved; ``speed_vs_reference`` is
    against the first entry, and each of ``baselines`` (name -> label; the fastest when a name maps
    to several labels joined by '|') gets its own ratio column."""
    torch.set_num_threads(args.threads)
    models = {e.label: e.load() for e in entries}
    vocab = min(m.config.vocab_size for m in models.values())
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, args.batch):
        prompts = torch.randint(1, vocab, (batch, args.prompt_tokens), generator=generator)
        times = {label: [] for label in models}
        for model in models.values():  # warm-up
            decode_seconds(model, prompts, 2)
        for _ in range(args.repeats):
            for label, model in models.items():
                times[label].append(decode_seconds(model, prompts, args.new_tokens))
        medians = {label: statistics.median(t) for label, t in times.items()}
        base = medians[entries[0].label]
        chosen = {name: min(labels.split("|"), key=medians.get) for name, labels in (baselines or {}).items()}
        for entry in entries:
            median = medians[entry.label]
            row = {"model": entry.path if baselines is None else entry.label, "batch": batch, "threads": args.threads,
                   "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                   "seconds": [round(t, 4) for t in times[entry.label]],
                   "tokens_per_second": round(batch * args.new_tokens / median, 1),
                   "speed_vs_reference": round(base / median, 3)}
            if baselines is not None:
                row["entry"] = asdict(entry)
                for name, label in chosen.items():
                    row[f"vs_{name}"] = round(medians[label] / median, 3)
                    row[f"{name}_baseline"] = label
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | threads | tokens/s | vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {os.path.basename(os.path.normpath(r['model']))} | {r['batch']} | {r['threads']} | "
                     f"{r['tokens_per_second']} | {r['speed_vs_reference']:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------ --runtimes


def _compress(source: str, out: str, **options) -> str:
    if not os.path.exists(os.path.join(out, "moepress.json")):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        moepress.compress(source, out=out, progress=False, overwrite=True, **options)
    return out


def group_size_for(source: str, wanted: int | None) -> int:
    """``wanted``, or the largest of 128, 64, 32 that divides every linear's input (moefied-smollm2's
    hidden size 576 is no multiple of 128; a partial group has no kernel and takes the reference path)."""
    if wanted is not None:
        return wanted
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    sizes = [config[k] for k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank",
                                 "kv_lora_rank") if isinstance(config.get(k), int)]
    return next((g for g in (128, 64, 32) if all(n % g == 0 for n in sizes)), 32)


def checkpoints(source: str, work: str, args) -> dict[str, str]:
    """The checkpoints the runtime comparison needs, compressed once into ``work`` (reused)."""
    small = dict(calib_samples=args.calib_samples, seq_len=128)
    group_size = group_size_for(source, args.group_size)
    made = {f"{bits}b": _compress(source, os.path.join(work, f"{bits}b"), bits=bits, group_size=group_size, **small)
            for bits in (4, 3, 2)}
    if args.mixed_plan == "budget":  # the allocator's plan (a cost-table pass first)
        made["mixed"] = _compress(source, os.path.join(work, "mixed"), budget=args.mixed_budget, group_size=group_size,
                                  planning={**small, "group_size": group_size}, **small)
    else:
        made["mixed-cycle"] = _compress(source, os.path.join(work, "mixed-cycle"), plan=cycle_plan(source, work, group_size),
                                        **small)
    return made


def cycle_plan(source: str, work: str, group_size: int) -> str:
    """A 3-bit mixed plan without a cost table: routed experts at 2, 3 and 4 bits in turn (3 bits on
    average), everything else at 4 bits (the allocator's default for the units outside its scope).
    For models whose cost-table pass takes too long here; the formats, not their placement, set the speed."""
    import yaml

    from moepress.model import MoEView

    view = MoEView(moepress.load(source, runtime="reference"))
    units = {}
    for layer in range(view.num_layers):
        units.update({unit.name: f"4b-g{group_size}" for unit in view.linear_units(layer)})
        store = view.experts(layer)
        for e in range(store.num_experts if store is not None else 0):
            units[f"layers.{layer}.experts.{e}"] = f"{2 + (layer + e) % 3}b-g{group_size}"
    path = os.path.join(work, "mixed-cycle.yaml")
    os.makedirs(work, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump({"moepress_plan": 1, "units": units}, f)
    return path


def runtime_entries(name: str, source: str, made: dict[str, str]) -> tuple[list[Entry], dict[str, str]]:
    bf16 = [Entry(f"{name} bf16 {impl}", source, "bfloat16", None, impl) for impl in EXPERT_IMPLEMENTATIONS]
    entries = bf16 + [Entry(f"{name} fp32 grouped_mm", source, "float32", None, "grouped_mm")]
    for kind, path in made.items():
        entries.append(Entry(f"{name} {kind} reference", path, "bfloat16", "reference"))
        entries.append(Entry(f"{name} {kind} fast", path, "bfloat16", "fast"))
        if kind in ("3b", "2b") or kind.startswith("mixed"):
            entries.append(Entry(f"{name} {kind} fast widen", path, "bfloat16", "fast-widen"))
    return entries, {"bf16": "|".join(e.label for e in bf16), "fp32": entries[3].label}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux's clear_refs 5), so the next peak is the decode's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(entry: Entry, args) -> dict:
    """In this (fresh) process: the model's tensor bytes (each storage once), the process's RSS after
    loading, and for each batch size its peak RSS while decoding and how far that is above the RSS
    before the decode (the decode's own transient memory: activations, KV cache, rebuilt kernels)."""
    from moepress.runtime.fast import kernel_counts, resident_bytes

    torch.set_num_threads(args.threads)
    model = entry.load()
    result = {"tensor_mib": round(resident_bytes(model) / 2**20, 2), "rss_loaded_mib": round(_status_kib("VmRSS") / 1024, 1),
              "kernels": dict(kernel_counts(model))}
    for batch in (1, args.batch):
        prompts = torch.randint(1, model.config.vocab_size, (batch, args.prompt_tokens),
                                generator=torch.Generator().manual_seed(0))
        before = _status_kib("VmRSS")
        if _reset_peak():
            decode_seconds(model, prompts, args.new_tokens)
            peak = _status_kib("VmHWM")
            result[f"peak_decode_b{batch}_mib"] = round(peak / 1024, 1)
            result[f"decode_transient_b{batch}_mib"] = round((peak - before) / 1024, 1)
    return result


def memory(entry: Entry, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--probe-memory", json.dumps(asdict(entry)),
               "--threads", str(args.threads), "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def logits_distance(entries: list[Entry], source: str, args) -> list[dict]:
    """Teacher-forced logits of each moepress row against its checkpoint's reference runtime in
    bf16, on windows of the built-in evaluation text; and, for scale, the reference runtime in bf16
    against itself in float32."""
    from moepress.data import load_text, token_windows
    from moepress.loading import load_tokenizer

    windows = token_windows(load_text("builtin:eval"), load_tokenizer(source), 64, 4, seed=0)

    def logits(entry: Entry) -> torch.Tensor:
        with torch.no_grad():
            return entry.load()(windows).logits.float()

    def distance(a: torch.Tensor, b: torch.Tensor) -> dict:
        return {"max_abs": round(float((a - b).abs().max()), 5), "mean_abs": round(float((a - b).abs().mean()), 6),
                "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}

    rows = []
    for path in sorted({e.path for e in entries if e.runtime is not None}):
        reference = logits(Entry("", path, "bfloat16", "reference"))
        own = distance(reference, logits(Entry("", path, "float32", "reference")))
        for entry in (e for e in entries if e.path == path and e.runtime not in (None, "reference")):
            rows.append({"model": entry.label, "vs_reference_bf16": distance(logits(entry), reference),
                         "reference_bf16_vs_fp32": own})
    return rows


# ------------------------------------------------------------------ --llamacpp (with --runtimes)

LLAMACPP_KINDS = {"f16": 16, "4b": 4, "3b": 3}  # --target llamacpp --bits: the GGUFs llama.cpp decodes


def gguf_files(source: str, work: str, args) -> dict[str, str]:
    """GGUFs of ``source`` from ``compress --target llamacpp --bits N`` + ``export --format gguf``, made
    once into ``work`` (reused); a width the model's rows cannot take is left out, saying why."""
    from moepress.errors import MoepressError
    from moepress.export.gguf import export_gguf

    files = {}
    for kind, bits in LLAMACPP_KINDS.items():
        out = os.path.join(work, f"llamacpp-{kind}")
        gguf = out + ".gguf"
        try:
            if not os.path.exists(gguf):
                _compress(source, out, bits=bits, target="llamacpp", calib_samples=args.calib_samples, seq_len=128)
                export_gguf(out, gguf)
        except MoepressError as exc:
            print(f"  {os.path.basename(source)} llama.cpp {kind}: left out ({exc})")
            continue
        files[f"{kind} ({'/'.join(_unit_types(out))})"] = gguf
    return files


def _unit_types(checkpoint: str) -> list[str]:
    """The llama.cpp types a ``--target llamacpp`` checkpoint's units hold (``--bits 3`` is q4_0 on rows
    that are no multiple of 256), as a row label says them."""
    from moepress.treatment import Treatment

    with open(os.path.join(checkpoint, "moepress.json")) as f:
        units = json.load(f)["units"].values()
    return sorted({Treatment.from_unit_map(u).label for u in units})


def llamacpp_tokens_per_second(gguf: str, args) -> dict[int, list[float]]:
    """llama-batched-bench's decode tokens/s (``speed_tg``: generation only, prompt excluded) of
    ``gguf`` at batch 1 and ``args.batch`` parallel sequences, one run per repeat."""
    from moepress.export import llamacpp_tools

    tool = llamacpp_tools.tool("llama-batched-bench")
    context = (args.prompt_tokens + args.new_tokens) * args.batch + 64
    speeds: dict[int, list[float]] = {1: [], args.batch: []}
    for _ in range(args.repeats):
        done = subprocess.run([str(tool), "-m", gguf, "-c", str(context), "-npp", str(args.prompt_tokens),
                               "-ntg", str(args.new_tokens), "-npl", f"1,{args.batch}", "-t", str(args.threads),
                               "--output-format", "jsonl"], capture_output=True, text=True, check=True)
        for line in done.stdout.splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                record = json.loads(line)
                speeds[record["pl"]].append(record["speed_tg"])
    return speeds


def llamacpp_rows(name: str, source: str, work: str, rows: list[dict], args) -> list[dict]:
    """llama.cpp's decode speed on moepress's GGUFs, as ratios to this run's fastest bf16 transformers
    row (``vs_bf16``) and to llama.cpp's own f16 GGUF (``vs_llamacpp_f16``)."""
    from moepress.export import llamacpp_tools

    reason = llamacpp_tools.missing("llama-batched-bench")
    if reason is not None:
        print(f"  llama.cpp rows left out: {reason}")
        return []
    bf16 = {r["batch"]: r["tokens_per_second"] / r["vs_bf16"] for r in rows if r.get("vs_bf16") == 1.0}
    speeds = {kind: llamacpp_tokens_per_second(path, args) for kind, path in gguf_files(source, work, args).items()}
    out = []
    for batch in (1, args.batch):
        for kind, by_batch in speeds.items():
            tps = statistics.median(by_batch[batch])
            row = {"model": f"{name} llama.cpp {kind}", "batch": batch, "threads": args.threads,
                   "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                   "tokens_per_second": round(tps, 1), "all_tokens_per_second": [round(t, 1) for t in by_batch[batch]],
                   "vs_bf16": round(tps / bf16[batch], 3) if batch in bf16 else None}
            f16 = next((k for k in speeds if k.startswith("f16")), None)
            if f16 is not None:
                row["vs_llamacpp_f16"] = round(tps / statistics.median(speeds[f16][batch]), 3)
            out.append(row)
    return out


def llamacpp_table(rows: list[dict]) -> str:
    lines = ["| model | batch | tokens/s | vs bf16 transformers | vs llama.cpp f16 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['tokens_per_second']} | {r['vs_bf16']:.2f}x | "
                     f"{r.get('vs_llamacpp_f16', float('nan')):.2f}x |")
    return "\n".join(lines)


def runtime_table(rows: list[dict], memories: dict[str, dict]) -> str:
    lines = ["| model | batch | tokens/s | vs bf16 | vs fp32 | tensors MiB | peak RSS MiB (decode +) | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = memories.get(r["model"], {})
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(m.get("kernels", {}).items())) or "-"
        batch = r["batch"]
        peak = f"{m.get(f'peak_decode_b{batch}_mib', '?')} (+{m.get(f'decode_transient_b{batch}_mib', '?')})"
        lines.append(f"| {r['model']} | {r['batch']} | {r['tokens_per_second']} | {r['vs_bf16']:.2f}x | "
                     f"{r['vs_fp32']:.2f}x | {m.get('tensor_mib', '?')} | {peak} | {kernels} |")
    return "\n".join(lines)


def logits_table(rows: list[dict]) -> str:
    lines = ["| model | max abs vs reference bf16 | mean abs | top-1 agree | reference bf16 vs fp32: max abs | mean abs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d, own = r["vs_reference_bf16"], r["reference_bf16_vs_fp32"]
        lines.append(f"| {r['model']} | {d['max_abs']} | {d['mean_abs']} | {d['top1_agreement']} | {own['max_abs']} | "
                     f"{own['mean_abs']} |")
    return "\n".join(lines)


def run_runtimes(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="moepress-speed-")
    names = args.zoo or [n for n in ZOO if os.path.isdir(os.path.join(ROOT, "zoo", "models", n))]
    results = {"work": work, "models": {}}
    for name in names:
        source = os.path.join(ROOT, "zoo", "models", name)
        made = checkpoints(source, os.path.join(work, name), args)
        entries, baselines = runtime_entries(name, source, made)
        rows = measure(entries, args, baselines)
        memories = {e.label: memory(e, args) for e in entries}
        distances = logits_distance(entries, source, args)
        results["models"][name] = {"checkpoints": made, "rows": rows, "memory": memories, "logits": distances}
        print(f"\n{name} ({args.threads} thread(s); baseline 'vs bf16': the fastest bf16 expert implementation)")
        print(runtime_table(rows, memories))
        print(logits_table(distances))
        if args.llamacpp:
            engine = llamacpp_rows(name, source, os.path.join(work, name), rows, args)
            results["models"][name]["llamacpp"] = engine
            print(llamacpp_table(engine))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="the uncompressed model (a folder)")
    p.add_argument("--models", nargs="+", help="moepress checkpoints to compare with it")
    p.add_argument("--runtimes", action="store_true", help="bf16 transformers vs moepress's runtimes on the zoo")
    p.add_argument("--llamacpp", action="store_true",
                   help="with --runtimes: also llama.cpp (llama-batched-bench) on moepress's f16, 4- and 3-bit GGUFs")
    p.add_argument("--zoo", nargs="+", help=f"zoo models for --runtimes (default: those of {', '.join(ZOO)} present)")
    p.add_argument("--work", help="folder for --runtimes' checkpoints (default: a new temp folder; reused when given)")
    p.add_argument("--group-size", type=int, default=None,
                   help="--runtimes' group size (default: the largest of 128, 64, 32 dividing the model's sizes)")
    p.add_argument("--mixed-budget", default="3bits", help="--runtimes' mixed plan budget (default 3bits)")
    p.add_argument("--mixed-plan", default="budget", choices=("budget", "cycle"),
                   help="--runtimes' mixed plan: the allocator's at --mixed-budget (default), or experts at 2/3/4 bits "
                        "in turn (no cost-table pass)")
    p.add_argument("--calib-samples", type=int, default=32, help="--runtimes' calibration windows (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch", type=int, default=16, help="the batched row's batch size (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="load every model in bfloat16 (default: as moepress.load does)")
    p.add_argument("--runtime", default="fast", choices=("fast", "reference", "fast-widen"),
                   help="moepress runtime of the --models (default fast, what moepress.load gives)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/speed[-fast]-<date>.json)")
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)  # internal: one row's memory, in its own process
    args = p.parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(Entry(**json.loads(args.probe_memory)), args)))
        return 0
    date = datetime.date.today().isoformat()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "torch": torch.__version__}
    if args.runtimes:
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"speed-fast-{date}.json")
        payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]), "machine": machine,
                   "settings": vars(args), **run_runtimes(args)}
    else:
        if not args.reference or not args.models:
            p.error("give --reference and --models, or --runtimes")
        for path in [args.reference, *args.models]:
            if not os.path.isdir(path):
                p.error(f"{path} is not a model folder")
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"speed-{date}.json")
        dtype = "bfloat16" if args.bf16 else None
        entries = [Entry(path, path, dtype, None if i == 0 else args.runtime) for i, path in
                   enumerate([args.reference, *args.models])]
        rows = measure(entries, args)
        payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]), "machine": machine,
                   "settings": vars(args), "rows": rows}
        print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
