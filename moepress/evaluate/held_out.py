"""A model's output against a reference's on a fixed set of windows: what every end-to-end
measurement during planning compares (the evolution's fitness, kl_scaled's layer sensitivity, the
measured cost of a drop)."""

from __future__ import annotations

import numpy as np
import torch


class HeldOutKL:
    """The reference model's next-token log-probabilities on ``tokens``, computed once; :meth:`score`
    compares any model with the same vocabulary against them."""

    def __init__(self, reference, tokens: torch.Tensor, batch_size: int = 8):
        self.tokens = tokens
        self.batch_size = batch_size
        with torch.no_grad():
            self.reference = [torch.log_softmax(reference(input_ids=b, use_cache=False).logits.float(), -1)
                              for b in self.batches()]

    def batches(self) -> list[torch.Tensor]:
        return [self.tokens[i:i + self.batch_size] for i in range(0, len(self.tokens), self.batch_size)]

    @torch.no_grad()
    def score(self, model) -> dict:
        """KL divergence, top-1 agreement and perplexity of ``model`` on the windows, against the
        reference. KL and top-1 over every position; perplexity over next-token predictions."""
        kl = agree = nll = 0.0
        count = predicted = 0
        for ref, batch in zip(self.reference, self.batches()):
            logq = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
            kl += float((ref.exp() * (ref - logq)).sum(-1).sum())
            agree += float((ref.argmax(-1) == logq.argmax(-1)).sum())
            count += ref.shape[0] * ref.shape[1]
            nll -= float(logq[:, :-1].gather(-1, batch[:, 1:, None]).sum())
            predicted += batch[:, 1:].numel()
        return {"kl": kl / count, "top1": agree / count, "perplexity": float(np.exp(nll / predicted))}


__all__ = ["HeldOutKL"]
