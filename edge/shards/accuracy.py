"""Does a stage keep the model accurate in int8? Measured on the whole model's outputs.

Dynamic quantization (``edge.shards.quantize``) can cost more accuracy than it looks stage
by stage: onnxruntime's quantization of resnet50 keeps cosine 0.984 with the fp32 model,
and the error a stage adds grows through the fp32 stages after it. So the planner asks, for
a node range ``[i, j)`` it wants in int8: with that range quantized and everything else in
fp32, how close are the model's final outputs to the fp32 model's?

``Int8Accuracy`` answers that without running the model once per question. The fp32 model
runs once per set of cuts and keeps the tensors crossing them (``GraphCosts.crossing``) and
the final outputs; then a range's int8 shard runs on the tensors crossing ``i`` and the
fp32 rest of the model, ``[j, n)``, on what comes out. Shards are built with
``edge.shards.build.build_shard`` into a temporary folder; every session uses the settings
the worker uses for that mode (``edge.shards.runtime.session_options``).

The inputs are the user's sample when there is one, else ``synthetic_inputs``.

A decoder planned for generation (its costs have state) is checked over its prefill and
then ``decode_steps`` teacher-forced decode steps (``edge.shards.decoding``): the fp32
model draws greedily and records, at each step, its logits and the tensors crossing each
cut; the int8 range and the fp32 rest run each step on those tensors with caches of their
own, and the range's cosine is the worst over the prefill's logits and every step's
(the prefill's caches count through the steps they feed, not by their own cosine).
``stored_kv_cosine`` measures the same way what storing the caches in fp16 costs.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from edge.errors import GraphError, PlanError
from edge.planning.graph import GraphCosts
from edge.shards.build import build_shard
from edge.shards.decoding import (DECODE_STEPS, can_step, greedy_token, next_pasts,
                                  step_feeds, store_as, teacher_forced, worst)
from edge.shards.quantize import cosine, quantize_shard
from edge.shards.runtime import session_options

__all__ = ["Int8Accuracy", "synthetic_inputs", "output_cosine", "format_cosine"]

log = logging.getLogger(__name__)

# Ops that carry an integer input to a Gather's indices unchanged in value (a cast, a
# reshape), followed when looking for the table a token-id input indexes.
_INDEX_PRESERVING = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                               "Identity", "Expand", "Transpose"})


def _gather_rows(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the smallest constant Gather table that tensor ``name`` indexes, following
    it through index-preserving ops; None when it reaches no such table."""
    g = model.graph
    dims = {t.name: tuple(t.dims) for t in g.initializer}
    for nd in g.node:
        if nd.op_type == "Constant" and nd.output:
            for a in nd.attribute:
                if a.name == "value":
                    dims[nd.output[0]] = tuple(a.t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for nd in g.node:
        for x in nd.input:
            readers.setdefault(x, []).append(nd)
    rows: list[int] = []
    seen, todo = {name}, [name]
    while todo:
        t = todo.pop()
        for nd in readers.get(t, ()):
            if nd.op_type == "Gather" and len(nd.input) > 1 and nd.input[1] == t:
                table = dims.get(nd.input[0])
                axis = next((a.i for a in nd.attribute if a.name == "axis"), 0)
                if table:
                    rows.append(int(table[axis]))
            elif nd.op_type in _INDEX_PRESERVING and nd.input and nd.input[0] == t:
                for o in nd.output:
                    if o and o not in seen:
                        seen.add(o)
                        todo.append(o)
    rows = [r for r in rows if r > 0]
    return min(rows) if rows else None


def synthetic_inputs(costs: GraphCosts, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for the model at its bound shapes (``costs.concrete_shapes``).

    Floats ~ N(0, 1); inputs named like a mask, all ones (a zero mask can turn softmax
    rows into NaN); bools True; other integers token ids in ``[0, rows)`` of the smallest
    Gather table they index, or zeros when they index none (zero is a valid index and
    size-like value for any input the shapes were measured with).

    Args:
        costs: the analysed model.
        seed: seeds the random generator.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in costs.graph_inputs:
        dtype = np.dtype(costs.specs[name].dtype)
        shape = costs.concrete_shapes.get(name)
        if shape is None:
            raise GraphError(f"input {name!r} has no bound shape; pass its sizes as bindings")
        if "mask" in name.lower() or dtype == np.bool_:
            out[name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            rows = _gather_rows(costs.model, name)
            out[name] = (rng.integers(0, rows, size=shape).astype(dtype) if rows
                         else np.zeros(shape, dtype=dtype))
        else:
            out[name] = np.zeros(shape, dtype=dtype)
    return out


def output_cosine(want: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """The lowest cosine over the float tensors of ``want`` against ``got`` (each
    flattened); over all of them as floats when none is a float. NaN if any is NaN."""
    names = [k for k in want if np.issubdtype(np.asarray(want[k]).dtype, np.floating)]
    sims = [cosine(want[k], got[k]) for k in (names or list(want))]
    if not sims:
        return 1.0
    if any(math.isnan(s) for s in sims):
        return float("nan")
    return max(-1.0, min(1.0, min(sims)))  # rounding can land a hair outside [-1, 1]


def format_cosine(c: float) -> str:
    """``c`` to 4 decimals rounded down, so that 0.98999 reads 0.9899 and never looks
    like it passed a 0.99 threshold; ``nan`` for NaN."""
    return "nan" if math.isnan(c) else f"{math.floor(c * 1e4) / 1e4:.4f}"


class Int8Accuracy:
    """Cosine of the model's outputs with one node range in int8 against fp32.

    Results are cached per range; shards and reference tensors are built on first need.
    Use as a context manager, or call ``close`` to remove the temporary folder.

    Args:
        costs: the analysed model (its ``model`` holds the weights).
        inputs: one request's inputs, every graph input by name.
        threads: intra-op threads of the measuring sessions; None for one per core.
        workdir: where to make the temporary folder; None for the system default.
        decode_steps: for a decoder with state, the teacher-forced decode steps compared
            after the prefill (0: the prefill only). Models whose step inputs are not
            the decoder convention's (``edge.shards.decoding.can_step``) get none.
    """

    def __init__(self, costs: GraphCosts, inputs: Mapping[str, np.ndarray],
                 threads: int | None = None, workdir: str | Path | None = None,
                 decode_steps: int = DECODE_STEPS):
        missing = [t for t in costs.graph_inputs if t not in inputs]
        if missing:
            raise PlanError(f"int8 accuracy check: the sample has no {', '.join(missing)}; "
                            f"expected the model's inputs {', '.join(costs.graph_inputs)}, "
                            f"got {', '.join(inputs) or 'none'}")
        self.costs = costs
        self.inputs = {t: np.asarray(inputs[t]) for t in costs.graph_inputs}
        self.threads = threads
        self._dir = Path(tempfile.mkdtemp(prefix="edge-int8-check-",
                                          dir=None if workdir is None else str(workdir)))
        self._full: Path | None = None
        self._at: dict[int, dict[str, np.ndarray]] = {}  # cut -> crossing tensors
        self._final: dict[str, np.ndarray] | None = None
        self._rest: dict[int, Path] = {}
        self._cos: dict[tuple[int, int], float] = {}
        pasts = [a for a, _ in costs.state]
        travelling = [t for t in costs.graph_outputs if t not in {b for _, b in costs.state}]
        self.steps = (decode_steps if costs.state and travelling
                      and can_step(costs.graph_inputs, pasts) else 0)
        if costs.state and decode_steps and not self.steps:
            log.warning("accuracy checks: the decoder's inputs are not input_ids, "
                        "attention_mask, position_ids and its pasts; its prefill only is "
                        "compared")
        self._travelling = travelling
        self._logits = "logits" if "logits" in travelling else (travelling or [""])[0]
        self._tokens: list[np.ndarray] = []  # the fp32 model's greedy draws, one per step
        self._step_want: list[np.ndarray] = []  # its logits at each decode step
        self._step_at: dict[int, list[dict[str, np.ndarray]]] = {}  # cut -> per step
        self._cached = 0  # tokens the prefill caches
        # (i, j) -> (prefill cosine, worst decode step's), for the log and the report
        self.detail: dict[tuple[int, int], tuple[float, float]] = {}

    def __enter__(self) -> "Int8Accuracy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the shards built so far."""
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def _session(self, path: Path, mode: str):
        return ort.InferenceSession(str(path), session_options(self.threads, mode),
                                    providers=["CPUExecutionProvider"])

    def _run(self, path: Path, mode: str, feeds: Mapping[str, np.ndarray],
             what: str) -> dict[str, np.ndarray]:
        try:
            sess = self._session(path, mode)
        except Exception as e:
            raise PlanError(f"int8 accuracy check: loading {what} failed: {e}") from None
        return self._call(sess, feeds, what)

    @staticmethod
    def _call(sess, feeds: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        try:
            names = [o.name for o in sess.get_outputs()]
            res = sess.run(None, {x.name: feeds[x.name] for x in sess.get_inputs()})
        except Exception as e:
            raise PlanError(f"accuracy check: running {what} failed: {e}") from None
        return dict(zip(names, res))

    def reference(self, cuts: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """The fp32 model's outputs; also keeps the tensors crossing each of ``cuts``.

        One run of the whole model for every cut not seen before (none if all were).
        """
        costs = self.costs
        new = sorted({int(p) for p in cuts} - set(self._at))
        if self._final is not None and not new:
            return self._final
        if self._full is None:
            self._full = build_shard(costs.model, costs, 0, costs.num_nodes,
                                     self._dir / "full.onnx", check=False).path
        wanted = [t for p in new for t in costs.crossing(p)
                  if t not in costs.graph_inputs and t not in costs.graph_outputs]
        wanted = list(dict.fromkeys(wanted))
        m = onnx.load(str(self._full), load_external_data=False)
        for t in wanted:
            # onnxruntime fills in the type of an output declared by name only.
            vi = onnx.ValueInfoProto()
            vi.name = t
            m.graph.output.append(vi)
        probe = self._dir / "probe.onnx"  # beside full.onnx: its data files resolve
        onnx.save(m, str(probe))
        sess = self._run_session(probe)
        got = self._call(sess, self.inputs, "the fp32 model")
        got.update(self.inputs)
        self._final = {t: got[t] for t in costs.graph_outputs}
        for p in new:
            self._at[p] = {t: got[t] for t in costs.crossing(p)}
        if self.steps:
            self._reference_steps(sess, got, new)
        del sess
        probe.unlink()
        return self._final

    def _reference_steps(self, sess, first: dict[str, np.ndarray], cuts: Sequence[int]
                         ) -> None:
        """Greedy decode steps of the fp32 model after its prefill's outputs ``first``:
        keeps each step's token and logits, and the tensors crossing each of ``cuts``."""
        pairs = self.costs.state
        self._cached = int(next(first[b] for _, b in pairs).shape[2])
        names = self.costs.graph_inputs
        self._tokens, self._step_want = [], []
        for p in cuts:
            self._step_at[p] = []
        prev = first
        for s in range(self.steps):
            token = greedy_token(prev[self._logits])
            feeds = {**step_feeds(names, token, self._cached + s), **next_pasts(prev, pairs)}
            prev = {**feeds, **self._call(sess, feeds, f"the fp32 model, decode step {s + 1}")}
            self._tokens.append(token)
            self._step_want.append(prev[self._logits])
            for p in cuts:
                self._step_at[p].append({t: prev[t] for t in self.costs.crossing(p)})

    def _rest_shard(self, j: int) -> Path:
        if j not in self._rest:
            self._rest[j] = build_shard(self.costs.model, self.costs, j, self.costs.num_nodes,
                                        self._dir / f"rest-{j}" / "rest.onnx",
                                        check=False).path
        return self._rest[j]

    def cosine(self, i: int, j: int) -> float:
        """Lowest cosine over the model's float outputs with nodes ``[i, j)`` in int8 (the
        rest fp32) against the fp32 model; NaN when the outputs hold NaN. With decode
        steps, over the prefill's logits and every step's (``detail`` keeps both).

        Args:
            i, j: the node range, ``0 <= i < j <= n``.
        """
        key = (int(i), int(j))
        if key in self._cos:
            return self._cos[key]
        n = self.costs.num_nodes
        if not 0 <= i < j <= n:
            raise PlanError(f"node range: expected 0 <= i < j <= {n}, got [{i}, {j})")
        want = self.reference([i])
        where = self._dir / f"stage-{i}-{j}"
        fp32 = build_shard(self.costs.model, self.costs, i, j, where / "fp32" / "stage.onnx",
                           check=False)
        int8 = quantize_shard(fp32.path, where / "int8" / "stage.onnx", check=False)
        shutil.rmtree(where / "fp32", ignore_errors=True)
        parts = [(int8.path, "int8", f"nodes [{i}, {j}) in int8")]
        if j < n:
            parts.append((self._rest_shard(j), "fp32", f"nodes [{j}, {n}) in fp32"))
        try:
            chain = [(self._session(path, mode), what) for path, mode, what in parts]
        except Exception as e:
            raise PlanError(f"int8 accuracy check: loading nodes [{i}, {j}) in int8 or the "
                            f"rest failed: {e}") from None
        shutil.rmtree(where, ignore_errors=True)

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            cur = dict(feeds)
            for sess, what in chain:
                cur.update(self._call(sess, cur, what))
            return cur

        # a decoder's pasts are read where their layer is, never crossing a cut
        cur = run({**self.inputs, **self._at[i]})
        # a decoder's caches of layers before i come from fp32 nodes: the reference's
        got = {t: cur[t] if t in cur else want[t] for t in self.costs.graph_outputs}
        # With decode steps, the prefill's caches are judged by what they do to the
        # steps' logits, not by their own cosine: on SmolLM2 the int8 caches of the first
        # layers keep 0.83 while every step's logits keep 0.999.
        compared = [t for t in want if t in self._travelling] if self.steps else list(want)
        first = output_cosine({t: want[t] for t in compared}, got)
        steps = self._decode_cosines(run, cur, i)
        c = worst([first, *steps])
        self._cos[key] = c
        self.detail[key] = (first, worst(steps))
        log.info("int8 on nodes [%d, %d): cosine %.5f of the model's outputs with fp32 at "
                 "prefill%s", i, j, first,
                 f", worst over {len(steps)} decode steps' logits {worst(steps):.5f}"
                 if steps else "")
        return c

    def _decode_cosines(self, run, first: dict[str, np.ndarray], i: int) -> list[float]:
        """Each teacher-forced decode step's logits cosine with fp32, for ``run`` (the
        model from node ``i`` on) after its prefill's outputs ``first``."""
        if not self.steps:
            return []
        at = self._step_at[i]
        outs = teacher_forced(lambda f, s: run({**f, **at[s]}), self.costs.graph_inputs,
                              first, self._tokens, self.costs.state, self._cached)
        return [output_cosine({self._logits: w}, {self._logits: o[self._logits]})
                for w, o in zip(self._step_want, outs)]

    def stored_kv_cosine(self, dtype: str) -> float:
        """The worst cosine over a decoder's teacher-forced decode steps of the fp32
        model's logits with its caches stored in ``dtype`` between steps (cast back to
        float32 to be fed) against the fp32 model with fp32 caches; 1.0 for a model with
        no decode steps to compare (no state, or ``decode_steps`` 0).

        Args:
            dtype: a numpy dtype name, "float16".
        """
        self.reference()
        if not self.steps:
            return 1.0
        sess = self._run_session(self._full)
        what = f"the fp32 model with {dtype} caches"
        first = self._call(sess, self.inputs, what)
        outs = teacher_forced(lambda f, _: self._call(sess, f, what), self.costs.graph_inputs,
                              first, self._tokens,
                              self.costs.state, self._cached,
                              keep=lambda c: store_as(c, dtype))
        sims = [output_cosine({self._logits: w}, {self._logits: o[self._logits]})
                for w, o in zip(self._step_want, outs)]
        c = worst(sims)
        log.info("caches stored in %s: worst cosine %.5f of %d decode steps' logits with "
                 "fp32 caches", dtype, c, len(sims))
        return c

    def _run_session(self, path: Path):
        try:
            return self._session(path, "fp32")
        except Exception as e:
            raise PlanError(f"accuracy check: loading {path.name} failed: {e}") from None

    def failing_core(self, i: int, j: int, min_cosine: float) -> tuple[int, int, float]:
        """A small range inside ``[i, j)`` that on its own keeps cosine below
        ``min_cosine``, found by bisection: first the shortest failing prefix ``[i, e)``,
        then the shortest failing suffix ``[s, e)`` of that.

        Vetoing the core rather than ``[i, j)`` rules out every range that holds the nodes
        that cost the accuracy, so the planner does not retry the range one node shorter
        each time. Bisection assumes that quantizing more nodes keeps accuracy no better;
        whatever it returns was measured to fail.

        Args:
            i, j: a range whose cosine is below ``min_cosine`` (NaN counts as below).
            min_cosine: the threshold.

        Returns:
            ``(s, e, cosine of [s, e))``; ``(i, j, cosine)`` itself when nothing smaller
            fails.
        """
        # Only cuts a stage may have: a decoder's range must hold whole layers (a shard
        # cut inside one would lack its past), so bisect over the allowed cut positions.
        ok = self.costs.cut_ok
        at = [p for p in range(i, j + 1) if ok is None or ok[p] or p in (i, j)]

        def fails(a: int, b: int) -> bool:
            return not self.cosine(at[a], at[b]) >= min_cosine

        if not fails(0, len(at) - 1):
            raise PlanError(f"nodes [{i}, {j}) keep cosine {self.cosine(i, j):.4f} >= "
                            f"{min_cosine} in int8: nothing to narrow down")
        lo, hi = 0, len(at) - 1  # [i, hi) fails; [i, lo) passes (empty when lo == i)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fails(0, mid) else (mid, hi)
        e = hi
        lo, hi = 0, e  # [lo, e) fails; [hi, e) passes (empty when hi == e)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fails(mid, e) else (lo, mid)
        return at[lo], at[e], self.cosine(at[lo], at[e])
