#!/usr/bin/env python3
"""The scale benchmark: memory and time of ``moepress compress`` as models get deeper and larger.

    python benchmarks/scale.py --shape small                         # 6 and 12 layers, rtn4 gptq4 mixed
    python benchmarks/scale.py --shape small --resume-check gptq4    # + kill -9 half way, rerun, compare
    python benchmarks/scale.py --shape big --methods rtn4            # 15.4 GB in bf16 (24 layers)
    python benchmarks/scale.py --shape mixtral-layer                 # one Mixtral-8x7B layer, GPTQ, x32
    python benchmarks/scale.py --shape tiny --resume-check           # a smoke test of the benchmark (minutes)

Not run in CI. Models are synthetic (random bf16 weights, benchmarks/synthetic_moe.py), generated
under --workdir one layer at a time and deleted at the end unless --keep: this measures memory and
time, not quality. Presets (--shape, several allowed):

    tiny           qwen3_moe, hidden 256, 8 experts of 256, top-2, 4/2 heads x 64; 2 and 4 layers
    small          qwen3_moe, hidden 1024, 16 experts of 512, top-4, 16/4 heads x 64; 6 and 12 layers
    big            qwen3_moe, hidden 2048, 64 experts of 768, top-8, 32/4 heads x 128; 24 layers, 15.4 GB
    mixtral-layer  mixtral, hidden 4096, 8 experts of 14336, top-2, 32/8 heads x 128; 1 layer (2.9 GB),
                   gptq4 on 4 x 128 calibration tokens, time and memory projected to 32 layers

Treatments (--methods): ``rtn4`` (--method rtn --bits 4), ``gptq4`` (--bits 4; any rtnN/gptqN works),
``mixed`` (a plan file: attention at 4 bits, whole experts alternating 2/3/4 bits, group 128, GPTQ).

Each run is ``python -m moepress.cli compress ... --quiet`` in its own process with OMP_NUM_THREADS
= --threads; /proc/PID/status (the process and its children) is polled every 50 ms for RssAnon
(anonymous memory: what the run itself holds; memory-mapped shards count in VmRSS but are the page
cache's) and VmRSS. Recorded: peak RssAnon, peak VmRSS, wall time, bytes written under --out, and
the mean time per layer from the output's moepress.json when it records per-layer timings (else
wall time / layers).

Targets (PASS/FAIL under the table): peak RssAnon flat in depth (deepest within 10% of shallowest),
within 20% of ``moepress.pipeline.memory.predicted_peak_bytes`` when that exists, time linear in
depth (2N / N within 1.7-2.3, i.e. the depth ratio +-15%), and with --resume-check, the overhead of
resuming after ``kill -9`` below one layer's time, with the resumed output's tensors identical
(sha256) to the uninterrupted run's.

Writes benchmarks/results/scale-<date>.json (machine, command line, every row) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.synthetic_moe import GB, SHAPES, generate, layer_params, model_bytes, train_tokenizer, verify_load  # noqa: E402

MB = 1e6
DEFAULT_METHODS = ("rtn4", "gptq4", "mixed")
POLL_SECONDS = 0.05
OUTPUT_FRACTION = 0.35  # a 4-bit checkpoint is ~0.3x its bf16 source; for the disk check


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- memory sampling

def _status(pid: int) -> dict[str, int]:
    """RssAnon and VmRSS of one process, bytes (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


def run_monitored(cmd: list[str], env: dict, log_path: str, *, kill_after: float | None = None,
                  timeout: float | None = None, cwd: str = ROOT) -> dict:
    """Run ``cmd``; peak RssAnon / VmRSS summed over its process tree, sampled every 50 ms. With
    ``kill_after`` seconds, SIGKILL it then (the resume check)."""
    peak_anon = peak_rss = 0
    killed = timed_out = False
    load = [os.getloadavg()[0]]
    with open(log_path, "w") as logf:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        while True:
            anon = rss = 0
            for p in _tree(proc.pid):
                s = _status(p)
                anon += s.get("RssAnon", 0)
                rss += s.get("VmRSS", 0)
            peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - started
            if not killed and ((kill_after is not None and elapsed >= kill_after) or (timeout and elapsed >= timeout)):
                timed_out = kill_after is None
                for p in reversed(_tree(proc.pid)):  # children first, then the run itself: kill -9
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
            if int(elapsed / 10) >= len(load):  # the machine's 1-minute load every 10 s: other jobs skew times
                load.append(os.getloadavg()[0])
            time.sleep(POLL_SECONDS)
        wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": round(wall, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2), "load_average": round(sum(load) / len(load), 2),
            "killed": killed, "timed_out": timed_out,
            "peak_rss_anon_bytes": peak_anon, "peak_vm_rss_bytes": peak_rss,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024}  # the kernel's high-water VmRSS of the run itself


def log_tail(path: str, lines: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    text = [t for t in text if not t.startswith(("Loading weights", "Writing model"))] or text
    return " | ".join(text[-lines:])


# ----------------------------------------------------------------- treatments

def method_args(method: str, plan_path: str | None) -> list[str]:
    if method == "mixed":
        return ["--plan", plan_path]
    m = re.fullmatch(r"(rtn|gptq)(\d)", method)
    if not m:
        raise SystemExit(f"scale: unknown method {method!r} (rtn4, gptq4, rtn3, gptq2, ..., mixed)")
    return (["--method", "rtn"] if m.group(1) == "rtn" else []) + ["--bits", m.group(2)]


def quant_method(method: str) -> str:
    return "rtn" if method.startswith("rtn") else "gptq"


def write_mixed_plan(path: str, shape, depth: int) -> None:
    """Attention at 4 bits, whole experts alternating 2/3/4 bits (group 128), GPTQ: every linear gets
    an option (the router is not a quantized linear)."""
    import yaml

    units = {}
    for layer in range(depth):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            units[f"layers.{layer}.attn.{proj}"] = "4b-g128"
        for e in range(shape.experts):
            units[f"layers.{layer}.experts.{e}"] = f"{(2, 3, 4)[(layer * shape.experts + e) % 3]}b-g128"
    plan = {"moepress_plan": 1, "strategy": "manual", "estimator": None, "granularity": "expert", "budget": None,
            "quantization": {"method": "gptq", "symmetric": False, "act_order": "static", "damp": 0.01},
            "info": {"keep_element_size": 2, "note": "benchmarks/scale.py: attention 4b, experts 2/3/4b in turn"},
            "units": units}
    with open(path, "w") as f:
        yaml.safe_dump(plan, f, sort_keys=False, width=120)


# ----------------------------------------------------------------- outputs

def dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


LAYER_KEYS = ("layer_seconds", "seconds_per_layer", "per_layer_seconds", "layer_times", "layers_seconds",
              "layer_timings")


def _numbers(value) -> list[float] | None:
    """Per-layer seconds from a list/dict of numbers or of {seconds: ...} records."""
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else None
    if not items:
        return None
    out = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in ("seconds", "total", "wall_seconds", "time") if k in item), None)
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            return None
        out.append(float(item))
    return out


def layer_timings(record, path: str = "") -> tuple[str, list[float]] | None:
    """Find per-layer timings anywhere in moepress.json: a key like ``layer_seconds`` (or ``layers``
    inside a ``timing``/``timings`` mapping) holding numbers per layer."""
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        timing_block = path.rsplit(".", 1)[-1] in ("timing", "timings")
        if key in LAYER_KEYS or (timing_block and key in ("layers", "per_layer")):
            numbers = _numbers(value)
            if numbers:
                return f"{path}.{key}".lstrip("."), numbers
    for key, value in record.items():
        if isinstance(value, dict) and key != "units":
            found = layer_timings(value, f"{path}.{key}")
            if found:
                return found
    return None


def tensor_hashes(folder: str) -> dict[str, tuple]:
    """sha256 of every tensor's bytes in every .safetensors file under ``folder`` (read from the
    file's header and byte ranges, so sharding and dtype do not matter): name -> (dtype, shape, sha)."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".safetensors"):
                continue
            with open(os.path.join(base, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                start = 8 + n
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    lo, hi = info["data_offsets"]
                    f.seek(start + lo)
                    h, left = hashlib.sha256(), hi - lo
                    while left:
                        chunk = f.read(min(left, 1 << 24))
                        h.update(chunk)
                        left -= len(chunk)
                    out[key] = (info["dtype"], tuple(info["shape"]), h.hexdigest())
    return out


def compare_outputs(a: str, b: str) -> dict:
    ha, hb = tensor_hashes(a), tensor_hashes(b)
    common = set(ha) & set(hb)
    differ = sorted(k for k in common if ha[k] != hb[k])
    only_a, only_b = sorted(set(ha) - set(hb)), sorted(set(hb) - set(ha))
    return {"tensors": len(ha), "identical": bool(ha) and not differ and not only_a and not only_b,
            "differing": len(differ), "differing_examples": differ[:5], "only_uninterrupted": only_a[:5],
            "only_resumed": only_b[:5]}


def partial_state(out: str) -> dict:
    """What the killed run left beside (or in) OUT: hidden entries of OUT's parent named after it
    (e.g. ``.OUT.moepress-partial``), their size, how many layers a JSON file there says are done
    (``layers_done`` or the like) and how many distinct layer numbers its file names carry."""
    parent, base = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
    entries = [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if _beside(e, base)]
    if os.path.isdir(out):
        entries.append(out)
    layers: set[int] = set()
    counts: list[tuple[bool, int]] = []
    for entry in entries:
        for b, dirs, files in os.walk(entry) if os.path.isdir(entry) else [(parent, [], [os.path.basename(entry)])]:
            for name in files + dirs:
                rel = os.path.relpath(os.path.join(b, name), entry)
                for m in re.finditer(r"layers?[-_.]?0*(\d+)", rel):
                    layers.add(int(m.group(1)))
                if name.endswith(".json") and os.path.getsize(os.path.join(b, name)) < (1 << 20):
                    try:
                        with open(os.path.join(b, name)) as f:
                            data = json.load(f)
                    except (OSError, ValueError):
                        continue
                    for key in ("layers_done", "completed_layers", "done_layers", "layers_completed", "next_layer"):
                        v = data.get(key) if isinstance(data, dict) else None
                        if isinstance(v, list):
                            v = len(v)
                        if isinstance(v, int) and not isinstance(v, bool):
                            counts.append((name == "state.json", v))  # the pipeline's state.json first
                            break
    declared = max(counts)[1] if counts else None
    # Only a count the pipeline states is trusted for the remaining fraction: a file per layer may also
    # exist for the layer in progress (the layers named in file names are reported, not used).
    return {"entries": [os.path.basename(e) for e in entries], "bytes": sum(dir_bytes(e) if os.path.isdir(e)
            else os.path.getsize(e) for e in entries), "layers_done": declared,
            "layers_done_source": "json" if declared is not None else None,
            "layers_in_file_names": len(layers)}


def _beside(entry: str, base: str) -> bool:
    """``entry`` (a name in OUT's parent) belongs to the run writing OUT = ``base``: a work folder or
    temporary such as ``.OUT.moepress-partial``, ``.OUT`` or ``OUT.tmp`` (not ``OUT-resume``'s)."""
    return entry in (f".{base}",) or entry.startswith((f".{base}.", f".{base}_", f"{base}."))


def remove_out_and_partials(out: str) -> None:
    parent, base = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
    if os.path.isdir(parent):
        for e in os.listdir(parent):
            if e == base or _beside(e, base):
                path = os.path.join(parent, e)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


# ----------------------------------------------------------------- prediction

PREDICT = r"""
import json, sys
try:
    from moepress.pipeline.memory import predicted_peak_bytes
except ImportError:
    print(json.dumps([None, "no prediction (moepress.pipeline.memory.predicted_peak_bytes not importable)"])); sys.exit()
try:
    chunk = {"expert_chunk": int(sys.argv[5])} if len(sys.argv) > 5 else {}  # only when compress got --expert-chunk
    value = predicted_peak_bytes(sys.argv[1], calib_samples=int(sys.argv[2]), seq_len=int(sys.argv[3]), method=sys.argv[4],
                                 **chunk)
except Exception as exc:  # TypeError/ImportError: another signature; anything else must not sink the benchmark
    print(json.dumps([None, f"no prediction ({type(exc).__name__}: {exc})"[:300]])); sys.exit()
if isinstance(value, dict):
    value = next((value[k] for k in ("peak", "peak_bytes", "total", "bytes") if k in value), None)
elif hasattr(value, "peak_bytes"):
    value = value.peak_bytes
try:
    print(json.dumps([int(value), "predicted_peak_bytes"]))
except (TypeError, ValueError):
    print(json.dumps([None, f"no prediction (predicted_peak_bytes returned {type(value).__name__})"]))
"""


def expert_chunk_of(extra: list[str]) -> int | None:
    """The ``--expert-chunk N`` among the extra compress arguments, if any."""
    for i, arg in enumerate(extra):
        if arg == "--expert-chunk" and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--expert-chunk="):
            return int(arg.split("=", 1)[1])
    return None


def predicted_peak(model_dir: str, calib_samples: int, seq_len: int, method: str, root: str = ROOT,
                   env: dict | None = None, expert_chunk: int | None = None) -> tuple[int | None, str]:
    """``moepress.pipeline.memory.predicted_peak_bytes(model_dir, calib_samples=, seq_len=, method=,
    [expert_chunk=])`` of the moepress under test (run in that tree, like the compress runs), or
    (None, 'no prediction (why)')."""
    chunk = [] if expert_chunk is None else [str(expert_chunk)]
    proc = subprocess.run([sys.executable, "-c", PREDICT, model_dir, str(calib_samples), str(seq_len), method, *chunk],
                          cwd=root, env=env, capture_output=True, text=True)
    try:
        value, source = json.loads(proc.stdout.strip().splitlines()[-1])
        return value, source
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"no prediction (the prediction call failed: {tail})"[:300]


# ----------------------------------------------------------------- runs

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.created: list[str] = []  # what to delete at the end
        self.rows: list[dict] = []
        self.models: dict[str, dict] = {}
        self.resume: list[dict] = []
        self._tokenizer = None
        self.root = os.path.abspath(args.moepress_root)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": self.root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def path(self, *parts) -> str:
        p = os.path.join(self.workdir, *parts)
        if p not in self.created:
            self.created.append(p)
        return p

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = train_tokenizer(512)
        return self._tokenizer

    def settings(self, shape) -> tuple[int, int, list[str]]:
        a = self.args
        methods = a.methods or list(shape.methods or DEFAULT_METHODS)
        return a.calib_samples or shape.calib_samples, a.seq_len or shape.seq_len, methods

    def model(self, shape, depth: int) -> tuple[str, dict]:
        name = f"{shape.name}-{depth}L"
        folder = self.path("models", name)
        log(f"{name}: {model_bytes(shape, depth) / GB:.2f} GB in bf16 ({layer_params(shape) * 2 / GB:.3f} GB per layer); "
            f"generating under {folder}")
        spec = generate(shape, depth, folder, tokenizer=self.tokenizer, shard_bytes=self.args.shard_mb << 20,
                        log=lambda m: log(f"{name}: {m.strip()}"))
        log(f"{name}: generated in {spec.get('seconds')} s")
        if self.args.verify_load:
            spec["verify_load"] = verify_load(folder)
            log(f"{name}: from_pretrained ok: {spec['verify_load']}")
        self.models[name] = spec
        return folder, spec

    def command(self, model_dir: str, out: str, method: str, calib: int, seq: int, plan: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "moepress.cli", "compress", "--model", model_dir, "--out", out,
               "--calib-samples", str(calib), "--seq-len", str(seq), "--quiet", *method_args(method, plan)]
        if self.args.device:
            cmd += ["--device", self.args.device]
        return cmd + list(self.args.extra)

    def compress(self, shape, depth, model_dir, spec, method, calib, seq, keep_out=False) -> dict:
        name = f"{shape.name}-{depth}L"
        plan = None
        if method == "mixed":
            plan = self.path("plans", f"{name}-mixed.yaml")
            os.makedirs(os.path.dirname(plan), exist_ok=True)
            write_mixed_plan(plan, shape, depth)
        out = self.path("outputs", f"{name}-{method}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        remove_out_and_partials(out)
        logs = self.path("logs")
        os.makedirs(logs, exist_ok=True)
        cmd = self.command(model_dir, out, method, calib, seq, plan)
        log(f"{name} {method}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
        run = run_monitored(cmd, self.env, os.path.join(logs, f"{name}-{method}.log"), timeout=self.args.timeout,
                            cwd=self.root)
        row = {"shape": shape.name, "model_type": shape.model_type, "depth": depth, "model_bytes": spec["bytes"],
               "layer_bytes": layer_params(shape) * 2, "method": method, "calib_samples": calib, "seq_len": seq,
               "threads": self.args.threads, "device": self.args.device, **run,
               "status": "ok" if run["returncode"] == 0 and os.path.isdir(out) else "failed"}
        if row["status"] != "ok":
            row["error"] = ("timed out after %s s" % self.args.timeout if run["timed_out"] else
                            f"exit {run['returncode']}: {log_tail(os.path.join(logs, f'{name}-{method}.log'))}")[:300]
        row["bytes_written"] = dir_bytes(out) if os.path.isdir(out) else 0
        timing = None
        try:
            with open(os.path.join(out, "moepress.json")) as f:
                record = json.load(f)
            timing = layer_timings(record)
            row["compress_seconds_reported"] = record.get("seconds")
        except (OSError, ValueError):
            pass
        if timing:
            row["layer_seconds_mean"] = round(sum(timing[1]) / len(timing[1]), 3)
            row["layer_seconds_source"] = f"moepress.json:{timing[0]}"
            row["layer_seconds"] = timing[1]
        else:
            row["layer_seconds_mean"] = round(run["wall_seconds"] / depth, 3)
            row["layer_seconds_source"] = "wall / layers"
        predicted, source = predicted_peak(model_dir, calib, seq, quant_method(method), self.root, self.env,
                                           expert_chunk_of(list(self.args.extra)))
        row["predicted_peak_bytes"], row["prediction"] = predicted, source
        if shape.project_to:
            per_layer = row["layer_seconds_mean"]
            fixed = max(0.0, run["wall_seconds"] - per_layer * depth) if timing else 0.0
            row["projected_layers"] = shape.project_to
            row["projected_wall_seconds"] = round(fixed + per_layer * shape.project_to, 1)
            # Flat in depth (a streaming pipeline): the measured peak; holding every layer: + the rest in bf16.
            row["projected_peak_rss_anon_bytes_streaming"] = run["peak_rss_anon_bytes"]
            row["projected_peak_rss_anon_bytes_resident"] = (run["peak_rss_anon_bytes"]
                                                            + (shape.project_to - depth) * row["layer_bytes"])
        log(f"{name} {method}: {row['status']} in {run['wall_seconds']:.1f} s, peak RssAnon "
            f"{run['peak_rss_anon_bytes'] / MB:.0f} MB, VmRSS {run['peak_vm_rss_bytes'] / MB:.0f} MB, "
            f"wrote {row['bytes_written'] / MB:.1f} MB" + (f" ({row.get('error')})" if row["status"] != "ok" else ""))
        row["out"] = out
        if not keep_out and not self.args.keep:
            remove_out_and_partials(out)
        self.rows.append(row)
        return row

    def resume_check(self, shape, depth, model_dir, spec, method, calib, seq, base: dict) -> dict:
        """Kill -9 a run at --kill-fraction of the uninterrupted run's wall time, rerun the same command,
        compare time and tensors."""
        name = f"{shape.name}-{depth}L"
        result = {"shape": shape.name, "depth": depth, "method": method, "uninterrupted_seconds": base["wall_seconds"]}
        if base["status"] != "ok":
            result.update(status="skipped", error="the uninterrupted run failed")
            self.resume.append(result)
            return result
        out = self.path("outputs", f"{name}-{method}-resume")
        remove_out_and_partials(out)
        plan = os.path.join(self.workdir, "plans", f"{name}-mixed.yaml") if method == "mixed" else None
        cmd = self.command(model_dir, out, method, calib, seq, plan)
        kill_after = self.args.kill_fraction * base["wall_seconds"]
        logs = self.path("logs")
        log(f"{name} {method}: resume check, SIGKILL after {kill_after:.1f} s")
        first = run_monitored(cmd, self.env, os.path.join(logs, f"{name}-{method}-killed.log"), kill_after=kill_after,
                              cwd=self.root)
        state = partial_state(out)
        result.update(killed_after_seconds=first["wall_seconds"], killed=first["killed"],
                      killed_peak_rss_anon_bytes=first["peak_rss_anon_bytes"], partial=state)
        if not first["killed"]:
            result.update(status="not killed", error=f"the run ended (exit {first['returncode']}) before the kill")
            self.resume.append(result)
            return result
        log(f"{name} {method}: killed at {first['wall_seconds']:.1f} s; left {state['entries'] or 'nothing'} "
            f"({state['bytes'] / MB:.1f} MB, layers done: {state['layers_done']}, layers in file names: "
            f"{state['layers_in_file_names']}); rerunning")
        second = run_monitored(cmd, self.env, os.path.join(logs, f"{name}-{method}-resumed.log"),
                               timeout=self.args.timeout, cwd=self.root)
        ok = second["returncode"] == 0 and os.path.isdir(out)
        if state["layers_done"] is not None and 0 < state["layers_done"] <= depth:
            remaining, basis = (depth - state["layers_done"]) / depth, f"layers ({state['layers_done_source']})"
        else:
            remaining, basis = max(0.0, 1 - first["wall_seconds"] / base["wall_seconds"]), "time"
        overhead = second["wall_seconds"] - base["wall_seconds"] * remaining
        result.update(status="ok" if ok else "failed", resumed_seconds=second["wall_seconds"],
                      resumed_peak_rss_anon_bytes=second["peak_rss_anon_bytes"],
                      resumed_peak_vm_rss_bytes=second["peak_vm_rss_bytes"],
                      remaining_fraction=round(remaining, 3), remaining_basis=basis,
                      overhead_seconds=round(overhead, 2), layer_seconds=base["layer_seconds_mean"])
        if not ok:
            result["error"] = f"exit {second['returncode']}: {log_tail(os.path.join(logs, f'{name}-{method}-resumed.log'))}"
        else:
            result["tensors"] = compare_outputs(base["out"], out)
        log(f"{name} {method}: resumed run {second['wall_seconds']:.1f} s vs {base['wall_seconds']:.1f} s x "
            f"{remaining:.2f} left ({basis}): overhead {overhead:.1f} s; one layer {base['layer_seconds_mean']:.1f} s; "
            f"tensors identical: {result.get('tensors', {}).get('identical')}")
        if not self.args.keep:
            remove_out_and_partials(out)
        self.resume.append(result)
        return result

    def cleanup(self) -> None:
        if self.args.keep:
            log(f"kept everything under {self.workdir}")
            return
        for p in reversed(self.created):  # each with its hidden work folders and any half-generated copy
            remove_out_and_partials(p)
            shutil.rmtree(p + ".generating", ignore_errors=True)
        for sub in ("models", "outputs", "plans", "logs"):
            try:
                os.rmdir(os.path.join(self.workdir, sub))
            except OSError:
                pass
        try:
            os.rmdir(self.workdir)
        except OSError:
            pass


# ----------------------------------------------------------------- report

def markdown(rows: list[dict]) -> str:
    head = ("| shape | layers | model GB | method | calib | wall s | cpu s | load | s/layer | peak RssAnon MB | peak VmRSS MB | "
            "RssAnon / model | predicted MB | written MB | status |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pred = f"{r['predicted_peak_bytes'] / MB:.0f}" if r.get("predicted_peak_bytes") else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:80]
        per_layer = f"{r['layer_seconds_mean']:.2f}" + ("" if r["layer_seconds_source"].startswith("moepress") else "*")
        out.append(f"| {r['shape']} | {r['depth']} | {r['model_bytes'] / GB:.2f} | {r['method']} | "
                   f"{r['calib_samples']}x{r['seq_len']} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.0f} | "
                   f"{r['load_average']:.1f} | {per_layer} | "
                   f"{r['peak_rss_anon_bytes'] / MB:.0f} | {r['peak_vm_rss_bytes'] / MB:.0f} | "
                   f"{r['peak_rss_anon_bytes'] / r['model_bytes']:.2f} | {pred} | {r['bytes_written'] / MB:.1f} | {status} |")
    if any(not r["layer_seconds_source"].startswith("moepress") for r in rows):
        out.append("\n\\* s/layer = wall time / layers (the output's moepress.json records no per-layer timings)")
    out.append("cpu s: user + system seconds of the run; load: the machine's mean 1-minute load average during it "
               "(above --threads, other jobs shared the cores and wall times are inflated)")
    return "\n".join(out)


def targets(rows: list[dict], resume: list[dict]) -> list[dict]:
    res = []
    ok = [r for r in rows if r["status"] == "ok"]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        for method in dict.fromkeys(r["method"] for r in ok if r["shape"] == shape):
            mine = sorted((r for r in ok if r["shape"] == shape and r["method"] == method), key=lambda r: r["depth"])
            if len(mine) < 2 or mine[0]["depth"] == mine[-1]["depth"]:
                continue
            a, b = mine[0], mine[-1]
            change = b["peak_rss_anon_bytes"] / a["peak_rss_anon_bytes"] - 1
            res.append({"target": "memory flat in depth", "shape": shape, "method": method, "pass": abs(change) <= 0.10,
                        "detail": f"{shape} {method}: peak RssAnon {b['peak_rss_anon_bytes'] / MB:.0f} MB at {b['depth']} "
                                  f"layers vs {a['peak_rss_anon_bytes'] / MB:.0f} MB at {a['depth']} ({change:+.1%}; "
                                  f"limit +-10%)"})
            want = b["depth"] / a["depth"]
            ratio = b["wall_seconds"] / a["wall_seconds"]
            lo, hi = 0.85 * want, 1.15 * want
            res.append({"target": "time linear in depth", "shape": shape, "method": method, "pass": lo <= ratio <= hi,
                        "detail": f"{shape} {method}: {b['wall_seconds']:.1f} s at {b['depth']} layers / "
                                  f"{a['wall_seconds']:.1f} s at {a['depth']} = {ratio:.2f}x (limit {lo:.2f}-{hi:.2f}; "
                                  f"cpu time {b['cpu_seconds'] / max(a['cpu_seconds'], 1e-9):.2f}x)"})
    predicted = [r for r in ok if r.get("predicted_peak_bytes")]
    for r in predicted:
        err = r["peak_rss_anon_bytes"] / r["predicted_peak_bytes"] - 1
        res.append({"target": "memory as predicted", "shape": r["shape"], "method": r["method"], "pass": abs(err) <= 0.20,
                    "detail": f"{r['shape']} {r['depth']} layers {r['method']}: peak RssAnon "
                              f"{r['peak_rss_anon_bytes'] / MB:.0f} MB vs predicted {r['predicted_peak_bytes'] / MB:.0f} MB "
                              f"({err:+.1%}; limit +-20%)"})
    if ok and not predicted:
        res.append({"target": "memory as predicted", "pass": None, "detail": ok[0]["prediction"]})
    for c in resume:
        if c["status"] != "ok":
            res.append({"target": "resume overhead", "shape": c["shape"], "method": c["method"], "pass": False,
                        "detail": f"{c['shape']} {c['depth']} layers {c['method']}: {c['status']}: {c.get('error', '')}"})
            continue
        t = c["tensors"]
        res.append({"target": "resume overhead", "shape": c["shape"], "method": c["method"],
                    "pass": c["overhead_seconds"] < c["layer_seconds"],
                    "detail": f"{c['shape']} {c['depth']} layers {c['method']}: killed at {c['killed_after_seconds']:.1f} s, "
                              f"resumed run {c['resumed_seconds']:.1f} s vs {c['uninterrupted_seconds']:.1f} s x "
                              f"{c['remaining_fraction']:.2f} left (by {c['remaining_basis']}): overhead "
                              f"{c['overhead_seconds']:.1f} s vs one layer {c['layer_seconds']:.1f} s"})
        res.append({"target": "resumed output identical", "shape": c["shape"], "method": c["method"],
                    "pass": t["identical"],
                    "detail": f"{c['shape']} {c['depth']} layers {c['method']}: {t['tensors']} tensors, "
                              f"{t['differing']} differ" + (f" (e.g. {t['differing_examples'][0]})" if t["differing"] else "")
                              + (f", {len(t['only_uninterrupted']) + len(t['only_resumed'])}+ in one output only"
                                 if t["only_uninterrupted"] or t["only_resumed"] else "")})
    for r in ok:
        if r.get("projected_layers"):
            res.append({"target": "projection", "shape": r["shape"], "method": r["method"], "pass": None,
                        "detail": f"{r['shape']} {r['method']} projected to {r['projected_layers']} layers: "
                                  f"{r['projected_wall_seconds'] / 60:.1f} min; peak RssAnon "
                                  f"{r['projected_peak_rss_anon_bytes_streaming'] / GB:.1f} GB streaming (flat in depth), "
                                  f"{r['projected_peak_rss_anon_bytes_resident'] / GB:.1f} GB if every layer stays "
                                  "resident (the other layers at their bf16 size)"})
    return res


def machine() -> dict:
    import torch
    import transformers

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "memory_bytes": mem,
            "cuda": torch.cuda.is_available()}


def source_info(root: str) -> dict:
    """Which moepress the compress runs used: its folder, and its commit when it is a git checkout."""
    info = {"root": root}
    try:
        info["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                            capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def disk_need(shape, depth: int, methods: list[str], keep: bool) -> int:
    b = model_bytes(shape, depth)
    outputs = len(methods) + 1 if keep else 2  # deleted after each row, but for the resume check's pair
    return int(b * (1 + OUTPUT_FRACTION * outputs) + 1 * GB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["small"], help="presets (default small)")
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated layer counts, for every shape (default: the shape's: tiny 2,4; small 6,12; "
                        "big 24; mixtral-layer 1)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help="comma-separated treatments: rtn4, gptq4 (any rtnN/gptqN), mixed (default rtn4,gptq4,mixed; "
                        "mixtral-layer: gptq4)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows (default: tiny 16, small/big 32, mixtral-layer 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: tiny/mixtral-layer 128, small/big 256)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each compress run (default 2)")
    p.add_argument("--device", default="cpu", help="passed to compress --device (default cpu; '' = compress's default)")
    p.add_argument("--resume-check", nargs="?", const="auto", default=None, metavar="METHOD",
                   help="also kill -9 a run of METHOD (default: gptq4 if measured, else the first method) on the "
                        "deepest model of the first shape half way, rerun it and compare")
    p.add_argument("--kill-fraction", type=float, default=0.55,
                   help="resume check: SIGKILL at this fraction of the uninterrupted run's wall time (default 0.55)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per compress run before it is killed (default none)")
    p.add_argument("--workdir", default="/tmp/moepress-scale", help="synthetic models and outputs (default /tmp/moepress-scale)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic models, outputs and logs")
    p.add_argument("--shard-mb", type=int, default=1024, help="shard size of the synthetic checkpoints, MB (default 1024)")
    p.add_argument("--verify-load", action="store_true",
                   help="load every generated model with AutoModelForCausalLM.from_pretrained and run a forward pass "
                        "(in this process, the whole model in memory: small shapes only)")
    p.add_argument("--moepress-root", default=ROOT,
                   help="the moepress source tree the compress runs import (default this checkout; e.g. a 'git archive' "
                        "of another commit, for before/after figures)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/scale-<date>.json)")
    p.add_argument("extra", nargs="*", help="after --: more arguments for every compress run")
    args = p.parse_args(argv)

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"scale-{date}.json")
    bench = Bench(args)
    plans = []
    for name in args.shape:
        shape = SHAPES[name]
        calib, seq, methods = bench.settings(shape)
        for m in methods:
            method_args(m, "plan.yaml")  # unknown names fail now, not after an hour
        plans.append((shape, args.depths or list(shape.depths), calib, seq, methods))

    # Disk: one model at a time (all of them with --keep) and its outputs.
    existing = bench.workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    needs = [disk_need(s, d, m, args.keep) for s, depths, _, _, m in plans for d in depths]
    need = sum(needs) if args.keep else max(needs)
    free = shutil.disk_usage(existing).free
    if need > free:
        print(f"scale: not enough disk space under {bench.workdir}: the models and outputs need about "
              f"{need / GB:.1f} GB, {free / GB:.1f} GB free (use --workdir elsewhere or fewer --depths)", file=sys.stderr)
        return 2
    os.makedirs(bench.workdir, exist_ok=True)

    payload = {"date": date, "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
               "machine": machine(), "moepress": source_info(bench.root), "settings": vars(args),
               "models": bench.models, "rows": bench.rows, "resume": bench.resume, "targets": []}

    def save():
        payload["targets"] = targets(bench.rows, bench.resume)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(out + ".tmp", out)

    try:
        for i, (shape, depths, calib, seq, methods) in enumerate(plans):
            resume_method = None
            if args.resume_check and i == 0:
                resume_method = (args.resume_check if args.resume_check != "auto"
                                 else "gptq4" if "gptq4" in methods else methods[0])
                if resume_method not in methods:
                    methods = methods + [resume_method]
            log(f"{shape.name}: {shape.model_type}, layers {depths}, methods {methods}, calibration {calib} x {seq}"
                + (f"; {shape.note}" if shape.note else ""))
            for depth in depths:
                free = shutil.disk_usage(bench.workdir).free
                if disk_need(shape, depth, methods, args.keep) > free:
                    print(f"scale: not enough disk space for {shape.name} x {depth} layers: need about "
                          f"{disk_need(shape, depth, methods, args.keep) / GB:.1f} GB, {free / GB:.1f} GB free", file=sys.stderr)
                    return 2
                model_dir, spec = bench.model(shape, depth)
                check_here = resume_method is not None and depth == max(depths)
                for method in methods:
                    row = bench.compress(shape, depth, model_dir, spec, method, calib, seq,
                                         keep_out=check_here and method == resume_method)
                    save()
                    if check_here and method == resume_method:
                        bench.resume_check(shape, depth, model_dir, spec, method, calib, seq, row)
                        if not args.keep:
                            remove_out_and_partials(row["out"])
                        save()
                if not args.keep:
                    shutil.rmtree(model_dir, ignore_errors=True)
        save()
    finally:
        bench.cleanup()

    print(markdown(bench.rows))
    print()
    for t in payload["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "INFO"}[t["pass"]]
        print(f"{mark} {t['target']}: {t['detail']}")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
