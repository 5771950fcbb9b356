"""Refusing a request that would run a device out of memory, before any worker sees it.

A plan is costed at sizes (``batch=1, sequence=128``); within them every stage fits by
construction. A request may be larger. The plan records, per stage, how its activations
grow with each size (``StagePrediction.activation_degrees``: hidden states grow with the
sequence, attention scores with its square), so the memory a request needs is bounded by
arithmetic, without running anything. A request that some stage's device could not hold
is refused with ``RESOURCE_EXHAUSTED`` naming the device, what the request would need and
what the device has, instead of reaching a worker that the kernel then kills.

Some dims follow from others: a decoder with a KV cache takes a past length, a new length
and a total that is their sum (``ModelInfo.derived``, or an input dim named by the
expression, ``past_sequence_length + 1``). Such a dim adds no factor of its own; the dims
it follows from carry its growth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from edge.errors import EdgeError
from edge.planning.plan import Plan, TensorSpec, dim_expression, free_sizes

__all__ = ["TooLarge", "BeyondModel", "BeyondContext", "check_context", "request_sizes", "check_fits", "largest",
           "describe_limits", "largest_request_bytes", "FRAMING_BYTES"]

# What a request message carries besides its tensors' bytes: names, dtypes, shapes, a
# request id, stage timings. Generous: it only keeps a bound from being too tight.
FRAMING_BYTES = 64 << 10


class TooLarge(EdgeError):
    """The request would not fit a device; the message says which and by how much."""


class BeyondModel(TooLarge):
    """The request is larger than the model itself takes (``ModelInfo.limits``: 512
    learned positions), whatever the memory: the request is wrong, not the cluster."""


class BeyondContext(BeyondModel):
    """The prompt is longer than the context the plan's KV caches were planned for
    (``Generation.context``): the request is wrong, not the cluster (INVALID_ARGUMENT)."""


def check_context(plan: Plan, prompt_tokens: int, max_tokens: int) -> int:
    """How many tokens a generation request may draw: ``max_tokens``, cut so that prompt
    and generated tokens fit the plan's context (the stages' caches hold no more); 0
    when the prompt fills the context exactly.

    Args:
        plan: a plan made for generation (``ModelInfo.generation``).
        prompt_tokens: the prompt's length in tokens.
        max_tokens: the most tokens the client asked for.

    Raises:
        BeyondContext: the prompt alone does not fit the context, or the plan is not one
            for generation.
    """
    gen = plan.model.generation
    if gen is None:
        raise BeyondContext(f"{plan.model.name} was not planned for generation (no KV "
                            "caches); re-plan it with `edge plan --context N`")
    if prompt_tokens < 1:
        raise BeyondContext(f"a prompt needs at least 1 token, got {prompt_tokens}")
    if prompt_tokens > gen.context:
        raise BeyondContext(
            f"a prompt of {prompt_tokens} tokens does not fit the context of "
            f"{gen.context} tokens that {plan.model.name}'s caches were planned for (prompt "
            f"and generated tokens together); send at most {gen.context} prompt tokens, "
            f"or re-plan with a larger --context")
    return max(0, min(int(max_tokens), gen.context - prompt_tokens))


def request_sizes(specs: Sequence[TensorSpec],
                  shapes: Iterable[tuple[str, Sequence[int]]]) -> dict[str, int]:
    """The request's size of each symbolic dim of the model's inputs.

    Args:
        specs: the model's inputs.
        shapes: (name, shape) of each tensor the request carries.
    """
    by_name = {s.name: s for s in specs}
    out: dict[str, int] = {}
    for name, shape in shapes:
        spec = by_name.get(name)
        if spec is None:
            continue
        for dim, size in zip(spec.shape, shape):
            if isinstance(dim, str):
                out[dim] = max(out.get(dim, 0), int(size))
    return out


def check_fits(plan: Plan, sizes: Mapping[str, int]) -> None:
    """Raise TooLarge if some stage of ``plan`` would not hold a request of ``sizes``.

    Requests within the plan's sizes always pass; so do all requests on a plan that does
    not record how its activations grow (made before it did).

    Args:
        plan: the plan being served.
        sizes: the request's size of each symbolic dim (``request_sizes``).
    """
    for dim, size in sizes.items():
        top = plan.model.limits.get(dim)
        if top is not None and size > top:
            raise BeyondModel(f"a request of {dim}={size} is larger than {plan.model.name} "
                              f"takes: its weights allow {dim} up to {top}; send {dim} <= "
                              f"{top}")
    bindings = plan.model.bindings
    derived = plan.model.derived
    free = free_sizes(bindings, sizes, derived)
    if not any(free[k] > v for k, v in bindings.items() if k not in derived):
        return
    for stage in plan.stages:
        need = stage.predicted.memory_at(bindings, dict(sizes), derived)
        has = stage.device.memory_mb
        if need is not None and need > has:
            asked = ", ".join(f"{k}={v}" for k, v in sizes.items() if not _follows(plan, k))
            planned = ", ".join(f"{k}={v}" for k, v in bindings.items())
            raise TooLarge(
                f"a request of {asked} would need about {need:.0f} MiB on device "
                f"{stage.device.name} (stage {stage.index}), which has {has:.0f} MiB; the "
                f"plan was made for {planned}. Send smaller requests, or plan for these "
                f"sizes (edge plan --dim NAME=SIZE) on devices that hold them")


def _follows(plan: Plan, dim: str) -> bool:
    """Whether ``dim`` follows from the plan's other dims (a KV cache's total length)."""
    return dim in plan.model.derived or (dim not in plan.model.bindings
                                         and dim_expression(dim) is not None)


def largest(plan: Plan, dim: str) -> int | None:
    """The largest size of ``dim`` (the other dims at the plan's sizes) that every device
    of ``plan`` holds by :func:`check_fits`, and the model itself takes
    (``ModelInfo.limits``); None if neither limits it (or the plan does not record how its
    activations grow, or ``dim`` follows from the others)."""
    planned = plan.model.bindings.get(dim)
    if not planned or _follows(plan, dim):
        return None
    by_memory = _largest_by_memory(plan, dim, planned)
    by_model = plan.model.limits.get(dim)
    if by_memory is None or by_model is None:
        return by_memory if by_model is None else by_model
    return min(by_memory, by_model)


def _largest_by_memory(plan: Plan, dim: str, planned: int) -> int | None:
    limit = None
    for stage in plan.stages:
        p = stage.predicted
        degree = p.activation_degrees.get(dim, 0)
        if dim not in p.activation_degrees or degree == 0 or p.activations_mb <= 0:
            continue
        room = stage.device.memory_mb - p.memory_mb
        k = max(1.0, room / p.activations_mb + 1) ** (1 / degree)
        limit = min(limit or math.inf, k)
    if limit is None:
        return None
    size = max(planned, math.floor(limit * planned))
    # the closed form can land a hair over; step back until the check agrees
    while size > planned and _refused(plan, {**plan.model.bindings, dim: size}):
        size -= max(1, size // 1000)
    return size


def _refused(plan: Plan, sizes: Mapping[str, int]) -> bool:
    """Whether the devices' memory refuses ``sizes`` (the model's own limits aside)."""
    unlimited = dataclasses.replace(plan, model=dataclasses.replace(plan.model, limits={}))
    try:
        check_fits(unlimited, sizes)
        return False
    except TooLarge:
        return True


def describe_limits(plan: Plan) -> str:
    """One line for people: the largest request of each size the plan's devices hold."""
    parts = []
    for dim in plan.model.bindings:
        size = largest(plan, dim)
        if size is not None:
            others = ", ".join(f"{k}={v}" for k, v in plan.model.bindings.items()
                               if k != dim and not _follows(plan, k))
            parts.append(f"{dim} up to {size}" + (f" (at {others})" if others else ""))
    if not parts:
        return ""
    return ("largest requests the devices hold: " + "; ".join(parts)
            + "; larger ones are refused with RESOURCE_EXHAUSTED")



def _grows_bounded(plan: Plan, index: int) -> bool:
    """Whether :func:`check_fits` bounds every dim on stage ``index``: the stage records
    a growth of degree >= 1 for each (else its bound is None and the stage is skipped)."""
    degrees = plan.stages[index].predicted.activation_degrees
    return all(degrees.get(dim, 0) >= 1 for dim in plan.model.bindings
               if not _follows(plan, dim))


def largest_request_bytes(plan: Plan, stage: int | None = None) -> int | None:
    """The largest request message a plan admits, in bytes, plus :data:`FRAMING_BYTES`:
    with ``stage``, a Forward to that stage; without, an Infer (the model's inputs).

    A stage's inputs are live while it runs, so they are part of its activations; a
    request that :func:`check_fits` passes has activations of at most what its device
    holds beyond the stage's weights and runtime floor. That bounds a Forward. An Infer's
    tensors have known shapes: at the plan's sizes they take ``planned`` bytes, and a
    request grows them at most as much as it grows some stage's activations (``K``, the
    most any device allows), so ``2 * planned * K`` (twice, for what the growth model
    does not see) bounds it too, usually far below the first bound; the smaller is taken.

    None when no bound is known: the plan does not record how activations grow, or a
    stage does not grow with some dim (then :func:`check_fits` does not bound that dim).

    Args:
        plan: the plan being served.
        stage: a stage index, or None for an Infer.
    """
    def room_bound(i: int) -> int | None:
        p = plan.stages[i].predicted
        if not _grows_bounded(plan, i):
            return None
        room_mb = plan.stages[i].device.memory_mb - p.memory_mb + p.activations_mb
        return int(max(room_mb, p.activations_mb, 0.0) * 2**20) + FRAMING_BYTES

    if stage is not None:
        return room_bound(stage)
    bounds = [room_bound(0)]
    planned = _tensor_bytes(plan.model.inputs, plan.model.bindings)
    if planned is not None and all(_grows_bounded(plan, i) for i in range(len(plan.stages))):
        k = max([1.0] + [(s.device.memory_mb - s.predicted.memory_mb)
                         / s.predicted.activations_mb + 1
                         for s in plan.stages if s.predicted.activations_mb > 0])
        bounds.append(int(2 * planned * k) + FRAMING_BYTES)
    known = [b for b in bounds if b is not None]
    return min(known) if known else None


def _tensor_bytes(specs: Sequence[TensorSpec], sizes: Mapping[str, int]) -> int | None:
    """Bytes of ``specs`` at ``sizes``; None if a dim or dtype is not known."""
    total = 0
    for spec in specs:
        try:
            itemsize = np.dtype(spec.dtype).itemsize
        except TypeError:
            return None
        count = 1
        for dim in spec.shape:
            size = dim if isinstance(dim, int) else sizes.get(dim) if isinstance(dim, str) \
                else None
            if size is None:
                return None
            count *= int(size)
        total += count * itemsize
    return total
