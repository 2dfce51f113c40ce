#!/usr/bin/env python3
"""The GGUF benchmark: moepress's GGUF against llama.cpp's own ``llama-quantize`` with an importance
matrix, at the same file size, scored by llama.cpp itself.

    python benchmarks/gguf_vs_llamacpp.py --models tiny-mixtral tiny-qwen3moe
    python benchmarks/gguf_vs_llamacpp.py --models moefied-smollm2 --calib-samples 16 --eval-chunks 32

For every zoo model (``zoo/models/<name>``) whose architecture moepress's GGUF export writes (others
are skipped, saying why), in one work folder:

* **f16**: llama.cpp's ``convert_hf_to_gguf.py`` on the Hugging Face model (the file every KL is
  measured against), and moepress's ``compress --target llamacpp --bits 16`` + ``export --format
  gguf``; the two are compared tensor by tensor (names, types, shapes, bytes) and the result recorded,
  with both files' perplexities where they differ. ``--f16-from moepress`` makes moepress's file the
  base (and llama-quantize's input) where the converter writes the model wrongly (tiny-deepseek:
  transformers 5's DeepseekV3Config has no ``scoring_func``, so the converter writes no
  ``expert_gating_func`` and llama.cpp routes with softmax instead of the sigmoid).
* **the same texts for both tools**: the calibration text is the first ``--calib-samples`` x
  ``--seq-len`` tokens of ``builtin:calib`` (whole lines), given to ``moepress compress --calib``
  (which cuts it into exactly those windows) and to ``llama-imatrix -f -c <seq-len> --chunks
  <calib-samples>``; the evaluation text is the first ``--eval-chunks`` x ``--ctx`` tokens of
  ``builtin:eval`` (held out: no document in common with the calibration split), scored by
  ``llama-perplexity -c <ctx> --chunks <eval-chunks>``.
* **llama.cpp**: ``llama-imatrix`` on the calibration text, then ``llama-quantize --imatrix`` to each
  of ``--presets`` (Q4_0, Q4_K_M, Q3_K_M, Q2_K). Where rows are not multiples of 256, llama-quantize
  falls back to legacy types per tensor; the file's actual types are read back and recorded.
* **moepress**, three files per preset, GPTQ on the same calibration text, then ``export --format gguf``:

  * ``mix``: ``compress --target llamacpp --ggml-type <preset>``: the same mix, every unit (and the
    embedding and head) in the type llama-quantize gives its tensor
    (:mod:`moepress.export.llamacpp_presets`; each layer's experts of one projection share one type in
    both). The types are compared with llama-quantize's file tensor by tensor (recorded where they
    differ): the files are the same size, and what differs is how the values were chosen, GPTQ's
    error feedback against llama.cpp's importance-weighted rounding.
  * ``budget``: ``compress --target llamacpp --budget <B>B --scope all`` (``--strategy ilp``,
    ``--estimator``, default gptq_routed): moepress's allocator chooses the body's types within B, the
    bytes of the quantized tensors of llama-quantize's file with F16 embedding and head; the
    embedding and head stay F16 (the cost table is measured once per model).
  * ``mix+budget``: ``--ggml-type <preset> --budget <B>B``: the body allocated within B, the embedding
    and head in the preset's types: the size of llama-quantize's stock file.
* **refinement**: every moepress file is refined as ``moepress compress`` does by default
  (``--refine 32``: the blocks' float16 scales on each layer's output, GPTQ's codes held);
  ``--refine 0`` gives GPTQ alone.
* **scores**: ``llama-perplexity --kl-divergence-base`` on the f16 file, then ``--kl-divergence`` on
  every file: llama-perplexity's own mean KL divergence, perplexity and top-1 agreement ("same top
  p"), and the ratios moepress / llama.cpp.

Every moepress file is compared with two llama.cpp files per preset:

* ``stock``: llama-quantize's preset as it comes, its token embedding and output head quantized too
  (Q4_K_M puts the head in Q6_K). ``--ggml-type <preset>`` gives moepress's embedding and head the same
  types where the export can (an untied head; a head tied to the embeddings stays F16 for now).
* ``f16-embed-head``: llama-quantize with ``--token-embedding-type f16 --output-tensor-type f16``: the
  same preset for every other tensor, the embedding and head kept, as moepress's ``--budget`` files
  (and every moepress file where the export keeps them) hold them.

Each pair records both files' bytes; a pair is "same size" when moepress's file is at most
llama.cpp's (up to 0.1% of metadata) and less than 3% smaller, and the targets are judged on those.

Issue 12's targets: at the size of Q3_K_M (Q4_0 on models whose rows are not multiples of 256, where
k-quants do not apply) moepress's KL at most 0.8x llama.cpp's; at Q4_K_M size, at most 0.9x.

Rows are written to ``benchmarks/results/gguf-<date>.json`` as they finish; a rerun with the same
``--out`` and the same settings skips the rows it has. Needs llama.cpp's tools
(``bash benchmarks/peers/setup_llamacpp.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import moepress  # noqa: E402
from moepress.errors import MoepressError  # noqa: E402
from moepress.export import llamacpp_tools  # noqa: E402
from moepress.refine import REFINE_STEPS  # noqa: E402

ZOO = ("tiny-mixtral", "tiny-deepseek", "moefied-smollm2", "tiny-qwen3moe")
PRESETS = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
VARIANTS = ("stock", "f16-embed-head")
MOEPRESS_KINDS = ("mix", "budget", "mix+budget")
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "convert")

def log(msg: str) -> None:
    print(f"[gguf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(command: list, log_path: str, need: str = "", timeout: float = 3600) -> str:
    """Run a llama.cpp tool with :func:`moepress.export.llamacpp_tools.run_tool` (which reruns it when
    llama.cpp's logger thread lost the last lines, ``need``), its output kept in ``log_path``."""
    output = llamacpp_tools.run_tool(command, need=need, timeout=timeout)
    with open(log_path, "w") as f:
        f.write(" ".join(map(str, command)) + "\n\n" + output)
    return output


# ------------------------------------------------------------------ the model and its texts

def model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def skip_reason(model_dir: str) -> str | None:
    """Why a model cannot be benchmarked here (None: it can)."""
    from moepress.export.gguf import ARCHITECTURES

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return f"{model_dir} is not built (see zoo/README.md)"
    model_type = model_config(model_dir).get("model_type")
    if model_type not in ARCHITECTURES:
        return (f"moepress's GGUF export does not write {model_type!r} yet (it writes "
                f"{', '.join(sorted(ARCHITECTURES))})")
    return llamacpp_tools.missing(*TOOLS)


def k_quants_apply(cfg: dict) -> bool:
    """Whether every linear's rows are multiples of 256 (llama.cpp's k-quant super-block)."""
    widths = [cfg.get(k) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return all(w % 256 == 0 for w in widths if w)


def write_text(source: str, tokenizer, tokens: int, path: str, slack: int = 0) -> dict:
    """The shortest prefix of whole lines of ``source`` holding at least ``tokens + slack`` tokens
    (moepress's tokenization, no special tokens), written to ``path``. The slack (under one window)
    covers llama.cpp tokenizing a token or two differently; both tools take whole windows only."""
    from moepress.data.corpus import load_text, tokenize_text

    text = load_text(source, what="calibration" if "calib" in source else "evaluation")
    tokens += slack
    ids = tokenize_text(text, tokenizer)
    if len(ids) < tokens:
        raise MoepressError(f"{source} has {len(ids)} tokens, fewer than the {tokens} asked for")
    end = text.find("\n", len(tokenizer.decode(ids[:tokens])))
    prefix = text if end < 0 else text[:end + 1]
    count = len(tokenize_text(prefix, tokenizer))
    assert count >= tokens, (count, tokens)
    with open(path, "w", encoding="utf-8") as f:
        f.write(prefix)
    return {"source": source, "path": path, "chars": len(prefix), "tokens": count}


# ------------------------------------------------------------------ GGUF files

def tensor_types(path: str) -> dict[str, dict]:
    """Every tensor of a GGUF: its ggml type name, element count and bytes."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: {"type": t.tensor_type.name, "elements": int(t.n_elements), "bytes": int(t.n_bytes)}
            for t in reader.tensors}


def type_summary(types: dict[str, dict]) -> dict:
    """Parameters per ggml type over the whole file, and the token embedding's and head's types."""
    by_type: dict[str, int] = {}
    for t in types.values():
        by_type[t["type"]] = by_type.get(t["type"], 0) + t["elements"]
    return {"params_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "token_embd": types.get("token_embd.weight", {}).get("type"),
            "output": types.get("output.weight", {}).get("type", "tied to token_embd")}


def types_unlike(mine: dict[str, dict], theirs: dict[str, dict]) -> dict[str, dict]:
    """The tensors two GGUFs hold in different types (or only one of them holds)."""
    return {n: {"moepress": mine.get(n, {}).get("type"), "llamacpp": theirs.get(n, {}).get("type")}
            for n in sorted(set(mine) | set(theirs)) if mine.get(n, {}).get("type") != theirs.get(n, {}).get("type")}


def compare_files(a: str, b: str) -> dict:
    """Tensor by tensor: the same names, types, shapes and bytes? (and which metadata keys differ)."""
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    differ = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape) or \
                not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            differ.append(name)

    def values(reader):
        out = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            out[key] = [bytes(field.parts[i]).hex() for i in field.data]
        return out

    ma, mb = values(ra), values(rb)
    return {"tensors": len(ta), "only_in_first": sorted(set(ta) - set(tb)), "only_in_second": sorted(set(tb) - set(ta)),
            "tensors_differing": differ, "metadata_differing": sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)),
            "bytes": [os.path.getsize(a), os.path.getsize(b)]}


# ------------------------------------------------------------------ llama-perplexity

def scores(output: str) -> dict:
    """llama-perplexity --kl-divergence's own figures."""
    def number(pattern: str) -> float:
        m = re.search(pattern, output)
        if m is None:
            raise RuntimeError(f"llama-perplexity printed no {pattern!r}")
        return float(m.group(1))

    return {"kl": number(r"Mean\s+KLD:\s+(-?[0-9.eE+-]+)"), "kl_error": number(r"Mean\s+KLD:\s+\S+\s+±\s+([0-9.eE+-]+)"),
            "kl_99": number(r"99\.0%\s+KLD:\s+([0-9.eE+-]+)"),
            "perplexity": number(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)"),
            "reference_perplexity": number(r"Mean PPL\(base\)\s+:\s+([0-9.]+)"),
            "top1": number(r"Same top p:\s+([0-9.]+)") / 100,
            "chunks": int(number(r"kl_divergence: computing over (\d+) chunks"))}


class Bench:
    """One model's work folder: the f16 file, the texts, the imatrix and the KL base, made once."""

    def __init__(self, name: str, model_dir: str, work: str, args):
        self.name, self.model_dir, self.work, self.args = name, model_dir, work, args
        os.makedirs(work, exist_ok=True)
        self.f16 = os.path.join(work, "f16.gguf")
        self.base = os.path.join(work, "base.kld")
        self.imatrix = os.path.join(work, "imatrix.gguf")
        self.info: dict = {}

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def prepare(self) -> dict:
        from moepress.export.gguf import export_gguf
        from moepress.loading import load_tokenizer

        a = self.args
        tok = load_tokenizer(self.model_dir)
        self.info["calib_text"] = write_text("builtin:calib", tok, a.calib_samples * a.seq_len, self.path("calib.txt"),
                                             slack=a.seq_len // 2)
        self.info["eval_text"] = write_text("builtin:eval", tok, a.eval_chunks * a.ctx, self.path("eval.txt"),
                                            slack=a.ctx // 2)
        log(f"{self.name}: f16 GGUF (llama.cpp's converter, and moepress --bits 16)")
        converted, own = self.path("converter-f16.gguf"), self.path("moepress-f16.gguf")
        llamacpp_tools.convert_reference(self.model_dir, converted)
        self.compress(self.path("moepress-f16"), bits=16, refine=0)
        export_gguf(self.path("moepress-f16"), own)
        self.info["f16_agreement"] = compare_files(converted, own)
        # the KL base (and llama-quantize's input): the converter's file unless --f16-from moepress
        os.replace(converted if a.f16_from == "converter" else own, self.f16)
        self.info["f16_from"] = a.f16_from
        log(f"{self.name}: KL base and imatrix")
        out = run([llamacpp_tools.tool("llama-perplexity"), "-m", self.f16, "-f", self.path("eval.txt"), "-c", a.ctx,
                   "--chunks", a.eval_chunks, "-t", a.threads, "--kl-divergence-base", self.base], self.path("base.log"),
                  need=r"Final estimate: PPL")
        self.info["f16_perplexity"] = float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))
        if self.info["f16_agreement"]["tensors_differing"] or self.info["f16_agreement"]["metadata_differing"]:
            other = converted if a.f16_from != "converter" else own  # how far apart the two files score
            out = run([llamacpp_tools.tool("llama-perplexity"), "-m", other, "-f", self.path("eval.txt"), "-c", a.ctx,
                       "--chunks", a.eval_chunks, "-t", a.threads], self.path("other-f16.log"), need=r"Final estimate: PPL")
            self.info["other_f16_perplexity"] = float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))
        out = run([llamacpp_tools.tool("llama-imatrix"), "-m", self.f16, "-f", self.path("calib.txt"), "-c", a.seq_len,
                   "--chunks", a.calib_samples, "-t", a.threads, "-o", self.imatrix], self.path("imatrix.log"))
        m = re.search(r"computing over (\d+) chunks", out)
        self.info["imatrix_chunks"] = int(m.group(1)) if m else None
        self.info["k_quants_apply"] = k_quants_apply(model_config(self.model_dir))
        return self.info

    def compress(self, out: str, **options) -> None:
        a = self.args
        moepress.compress(self.model_dir, out=out, overwrite=True, restart=True, target="llamacpp",
                          calib=self.path("calib.txt"),
                          calib_samples=a.calib_samples, seq_len=a.seq_len, progress=False, **options)

    def score(self, gguf_path: str, tag: str) -> dict:
        a = self.args
        out = run([llamacpp_tools.tool("llama-perplexity"), "-m", gguf_path, "-f", self.path("eval.txt"), "-c", a.ctx,
                   "--chunks", a.eval_chunks, "-t", a.threads, "--kl-divergence-base", self.base, "--kl-divergence"],
                  self.path(f"score-{tag}.log"), need=r"Same top p:")
        return scores(out)

    def llamacpp(self, preset: str, variant: str) -> dict:
        path = self.path(f"llamacpp-{preset}-{variant}.gguf")
        extra = ["--token-embedding-type", "f16", "--output-tensor-type", "f16"] if variant == "f16-embed-head" else []
        run([llamacpp_tools.tool("llama-quantize"), "--imatrix", self.imatrix, *extra, self.f16, path, preset,
             self.args.threads], self.path(f"quantize-{preset}-{variant}.log"))
        types = tensor_types(path)
        return {"file": path, "file_bytes": os.path.getsize(path), "types": type_summary(types),
                "tensor_types": {n: t["type"] for n, t in types.items()}, **self.score(path, f"llamacpp-{preset}-{variant}")}

    def moepress(self, preset: str, kind: str, stock_file: str, body_file: str) -> dict:
        """moepress's GGUF at ``preset``'s size, GPTQ on the calibration text, then exported:

        * ``mix``: ``compress --target llamacpp --ggml-type <preset>``: every unit the type
          llama-quantize's mix gives its tensor (types unlike llama-quantize's own file are recorded:
          there should be none);
        * ``budget``: ``compress --target llamacpp --budget <B>B --scope all``: moepress's allocator
          chooses the types (``--strategy ilp``, ``--estimator`` of the command line), at B = the bytes
          of the quantized tensors of ``body_file``, llama-quantize's file with F16 embedding and head;
          the embedding and head stay F16. The cost table is measured once per model, for every preset;
        * ``mix+budget``: both: the body's types chosen by the allocator within B, the embedding and
          head in the preset's types, as llama-quantize's stock file holds them."""
        from moepress.export.gguf import export_gguf

        a = self.args
        out = self.path(f"moepress-{preset}-{kind}")
        started = time.time()
        options = {"ggml_type": preset} if kind in ("mix", "mix+budget") else {}
        options["refine"] = a.refine
        if kind in ("budget", "mix+budget"):
            body = sum(t["bytes"] for t in tensor_types(body_file).values() if t["type"] not in ("F16", "F32"))
            options.update({"budget": f"{body}B", "planning": {
                "scope": "all", "target": "llamacpp", "strategy": "ilp", "estimator": a.estimator,
                "calib": self.path("calib.txt"), "calib_samples": a.calib_samples, "seq_len": a.seq_len,
                "table": self.path("costs.safetensors")}})
        self.compress(out, **options)
        seconds = time.time() - started
        path = export_gguf(out, self.path(f"moepress-{preset}-{kind}.gguf"))
        types = tensor_types(path)
        row = {"file": path, "file_bytes": os.path.getsize(path), "types": type_summary(types),
               "options": {k: v for k, v in options.items() if k != "planning"} |
               ({"planning": {k: v for k, v in options["planning"].items() if k not in ("calib", "table")}}
                if "planning" in options else {}),
               "compress_seconds": round(seconds, 1), **self.score(path, f"moepress-{preset}-{kind}")}
        if kind == "mix":  # the same mix: every tensor in the type of llama-quantize's stock file
            row["types_unlike_llamacpp"] = types_unlike(types, tensor_types(stock_file))
        else:
            row["body_bytes"] = {"moepress": sum(t["bytes"] for t in types.values() if t["type"] not in ("F16", "F32")),
                                 "budget": body}
        return row


# ------------------------------------------------------------------ rows and table

def settings_of(args) -> dict:
    keys = ("calib_samples", "seq_len", "eval_chunks", "ctx", "threads", "estimator", "moepress", "f16_from")
    return {k: getattr(args, k) for k in keys}


def run_model(name: str, args, payload: dict, save) -> None:
    model_dir = os.path.join(ROOT, "zoo", "models", name)
    reason = skip_reason(model_dir)
    if reason is not None:
        log(f"{name}: skipped: {reason}")
        payload["skipped"][name] = reason
        save()
        return
    payload["skipped"].pop(name, None)
    settings = settings_of(args)
    done = {(r["preset"]) for r in payload["rows"] if r["model"] == name and r.get("status") == "ok"
            and {"f16_from": "converter", **r.get("settings", {})} == settings}
    todo = [p for p in args.presets if p not in done]
    if not todo:
        return
    work = os.path.join(args.work, name)
    bench = Bench(name, model_dir, work, args)
    started = time.time()
    try:
        payload["models"][name] = {**bench.prepare(), "settings": settings, "work": work}
    except Exception as exc:  # the f16 files, texts or imatrix: no row of this model can run
        payload["models"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "settings": settings}
        log(f"{name}: preparation failed: {payload['models'][name]['error']}")
        save()
        return
    payload["models"][name]["prepare_seconds"] = round(time.time() - started, 1)
    save()
    for preset in todo:
        log(f"{name} {preset}")
        row = {"model": name, "preset": preset, "settings": settings}
        try:
            llama = {variant: bench.llamacpp(preset, variant) for variant in VARIANTS}
            # the two llama.cpp files differ in the embedding and head only (checked): one moepress file serves both
            bodies = [{n: t for n, t in llama[v].pop("tensor_types").items()
                       if n not in ("token_embd.weight", "output.weight")} for v in VARIANTS]
            ours = {kind: bench.moepress(preset, kind, llama["stock"]["file"], llama["f16-embed-head"]["file"])
                    for kind in args.moepress}
            k_quants = payload["models"][name]["k_quants_apply"]
            row.update({"status": "ok", "llamacpp": llama, "moepress": ours,
                        "llamacpp_bodies_equal": bodies[0] == bodies[1],
                        "comparisons": {v: {kind: compare(ours[kind], llama[v], preset, k_quants) for kind in ours}
                                        for v in VARIANTS}})
        except Exception as exc:  # a failed row says how, the benchmark goes on
            row.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
            log(f"{name} {preset} failed: {row['error']}")
        payload["rows"] = [r for r in payload["rows"] if (r["model"], r["preset"]) != (name, preset)] + [row]
        save()


def compare(mine: dict, theirs: dict, preset: str, k_quants: bool) -> dict:
    """moepress / llama.cpp ratios for one pair of files, and issue 12's target where it applies: 0.9x
    at Q4_K_M's size, 0.8x at Q3_K_M's (Q4_0's on a model whose rows are not multiples of 256). The
    target is judged only where the files are the same size: moepress's at most llama.cpp's (up to
    0.1% of metadata) and not 3% or more below it (then it is a smaller file, not the same size)."""
    target = {"Q4_K_M": 0.9, "Q3_K_M" if k_quants else "Q4_0": 0.8}.get(preset)
    bytes_ratio = mine["file_bytes"] / theirs["file_bytes"]
    size = "larger" if bytes_ratio > 1.001 else "smaller" if bytes_ratio < 0.97 else "same"
    kl_ratio = mine["kl"] / theirs["kl"] if theirs["kl"] > 0 else float("nan")
    return {"kl_ratio": round(kl_ratio, 4), "bytes_ratio": round(bytes_ratio, 4),
            "perplexity_ratio": round(mine["perplexity"] / theirs["perplexity"], 4),
            "top1_difference": round(mine["top1"] - theirs["top1"], 5), "size": size, "target": target,
            "target_met": None if target is None or size != "same" else kl_ratio <= target}


def table(payload: dict) -> str:
    """One line per moepress file: against the llama.cpp file of its size (stock or F16 embedding and
    head; where neither is its size, the one nearest in bytes, marked)."""
    lines = ["| model | preset | moepress | bytes | KL | top-1 | ppl | llama.cpp --imatrix | bytes | types | KL | top-1 "
             "| ppl | KL ratio | target |", "|---" * 15 + "|"]
    for r in payload["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['preset']} | failed: {r.get('error', '')[:100]} |" + " |" * 12)
            continue
        for kind, mp in r["moepress"].items():
            pairs = r["comparisons"]
            variant = next((v for v in VARIANTS if pairs[v][kind]["size"] == "same"),
                           min(VARIANTS, key=lambda v: abs(pairs[v][kind]["bytes_ratio"] - 1)))
            ll, c = r["llamacpp"][variant], pairs[variant][kind]
            total = sum(ll["types"]["params_by_type"].values())
            types = ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in ll["types"]["params_by_type"].items()
                              if t != "F32" and n / total >= 0.01)
            target = f"{c['bytes_ratio']:.2f}x the bytes" if c["size"] != "same" else "-" if c["target"] is None \
                else f"<= {c['target']}: {'met' if c['target_met'] else 'missed'}"
            lines.append(f"| {r['model']} | {r['preset']} | {kind} | {mp['file_bytes']:,} | {mp['kl']:.5f} | "
                         f"{mp['top1']:.3f} | {mp['perplexity']:.2f} | {variant} | {ll['file_bytes']:,} | {types} | "
                         f"{ll['kl']:.5f} | {ll['top1']:.3f} | {ll['perplexity']:.2f} | {c['kl_ratio']:.2f}x | {target} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ZOO), help=f"zoo models (default {' '.join(ZOO)})")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"llama-quantize types (default {' '.join(PRESETS)})")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows, both tools (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-chunks", type=int, default=128, help="llama-perplexity chunks (default 128)")
    p.add_argument("--ctx", type=int, default=256, help="llama-perplexity context; each chunk's second half is scored")
    p.add_argument("--moepress", nargs="+", default=list(MOEPRESS_KINDS), choices=MOEPRESS_KINDS,
                   help="moepress's files: mix (--ggml-type <preset>), budget (its allocator at llama.cpp's body bytes), "
                        "mix+budget (both)")
    p.add_argument("--refine", type=int, default=REFINE_STEPS,
                   help=f"refinement steps of every moepress file (default {REFINE_STEPS}, the command's; 0: GPTQ alone)")
    p.add_argument("--estimator", default="gptq_routed",
                   help="the budget rows' damage estimate (default gptq_routed; kl_scaled does not combine with --target yet)")
    p.add_argument("--f16-from", default="converter", choices=("converter", "moepress"),
                   help="the f16 file every KL is measured against and llama-quantize reads: llama.cpp's converter's "
                        "(default) or moepress's --bits 16 export (where the converter writes the model wrongly)")
    p.add_argument("--threads", type=int, default=1, help="threads for llama.cpp's tools and torch (default 1)")
    p.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/gguf-<date>.json)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.work = args.work or tempfile.mkdtemp(prefix="moepress-gguf-")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gguf-{date}.json")
    payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
               "llamacpp": str(llamacpp_tools.source_tree()), "models": {}, "skipped": {}, "rows": []}
    if os.path.exists(out):
        old = json.load(open(out))
        payload.update({k: old.get(k, payload[k]) for k in ("models", "skipped", "rows")})

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(out + ".tmp", out)

    for name in args.models:
        run_model(name, args, payload, save)
    print(table(payload))
    for name, why in payload["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
