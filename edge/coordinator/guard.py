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

from edge.errors import EdgeError
from edge.planning.plan import Plan, TensorSpec, dim_expression, free_sizes

__all__ = ["TooLarge", "BeyondModel", "request_sizes", "check_fits", "largest",
           "describe_limits"]


class TooLarge(EdgeError):
    """The request would not fit a device; the message says which and by how much."""


class BeyondModel(TooLarge):
    """The request is larger than the model itself takes (``ModelInfo.limits``: 512
    learned positions), whatever the memory: the request is wrong, not the cluster."""


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
