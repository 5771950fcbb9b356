"""The checks of a Configure before anything is loaded: the protocol, the StageConfig's
fields, the memory budget, and the cached files against the plan's digests.

Each raises a typed error of ``edge.worker.errors`` (or the cache's UploadError); the
servicer maps them to status codes. Loading and swapping the stage is the engine's
(:meth:`edge.worker.engine.StageEngine.install`).
"""

from __future__ import annotations

import math
from pathlib import Path

import edge
from edge.errors import TensorError
from edge.spec import KV_DTYPES, MODES
from edge.proto import edge_pb2 as pb
from edge.transport.codec import PROTOCOL_VERSION, decode_specs
from edge.address import AddressError, parse_address
from edge.worker.cache import ShardCache, file_sha256
from edge.worker.errors import (BadRequest, CacheUnreadable, DigestMismatch, OverBudget,
                                ProtocolMismatch)
from edge.worker.stage import StageSpec

__all__ = ["check_protocol", "check_stage_config", "stage_spec", "check_budget",
           "verified_stage_path"]

def check_protocol(c: pb.StageConfig) -> None:
    """Raise ProtocolMismatch unless the coordinator speaks this worker's protocol."""
    if c.protocol != PROTOCOL_VERSION:
        said = (f"protocol {c.protocol}" if c.protocol
                else "no protocol (an edge from before protocol versions)")
        raise ProtocolMismatch(
            f"the coordinator's StageConfig states {said}; this worker (edge "
            f"{edge.__version__}) speaks protocol {PROTOCOL_VERSION}: run the same edge "
            "version on the coordinator and its workers")


def _config_problem(c: pb.StageConfig) -> str | None:
    """What is wrong with a StageConfig's plain fields, or None."""
    if c.num_stages < 1 or c.stage >= c.num_stages:
        return (f"StageConfig: stage {c.stage} of {c.num_stages}; expected a stage index "
                "below num_stages (>= 1)")
    mode = c.mode or "fp32"
    if mode not in MODES:
        return f"StageConfig: unknown mode {mode!r}; expected one of {', '.join(MODES)}"
    if (c.kv_dtype or "fp32") not in KV_DTYPES:
        return (f"StageConfig: kv_dtype: expected one of {', '.join(KV_DTYPES)} (or "
                f"nothing: fp32), got {c.kv_dtype!r}")
    if not (math.isfinite(c.predicted_memory_mb) and c.predicted_memory_mb >= 0):
        return (f"StageConfig: predicted_memory_mb: expected MiB >= 0, got "
                f"{c.predicted_memory_mb}")
    if c.next_address:
        try:
            parse_address(c.next_address)
        except AddressError:
            return (f"StageConfig: next_address: expected host:port (port 1-65535) or "
                    f"nothing (the last stage), got {c.next_address!r}")
    return None


def check_stage_config(c: pb.StageConfig) -> None:
    """Raise BadRequest naming the first StageConfig field that is out of range."""
    problem = _config_problem(c)
    if problem:
        raise BadRequest(problem)


def stage_spec(c: pb.StageConfig) -> StageSpec:
    """The StageSpec a StageConfig describes.

    Raises:
        BadRequest: its tensor specs do not decode.
    """
    try:
        inputs = decode_specs(c.inputs, "inputs")
        outputs = decode_specs(c.outputs, "outputs")
    except TensorError as e:
        raise BadRequest(f"StageConfig: {e}") from None
    state = tuple((p.input, p.output) for p in c.state)
    problem = _state_problem(state, inputs, outputs)
    if problem:
        raise BadRequest(f"StageConfig: {problem}")
    return StageSpec(
        stage=c.stage, num_stages=c.num_stages,
        shard_sha256=c.shard_sha256, inputs=inputs, outputs=outputs,
        next_address=c.next_address, epoch=c.epoch,
        plan_id=c.plan_id, predicted_memory_mb=c.predicted_memory_mb,
        data_files=tuple((f.name, f.sha256, f.random_access) for f in c.data_files),
        mode=c.mode or "fp32",
        max_request_bytes=c.max_request_bytes,
        state=state, max_sequences=c.max_sequences, context=c.context,
        kv_dtype=c.kv_dtype or "fp32",
        prefill_chunk=c.prefill_chunk,
    )


def _state_problem(state: tuple[tuple[str, str], ...], inputs: tuple, outputs: tuple
                   ) -> str | None:
    """What is wrong with a StageConfig's state pairs against its wire tensors, or None.

    The pasts come from the stage's own caches and the presents stay there: neither may
    be among the tensors that travel. (That they are the shard's is checked once it is
    loaded, by the StageRunner.)
    """
    wire_in, wire_out = {s.name for s in inputs}, {s.name for s in outputs}
    seen: set[str] = set()
    for past, present in state:
        if not past or not present:
            return (f"state pair {past!r} -> {present!r}: expected a past input and a "
                    "present output, both named")
        if past in wire_in:
            return (f"state input {past} is also among the inputs; expected it only in "
                    "the state (it is fed from this stage's cache, never sent)")
        if present in wire_out:
            return (f"state output {present} is also among the outputs; expected it only "
                    "in the state (it is kept in this stage's cache, never sent)")
        for name in (past, present):
            if name in seen:
                return f"state: {name} appears in two pairs; expected each name once"
            seen.add(name)
    return None


def check_budget(spec: StageSpec, budget_mb: float) -> None:
    """Raise OverBudget if the plan predicts more memory than ``budget_mb`` (0: unknown)."""
    if budget_mb and spec.predicted_memory_mb > budget_mb:
        raise OverBudget(f"{spec.where} needs {spec.predicted_memory_mb:.0f} MiB (predicted "
                         f"by the plan), this worker's budget is {budget_mb:.0f} MiB; re-plan "
                         f"with this device's memory")


def verified_stage_path(cache: ShardCache, spec: StageSpec) -> Path:
    """The stage's ``.onnx`` in ``cache``, laid out with its data files, each checked
    against the plan's digest.

    Raises:
        UploadError: a file is not in the cache, or the layout fails.
        CacheUnreadable: a cached file cannot be read.
        DigestMismatch: a cached file does not match the plan (it is removed).
    """
    path = cache.stage_dir(spec.shard_sha256, [(name, sha) for name, sha, _ in spec.data_files])
    # The cache could have been tampered with on disk since the upload: a shard is only
    # loaded if its bytes still match the plan's digests.
    for name, sha in [(path.name, spec.shard_sha256)] + [
            (name, sha) for name, sha, _ in spec.data_files]:
        try:
            digest = file_sha256(path.parent / name)
        except OSError as e:
            raise CacheUnreadable(f"cannot read cached {name}: {e.strerror}; check the "
                                  "worker's --cache-dir") from None
        if digest != sha:
            cache.path(sha).unlink(missing_ok=True)
            raise DigestMismatch(f"cached {name} does not match the plan: expected sha256 "
                                 f"{sha}, file has {digest}; upload it again")
    return path
