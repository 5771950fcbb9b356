"""Build models from configs with seeded weights and export them to ONNX (dynamo exporter).

torch and transformers are imported inside functions: ``import edge.export`` stays cheap
and a worker never pays for them.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edge.errors import EdgeError
from edge.export.inputs import example_inputs, text_inputs
from edge.export.specs import ModelSpec, get_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ExportError", "build_model", "export_model", "export_hf", "verify_onnx"]

log = logging.getLogger(__name__)

# Max abs difference allowed between onnxruntime and torch eager.
ATOL = 1e-4


class ExportError(EdgeError):
    """An exported model does not reproduce the torch model, or the export failed."""


def _perturb(model: "torch.nn.Module", seed: int) -> None:
    # Freshly initialised models have many identical parameters (zero biases, unit norms);
    # the exporter deduplicates them across layers, which distorts per-layer sizes and
    # where a cut falls. A seeded N(0, 0.02) nudge makes every tensor distinct.
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def _wrap_outputs(model: "torch.nn.Module", names: Sequence[str],
                  inputs: Sequence[str] = ("input_ids", "attention_mask")) -> "torch.nn.Module":
    """Wrap a transformers model so it takes positional tensors and returns a tuple.

    Args:
        model: the transformers model.
        names: its outputs to return, in order.
        inputs: ``("input_ids", "attention_mask")`` (the mask optional), ``("input_ids",)``
            or ``("pixel_values",)``. The forward's parameters carry these names: the
            exporter matches ``dynamic_shapes`` to them.
    """
    import torch

    def outputs(**kwargs: Any) -> tuple[torch.Tensor, ...]:
        res = model(**kwargs, return_dict=True)
        return tuple(res[n] for n in names)

    if tuple(inputs) == ("pixel_values",):
        class _Image(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return outputs(pixel_values=pixel_values)

        return _Image().eval()

    class _Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
            kwargs: dict[str, Any] = {"input_ids": input_ids}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            return outputs(**kwargs)

    return _Outputs().eval()


def build_model(kind: str, size: str = "tiny", seed: int = 0) -> "torch.nn.Module":
    """The torch model of (kind, size) with seeded weights, in eval mode.

    Its forward takes the spec's inputs positionally and returns a tuple of the spec's
    outputs, i.e. exactly what the ONNX file computes.

    Args:
        kind: ``bert``, ``gpt2``, ``unet``, ``resnet``, ``convnext``, ``vit``,
            ``distilbert`` or ``llama``.
        size: a size of ``edge.export.sizes(kind)``.
        seed: seeds both the initialisation and the perturbation.
    """
    import torch

    spec = get_spec(kind, size)
    torch.manual_seed(seed)
    if kind == "bert":
        from transformers import BertConfig, BertModel

        # Eager attention: the plain matmul/softmax graph that ORT runs everywhere (sdpa
        # would export the same math, but eager is the form every exporter agrees on).
        cfg = BertConfig(**spec.config, attn_implementation="eager")
        inner = BertModel(cfg, add_pooling_layer=True)
    elif kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # No KV cache: one pass over the whole sequence, no past_key_values in the graph.
        cfg = GPT2Config(**spec.config, use_cache=False, attn_implementation="eager")
        inner = GPT2LMHeadModel(cfg)
    elif kind == "unet":
        from edge.export.unet import UNet

        model = UNet(**spec.config)
        _perturb(model, seed)
        return model.eval()
    else:
        inner = _transformers_model(kind, spec)
    _perturb(inner, seed)
    inner.eval()
    return _wrap_outputs(inner, spec.outputs, spec.inputs)


def _transformers_model(kind: str, spec: ModelSpec) -> "torch.nn.Module":
    """The transformers model of the other kinds, from its config (no download)."""
    import transformers as tf

    if kind == "resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(**spec.config))
    if kind == "convnext":
        return tf.ConvNextForImageClassification(tf.ConvNextConfig(**spec.config))
    if kind == "vit":
        cfg = tf.ViTConfig(**spec.config, attn_implementation="eager")
        return tf.ViTForImageClassification(cfg)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(**spec.config, attn_implementation="eager")
        return tf.DistilBertModel(cfg)
    if kind == "llama":
        # No KV cache, as for GPT-2: one pass over the whole sequence.
        cfg = tf.LlamaConfig(**spec.config, use_cache=False, attn_implementation="eager")
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(f"no builder for model kind {kind!r}")


def _to_torch(feeds: Mapping[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def verify_onnx(model: "torch.nn.Module", onnx_path: str | Path,
                feeds_list: Sequence[Mapping[str, np.ndarray]],
                output_names: Sequence[str], atol: float = ATOL) -> float:
    """Run the ONNX file with onnxruntime and the torch model on each feed; compare.

    Args:
        model: the torch model (positional inputs in the feed's order, tuple outputs).
        onnx_path: the exported file.
        feeds_list: input dicts, e.g. two different shapes to exercise dynamic axes.
        output_names: ONNX output names, in the model's output order.
        atol: largest max-abs difference allowed, times the largest output magnitude
            where that exceeds 1.

    Returns:
        The largest max-abs difference seen.

    Raises:
        ExportError: an output differs by more than ``atol`` or has another shape.
    """
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in feeds_list:
        got = sess.run(list(output_names), dict(feeds))
        with torch.no_grad():
            want = model(*_to_torch(feeds).values())
        if isinstance(want, torch.Tensor):
            want = (want,)
        shapes = {k: v.shape for k, v in feeds.items()}
        worst = max(worst, compare_outputs(
            onnx_path, output_names, got, [w.numpy() for w in want],
            atol, f"for inputs {shapes}", "output "))
    return worst


def compare_outputs(onnx_path: str | Path, names: Sequence[str], got: Sequence[np.ndarray],
                    want: Sequence[np.ndarray], atol: float, where: str,
                    kind: str = "") -> float:
    """Largest absolute difference of onnxruntime's outputs from torch's.

    Args:
        onnx_path: the exported file, for messages.
        names: the outputs' names; ``got`` (onnxruntime) and ``want`` (torch) in that order.
        atol: the bound, scaled by the output's magnitude when above 1.
        where: the inputs they were computed at, for messages.
        kind: a word before each name in messages ("output ").

    Raises:
        ExportError: a shape differs, or a difference passes the bound.
    """
    worst = 0.0
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape:
            raise ExportError(f"{onnx_path}: {kind}{name} {where}: expected shape {w.shape} "
                              f"(torch), got {g.shape} (onnxruntime)")
        diff = float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
        # float32 rounding grows with the values: a seeded ResNet-50's logits reach 740
        # and differ by 4e-4 (5e-7 relative), so the bound scales with outputs larger
        # than 1.
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        if not diff <= atol * scale:
            raise ExportError(f"{onnx_path}: {kind}{name} {where}: expected max abs diff "
                              f"<= {atol * scale:.3g} vs torch, got {diff:.3g}")
        worst = max(worst, diff)
    return worst


def _dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch")
    if spec.fixed_side:
        return {spec.inputs[0]: {0: batch}}
    if spec.is_image:
        # ResNet and ConvNeXt downsample 32x before a global pool: any side >= 32 works.
        low = 8 if spec.kind == "unet" else 32
        return {spec.inputs[0]: {0: batch, 2: Dim("height", min=low),
                                 3: Dim("width", min=low)}}
    sequence = Dim("sequence")
    return {name: {0: batch, 1: sequence} for name in spec.inputs}


def _export(model: "torch.nn.Module", feeds: Mapping[str, np.ndarray], out: Path,
            input_names: Sequence[str], output_names: Sequence[str],
            dynamic_shapes: dict[str, Any], opset: int) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # Both text inputs share the Dim objects on purpose; torch warns that it keeps
        # one name per constraint, which is exactly what we want.
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
        # torch-internal deprecation noise from the exporter itself (torch 2.13).
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        torch.onnx.export(model, tuple(_to_torch(feeds).values()), str(out), dynamo=True,
                          external_data=True, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_shapes=dynamic_shapes, verbose=False)
    log.info("exported %s in %.1f s", out, time.perf_counter() - t0)


def _verify_feeds(spec: ModelSpec) -> list[dict[str, np.ndarray]]:
    # Two shapes that differ in every dynamic axis, and neither equal to the trace shape
    # in both: batch 1 / batch 3 with padding, two sequence lengths (or image sides).
    if spec.is_image:
        side = spec.default_seq
        other = side if spec.fixed_side else side // 2 + 8
        return [example_inputs(spec.kind, spec.size, batch=1, seq=side, seed=1),
                example_inputs(spec.kind, spec.size, batch=3, seq=other, seed=2)]
    return [example_inputs(spec.kind, spec.size, batch=1, seq=16, seed=1),
            example_inputs(spec.kind, spec.size, batch=3, seq=37, seed=2)]


def export_model(kind: str, size: str = "tiny", seed: int = 0,
                 out: str | Path | None = None, opset: int = 18,
                 verify: bool = True) -> Path:
    """Build (kind, size) from its config with seeded weights and export it to ONNX.

    Weights go to ``<out>.data`` next to the file (external data). Batch and sequence (or
    batch, height and width for ``unet``) are dynamic; the ONNX dims are named ``batch``,
    ``sequence``, ``height``, ``width``.

    Args:
        kind: ``bert`` (inputs ``input_ids``, ``attention_mask``; outputs
            ``last_hidden_state``, ``pooler_output``), ``gpt2`` or ``llama``
            (``input_ids`` -> ``logits``), ``unet`` (``image`` -> ``mask``), ``resnet``,
            ``convnext`` or ``vit`` (``pixel_values`` -> ``logits``), ``distilbert``
            (``input_ids``, ``attention_mask`` -> ``last_hidden_state``).
        size: a size of ``edge.export.sizes(kind)``.
        seed: weight seed; same seed, same weights.
        out: the ``.onnx`` path; default ``models/<kind>-<size>.onnx``. Parent dirs are made.
        opset: ONNX opset (>= 17 recommended; the dynamo exporter works at 18).
        verify: compare onnxruntime with torch eager at two input shapes (max abs diff
            <= 1e-4) and raise ``ExportError`` if they differ.

    Returns:
        The path of the ``.onnx`` file.
    """
    spec = get_spec(kind, size)
    out = Path(out) if out is not None else Path("models") / f"{kind}-{size}.onnx"
    model = build_model(kind, size, seed)
    trace = example_inputs(kind, size, batch=2, seq=None if spec.is_image else 24, seed=0)
    _export(model, trace, out, spec.inputs, spec.outputs, _dynamic_shapes(spec), opset)
    if verify:
        diff = verify_onnx(model, out, _verify_feeds(spec), spec.outputs)
        log.info("%s matches torch (max abs diff %.2g)", out, diff)
    return out


def hf_folder(model_dir: str | Path) -> Path:
    """A local Hugging Face model folder, checked, with the hub switched off.

    Raises:
        ExportError: the folder has no ``config.json``.
    """
    # Offline by construction: a typo in the path must fail, not start a download.
    os.environ["HF_HUB_OFFLINE"] = "1"
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: expected a Hugging Face model folder with "
                          f"config.json, found none")
    return model_dir


def export_hf(model_dir: str | Path, out: str | Path, seq: int = 128, opset: int = 18,
              verify: bool = True) -> Path:
    """Export a local Hugging Face encoder directory (no download) BERT-style.

    Inputs ``input_ids`` and ``attention_mask`` [batch, sequence]; outputs
    ``last_hidden_state`` and, if the model has a pooler, ``pooler_output``.

    Args:
        model_dir: a folder with ``config.json`` and weights (``AutoModel`` format).
        out: the ``.onnx`` path; weights go to ``<out>.data``.
        seq: sequence length of the tracing and verification inputs.
        opset: ONNX opset.
        verify: compare onnxruntime with torch at two shapes, as in ``export_model``.

    Returns:
        The path of the ``.onnx`` file.
    """
    from transformers import AutoModel

    model_dir = hf_folder(model_dir)
    inner = AutoModel.from_pretrained(str(model_dir), local_files_only=True,
                                      attn_implementation="eager").eval()
    vocab = int(inner.config.vocab_size)
    probe = text_inputs(vocab, batch=1, seq=4)
    import torch

    with torch.no_grad():
        res = inner(**_to_torch(probe), return_dict=True)
    outputs = tuple(n for n in ("last_hidden_state", "pooler_output")
                    if getattr(res, n, None) is not None)
    model = _wrap_outputs(inner, outputs)
    inputs = ("input_ids", "attention_mask")
    spec = ModelSpec("hf", "local", inputs=inputs, outputs=outputs)
    out = Path(out)
    _export(model, text_inputs(vocab, batch=2, seq=seq, seed=0), out, inputs, outputs,
            _dynamic_shapes(spec), opset)
    if verify:
        feeds = [text_inputs(vocab, batch=1, seq=max(2, seq // 2), seed=1),
                 text_inputs(vocab, batch=3, seq=seq, seed=2)]
        diff = verify_onnx(model, out, feeds, outputs)
        log.info("%s matches torch (max abs diff %.2g)", out, diff)
    _save_encoder_tokenizer(model_dir, out.parent)
    return out


def _save_encoder_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """The folder's fast tokenizer beside the .onnx (``tokenizer.json``,
    ``tokenizer_config.json``), for the coordinator's /v1/embeddings of text; nothing
    when the folder has none."""
    if not (model_dir / "tokenizer.json").is_file():
        return
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file() and model_dir.resolve() != out_dir.resolve():
            shutil.copyfile(model_dir / name, out_dir / name)
