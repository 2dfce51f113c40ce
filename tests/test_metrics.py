"""Properties of moepress.evaluate.metrics on tiny models whose answers are known."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from moepress.evaluate import (
    ComparisonResult,
    PerplexityResult,
    compare_to_reference,
    perplexity,
)
from moepress.evaluate import metrics

VOCAB = 32


class Uniform(torch.nn.Module):
    """Every position gets the same logits: a uniform distribution over the vocabulary."""

    def __init__(self, vocab: int = VOCAB, value: float = 3.0):
        super().__init__()
        self.vocab = vocab
        self.value = value

    def forward(self, input_ids):
        b, t = input_ids.shape
        return types.SimpleNamespace(logits=torch.full((b, t, self.vocab), self.value))


class Bigram(torch.nn.Module):
    """Logits at position t depend only on token t (a lookup table)."""

    def __init__(self, vocab: int = VOCAB, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Embedding(vocab, vocab, dtype=dtype)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab, vocab, generator=g) * 2.0)
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return types.SimpleNamespace(logits=self.table(input_ids))


class GarbageAt(torch.nn.Module):
    """Wraps a model and replaces the logits at one position with huge random values."""

    def __init__(self, inner: torch.nn.Module, position: int):
        super().__init__()
        self.inner = inner
        self.position = position

    def forward(self, input_ids):
        logits = self.inner(input_ids=input_ids).logits.clone()
        g = torch.Generator().manual_seed(123)
        logits[:, self.position] = torch.randn(logits.shape[0], logits.shape[-1], generator=g) * 1e2
        return types.SimpleNamespace(logits=logits)


class Oracle(torch.nn.Module):
    """Knows the windows: the logits at position t put (almost) all mass on token t + 1."""

    def __init__(self, windows: torch.Tensor, vocab: int = VOCAB):
        super().__init__()
        self.windows = windows
        self.vocab = vocab

    def forward(self, input_ids):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        # position t predicts token t + 1; the last position predicts nothing (left at zero)
        nxt = self._next_tokens(input_ids)
        logits.scatter_(-1, nxt[:, :, None], 50.0)
        return types.SimpleNamespace(logits=logits)

    def _next_tokens(self, input_ids):
        # find each row among the windows and return its shifted tokens (last one arbitrary)
        rows = []
        for row in input_ids:
            match = (self.windows == row).all(-1).nonzero()[0, 0]
            w = self.windows[match]
            rows.append(torch.cat([w[1:], w[:1]]))
        return torch.stack(rows)


def perturbed(model: Bigram, scale: float = 0.5, seed: int = 1) -> Bigram:
    other = Bigram(VOCAB, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noise = scale * torch.randn(VOCAB, VOCAB, generator=g)
        other.table.weight.copy_(model.table.weight + noise)
    return other


def make_windows(n: int = 7, seq_len: int = 12, vocab: int = VOCAB, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def direct_nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean NLL over positions 1.. computed the obvious way."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    ).item()


# ------------------------------------------------------------------------------------------------
# perplexity


def test_uniform_model_perplexity_is_vocab_size():
    windows = make_windows()
    res = perplexity(Uniform(), windows, progress=False)
    assert isinstance(res, PerplexityResult)
    assert res.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert res.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert res.tokens == 7 * 11
    assert res.seconds >= 0


def test_perplexity_matches_direct_cross_entropy():
    windows = make_windows()
    model = Bigram()
    res = perplexity(model, windows, batch_size=3, progress=False)
    expected = direct_nll(model(windows).logits.detach(), windows)
    assert res.nll == pytest.approx(expected, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_first_token_is_not_scored_and_alignment():
    # A model that predicts every next token perfectly reaches perplexity 1: only tokens 1..T-1
    # are scored (nothing can predict token 0), each by the logits one position earlier.
    windows = make_windows()
    res = perplexity(Oracle(windows), windows, batch_size=3, progress=False)
    assert res.perplexity == pytest.approx(1.0, abs=1e-6)
    assert res.tokens == windows.numel() - windows.shape[0]


def test_last_position_logits_are_not_used():
    # The logits at the last position predict the token after the window: never scored, so
    # garbage there changes nothing...
    windows = make_windows()
    good = Bigram()
    a = perplexity(good, windows, progress=False)
    b = perplexity(GarbageAt(good, position=-1), windows, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)
    c = compare_to_reference(GarbageAt(good, position=-1), good, windows, progress=False)
    assert c.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert c.top1_agreement == 1.0
    # ...while garbage at position 0 (which predicts token 1, a scored token) does change it.
    d = perplexity(GarbageAt(good, position=0), windows, progress=False)
    assert d.perplexity > a.perplexity * 1.5


def test_windows_are_scored_independently():
    # The last token of window i must not be used as context for window i + 1: the result for
    # a set of windows equals the token-weighted mean of each window scored alone.
    windows = make_windows(n=4)

    class PrefixSum(torch.nn.Module):  # logits depend on the whole prefix
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.emb(input_ids).cumsum(1) * 0.3)

    model = PrefixSum()
    together = perplexity(model, windows, batch_size=4, progress=False)
    alone = [perplexity(model, w[None], progress=False).nll for w in windows]
    assert together.nll == pytest.approx(sum(alone) / len(alone), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
def test_batch_size_does_not_change_results(batch_size):
    windows = make_windows(n=7)
    model = Bigram()
    ref = perturbed(model)
    base_p = perplexity(model, windows, batch_size=8, progress=False)
    base_c = compare_to_reference(model, ref, windows, batch_size=8, progress=False)
    p = perplexity(model, windows, batch_size=batch_size, progress=False)
    c = compare_to_reference(model, ref, windows, batch_size=batch_size, progress=False)
    assert p.perplexity == pytest.approx(base_p.perplexity, rel=1e-6)
    assert p.tokens == base_p.tokens
    assert c.kl_divergence == pytest.approx(base_c.kl_divergence, rel=1e-5)
    assert c.top1_agreement == base_c.top1_agreement
    assert c.perplexity == pytest.approx(base_c.perplexity, rel=1e-6)
    assert c.reference_perplexity == pytest.approx(base_c.reference_perplexity, rel=1e-6)
    assert c.tokens == base_c.tokens


def test_position_chunking_does_not_change_results(monkeypatch):
    windows = make_windows(n=5, seq_len=20)
    model = Bigram()
    ref = perturbed(model)
    whole_p = perplexity(model, windows, progress=False)
    whole_c = compare_to_reference(model, ref, windows, progress=False)
    monkeypatch.setattr(metrics, "_POSITION_CHUNK", 4)  # 19 positions -> chunks 4,4,4,4,3
    p = perplexity(model, windows, progress=False)
    c = compare_to_reference(model, ref, windows, progress=False)
    assert p.nll == pytest.approx(whole_p.nll, rel=1e-6)
    assert c.kl_divergence == pytest.approx(whole_c.kl_divergence, rel=1e-6)
    assert c.top1_agreement == whole_c.top1_agreement


def test_bf16_model_log_softmax_in_float32():
    windows = make_windows()
    model = Bigram(dtype=torch.bfloat16)
    res = perplexity(model, windows, progress=False)
    logits = model(windows).logits.detach()
    assert logits.dtype == torch.bfloat16
    expected = direct_nll(logits, windows)  # float32 log-softmax of the bf16 logits
    assert res.nll == pytest.approx(expected, rel=1e-5)
    bf16_nll = -(
        logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None]).float().mean().item()
    )
    assert bf16_nll != pytest.approx(expected, rel=1e-5)  # bf16 log-softmax would be off


def test_eval_mode_and_mode_restored():
    class ModeSpy(Bigram):
        def forward(self, input_ids):
            assert not self.training, "model must be in eval mode while evaluated"
            assert torch.is_inference_mode_enabled()
            return super().forward(input_ids)

    model = ModeSpy()
    ref = ModeSpy()
    model.train()
    ref.train()
    perplexity(model, make_windows(), progress=False)
    compare_to_reference(model, ref, make_windows(), progress=False)
    assert model.training and ref.training


# ------------------------------------------------------------------------------------------------
# compare_to_reference


def test_model_against_itself():
    windows = make_windows()
    model = Bigram()
    res = compare_to_reference(model, model, windows, progress=False)
    assert isinstance(res, ComparisonResult)
    assert res.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-7)
    assert res.perplexity == pytest.approx(perplexity(model, windows, progress=False).perplexity)
    assert res.tokens == 7 * 11


def test_perturbed_model_diverges():
    windows = make_windows(n=16, seq_len=32)
    ref = Bigram()
    model = perturbed(ref, scale=1.0)
    res = compare_to_reference(model, ref, windows, progress=False)
    assert res.kl_divergence > 1e-3
    assert res.top1_agreement < 1.0
    assert res.top1_agreement > 0.0
    assert res.perplexity != pytest.approx(res.reference_perplexity, rel=1e-3)


def test_kl_matches_torch_kl_div_and_direction():
    windows = make_windows(n=3, seq_len=6)
    ref = Bigram(seed=0)
    model = perturbed(ref, scale=1.5)
    res = compare_to_reference(model, ref, windows, progress=False)

    with torch.no_grad():
        logp_model = model(windows).logits[:, :-1].reshape(-1, VOCAB).log_softmax(-1)
        logp_ref = ref(windows).logits[:, :-1].reshape(-1, VOCAB).log_softmax(-1)
    # F.kl_div(input=log Q, target=P) = KL(P || Q): P is the reference.
    expected = F.kl_div(logp_model, logp_ref.exp(), reduction="batchmean").item()
    reverse = F.kl_div(logp_ref, logp_model.exp(), reduction="batchmean").item()
    assert res.kl_divergence == pytest.approx(expected, rel=1e-4)
    assert abs(expected - reverse) > 1e-3  # the test can tell the two directions apart
    agree = (logp_model.argmax(-1) == logp_ref.argmax(-1)).float().mean().item()
    assert res.top1_agreement == pytest.approx(agree)
    assert res.perplexity == pytest.approx(
        math.exp(F.nll_loss(logp_model, windows[:, 1:].reshape(-1)).item()), rel=1e-5
    )
    assert res.reference_perplexity == pytest.approx(
        math.exp(F.nll_loss(logp_ref, windows[:, 1:].reshape(-1)).item()), rel=1e-5
    )


def test_each_model_runs_once_per_batch():
    windows = make_windows(n=7)
    model, ref = Bigram(), perturbed(Bigram())
    ref.calls = 0
    compare_to_reference(model, ref, windows, batch_size=3, progress=False)
    assert model.calls == 3 and ref.calls == 3


def test_uniform_reference_kl_is_log_vocab_minus_entropy():
    windows = make_windows()
    model = Bigram()
    res = compare_to_reference(Uniform(), model, windows, progress=False)
    # KL(P || U) = log V - H(P)
    with torch.no_grad():
        logp = model(windows).logits[:, :-1].log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert res.kl_divergence == pytest.approx(math.log(VOCAB) - entropy, rel=1e-5)
    assert res.perplexity == pytest.approx(VOCAB, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# inputs, devices, progress


def test_bad_windows_rejected():
    model = Uniform()
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 8), progress=False)
    with pytest.raises(ValueError):
        perplexity(model, make_windows(), batch_size=0, progress=False)


def test_mismatched_vocab_rejected():
    with pytest.raises(ValueError, match="shape"):
        compare_to_reference(Uniform(VOCAB), Uniform(VOCAB + 1), make_windows(), progress=False)


def test_explicit_device_and_progress_bar(capsys):
    windows = make_windows()
    res = perplexity(Bigram(), windows, device="cpu", progress=True)
    assert math.isfinite(res.perplexity)
    res = compare_to_reference(Bigram(), Bigram(seed=3), windows, device="cpu", progress=True)
    assert math.isfinite(res.kl_divergence)
    assert capsys.readouterr().out == ""  # the bar never goes to stdout


# ------------------------------------------------------------------------------------------------
# a real transformers model


@pytest.fixture(scope="module")
def tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def test_transformers_model(tiny_mixtral):
    model = tiny_mixtral
    windows = make_windows(n=5, seq_len=16, vocab=64)
    res = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        expected = direct_nll(model(input_ids=windows).logits, windows)
    assert res.nll == pytest.approx(expected, rel=1e-4)
    assert 1.0 < res.perplexity < 1000.0
    assert res.tokens == 5 * 15

    same = compare_to_reference(model, model, windows, batch_size=2, progress=False)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(res.perplexity, rel=1e-5)

    vs_uniform = compare_to_reference(Uniform(64), model, windows, progress=False)
    assert vs_uniform.kl_divergence > 0
    assert vs_uniform.perplexity == pytest.approx(64, rel=1e-5)
    assert vs_uniform.reference_perplexity == pytest.approx(res.perplexity, rel=1e-5)
