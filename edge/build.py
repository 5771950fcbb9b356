"""Building a plan: analyse an ONNX model, split it over devices, write shards and ``plan.json``.

The one place where planning (``edge.planning``: costs, the partition, the plan data) and
shard building (``edge.shards``) meet, so that neither package imports the other's caller:
``edge.shards`` reads ``edge.planning``, and this module reads both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from edge.errors import ConfigError, GraphError, NoFitError, PlanError
from edge.files import file_sha256
from edge.planning import generation as gen_plan
from edge.planning.generation import GenerationRequest
from edge.planning.graph import GraphCosts, analyze, load_model
from edge.planning.plan import (INT8_MIN_COSINE, Device, Generation, ModelInfo, Plan,
                                ShardFile, Stage, TensorSpec)
from edge.planning.planner import Split, partition
from edge.planning.refine import (IMBALANCE, heavy_feed_forwards, heavy_matmuls,
                                  split_feed_forwards, split_matmuls)
from edge.planning.state import kv_bytes_per_token, state_pairs
from edge.shards.accuracy import Int8Accuracy, format_cosine, synthetic_inputs
from edge.shards.build import build_shard, stage_state
from edge.shards.decoding import prompt_feeds
from edge.shards.quantize import quantize_shard
from edge.spec import KV_DTYPES, MODE_TABLE, MODES, quantized_modes

__all__ = ["make_plan", "plan_dims", "load_sample", "DEFAULT_DIMS"]

log = logging.getLogger(__name__)


# Sizes a plan is costed at unless --dim says otherwise, for the dims a model names so.
DEFAULT_DIMS = {"batch": 1, "sequence": 128}

def load_sample(path: str | None) -> dict | None:
    """The arrays of ``--sample FILE.npz``, or None without one."""
    if not path:
        return None
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array (np.save); write it with np.savez")
        with f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"--sample {path}: expected an .npz of arrays keyed by the "
                          f"model's input names, got a file that does not read as one ({e})"
                          ) from None


def plan_dims(model: str | Path, given: dict[str, int], sample: dict | None = None,
              ) -> dict[str, int]:
    """``given`` plus DEFAULT_DIMS for the model's symbolic input dims that it leaves open
    (none with a sample: its shapes bind every dim)."""
    if sample is not None:
        return given

    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception:
        return given  # analyze() reports an unreadable model with a better message
    names = {d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim}
    return {**{k: v for k, v in DEFAULT_DIMS.items() if k in names}, **given}


# Rounds of (measure the int8 stages, veto those too far from fp32, partition again) before
# the planner gives up on int8 for the model. Each round vetoes, per failing stage, the small
# range inside it that costs the accuracy (Int8Accuracy.failing_core) and with it every
# range holding that one, so few rounds are ever needed.
_INT8_ROUNDS = 4


def _rejected_no_fit(e: NoFitError, rejected: Mapping[tuple[int, int], float],
                     min_cosine: float, on: str) -> NoFitError:
    """``e`` with a line saying which int8 ranges were rejected for accuracy."""
    worst = sorted(rejected.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else -2.0)
    said = "; ".join(f"nodes [{i}, {j}) in int8 keep {format_cosine(c)}"
                     for (i, j), c in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    msg = (f"{e}\nint8 was rejected for accuracy where it would have fitted: the model's "
           f"outputs must keep cosine >= {min_cosine} with fp32 (measured on {on}); "
           f"{said}{more}")
    return NoFitError(msg, needs=e.needs, has=e.has, min_memory_mb=e.min_memory_mb)


def _accurate_split(costs: GraphCosts, devices: Sequence[Device],
                    modes: Sequence[str] | None, acc: "_Checks", on: str,
                    min_cosine: float) -> tuple[Split, dict[tuple[int, int], float]]:
    """Partition with int8 only where the model's outputs keep ``min_cosine``.

    A stage below ``min_cosine`` gets int8 vetoed on the range inside it that fails on
    its own (found by bisection), and so on every range holding that; then the model is
    partitioned again. For a decoder planned for generation, a range's cosine is the
    worst of the prefill's and of teacher-forced decode steps' (``Int8Accuracy``).

    Args:
        acc: measures the ranges, on the inputs described by ``on`` (for messages).

    Returns:
        The split and, per int8 stage's range, its measured cosine.

    Raises:
        NoFitError: nothing fits once int8 is rejected where it is too inaccurate; the
            message lists the rejected ranges and their cosines.
    """
    modes = MODES if modes is None else tuple(modes)
    split = partition(costs, devices, modes=modes)
    if not quantized_modes(split.modes):
        return split, {}
    rejected: dict[tuple[int, int], float] = {}
    for attempt in range(_INT8_ROUNDS):
        measured = {r: acc.cosine(*r) for r, m in zip(split.ranges, split.modes)
                    if MODE_TABLE[m].quantized}
        bad = {r: c for r, c in measured.items() if not c >= min_cosine}  # NaN is bad
        if not bad:
            return split, measured
        for k, r in enumerate(split.ranges):
            if r in bad:
                a, b, c = acc.failing_core(r[0], r[1], min_cosine)
                rejected[(a, b)] = c
                log.warning("stage %d (nodes [%d, %d)) in int8 keeps cosine %s < %s of "
                            "the model's outputs with fp32 on %s; nodes [%d, %d) alone "
                            "keep %s: int8 rejected on every range holding them, "
                            "re-planning", k, r[0], r[1], format_cosine(bad[r]),
                            min_cosine, on, a, b, format_cosine(c))
        if attempt == _INT8_ROUNDS - 1:
            break
        try:
            split = partition(costs, devices, modes=modes, int8_vetoed=tuple(rejected))
        except NoFitError as e:
            raise _rejected_no_fit(e, rejected, min_cosine, on) from None
        if not quantized_modes(split.modes):
            return split, {}
    # Still finding new int8 ranges to reject: stop measuring and do without int8.
    left = tuple(m for m in modes if not MODE_TABLE[m].quantized)
    log.warning("int8 rejected for accuracy on %d node ranges; planning without int8",
                len(rejected))
    if not left:
        raise NoFitError(
            f"int8, the only mode allowed, keeps the model's outputs below cosine "
            f"{min_cosine} with fp32 on {len(rejected)} splits tried (measured on {on}): "
            + "; ".join(f"nodes [{i}, {j}) keep {format_cosine(c)}"
                        for (i, j), c in rejected.items())
            + "; allow fp32 or add devices", needs={},
            has={d.name: d.memory_mb for d in devices}, min_memory_mb=float("inf"))
    try:
        return partition(costs, devices, modes=left), {}
    except NoFitError as e:
        raise _rejected_no_fit(e, rejected, min_cosine, on) from None


def make_plan(model_path: str | Path, cluster_devices: Sequence[Device],
              out_dir: str | Path, bindings: dict[str, int] | None = None,
              standby: Sequence[Device] = (),
              modes: Sequence[str] | None = None,
              sample: Mapping[str, np.ndarray] | None = None,
              int8_min_cosine: float | None = None,
              generation: GenerationRequest | Generation | None = None,
              finer_cuts: bool = False, block_cuts: bool = True) -> Plan:
    """Analyse a model, split it over the devices, write the shards and ``plan.json``.

    Args:
        model_path: the source ``.onnx`` (external data next to it is loaded).
        cluster_devices: devices in pipeline order; those with ``standby=True`` hold no
            stage and go to ``Plan.standby``.
        out_dir: folder for ``plan.json`` and ``shards/stage-<i>.onnx`` with their data
            files (``.onnx.data``, ``.onnx.gather.data``); a stage whose mode is int8 is
            built in fp32 and quantized (``edge.shards.quantize``).
        bindings: sizes of symbolic dims to cost at, e.g. ``{"batch": 1, "sequence": 128}``.
        standby: extra spare devices.
        modes: the modes a stage may take, in order of preference; None for all of
            ``MODES`` (fp32, then fp32-lean, then int8: each stage gets the first that fits).
        sample: a real input, one array per model input (``edge plan --sample``): it binds
            the model's dims, shapes are measured on it, and so is int8 accuracy (without
            one, seeded synthetic inputs at the bound shapes:
            ``edge.shards.accuracy.synthetic_inputs``). Saved as ``sample.npz`` next to
            ``plan.json``, for re-plans.
        generation: plan a decoder with KV caches for generation, with this context,
            sequences and prefill (``edge.planning.generation``; unset fields take the
            defaults; a ``Generation`` from an earlier plan is kept as it is): it is
            costed at its prefill with empty caches, each stage keeps its layers' caches
            (never sent) and its memory holds them for context x sequences tokens, and
            the objective is the decode step. None or an empty request: planned as any
            model (caches travel as inputs and outputs). A model without caches refuses
            a request.
        int8_min_cosine: a stage is planned in int8 only if the model's outputs, with that
            stage quantized, keep at least this cosine similarity with the fp32 model's
            (``Stage.int8_cosine`` records it); None for ``INT8_MIN_COSINE`` (0.99).
        block_cuts: where whole nodes leave the stages uneven, split feed-forward blocks
            in parts so that a cut may fall inside one (``edge.planning.refine``), if the
            cost model finds it faster (edge lab, BERT-base over 8 Pi 4s: 3-8% faster).
        finer_cuts: else split the heaviest MatMuls by columns (there: no gain).

    Returns:
        The plan, also saved as ``out_dir/plan.json``.

    Raises:
        GraphError: the model cannot be analysed or cut.
        NoFitError: no split fits the devices' memory (in a mode accurate enough).
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    active = [d for d in cluster_devices if not d.standby]
    spares = tuple(d for d in cluster_devices if d.standby) + tuple(standby)
    min_cosine = INT8_MIN_COSINE if int8_min_cosine is None else float(int8_min_cosine)
    if not -1.0 <= min_cosine <= 1.0:
        raise PlanError(f"int8_min_cosine: expected a cosine in [-1, 1], got {min_cosine}")
    gen, bindings = _generation(model_path, bindings, generation)
    costs = analyze(_source(model_path, gen), bindings, sample, state=gen is not None)
    if gen is not None:
        _add_decode_costs(costs, model_path, gen)
        gen = dataclasses.replace(gen, tokenizer=gen_plan.copy_tokenizer(model_path, out_dir))
    else:  # an encoder's tokenizer, for the coordinator's /v1/embeddings of text
        gen_plan.copy_tokenizer(model_path, out_dir)
        costs = _finer(costs, active, modes, bindings, sample, block_cuts, finer_cuts)
    shard_dir, sample_rel = _output_dirs(out_dir, sample)
    on = "the sample" if sample is not None else "synthetic inputs"
    with _Checks(costs, sample, shard_dir) as acc:
        if gen is not None and not isinstance(generation, Generation):
            gen = _checked_kv_dtype(gen, acc, on)  # a kept Generation was checked before
        split, cosines = _accurate_split(costs, active, modes, acc, on, min_cosine)
    stages = _build_stages(costs, active, split, cosines, out_dir, shard_dir,
                           KV_DTYPES[gen.kv_dtype] if gen is not None else None)
    model = dataclasses.replace(_model_info(model_path, costs, out_dir, sample_rel),
                                generation=gen)
    plan = Plan(model=model, stages=tuple(stages), standby=spares,
                bottleneck_ms=split.bottleneck_ms, latency_ms=split.latency_ms,
                modes=MODES if modes is None else tuple(modes), int8_min_cosine=min_cosine)
    plan.save(out_dir / "plan.json")
    log.info("plan %s: %d stages, period %.1f ms, latency %.1f ms -> %s", plan.plan_id,
             len(stages), plan.bottleneck_ms, plan.latency_ms, out_dir / "plan.json")
    return plan


def _build_stages(costs: GraphCosts, devices: Sequence[Device], split: Split,
                  cosines: Mapping[tuple[int, int], float], out_dir: Path, shard_dir: Path,
                  kv_stored: str | None = None) -> list[Stage]:
    """Write each stage's shard (quantized in a quantized mode) and describe the stage;
    its KV caches are counted stored as numpy dtype ``kv_stored`` (None: as computed)."""
    n = costs.num_nodes
    stages = []
    for k, (dev, (i, j), pred, mode) in enumerate(zip(devices, split.ranges,
                                                      split.predictions, split.modes)):
        rel = f"shards/stage-{k}.onnx"
        quantized = MODE_TABLE[mode].quantized
        if quantized:
            # Quantize the fp32 shard built in a folder of its own, then write the int8
            # one in the same layout.
            with tempfile.TemporaryDirectory(prefix="edge-fp32-", dir=shard_dir) as tmp:
                fp32 = build_shard(costs.model, costs, i, j, Path(tmp) / f"stage-{k}.onnx")
                info = quantize_shard(fp32.path, out_dir / rel)
        else:
            info = build_shard(costs.model, costs, i, j, out_dir / rel)
        outputs = (tuple(costs.specs[t] for t in costs.travelling_outputs) if j == n
                   else costs.crossing_specs(j))
        state = tuple(stage_state(costs, i, j))
        stages.append(Stage(
            index=k, device=dev, node_range=(i, j), inputs=costs.crossing_specs(i),
            outputs=outputs, shard=rel, sha256=info.sha256, shard_bytes=info.size,
            predicted=dataclasses.replace(
                pred, activation_degrees=costs.activation_degrees(i, j),
                activation_growth=tuple(costs.activation_growth(i, j))), mode=mode,
            int8_cosine=cosines.get((i, j)) if quantized else None, state=state,
            kv_bytes_per_token=kv_bytes_per_token(costs.specs, [b for _, b in state],
                                                  kv_stored),
            data_files=tuple(ShardFile(f"shards/{f.path.name}", f.sha256, f.size,
                                       f.random_access) for f in info.data_files)))
    return stages


def _model_info(model_path: Path, costs: GraphCosts, out_dir: Path, sample_rel: str
                ) -> ModelInfo:
    """What the plan records of its source model."""
    return ModelInfo(
        name=model_path.stem, sha256=file_sha256(model_path), num_nodes=costs.num_nodes,
        inputs=tuple(costs.specs[t] for t in costs.travelling_inputs),
        outputs=tuple(costs.specs[t] for t in costs.travelling_outputs),
        bindings=dict(costs.bindings), derived=dict(costs.derived),
        limits=dict(costs.dim_limits),
        path=os.path.relpath(model_path.resolve(), out_dir.resolve()),
        sample=sample_rel, notes=tuple(costs.notes))


def _input_specs(model_path: Path) -> tuple[list[TensorSpec], list[str]]:
    """The model's graph inputs (symbolic shapes) and output names, weights not loaded."""
    try:
        g = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:
        return [], []  # analyze() reports an unreadable model with a better message
    inits = {t.name for t in g.initializer}
    specs = [TensorSpec(name=i.name, dtype="float32", shape=tuple(
        d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
        for d in i.type.tensor_type.shape.dim)) for i in g.input if i.name not in inits]
    return specs, [o.name for o in g.output]


def _generation(model_path: Path, bindings: dict[str, int] | None,
                asked: GenerationRequest | Generation | None
                ) -> tuple[Generation | None, dict[str, int] | None]:
    """The generation settings (None for a model without state) and the bindings to cost
    at: the prefill's, with empty caches, for a decoder."""
    inputs, outputs = _input_specs(model_path)
    pairs = state_pairs([s.name for s in inputs], outputs)
    request = asked if isinstance(asked, GenerationRequest) else GenerationRequest()
    wanted = isinstance(asked, Generation) or request.given
    if wanted and not pairs:
        raise PlanError(
            f"--generate/--context/--sequences/--prefill: {model_path.name} has no KV "
            "caches (no input past_key_values.N.* or past.N.* with a matching present.N.* "
            "output), so there is nothing to plan them for; plan it without them")
    if not wanted:
        if pairs:
            log.info("%s has KV caches (%d): planned for one request at a time, caches "
                     "travelling; pass --generate or --context to plan it for generation",
                     model_path.name, len(pairs))
        return None, bindings
    gen = asked if isinstance(asked, Generation) else gen_plan.resolve(model_path, request)
    pasts = {a for a, _ in pairs}
    log.info("planning %s for generation: context %d, %d sequence(s), prefill %d",
             model_path.name, gen.context, gen.sequences, gen.prefill)
    return gen, {**(bindings or {}), **gen_plan.prefill_bindings(inputs, pasts, gen)}


# Bytes of one drawn token (int64), what the last stage of a generation plan sends.
_TOKEN_BYTES = 8


def _output_dirs(out_dir: Path, sample: Mapping[str, np.ndarray] | None) -> tuple[Path, str]:
    """Make ``out_dir/shards``; save the sample as ``out_dir/sample.npz``, for re-plans.
    Returns the shards' folder and the sample's path in the plan ("" without one)."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if sample is None:
        return shard_dir, ""
    np.savez(out_dir / "sample.npz", **{k: np.asarray(v) for k, v in sample.items()})
    return shard_dir, "sample.npz"


def _finer(costs: GraphCosts, devices: Sequence[Device], modes: Sequence[str] | None,
           bindings: dict[str, int] | None, sample: Mapping[str, np.ndarray] | None,
           blocks_too: bool, columns: bool) -> GraphCosts:
    """``costs`` of the model with its feed-forward blocks (``blocks_too``), or else its
    heaviest MatMuls (``columns``), split in parts (``edge.planning.refine``), when the
    split of ``costs`` is uneven because no cut can fall inside them and the finer
    model's split is faster; else ``costs``."""
    if not (blocks_too or columns):
        return costs
    try:
        split = partition(costs, devices, modes=MODES if modes is None else tuple(modes))
    except NoFitError:
        return costs  # the planner says why, with the model as it is
    total = float(np.sum(costs.flops))
    even_ms = total / sum(d.gflops * 1e9 for d in devices) * 1e3
    if len(devices) < 2 or split.bottleneck_ms <= (1 + IMBALANCE) * even_ms:
        return costs
    slowest = max(split.predictions, key=lambda p: p.time_ms)
    # Feed-forward blocks split whole where the model has them (a cut inside one carries
    # two tensors of its output's size); else the heavy MatMuls by their columns.
    flops = {outs[0]: f for outs, f in zip(costs.node_outputs, costs.flops) if outs}
    blocks = (heavy_feed_forwards(costs.model.graph, flops, slowest.gflops * 1e9)
              if blocks_too else {})
    model, count = split_feed_forwards(costs.model, blocks) if blocks else (costs.model, 0)
    what = "feed-forward blocks"
    if not count and columns:
        what = "MatMuls"
        parts = heavy_matmuls(costs.op_types, costs.node_outputs, costs.flops,
                              slowest.gflops * 1e9)
        model, count = split_matmuls(costs.model, parts) if parts else (costs.model, 0)
    if not count:
        return costs
    try:  # the model as it came always plans; a split that does not is left out
        finer = analyze(model, bindings, sample)
        better = partition(finer, devices, modes=MODES if modes is None else tuple(modes))
    except (GraphError, NoFitError) as e:
        log.info("not splitting %s in parts: %s", what, e)
        return costs
    keep = better.bottleneck_ms < 0.98 * split.bottleneck_ms
    log.info("split %d %s in parts so that cuts may fall inside them: slowest stage "
             "%.0f ms -> %.0f ms (even: %.0f ms); %s", count,
             what, split.bottleneck_ms,
             better.bottleneck_ms, even_ms, "kept" if keep else "not kept")
    return finer if keep else costs


def _source(model_path: Path, gen: Generation | None) -> Path | onnx.ModelProto:
    """What is analysed and cut: the model file, or for generation the model with logits
    for the last position only (``gen_plan.last_position_logits``), which is all a draw
    reads."""
    if gen is None:
        return model_path
    m = load_model(model_path)
    gen_plan.last_position_logits(m)
    return m


def _add_decode_costs(costs: GraphCosts, model_path: Path, gen: Generation) -> None:
    """Give ``costs`` the KV caches' bytes per node at the plan's context and sequences,
    and the flops and cut bytes of one decode step (measured at its sizes), which the
    planner reads (``edge.planning.planner``)."""
    inputs = [costs.specs[t] for t in costs.graph_inputs]
    pasts = {a for a, _ in costs.state}
    decode = analyze(_source(model_path, gen), gen_plan.decode_bindings(inputs, pasts, gen),
                     state=True)
    if decode.node_names != costs.node_names:
        raise PlanError(f"{model_path.name}: the decode step's graph differs from the "
                        "prefill's after normalising; cannot cost it")
    costs.decode_flops = decode.flops
    # The last stage draws the next token and keeps its logits (edge.worker.sessions
    # run_step): what leaves the pipeline is one int64 token per sequence, not the
    # logits (SmolLM2's 192 KiB a step, 52 ms over a Zero 2 W's Wi-Fi, which made the LM
    # head the slowest stage and left the planner no reason to give it any layers).
    n = costs.num_nodes
    costs.decode_cut_bytes = np.array(decode.cut_bytes, dtype=np.float64)
    costs.decode_cut_bytes[n] = _TOKEN_BYTES
    costs.cut_bytes = np.array(costs.cut_bytes, dtype=np.float64)
    costs.cut_bytes[n] = _TOKEN_BYTES * costs.bindings.get("batch", 1)
    # kv_token_bytes counts the presents' float32; fp16 caches are stored in half that.
    stored = np.dtype(KV_DTYPES[gen.kv_dtype]).itemsize / np.dtype(np.float32).itemsize
    kept = gen.sequences * stored
    # A batch of decode steps (the coordinator's default: every sequence's) runs with its
    # rows' caches left-padded into float32 pasts and gets presents one token longer: two
    # more copies of them while it runs (edge.worker.sessions.pad_pasts), at the context.
    batch = 2.0 * gen.sequences if gen.sequences > 1 else 0.0
    costs.kv_bytes = costs.kv_token_bytes * float(gen.context) * (kept + batch)
    costs.kv_stored_fraction = kept / (kept + batch)


# The least cosine the logits must keep with caches stored in a smaller dtype than fp32
# (the issue's bar, the same as int8's default).
KV_MIN_COSINE = 0.99


class _Checks:
    """The plan's accuracy checks (``Int8Accuracy``), made on first use: most plans need
    none, and synthetic inputs cannot be made for every model.

    They run on the sample, else on synthetic inputs (for a decoder planned for
    generation, a prompt: positions 0..n-1 and a mask of ones).
    """

    def __init__(self, costs: GraphCosts, sample: Mapping[str, np.ndarray] | None,
                 workdir: Path):
        self._args = costs, sample, workdir
        self._acc: Int8Accuracy | None = None

    def __enter__(self) -> "_Checks":
        return self

    def __exit__(self, *exc) -> None:
        if self._acc is not None:
            self._acc.close()

    @property
    def acc(self) -> Int8Accuracy:
        if self._acc is None:
            costs, sample, workdir = self._args
            inputs = dict(sample) if sample is not None else synthetic_inputs(costs)
            if sample is None and costs.state and "input_ids" in inputs:
                inputs = prompt_feeds(inputs, [past for past, _ in costs.state])
            self._acc = Int8Accuracy(costs, inputs, workdir=workdir)
        return self._acc

    def __getattr__(self, name: str):
        return getattr(self.acc, name)  # cosine, failing_core, stored_kv_cosine, steps


def _checked_kv_dtype(gen: Generation, acc: "_Checks", on: str) -> Generation:
    """``gen`` with the cosine its KV dtype keeps, measured (fp32 needs no check).

    Raises:
        PlanError: the logits keep less than ``KV_MIN_COSINE`` with caches stored so.
    """
    if gen.kv_dtype == "fp32":
        return gen
    odd = [b for _, b in acc.costs.state if acc.costs.specs[b].dtype != "float32"]
    if odd:
        raise PlanError(f"--kv-dtype {gen.kv_dtype}: expected float32 presents to store "
                        f"in {gen.kv_dtype}, got {acc.costs.specs[odd[0]].describe()}: plan "
                        "with --kv-dtype fp32")
    c = acc.stored_kv_cosine(KV_DTYPES[gen.kv_dtype])
    if not c >= KV_MIN_COSINE:  # NaN fails
        raise PlanError(
            f"--kv-dtype {gen.kv_dtype}: with the KV caches stored in {gen.kv_dtype} the "
            f"logits keep cosine {format_cosine(c)} with fp32 caches over {acc.steps} "
            f"teacher-forced decode steps (measured on {on}); expected at least "
            f"{KV_MIN_COSINE}: plan with --kv-dtype fp32")
    log.info("KV caches in %s: logits keep cosine %s with fp32 caches over %d decode "
             "steps (measured on %s)", gen.kv_dtype, format_cosine(c), acc.steps, on)
    return dataclasses.replace(gen, kv_cosine=c)
