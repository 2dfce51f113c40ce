"""The quality benchmark: every zoo model compressed by moepress and by the peer tools, side by side.

    python benchmarks/quality.py --models zoo/models/tiny-mixtral --bits 2 3 4 --peers hqq

Each row runs in its own process (peer tools in their own virtual environments, see
benchmarks/peers/README.md) and is evaluated on the same evaluation windows against the same
uncompressed model: perplexity, KL divergence and top-1 agreement, measured checkpoint bytes and
bits per parameter of the linear weights, compression wall time and the process's peak memory.
A tool that fails gets a row saying how. Writes benchmarks/results/quality-<date>.json and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = {  # tool -> (worker module, environment variable naming its python, default venv, setup script)
    "llmcompressor": ("benchmarks.workers.llmcompressor_worker", "MOEPRESS_LLMCOMPRESSOR_PYTHON", ".venvs/llmcompressor",
                      "benchmarks/peers/setup_llmcompressor.sh"),
    "autoround": ("benchmarks.workers.autoround_worker", "MOEPRESS_AUTOROUND_PYTHON", ".venvs/peers", "benchmarks/peers/setup_peers.sh"),
    "gptqmodel": ("benchmarks.workers.gptqmodel_worker", "MOEPRESS_GPTQMODEL_PYTHON", ".venvs/peers", "benchmarks/peers/setup_peers.sh"),
    "hqq": ("benchmarks.workers.hqq_worker", "MOEPRESS_HQQ_PYTHON", ".venvs/peers", "benchmarks/peers/setup_peers.sh"),
}


def peer_python(tool: str) -> str | None:
    _, env, default, _ = PEERS[tool]
    python = os.environ.get(env) or os.path.join(ROOT, default, "bin", "python")
    return python if os.path.exists(python) else None


def run_worker(python: str, module: str, args: list[str], timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="moepress-bench-") as workdir:
        cmd = [python, "-m", module, *args, "--workdir", workdir]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": "failed", "error": f"worker exited {proc.returncode}: {tail}"}
        return json.loads(lines[-1])


def markdown(rows: list[dict]) -> str:
    head = "| model | tool | method | bits | group | ppl | KL | top-1 | bits/param | ckpt MB | time s | peak MB | status |"
    out = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        def f(key, fmt="{}"):
            v = r.get(key)
            return "" if v is None else fmt.format(v)
        group = "-" if r.get("tool") == "baseline" else (r.get("group_size") or "channel")
        mb = "" if r.get("checkpoint_bytes") is None else f"{r['checkpoint_bytes'] / 1e6:.2f}"
        status = r.get("status", "")
        if status != "ok":
            status = f"failed: {r.get('error', '')}"[:80]
        out.append(
            f"| {f('model')} | {f('tool')} | {f('method')} | {f('bits')} | {group} | "
            f"{f('perplexity', '{:.3f}')} | {f('kl_divergence', '{:.4f}')} | {f('top1_agreement', '{:.3f}')} | "
            f"{f('bits_per_param', '{:.3f}')} | {mb} | "
            f"{f('compress_seconds', '{:.1f}')} | {f('peak_rss_mb', '{:.0f}')} | {status} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model folders (the zoo: zoo/models/*)")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--group-sizes", nargs="+", type=int, default=[128, 0], help="0 = per-channel")
    p.add_argument("--methods", nargs="*", default=["rtn", "gptq"],
                   help="moepress methods (rtn gptq); give none (a bare --methods) for peer rows only")
    p.add_argument("--act-order", default="static", choices=("off", "static", "dynamic"),
                   help="moepress GPTQ's column order (default static, moepress's default)")
    p.add_argument("--refine", type=int, default=None,
                   help="moepress rows: refinement steps per layer (default: moepress compress's, REFINE_STEPS)")
    p.add_argument("--budgets", nargs="*", default=[],
                   help="also mixed-precision moepress rows: moepress compress --budget B --scope all (e.g. 3bits), "
                        "planned with the command's defaults, per group size")
    p.add_argument("--side-by-side", action="store_true",
                   help="run each option's moepress and peer rows at the same time (one process each), so that "
                        "their compress times are taken under the same load and compare as ratios")
    p.add_argument("--peers", default="", help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seed", type=int, default=0, help="the calibration windows' seed (the same for every tool)")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    p.add_argument("--autoround-iters", type=int, default=200,
                   help="AutoRound's SignRound steps per block (its default 200; fewer is faster on CPU)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality-<date>.json)")
    args = p.parse_args(argv)

    if args.refine is None:
        sys.path.insert(0, ROOT)
        from moepress.refine import REFINE_STEPS

        args.refine = REFINE_STEPS
    peers = [t for t in args.peers.split(",") if t]
    unknown = [t for t in peers if t not in PEERS]
    if unknown:
        p.error(f"unknown peer tool(s) {unknown}; known: {', '.join(PEERS)}")
    rows = []
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"quality-{date}.json")

    def save() -> None:
        """Rewrite the JSON after every row (atomically), so a long run that is stopped keeps its rows."""
        payload = {
            "date": date,
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
            "settings": vars(args),
            "rows": rows,
        }
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(out + ".tmp", out)

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()

    for model in args.models:
        common = ["--model", model, "--calib-samples", str(args.calib_samples), "--calib-seed", str(args.calib_seed),
                  "--eval-samples", str(args.eval_samples),
                  "--seq-len", str(args.seq_len)]
        name = os.path.basename(os.path.normpath(model))
        record({"model": name, "tool": "baseline", "bits": 16,
                **run_worker(sys.executable, "benchmarks.workers.moepress_worker", common + ["--bits", "16"], args.timeout)})
        for bits in args.bits:
            for group in args.group_sizes:
                option = common + ["--bits", str(bits), "--group-size", str(group)]
                jobs = []  # (the row's fixed fields, the worker's python, module, arguments)
                for method in args.methods:
                    jobs.append(({"model": name, "tool": "moepress", "method": method, "bits": bits,
                                  "group_size": group or None}, sys.executable, "benchmarks.workers.moepress_worker",
                                 option + ["--method", method, "--act-order", args.act_order,
                                           "--refine", str(args.refine if method == "gptq" else 0)]))
                for tool in peers:
                    python = peer_python(tool)
                    base = {"model": name, "tool": tool, "bits": bits, "group_size": group or None}
                    if python is None:
                        record({**base, "status": "failed", "error": f"not installed: run {PEERS[tool][3]}"})
                        continue
                    extra = ["--iters", str(args.autoround_iters)] if tool == "autoround" else []
                    jobs.append((base, python, PEERS[tool][0], option + extra))
                if args.side_by_side:  # every tool's row at once: each sees the same load, so times compare
                    from concurrent.futures import ThreadPoolExecutor

                    with ThreadPoolExecutor(len(jobs) or 1) as pool:
                        results = list(pool.map(lambda job: run_worker(job[1], job[2], job[3], args.timeout), jobs))
                    for (base, *_), row in zip(jobs, results):
                        record({**base, **row, "side_by_side": len(jobs)})
                else:
                    for base, python, module, worker_args in jobs:
                        record({**base, **run_worker(python, module, worker_args, args.timeout)})

        for budget in args.budgets:
            for group in args.group_sizes:
                option = common + ["--bits", "4", "--group-size", str(group), "--budget", budget, "--scope", "all",
                                   "--refine", str(args.refine), "--act-order", args.act_order]
                row = run_worker(sys.executable, "benchmarks.workers.moepress_worker", option, args.timeout)
                record({"model": name, "tool": "moepress", "method": "gptq", **row, "bits": f"mixed {budget}",
                        "group_size": group or None})

    save()
    print(markdown(rows))
    # moepress's own rows must all succeed (CI relies on this); a peer's failure is a result, not an error.
    own_failures = [r for r in rows if r.get("tool") in ("baseline", "moepress") and r.get("status") != "ok"]
    if own_failures:
        print(f"\n{len(own_failures)} moepress row(s) failed, e.g. {own_failures[0].get('error')}", file=sys.stderr)
        return 1
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
