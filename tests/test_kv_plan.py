"""Planning decoders with KV caches: state never crosses a cut, each stage keeps its layers'
caches, the shards chained with a per-stage cache reproduce the model step by step, the
caches count in every stage's memory, and ``edge plan --context --sequences`` writes it all.

The tiny llama (2 layers, 4 heads, 2 KV heads of 16, vocab 1000) is exported once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge.build import make_plan
from edge.coordinator.guard import BeyondContext, BeyondModel, check_context
from edge.errors import NoFitError, PlanError
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.planning.graph import analyze
from edge.planning.plan import load_plan
from edge.planning.state import state_pairs
from edge.shards.build import build_shard

# 2 layers x (key, value) x 2 KV heads x head dim 16 x 4 bytes
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4
PROMPT = [5, 17, 42, 7, 99]


@pytest.fixture(scope="module")
def llama_tiny(tmp_path_factory) -> Path:
    from edge.export.decoder import export_llama

    return Path(export_llama("tiny", seed=0, out=tmp_path_factory.mktemp("llama") / "model.onnx"))


def _devices(count: int, memory_mb: float | None = None):
    devices = cluster_from_profile("rpi4b-2gb", count).devices
    if memory_mb is None:
        return devices
    return [dataclasses.replace(d, memory_mb=memory_mb) for d in devices]


# --------------------------------------------------------------------------- pairs


def test_state_pairs_in_every_naming_style():
    inputs = ["input_ids", "past_key_values.0.key", "past_key_values.0.value", "past.1.key",
              "past_key_values_2_value", "past.3", "past_key_values.9.key"]
    outputs = ["logits", "present.0.key", "present.0.value", "present.1.key",
               "present_2_value", "present.3"]
    assert state_pairs(inputs, outputs) == [
        ("past_key_values.0.key", "present.0.key"),
        ("past_key_values.0.value", "present.0.value"), ("past.1.key", "present.1.key"),
        ("past_key_values_2_value", "present_2_value"), ("past.3", "present.3")]
    # no present: an ordinary input; no past: an ordinary output
    assert state_pairs(["past_key_values.0.key", "x"], ["present.1.key", "y"]) == []


def test_state_crosses_no_cut(llama_tiny):
    costs = analyze(llama_tiny, {"batch": 1, "sequence": 8, "past_sequence": 0,
                                 "total_sequence": 8}, state=True)
    state = {t for pair in costs.state for t in pair}
    assert len(costs.state) == 4
    for p in range(costs.num_nodes + 1):
        if costs.cut_ok[p]:
            assert not state & set(costs.crossing(p)), p
    # a cut between the layers is allowed; one inside a layer's cache span is not
    made = [costs.producer[b] for _, b in costs.state]
    assert costs.cut_ok[made[1] + 2 : made[2]].any()
    assert not costs.cut_ok[made[0]]
    assert int(costs.kv_token_bytes.sum()) == TINY_KV_BYTES_PER_TOKEN


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("count", [2, 3])
def test_stages_keep_their_own_layers_caches(llama_tiny, tmp_path, count):
    plan = make_plan(llama_tiny, _devices(count), tmp_path, modes=("fp32",),
                     generation=GenerationRequest(context=64))
    pairs = set(state_pairs([f"past_key_values.{i}.{kv}" for i in range(2)
                             for kv in ("key", "value")],
                            [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]))
    names = {t for pair in pairs for t in pair}
    held = []
    for st in plan.stages:
        assert not names & {t.name for t in st.inputs + st.outputs}, st.index
        held.extend(st.state)
        shard = onnx.load(str(tmp_path / st.shard), load_external_data=False).graph
        assert {a for a, _ in st.state} <= {i.name for i in shard.input}
        assert {b for _, b in st.state} <= {o.name for o in shard.output}
        assert st.kv_bytes_per_token == 128 * len(st.state)
    assert sorted(held) == sorted(pairs)
    assert sum(st.kv_bytes_per_token for st in plan.stages) == TINY_KV_BYTES_PER_TOKEN
    assert {t.name for t in plan.model.inputs} == {"input_ids", "attention_mask",
                                                   "position_ids"}
    assert [t.name for t in plan.model.outputs] == ["logits"]
    assert plan.model.bindings == {"batch": 1, "sequence": 64, "total_sequence": 64,
                                   "past_sequence": 0}


class _CachedChain:
    """Shards run in order, each with its own cache per its state pairs, as the contract's
    workers do: pasts fed from the cache (zero-length at first), presents kept."""

    def __init__(self, paths):
        self.sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                         for p in paths]
        self.caches = []
        for s in self.sessions:
            ins = [i.name for i in s.get_inputs()]
            pairs = state_pairs(ins, [o.name for o in s.get_outputs()])
            shapes = {i.name: i.shape for i in s.get_inputs()}
            self.caches.append({a: (b, np.zeros((1, shapes[a][1], 0, shapes[a][3]),
                                                np.float32)) for a, b in pairs})

    def step(self, tokens: list[int], position: int) -> np.ndarray:
        n = len(tokens)
        flow = {"input_ids": np.array([tokens], np.int64),
                "attention_mask": np.ones((1, position + n), np.int64),
                "position_ids": np.arange(position, position + n, dtype=np.int64)[None]}
        for s, cache in zip(self.sessions, self.caches):
            feeds = {i.name: cache[i.name][1] if i.name in cache else flow[i.name]
                     for i in s.get_inputs()}
            names = [o.name for o in s.get_outputs()]
            got = dict(zip(names, s.run(names, feeds)))
            for past, (present, _) in list(cache.items()):
                cache[past] = (present, got.pop(present))
            flow.update(got)
        return flow["logits"]


def _compare_steps(reference: _CachedChain, sharded: _CachedChain) -> None:
    tokens, position = PROMPT, 0
    for _ in range(4):  # the prefill, then 3 decode steps
        want = reference.step(tokens, position)
        got = sharded.step(tokens, position)
        # A generation plan's shards compute the logits of the last position only, all a
        # draw reads (edge.planning.generation.last_position_logits).
        if got.shape[1] != want.shape[1]:
            assert got.shape[1] == 1, got.shape
            want = want[:, -1:]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        position += len(tokens)
        tokens = [int(want[0, -1].argmax())]


def test_planned_shards_reproduce_the_model_with_caches(llama_tiny, tmp_path):
    plan = make_plan(llama_tiny, _devices(3), tmp_path, modes=("fp32",),
                     generation=GenerationRequest(context=32))
    _compare_steps(_CachedChain([llama_tiny]),
                   _CachedChain([tmp_path / st.shard for st in plan.stages]))


def test_a_generation_plan_computes_the_last_positions_logits_only(llama_tiny, tmp_path):
    plan = make_plan(llama_tiny, _devices(2), tmp_path, modes=("fp32",),
                     generation=GenerationRequest(context=32))
    (logits,) = plan.model.outputs
    assert logits.shape[1] == 1, logits.describe()
    slices = [n.name for st in plan.stages
              for n in onnx.load(str(tmp_path / st.shard), load_external_data=False).graph.node
              if n.op_type == "Slice" and n.name.endswith("__last_position__slice")]
    assert len(slices) == 1, slices
    full = make_plan(llama_tiny, _devices(2), tmp_path / "full", modes=("fp32",),
                     bindings=dict(plan.model.bindings))
    assert full.model.outputs[0].shape[1] != 1  # no generation: every position, as before
    assert plan.stages[-1].predicted.activations_mb < full.stages[-1].predicted.activations_mb


def test_shards_one_layer_each_reproduce_the_model(llama_tiny, tmp_path):
    costs = analyze(llama_tiny, {"batch": 1, "sequence": 5, "past_sequence": 0,
                                 "total_sequence": 5}, state=True)
    made = sorted({costs.producer[b] for _, b in costs.state})
    # the first allowed cuts after each layer's cache: one layer per stage, then the head
    cuts = [next(p for p in range(made[k] + 1, costs.num_nodes) if costs.cut_ok[p])
            for k in (1, 3)]
    bounds = [0, *cuts, costs.num_nodes]
    paths = []
    for k, (i, j) in enumerate(zip(bounds[:-1], bounds[1:])):
        paths.append(build_shard(None, costs, i, j, tmp_path / f"s{k}.onnx").path)
    chain = _CachedChain(paths)
    assert [len(c) for c in chain.caches] == [2, 2, 0]
    _compare_steps(_CachedChain([llama_tiny]), chain)


# --------------------------------------------------------------------------- memory


def test_memory_grows_by_the_kv_caches(llama_tiny, tmp_path):
    def plan(context, sequences):
        return make_plan(llama_tiny, _devices(1), tmp_path / f"{context}-{sequences}",
                         modes=("fp32",), generation=GenerationRequest(
                             context=context, sequences=sequences, prefill=16))

    base, longer, more = plan(1024, 1), plan(2048, 1), plan(1024, 2)
    kv = TINY_KV_BYTES_PER_TOKEN * 1024 / 2**20
    b = base.stages[0].predicted
    assert b.kv_cache_mb == pytest.approx(kv)
    for p in (longer, more):
        assert p.stages[0].predicted.kv_cache_mb == pytest.approx(2 * kv)
    assert longer.stages[0].predicted.memory_mb - b.memory_mb == pytest.approx(kv)
    # Two sequences: one more kept, and a decode batch of both holds their caches twice
    # more while it runs (padded pasts, presents), counted with the activations.
    q = more.stages[0].predicted
    assert q.memory_mb - b.memory_mb == pytest.approx(kv + 2 * 2 * kv)
    assert q.activations_mb - b.activations_mb == pytest.approx(2 * 2 * kv)
    assert b.decode_ms > 0 and b.time_ms > 0


def test_a_context_that_cannot_fit_is_refused_naming_the_kv_cache(llama_tiny, tmp_path):
    # 512 MiB of caches (256 MiB a layer) over two 300 MiB devices
    with pytest.raises(NoFitError, match="KV cache"):
        make_plan(llama_tiny, _devices(2, memory_mb=300), tmp_path, modes=("fp32",),
                  generation=GenerationRequest(context=4096, sequences=256, prefill=16))


# --------------------------------------------------------------------------- plan.json, CLI


def test_plan_json_round_trip_with_generation_and_state(llama_tiny, tmp_path):
    plan = make_plan(llama_tiny, _devices(2), tmp_path, modes=("fp32",),
                     generation=GenerationRequest(context=64, sequences=2))
    again = load_plan(tmp_path)
    assert again.to_dict() == plan.to_dict()
    gen = again.model.generation
    assert (gen.context, gen.sequences, gen.prefill, gen.eos_token_ids) == (64, 2, 64, (2,))
    assert [s.state for s in again.stages] == [s.state for s in plan.stages]


def test_cli_plan_writes_generation_and_copies_the_tokenizer(llama_tiny, tmp_path):
    from edge.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(llama_tiny.parent, model_dir)
    (model_dir / "tokenizer.json").write_text('{"model": {}}')
    (model_dir / "tokenizer_config.json").write_text('{"chat_template": ""}')
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("devices:\n" + "".join(
        f"  - name: pi-{k}\n    profile: rpi4b-2gb\n    address: 127.0.0.1:{50060 + k}\n"
        for k in range(2)))
    out = tmp_path / "plan"
    assert main(["plan", str(model_dir / "model.onnx"), "--cluster", str(cluster), "--out",
                 str(out), "--modes", "fp32", "--context", "96", "--sequences", "3"]) == 0
    plan = load_plan(out)
    gen = plan.model.generation
    assert (gen.context, gen.sequences, gen.prefill, gen.tokenizer) == (96, 3, 96, "tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation.json"):
        assert (out / "tokenizer" / f).is_file()
    raw = json.loads((out / "plan.json").read_text())
    assert sum(s["kv_bytes_per_token"] for s in raw["stages"]) == TINY_KV_BYTES_PER_TOKEN


def _stateless(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_model_without_state_refuses_context(tmp_path):
    model = _stateless(tmp_path / "mlp.onnx")
    with pytest.raises(PlanError, match="no KV caches"):
        make_plan(model, _devices(1), tmp_path / "out", generation=GenerationRequest(context=8))
    plan = make_plan(model, _devices(1), tmp_path / "plain")  # and plans as before without
    assert plan.model.generation is None and plan.stages[0].state == ()


def test_a_decoder_planned_without_generation_keeps_its_caches_travelling(llama_tiny, tmp_path):
    plan = make_plan(llama_tiny, _devices(1), tmp_path, modes=("fp32",),
                     bindings={"sequence": 4, "past_sequence": 4, "total_sequence": 8})
    assert plan.model.generation is None and plan.stages[0].state == ()
    assert "past_key_values.1.value" in {t.name for t in plan.stages[0].inputs}
    assert "present.1.value" in {t.name for t in plan.stages[0].outputs}


# --------------------------------------------------------------------------- guard


def test_check_context(llama_tiny, tmp_path):
    plan = make_plan(llama_tiny, _devices(1), tmp_path, modes=("fp32",),
                     generation=GenerationRequest(context=32, prefill=8))
    assert check_context(plan, 5, 100) == 27
    assert check_context(plan, 5, 10) == 10
    assert check_context(plan, 32, 10) == 0
    with pytest.raises(BeyondContext, match="33 tokens.*context of 32") as e:
        check_context(plan, 33, 1)
    assert isinstance(e.value, BeyondModel)  # INVALID_ARGUMENT where the coordinator maps it
