"""Accuracy of a decoder over generation, not only at prefill: int8 stages and fp16 KV
caches are checked at plan time on teacher-forced decode steps (``edge.shards.decoding``),
and fp16 caches are what the planner counts and the workers keep.

The plan-time numbers are compared with an independent computation: the model chained
from its own shards (fp32 head, int8 range, fp32 tail) and the unsharded model, each with
its own caches, fed the fp32 model's greedy tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from edge.build import _generation, _source, make_plan
from edge.coordinator.generate import Generator
from edge.coordinator.pipeline import Pipeline
from edge.errors import ConfigError, PlanError
from edge.export.decoder import export_llama
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.planning.graph import analyze
from edge.planning.plan import load_plan
from edge.proto import edge_pb2 as pb
from edge.shards.accuracy import Int8Accuracy, synthetic_inputs
from edge.shards.build import build_shard
from edge.shards.decoding import DECODE_STEPS, prompt_feeds
from edge.shards.quantize import cosine, quantize_shard
from edge.worker.launch import LocalWorkers
from edge.worker.sessions import SessionStore, run_batch, run_step

GEN = GenerationRequest(context=64, sequences=2, prefill=16)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return Path(export_llama("tiny", seed=0,
                             out=tmp_path_factory.mktemp("llama") / "model.onnx"))


@pytest.fixture(scope="module")
def costs(llama):
    """The tiny Llama analysed as a generation plan analyses it (prefill 16, empty
    caches, last position's logits)."""
    gen, bindings = _generation(llama, None, GEN)
    return analyze(_source(llama, gen), bindings, state=True)


def _devices(count: int):
    return cluster_from_profile("rpi4b-2gb", count).devices


# ------------------------------------------------------------------ an independent run

def _session(path: Path, mode: str = "fp32"):
    from edge.shards.runtime import session_options

    return ort.InferenceSession(str(path), session_options(1, mode),
                                providers=["CPUExecutionProvider"])


def _chain(sessions, feeds: dict) -> dict:
    cur = dict(feeds)
    for s in sessions:
        names = [o.name for o in s.get_outputs()]
        cur.update(zip(names, s.run(None, {i.name: cur[i.name] for i in s.get_inputs()})))
    return cur


def _teacher_forced(sessions, pairs, prompt: dict, tokens: list[int] | None, steps: int,
                    fp16: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """Logits of the prefill and each decode step of a chain of sessions with its own
    caches; fed ``tokens`` (or its own greedy draws when None)."""
    out = _chain(sessions, prompt)
    logits, drawn = [out["logits"]], []
    cached = prompt["input_ids"].shape[1]
    for s in range(steps):
        token = tokens[s] if tokens is not None else int(out["logits"][0, -1].argmax())
        drawn.append(token)
        pasts = {a: out[b] for a, b in pairs}
        if fp16:
            pasts = {k: v.astype(np.float16).astype(np.float32) for k, v in pasts.items()}
        feeds = {"input_ids": np.array([[token]], np.int64),
                 "attention_mask": np.ones((1, cached + s + 1), np.int64),
                 "position_ids": np.array([[cached + s]], np.int64), **pasts}
        out = _chain(sessions, feeds)
        logits.append(out["logits"])
    return logits, drawn


def _cuts(costs) -> tuple[int, int]:
    """Two allowed cuts, at about a third and two thirds of the nodes."""
    ok = [p for p in range(1, costs.num_nodes) if costs.cut_ok[p]]
    return ok[len(ok) // 3], ok[2 * len(ok) // 3]


def test_int8_and_fp16_decode_step_cosines_match_an_independent_run(costs, tmp_path):
    n = costs.num_nodes
    i, j = _cuts(costs)
    prompt = prompt_feeds(synthetic_inputs(costs), [p for p, _ in costs.state])
    with Int8Accuracy(costs, prompt, workdir=tmp_path) as acc:
        measured = acc.cosine(i, j)
        prefill, decode = acc.detail[(i, j)]
        fp16 = acc.stored_kv_cosine("float16")
    assert acc.steps == DECODE_STEPS

    part = lambda a, b, name: build_shard(costs.model, costs, a, b,  # noqa: E731
                                          tmp_path / name / "s.onnx", check=False).path
    int8 = quantize_shard(part(i, j, "mid"), tmp_path / "int8" / "s.onnx", check=False).path
    full = [_session(part(0, n, "full"))]
    mixed = [_session(part(0, i, "head")), _session(int8, "int8"),
             _session(part(j, n, "tail"))]
    want, tokens = _teacher_forced(full, costs.state, prompt, None, DECODE_STEPS)
    got, _ = _teacher_forced(mixed, costs.state, prompt, tokens, DECODE_STEPS)
    steps = [cosine(w, g) for w, g in zip(want[1:], got[1:])]
    assert decode == pytest.approx(min(steps), abs=1e-6)
    assert prefill == pytest.approx(cosine(want[0], got[0]), abs=1e-6)
    assert measured == min(prefill, decode)
    assert 0.99 < decode < 1.0  # int8 moved the logits, a little

    half, _ = _teacher_forced(full, costs.state, prompt, tokens, DECODE_STEPS, fp16=True)
    assert fp16 == pytest.approx(min(cosine(w, g) for w, g in zip(want[1:], half[1:])),
                                 abs=1e-9)
    assert 0.99 < fp16 < 1.0


def test_a_stage_failing_on_decode_steps_only_is_vetoed(llama, tmp_path, monkeypatch):
    """The veto reads the decode steps: a range whose prefill passes but whose decode
    steps fail gets no int8."""
    real = Int8Accuracy._decode_cosines

    def worse_from_node_0(self, run, first, i):
        got = real(self, run, first, i)
        return [c - 0.5 for c in got] if i == 0 else got

    monkeypatch.setattr(Int8Accuracy, "_decode_cosines", worse_from_node_0)
    plan = make_plan(llama, _devices(3), tmp_path, modes=("int8", "fp32"), generation=GEN)
    assert [s.mode for s in plan.stages] == ["fp32", "int8", "int8"]
    assert all(s.int8_cosine >= 0.99 for s in plan.stages[1:])


# ------------------------------------------------------------------ fp16 caches, planned

def test_fp16_caches_count_half_and_are_recorded(llama, tmp_path):
    def plan(kv):
        return make_plan(llama, _devices(2), tmp_path / kv, modes=("fp32",),
                         generation=dataclasses.replace(GEN, kv_dtype=kv))

    full, half = plan("fp32"), plan("fp16")
    assert [s.node_range for s in half.stages] == [s.node_range for s in full.stages]
    assert full.stages[0].kv_bytes_per_token > 0
    for a, b in zip(full.stages, half.stages):
        assert b.kv_bytes_per_token * 2 == a.kv_bytes_per_token
        assert b.predicted.kv_cache_mb * 2 == pytest.approx(a.predicted.kv_cache_mb)
        assert a.predicted.memory_mb - b.predicted.memory_mb == pytest.approx(
            b.predicted.kv_cache_mb)
    gen = load_plan(tmp_path / "fp16").model.generation
    assert gen.kv_dtype == "fp16" and 0.99 <= gen.kv_cosine < 1.0
    assert full.model.generation.kv_dtype == "fp32" and full.model.generation.kv_cosine is None

    d = json.loads((tmp_path / "fp16" / "plan.json").read_text())
    d["model"]["generation"]["kv_dtype"] = "int4"
    (tmp_path / "fp16" / "plan.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="kv_dtype.*expected one of fp32, fp16.*int4"):
        load_plan(tmp_path / "fp16")


def test_fp16_caches_are_refused_when_the_logits_drift(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(Int8Accuracy, "stored_kv_cosine", lambda self, dtype: 0.95)
    with pytest.raises(PlanError, match=r"--kv-dtype fp16: .*cosine 0\.9500 .*8 "
                                        r"teacher-forced decode steps.*--kv-dtype fp32"):
        make_plan(llama, _devices(2), tmp_path, modes=("fp32",),
                  generation=dataclasses.replace(GEN, kv_dtype="fp16"))


def test_cli_takes_kv_dtype(llama, tmp_path):
    from edge.cli import main

    (tmp_path / "cluster.yaml").write_text(
        "devices:\n  - {name: a, address: 127.0.0.1:1, profile: rpi4b-2gb}\n")
    rc = main(["plan", str(llama), "--cluster", str(tmp_path / "cluster.yaml"), "--out",
               str(tmp_path / "build"), "--modes", "fp32", "--context", "64", "--kv-dtype",
               "fp16"])
    assert rc == 0
    assert load_plan(tmp_path / "build").model.generation.kv_dtype == "fp16"


# ------------------------------------------------------------------ fp16 caches, served

class _Runner:
    """A one-layer stand-in for StageRunner: its present is the past plus one position of
    the step's value; it records the pasts it was fed."""

    def __init__(self, kv_dtype: str):
        self.spec = SimpleNamespace(plan_id="p", state=(("past.0", "present.0"),),
                                    max_sequences=1, where="stage 0", context=0,
                                    is_last=False, kv_dtype=kv_dtype)
        self.fed: list[np.ndarray] = []

    def empty_pasts(self, batch: int) -> dict:
        return {"past.0": np.zeros((batch, 1, 0, 2), np.float32)}

    def run_state(self, arrays, pasts):
        self.fed.append(pasts["past.0"])
        rows = arrays["x"].shape[0]
        new = np.broadcast_to((arrays["x"][:, 0] / 3)[:, None, None, None], (rows, 1, 1, 2))
        return {"h": arrays["x"]}, {"past.0": np.concatenate([pasts["past.0"],
                                                              new.astype(np.float32)], 2)}


def test_fp16_caches_are_stored_in_float16_and_fed_as_float32():
    runner, store = _Runner("fp16"), SessionStore()
    store.reset(("p", 1))
    for pos, x in enumerate([1.0, 2.0, 4.0]):
        run_step(runner, store, 1, {"x": np.array([[x]], np.float32)},
                 pb.Step(sequence_id="s", position=pos))
    held = store.take(("p", 1), "s", 3, 1, "stage 0")
    assert held["past.0"].dtype == np.float16 and held["past.0"].shape == (1, 1, 3, 2)
    assert store.stats() == (1, 3 * 2 * 2)
    assert all(p.dtype == np.float32 for p in runner.fed)
    # 1/3 is not a float16: what the graph is fed again is the stored value, rounded
    np.testing.assert_array_equal(runner.fed[-1][0, 0, :, 0],
                                  np.float16([1 / 3, 2 / 3]).astype(np.float32))


def test_fp16_caches_in_a_decode_batch_are_padded_as_float32():
    runner, store = _Runner("fp16"), SessionStore()
    runner.spec.max_sequences = 2
    store.reset(("p", 1))
    for seq, x in (("a", 1.0), ("b", 2.0)):
        run_step(runner, store, 1, {"x": np.array([[x]], np.float32)},
                 pb.Step(sequence_id=seq, position=0))
    run_batch(runner, store, 1, {"x": np.array([[4.0], [5.0]], np.float32)},
              [pb.Step(sequence_id="a", position=1), pb.Step(sequence_id="b", position=1)])
    fed = runner.fed[-1]
    assert fed.dtype == np.float32 and fed.shape == (2, 1, 1, 2)
    np.testing.assert_array_equal(fed[:, 0, 0, 0],
                                  np.float16([1 / 3, 2 / 3]).astype(np.float32))
    for seq, x in (("a", 4.0), ("b", 5.0)):
        held = store.take(("p", 1), seq, 2, 2, "stage 0")["past.0"]
        assert held.dtype == np.float16 and held.shape == (1, 1, 2, 2)
        assert held[0, 0, 1, 0] == np.float16(x / 3)


def test_fp16_caches_over_workers_give_fp32s_tokens_in_half_the_bytes(llama, tmp_path):
    from test_generate import PROMPT, reference

    def run(kv: str, workers) -> tuple[list[int], list[tuple[int, int]]]:
        devices = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses).devices
        plan = make_plan(llama, devices, tmp_path / kv, modes=("fp32",),
                         generation=dataclasses.replace(GEN, kv_dtype=kv))
        got, held = [], []
        with Pipeline(plan, tmp_path / kv) as pipeline:
            pipeline.start()
            for chunk in Generator(pipeline).start(PROMPT, max_tokens=12):
                got.extend(chunk.tokens)
                if len(got) == 6 and not held:
                    per = {s.index: s.kv_bytes_per_token for s in plan.stages}
                    held = [(st.worker.kv_cache_bytes, per[st.stage])
                            for st in pipeline.status().stages]
        return got, held

    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        got32, held32 = run("fp32", workers)
        got16, held16 = run("fp16", workers)
    assert got16 == got32 == reference(llama, PROMPT, 12)
    for (b32, t32), (b16, t16) in zip(held32, held16):
        assert t16 * 2 == t32
        if t32:  # a stage with layers: its caches hold about the tokens so far
            assert b32 % t32 == 0 and b16 % t16 == 0
            assert len(PROMPT) + 4 <= b16 // t16 <= len(PROMPT) + 7
            assert len(PROMPT) + 4 <= b32 // t32 <= len(PROMPT) + 7
    assert 0.4 < sum(b for b, _ in held16) / sum(b for b, _ in held32) < 0.6
