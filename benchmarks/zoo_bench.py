#!/usr/bin/env python3
"""One command: rebuild a size of the zoo from scratch and run the quality benchmark on it.

    python benchmarks/zoo_bench.py --variant micro                 # CI: two micro models, moepress rows only
    python benchmarks/zoo_bench.py --variant tiny --peers llmcompressor,hqq,autoround,gptqmodel

Steps: build the train split (``zoo/common.py``: Debian packages + PyPI, cached in
``zoo/.cache``), train every model family of the variant (``zoo/tiny_mixtral.py``,
``zoo/tiny_deepseek.py`` with ``--variant``), then ``benchmarks/quality.py`` on the fresh
models. ``micro`` models train in under two CPU minutes each and are not committed;
``tiny`` rewrites the committed zoo models (training is deterministic for a machine and a
thread count, so they come back equal or within the last bits). ``--skip-train`` benchmarks the
models already on disk. Every other argument goes to ``benchmarks/quality.py``
(``--bits``, ``--group-sizes``, ``--methods``, ``--calib-samples`` ...).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"mixtral": "zoo/tiny_mixtral.py", "deepseek": "zoo/tiny_deepseek.py"}


def step(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"zoo_bench: step failed (exit {result.returncode}): {' '.join(cmd)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["micro", "tiny"], default="tiny")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for training (default 1)")
    p.add_argument("--skip-train", action="store_true", help="benchmark the models already built")
    p.add_argument("--out", default=None,
                   help="benchmark JSON (default benchmarks/results/quality-<variant>-<date>.json)")
    args, quality_args = p.parse_known_args(argv)

    models = [f"zoo/models/{args.variant}-{family}" for family in args.families]
    if not args.skip_train:
        for family in args.families:
            step([sys.executable, FAMILIES[family], "--variant", args.variant, "--threads", str(args.threads)])
    missing = [m for m in models if not os.path.isfile(os.path.join(ROOT, m, "config.json"))]
    if missing:
        raise SystemExit(f"zoo_bench: {', '.join(missing)} not built; run without --skip-train")
    out = args.out or os.path.join("benchmarks", "results",
                                   f"quality-{args.variant}-{datetime.date.today().isoformat()}.json")
    step([sys.executable, "benchmarks/quality.py", "--models", *models, "--out", out, *quality_args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
