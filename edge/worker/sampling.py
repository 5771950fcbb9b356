"""How the last stage draws the next token from its logits (numpy only).

The draw is a pure function of the logits, the sampling settings, the seed and the
step's position: the generator is ``numpy.random.default_rng([seed, position + n])`` (n:
the tokens of the step), or ``[seed, length]`` where the step says the sequence's length
once it is cached, so a step replayed after a failover, or run in chunks, draws the same
token.
"""

from __future__ import annotations

import numpy as np

__all__ = ["draw_tokens", "distribution"]


def distribution(logits: np.ndarray, temperature: float, top_k: int = 0,
                 top_p: float = 0.0) -> np.ndarray:
    """The probabilities a draw uses, for one row of logits.

    Args:
        logits: [vocab] scores.
        temperature: > 0; the logits are divided by it before the softmax.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p
            (0 or >= 1: all).

    Returns:
        float64 [vocab] probabilities summing to 1, zero outside the kept tokens.
    """
    z = logits.astype(np.float64) / temperature
    z -= z.max()  # the softmax of a shifted row is the same, and exp cannot overflow
    p = np.exp(z)
    p /= p.sum()
    # Ties are broken by token id (a stable sort), so the kept set is deterministic.
    order = np.argsort(-p, kind="stable")
    keep = np.ones(p.shape, dtype=bool)
    if 0 < top_k < p.size:
        keep[order[top_k:]] = False
    if 0 < top_p < 1:
        cumulative = np.cumsum(p[order])
        # A token is kept if the more likely ones before it have not yet reached top_p:
        # the smallest prefix whose mass reaches p, never empty.
        outside = order[1:][cumulative[:-1] >= top_p]
        keep[outside] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def draw_tokens(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                seed: int, position: int, length: int = 0) -> np.ndarray:
    """The next token of each batch row, from a step's logits.

    Args:
        logits: [batch, n, vocab] (the step's n tokens); the last position is drawn from.
        temperature: 0 draws the most likely token (greedy); else see
            :func:`distribution`.
        top_k: see :func:`distribution`.
        top_p: see :func:`distribution`.
        seed: the request's seed.
        position: the tokens cached before this step.
        length: the sequence's tokens once this step is cached (0: ``position`` plus the
            logits' length, which is the step's length only where every position's logits
            are kept).

    Returns:
        int64 [batch].
    """
    last = np.asarray(logits)[:, -1, :]
    if temperature <= 0:
        return last.argmax(axis=-1).astype(np.int64)
    n = logits.shape[1]
    rng = np.random.default_rng([int(seed), int(length) or int(position) + n])
    out = np.empty(last.shape[0], dtype=np.int64)
    for row in range(last.shape[0]):
        p = distribution(last[row], temperature, top_k, top_p)
        out[row] = rng.choice(p.size, p=p)
    return out
