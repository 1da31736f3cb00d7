"""Choosing the next token from logits: greedy, temperature, top-k, top-p, per-sequence seed.

Each sequence owns a ``torch.Generator`` so that a seeded request gives the same text whatever
else is batched with it.
"""

from __future__ import annotations

import torch

from lastmile.runtime.generation.types import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A generator for a sampled sequence (seeded when the request says so); None for greedy."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(int(params.seed))
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits ``[vocab]``."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits).item())
    scores = logits.float() / max(float(params.temperature), 1e-5)
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
