"""Planning a decoder for generation: the sizes it is costed at, and what it needs beside it.

A decoder with KV caches (``edge.planning.state``) is planned for a *context* (tokens per
sequence, prompt and generated), a number of *sequences* whose caches the stages hold at
once, and a *prefill* (the longest prompt the activations are planned for):

- memory: every stage holds its layers' caches for ``context x sequences`` tokens
  (``Stage.kv_bytes_per_token`` times that, at the item size of ``Generation.kv_dtype``:
  fp16 caches count half), on top of its weights and the prefill's activations;
- time: generating is one decode step per token, so the planner minimises the slowest
  stage's decode step, costed at one new token after ``context / 2`` cached ones (the
  average over a sequence that fills its context); the prefill's time is recorded beside.

Defaults: the context is the model's ``max_position_embeddings`` from ``generation.json``
beside it, capped at 2048 (a board's memory, not the model, is usually the limit); one
sequence, because every sequence held multiplies the caches on every stage, and a single
board pipeline gains more from a longer context than from concurrency (more sequences wait
in the coordinator's queue); a prefill of min(context, 128).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edge.errors import PlanError
from edge.planning.plan import Generation, Plan, TensorSpec, dim_expression
from edge.spec import KV_DTYPES

__all__ = ["DEFAULT_CONTEXT", "TOKENIZER_FILES", "GenerationRequest", "resolve",
           "prefill_bindings", "decode_bindings", "copy_tokenizer", "last_position_logits",
           "batch_rows_that_fit"]

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
DEFAULT_PREFILL = 128
GENERATION_FILE = "generation.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", GENERATION_FILE)


@dataclass(frozen=True)
class GenerationRequest:
    """What ``edge plan --generate --context --sequences --prefill`` asked for; None: the
    default. Any of them plans the model for generation."""

    context: int | None = None
    sequences: int | None = None
    prefill: int | None = None
    generate: bool = False
    kv_dtype: str | None = None  # None: "fp32"

    @property
    def given(self) -> bool:
        return self.generate or any(v is not None for v in (self.context, self.sequences,
                                                            self.prefill, self.kv_dtype))


def _model_info(model_path: Path) -> dict:
    path = model_path.parent / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); using generation defaults", path, e)
        return {}
    return info if isinstance(info, dict) else {}


def resolve(model_path: str | Path, asked: GenerationRequest) -> Generation:
    """The generation settings: what was asked, the rest from ``generation.json`` beside
    the model and the defaults (module docstring). ``tokenizer`` is left "".

    Raises:
        PlanError: a size below 1, or a prefill longer than the context.
    """
    info = _model_info(Path(model_path))
    most = info.get("max_position_embeddings")
    if asked.context is not None:
        context = asked.context
    else:
        context = min(most, DEFAULT_CONTEXT) if isinstance(most, int) else DEFAULT_CONTEXT
    sequences = 1 if asked.sequences is None else asked.sequences
    prefill = min(context, DEFAULT_PREFILL) if asked.prefill is None else asked.prefill
    for name, v in (("context", context), ("sequences", sequences), ("prefill", prefill)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"--{name}: expected an integer >= 1, got {v!r}")
    if prefill > context:
        raise PlanError(f"--prefill: expected at most the context ({context}), got {prefill}")
    kv_dtype = "fp32" if asked.kv_dtype is None else asked.kv_dtype
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"--kv-dtype: expected one of {', '.join(KV_DTYPES)}, got "
                        f"{kv_dtype!r}")
    if isinstance(most, int) and context > most:
        log.warning("context %d is beyond the model's %d positions", context, most)
    eos = info.get("eos_token_ids") or []
    return Generation(context=context, sequences=sequences, prefill=prefill,
                      eos_token_ids=tuple(int(t) for t in eos if isinstance(t, int)),
                      kv_dtype=kv_dtype)


def _dim_roles(inputs: Sequence[TensorSpec], pasts: set[str]) -> dict[str, str]:
    """Each plain symbolic input dim's role: "batch" (on the pasts and on other inputs),
    "past" (on the pasts only), "total" (named so: ``total_sequence``, the mask's length)
    or "new" (the tokens of this step)."""
    on_past = {d for s in inputs if s.name in pasts for d in s.shape if isinstance(d, str)}
    other = {d for s in inputs if s.name not in pasts for d in s.shape if isinstance(d, str)}
    roles = {}
    for d in on_past | other:
        if dim_expression(d) is not None:
            continue  # an expression (past + 1) follows from the others: never bound
        roles[d] = ("batch" if d in on_past and d in other else "past" if d in on_past
                    else "total" if "total" in d.lower() else "new")
    return roles


def prefill_bindings(inputs: Sequence[TensorSpec], pasts: set[str], gen: Generation
                     ) -> dict[str, int]:
    """The sizes a decoder is costed at for memory: one sequence's last prefill chunk,
    after ``context - prefill`` cached tokens (a chunk's attention spans every token
    cached before it, so the last chunk of a prompt that fills the context is the
    largest)."""
    past = gen.context - gen.prefill
    size = {"batch": 1, "past": past, "total": gen.context, "new": gen.prefill}
    return {d: size[r] for d, r in _dim_roles(inputs, pasts).items()}


def decode_bindings(inputs: Sequence[TensorSpec], pasts: set[str], gen: Generation
                    ) -> dict[str, int]:
    """The sizes of one decode step: one new token after ``context // 2`` cached."""
    past = max(1, gen.context // 2)
    size = {"batch": 1, "past": past, "total": past + 1, "new": 1}
    return {d: size[r] for d, r in _dim_roles(inputs, pasts).items()}


def copy_tokenizer(model_path: str | Path, out_dir: str | Path) -> str:
    """Copy ``tokenizer.json``, ``tokenizer_config.json`` and ``generation.json`` from
    beside the model into ``out_dir/tokenizer/``.

    Returns:
        "tokenizer" (the folder, relative to ``out_dir``) when a ``tokenizer.json`` was
        copied, else "" (the coordinator then takes token ids only).
    """
    src = Path(model_path).parent
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not found:
        return ""
    dest = Path(out_dir) / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copyfile(src / f, dest / f)
    return "tokenizer" if "tokenizer.json" in found else ""


def last_position_logits(m, output: str = "logits") -> bool:
    """Make a decoder's ``output`` the last position's only, in place: when it is made by
    a MatMul of the hidden state [batch, sequence, hidden] and a weight, slice the hidden
    state's last position before that MatMul, so ``output`` becomes [batch, 1, vocab].

    Greedy and sampled draws are unchanged (they read the last position). Only what the
    last stage computes and sends shrinks: the LM head runs on one position, not the
    prefill's, and its logits are one row.

    Args:
        m: an ``onnx.ModelProto`` (the full model, before analysis).
        output: the graph output holding the logits.

    Returns:
        True if the graph was changed; False (and a log line) if ``output`` is not made by
        such a MatMul, which leaves the model as it was.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = m.graph
    outs = [o for o in g.output if o.name == output]
    at = next((k for k, n in enumerate(g.node) if output in n.output), None)
    inits = {t.name: t for t in g.initializer}
    if not outs or at is None:
        log.info("no output %r made by a node: logits kept at every position", output)
        return False
    node = g.node[at]
    dims = outs[0].type.tensor_type.shape.dim
    # A tied LM head reads the embedding through a Transpose (folded into a weight only
    # later, by analyze): a 2-D B either way, so the hidden state has the logits' rank.
    weight = node.input[1] if len(node.input) > 1 else ""
    made = next((n for n in g.node if weight in n.output), None)
    if made is not None and made.op_type == "Transpose":
        weight = made.input[0]
    if (node.op_type != "MatMul" or weight not in inits or len(inits[weight].dims) != 2
            or len(dims) != 3):
        log.info("%s is not a MatMul of [batch, sequence, hidden] by a weight (%s): "
                 "logits kept at every position", output, node.op_type)
        return False
    hidden = node.input[0]
    last = f"{hidden}__last_position"
    consts = {f"{last}__{k}": np.array([v], dtype=np.int64)
              for k, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    g.node.insert(at, helper.make_node("Slice", [hidden, *consts], [last],
                                       name=f"{last}__slice"))
    node.input[0] = last
    dims[1].Clear()
    dims[1].dim_value = 1
    stale = [vi for vi in g.value_info if vi.name == output]
    for vi in stale:
        g.value_info.remove(vi)
    log.info("generation: %s computed for the last position only (a Slice of %s before "
             "its MatMul)", output, hidden)
    return True


def batch_rows_that_fit(plan: Plan, rows: int) -> int:
    """How many sequences' decode steps (up to ``rows``) each stage can run as one batch
    within its device's memory.

    A batch copies its rows' caches into left-padded pasts and onnxruntime returns
    presents one token longer, so while it runs a stage holds about twice the batch's
    caches beside the ones it keeps. A plan for several sequences counts that for a batch
    of all of them (``edge.build``); a larger batch must fit in what the device has beyond
    the stage's planned memory, at ``2 x context x kv_bytes_per_token`` a row. The copies
    are float32 even when the caches are stored in fp16 (``Generation.kv_dtype``): twice
    the stored bytes per token then.
    """
    gen = plan.model.generation
    if gen is None:
        return 1
    widen = 2 if gen.kv_dtype == "fp16" else 1  # the graph reads float32 pasts
    planned = gen.sequences if gen.sequences > 1 else 0
    fit = rows
    for stage in plan.stages:
        per_row = 2 * gen.context * stage.kv_bytes_per_token * widen / 2**20
        if per_row <= 0:
            continue
        room = stage.device.memory_mb - stage.predicted.memory_mb
        fit = min(fit, planned + int(room // per_row))
    return max(1, fit)
