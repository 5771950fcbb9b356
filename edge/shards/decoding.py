"""Teacher-forced decode steps: how far a decoder drifts over generation, not only at prefill.

A decoder planned for generation runs its prefill once and then one decode step per token,
each fed from the caches the steps before it wrote. An error in a quantized stage, or in
caches stored in fp16, reaches the logits through those caches too, and grows with them;
the prefill's logits alone do not show it. So the accuracy checks compare logits step by
step, *teacher-forced*: both models are fed the same tokens (the fp32 model's greedy
choices), each with its own caches, so that one different draw does not make every later
step incomparable.

The step tensors follow the decoder convention of ``edge.export.decoder`` (and of the
coordinator's token loop): ``input_ids`` [batch, new], ``attention_mask`` [batch, total],
``position_ids`` [batch, new] when the model has it, and the pasts.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["DECODE_STEPS", "STEP_INPUTS", "can_step", "prompt_feeds", "step_feeds",
           "next_pasts", "store_as", "greedy_token", "worst", "teacher_forced"]

# Decode steps the plan-time checks compare after the prefill. Eight steps carry the
# caches' error through eight rounds of reading and writing; more cost time at plan time
# for little: the drift is visible from the first steps.
DECODE_STEPS = 8

# The inputs of a decode step besides the pasts (edge.export.decoder's convention).
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


def can_step(graph_inputs: Sequence[str], pasts: Sequence[str]) -> bool:
    """Whether decode-step feeds can be built for a model with these inputs: its inputs
    besides the pasts are ``STEP_INPUTS`` (input_ids required)."""
    plain = set(graph_inputs) - set(pasts)
    return "input_ids" in plain and plain <= set(STEP_INPUTS)


def prompt_feeds(feeds: Mapping[str, np.ndarray], pasts: Sequence[str] = ()
                 ) -> dict[str, np.ndarray]:
    """A prefill's feeds as a generation starts them: ``feeds`` with empty ``pasts``, the
    mask all ones over the prompt and the positions 0..n-1 (synthetic inputs are made at
    the planned sizes, whose past is a chunk's, and fill position ids with zeros)."""
    out = dict(feeds)
    ids = np.asarray(out["input_ids"])
    for name in pasts:
        if name in out:
            shape = list(np.shape(out[name]))
            shape[2] = 0  # [batch, kv_heads, past_sequence, head_dim]
            out[name] = np.zeros(shape, dtype=np.asarray(out[name]).dtype)
    if "attention_mask" in out:
        out["attention_mask"] = np.ones(ids.shape, dtype=np.int64)
    if "position_ids" in out:
        n = ids.shape[1]
        out["position_ids"] = np.broadcast_to(np.arange(n, dtype=np.int64),
                                              ids.shape).copy()
    return out


def step_feeds(names: Sequence[str], token: np.ndarray, position: int
               ) -> dict[str, np.ndarray]:
    """The plain feeds of a decode step of one new token per sequence.

    Args:
        names: the model's inputs (pasts among them are ignored).
        token: [batch] int64, the step's token per sequence.
        position: tokens already cached.
    """
    token = np.asarray(token, dtype=np.int64).reshape(-1, 1)
    batch = token.shape[0]
    all_feeds = {"input_ids": token,
                 "attention_mask": np.ones((batch, position + 1), dtype=np.int64),
                 "position_ids": np.full((batch, 1), position, dtype=np.int64)}
    return {k: v for k, v in all_feeds.items() if k in names}


def store_as(caches: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Caches as a stage keeps them between steps in ``dtype`` ("float16"), cast back to
    float32 to be fed again: what the model sees with caches stored in that dtype."""
    return {k: np.asarray(v).astype(dtype).astype(np.float32) for k, v in caches.items()}


def next_pasts(outputs: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]]
               ) -> dict[str, np.ndarray]:
    """The pasts of the next step: each present among ``outputs`` under its past's name."""
    return {past: outputs[present] for past, present in pairs if present in outputs}


def greedy_token(logits: np.ndarray) -> np.ndarray:
    """[batch] int64: the most likely next token after the last position of each row."""
    return np.asarray(logits)[:, -1, :].argmax(axis=-1).astype(np.int64)


def worst(cosines: Sequence[float]) -> float:
    """The lowest of ``cosines``; NaN when any is NaN (1.0 when there are none)."""
    if any(math.isnan(c) for c in cosines):
        return float("nan")
    return min(cosines, default=1.0)


def teacher_forced(run: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]],
                   names: Sequence[str], first: Mapping[str, np.ndarray],
                   tokens: Sequence[np.ndarray], pairs: Sequence[tuple[str, str]],
                   cached: int, keep: Callable[[dict], dict] = dict
                   ) -> list[dict[str, np.ndarray]]:
    """Run ``len(tokens)`` decode steps after a prefill's outputs ``first``.

    Args:
        run: one step of the model: (feeds, step index from 0) -> outputs (its presents
            among them).
        names: the model's inputs.
        first: the prefill's outputs.
        tokens: the token fed at each step ([batch] each).
        pairs: the (past, present) pairs.
        cached: tokens the prefill cached.
        keep: what storing the caches between steps does to them (``store_as``).

    Returns:
        Each decode step's outputs.
    """
    outs, prev = [], first
    for s, token in enumerate(tokens):
        feeds = {**step_feeds(names, token, cached + s), **keep(next_pasts(prev, pairs))}
        prev = run(feeds, s)
        outs.append(prev)
    return outs
