"""Record what ``moepress.compress`` writes for tiny models of every architecture (reference tensors).

What it records
---------------
For every architecture in ``moepress.model.ARCHITECTURES`` a tiny random model
(``build_tiny_model(arch, vocab_size=len(tokenizer))``, seed 0) is saved in two on-disk layouts:

* ``hub``:   ``model.save_pretrained`` + tokenizer: transformers 5 converts back to the hub names,
             one tensor per expert (``mlp.experts.N.gate_proj.weight``; mixtral and phimoe
             ``block_sparse_moe.experts.N.w1/w2/w3.weight``) except granitemoe, whose hub layout is
             ``block_sparse_moe.input_linear.weight`` [E, 2I, H] / ``output_linear`` / ``router.layer``;
* ``fused``: config (+ generation config) + tokenizer + ``model.safetensors`` holding the
             in-memory state dict as it is (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``).

``models`` in the output says, per architecture, whether each layout loads, whether the logits
agree (hub vs the in-memory model, fused vs hub) and which tensors layer 1 (an MoE layer) has on disk.

Both are loaded with ``moepress.load`` and must give identical logits (a fused layout that does not
load is recorded and skipped). Each is then compressed with GPTQ, 3 bits, group size 32 (default
static act-order) on a small calibration set; in addition RTN 4-bit group 128 on mixtral and
deepseek_v3 (hub layout), and GPTQ 2-bit per-channel with dynamic act-order on qwen3_moe (hub).

For every case the JSON holds the compress kwargs, the layout, and for every tensor in the output
checkpoint's ``*.safetensors`` files its dtype, shape and sha256 of its raw bytes (no tensor data);
``moepress.json``'s ``units`` map without the float ``error`` field, the errors separately rounded
to 6 significant digits, and ``quantization_config`` from ``config.json``. The tokenizer and the
calibration text are made exactly as ``tests/conftest.py``'s ``tokenizer`` and ``calib_file``
fixtures make them; their hashes are recorded too, with a hash of every source model's weights.

It must be run with the moepress code of the commit it names (``moepress_commit`` in the output,
also printed): the reference is what THAT code writes. To record from a worktree of another commit::

    cd /path/to/worktree && PYTHONPATH=$PWD python /path/to/tests/data/record_reference.py [--out FILE]

The script refuses to run if the imported moepress is not in a git checkout, and records whether
that checkout had uncommitted changes. The default output is ``reference_tensors.json`` beside this
script. The hashes depend on the number of torch CPU threads (a few GPTQ codes flip between 1 and
2 threads), so the script pins it (``--threads``, default 1, recorded as ``torch_num_threads``) and
a test comparing against it must call ``torch.set_num_threads`` with the same count; the CPU's
kernel set (``cpu_capability``, e.g. AVX512) is recorded too. Everything runs on the CPU:
``device`` is not passed to ``compress`` and the old default picks CUDA when present, so run it on a
machine without one (or with ``CUDA_VISIBLE_DEVICES=``) for CPU hashes; it warns if CUDA is seen.
Runtime: about 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GPTQ3 = dict(bits=3, group_size=32)
SMALL = dict(calib_samples=8, seq_len=64, batch_size=4)
# (name suffix, extra compress kwargs, archs (None = all), layouts)
CASES = [
    ("gptq3g32", dict(GPTQ3), None, ("hub", "fused")),
    ("rtn4g128", dict(method="rtn", bits=4, group_size=128), ("mixtral", "deepseek_v3"), ("hub",)),
    ("gptq2pc-dynamic", dict(bits=2, group_size=None, act_order="dynamic"), ("qwen3_moe",), ("hub",)),
]


def sha256_tensor(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order), for any dtype, scalars and empty tensors included."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """One hash over a whole state dict: every key (sorted), its dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|{sha256_tensor(t)}\n".encode())
    return h.hexdigest()


def git(args: list[str], cwd: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def code_commit() -> dict:
    import moepress

    package = os.path.dirname(os.path.abspath(moepress.__file__))
    try:
        commit = git(["rev-parse", "HEAD"], package)
        dirty = bool(git(["status", "--porcelain", "--", "."], os.path.dirname(package)))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        sys.exit(f"moepress imported from {package} is not in a git checkout ({exc}); cannot name its commit")
    return {"commit": commit, "dirty": dirty, "package": package}


def sig6(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def checkpoint_tensors(folder: str) -> dict:
    """dtype, shape and sha256 of every tensor in every ``*.safetensors`` file of ``folder``."""
    from safetensors import safe_open

    tensors: dict[str, dict] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise RuntimeError(f"{key} is in more than one shard of {folder}")
                t = f.get_tensor(key)
                tensors[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                "sha256": sha256_tensor(t)}
    return tensors


def save_layouts(model, tokenizer, root: Path, arch: str) -> dict[str, str]:
    from safetensors.torch import save_file

    hub = root / f"{arch}-hub"
    model.save_pretrained(hub)
    tokenizer.save_pretrained(hub)
    fused = root / f"{arch}-fused"
    fused.mkdir()
    model.config.save_pretrained(fused)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    return {"hub": str(hub), "fused": str(fused)}


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("reference_tensors.json")))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1). The hashes depend on it: GPTQ on 2 threads gives "
                             "different codes than on 1 for some experts, so a test must pin the same count")
    parser.add_argument("--only", nargs="*", help="only these archs (for a quick try; not for the reference)")
    args = parser.parse_args()

    import transformers

    import moepress
    from moepress.data import load_text
    from moepress.data.tokenizer import train_byte_bpe
    from moepress.model import ARCHITECTURES
    from moepress.model.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    code = code_commit()
    print(f"moepress from {code['package']} at commit {code['commit']}{' (DIRTY)' if code['dirty'] else ''}",
          flush=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cuda {torch.cuda.is_available()}, threads {torch.get_num_threads()}, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}", flush=True)
    if torch.cuda.is_available():
        print("WARNING: CUDA is available, so compress calibrates on it: these are not CPU hashes", flush=True)

    started = time.time()
    tokenizer = train_byte_bpe(load_text("builtin:calib")[:100_000], vocab_size=512)
    calib_text = load_text("builtin:calib")[:60_000]
    archs = [a for a in ARCHITECTURES if not args.only or a in args.only]
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))

    models: dict[str, dict] = {}
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moepress-reference-") as tmp:
        root = Path(tmp)
        calib = root / "calib.txt"
        calib.write_text(calib_text)
        for arch in archs:
            model = build_tiny_model(arch, vocab_size=len(tokenizer))
            with torch.no_grad():
                memory_logits = model(ids).logits
            paths = save_layouts(model, tokenizer, root, arch)
            info = {"source_state_sha256": state_sha256(model.state_dict()),
                    "source_num_tensors": {}, "source_layer1_tensors": {}, "load": {}}
            logits = {}
            for layout, path in paths.items():
                saved = checkpoint_tensors(path)
                info["source_num_tensors"][layout] = len(saved)
                # What one MoE layer looks like on disk (layer 0 is dense in qwen*_moe and deepseek_*).
                info["source_layer1_tensors"][layout] = {k: v["shape"] for k, v in saved.items()
                                                         if k.startswith("model.layers.1.")}
                try:
                    loaded = moepress.load(path)
                    with torch.no_grad():
                        logits[layout] = loaded(ids).logits
                    info["load"][layout] = "ok"
                    del loaded
                except Exception as exc:  # record and skip this layout
                    info["load"][layout] = one_line(exc)
            info["hub_logits_equal_in_memory"] = "hub" in logits and torch.equal(logits["hub"], memory_logits)
            info["fused_logits_equal_hub"] = len(logits) == 2 and torch.equal(logits["hub"], logits["fused"])
            models[arch] = info
            print(f"{arch}: load {info['load']}, hub==memory {info['hub_logits_equal_in_memory']}, "
                  f"fused==hub {info['fused_logits_equal_hub']}", flush=True)
            del model

            for suffix, kwargs, case_archs, layouts in CASES:
                if case_archs is not None and arch not in case_archs:
                    continue
                for layout in layouts:
                    name = f"{arch}-{layout}-{suffix}"
                    if info["load"][layout] != "ok":
                        cases[name] = {"skipped": f"{layout} layout does not load: {info['load'][layout]}"}
                        print(f"  {name}: SKIPPED ({cases[name]['skipped']})", flush=True)
                        continue
                    out = root / f"out-{name}"
                    t0 = time.time()
                    moepress.compress(paths[layout], calib=str(calib), out=str(out), progress=False,
                                      **SMALL, **kwargs)
                    record = json.loads((out / "moepress.json").read_text())
                    config = json.loads((out / "config.json").read_text())
                    units = {u: {k: v for k, v in rec.items() if k != "error"} for u, rec in record["units"].items()}
                    cases[name] = {
                        "arch": arch,
                        "layout": layout,
                        "compress_kwargs": {**SMALL, **kwargs, "calib": "<calib_file>", "progress": False},
                        "tensors": checkpoint_tensors(str(out)),
                        "units": units,
                        "unit_errors": {u: sig6(rec["error"]) for u, rec in record["units"].items()},
                        "quantization_config": config["quantization_config"],
                        "files": sorted(os.listdir(out)),
                    }
                    print(f"  {name}: {len(cases[name]['tensors'])} tensors, {len(units)} units, "
                          f"{time.time() - t0:.1f} s", flush=True)

    for name, case in cases.items():  # does the fused layout compress to what the hub layout does?
        hub = cases.get(name.replace("-fused-", "-hub-"))
        if case.get("layout") == "fused" and hub is not None and "tensors" in hub:
            case["same_as_hub_case"] = all(case[k] == hub[k] for k in ("tensors", "units", "quantization_config"))
            print(f"{name}: same tensors, units and quantization_config as the hub case: "
                  f"{case['same_as_hub_case']}", flush=True)

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    result = {
        "about": "tensors written by moepress.compress for tiny models (tests/data/record_reference.py)",
        "moepress_commit": code["commit"],
        "moepress_dirty": code["dirty"],
        "moepress_version": moepress.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tokenizer": {"vocab_size": len(tokenizer),
                      "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
                      "recipe": 'train_byte_bpe(load_text("builtin:calib")[:100_000], vocab_size=512)'},
        "calib": {"recipe": 'load_text("builtin:calib")[:60_000] written to a .txt file',
                  "sha256": hashlib.sha256(calib_text.encode()).hexdigest(), "chars": len(calib_text)},
        "logits_ids": 'torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))',
        "models": models,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, sort_keys=True, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(cases)} cases) in "
          f"{time.time() - started:.1f} s; recorded with moepress commit {code['commit']}", flush=True)


if __name__ == "__main__":
    main()
