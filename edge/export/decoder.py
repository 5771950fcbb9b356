"""Export causal language models (decoders) to ONNX with a KV cache as plain graph I/O.

The convention (the one onnxruntime-genai and Optimum use), for a model of L layers:

- inputs: ``input_ids`` int64 [batch, sequence]; ``attention_mask`` int64
  [batch, total_sequence] where total_sequence = past_sequence + sequence;
  ``position_ids`` int64 [batch, sequence]; for each layer N,
  ``past_key_values.N.key`` and ``past_key_values.N.value`` float32
  [batch, kv_heads, past_sequence, head_dim].
- outputs: ``logits`` float32 [batch, sequence, vocab]; for each layer N, ``present.N.key``
  and ``present.N.value`` [batch, kv_heads, past_sequence + sequence, head_dim].

Prefill feeds past_sequence 0 (zero-length tensors); each decode step feeds the previous
step's presents as the pasts. Each layer reads only its own past and writes only its own
present, so a stage that holds layers i..j keeps exactly their cache.

Beside ``<name>.onnx`` (weights in ``<name>.onnx.data``) every export writes
``generation.json`` (see ``decoder_info``); ``export_gguf`` and ``export_hf_decoder`` also
write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, special tokens), which
``edge.text`` reads without transformers.

torch and transformers are imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edge.errors import MissingPackageError
from edge.export.onnx_export import ATOL, ExportError, _perturb, compare_outputs, hf_folder
from edge.export.specs import get_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "GENERATION_FILE",
    "decoder_info",
    "decoder_io_names",
    "export_decoder",
    "export_gguf",
    "export_hf_decoder",
    "export_llama",
    "save_tokenizer",
]

log = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"
# The exporter names the mask's length after a symbol of its own ("s53"); we rename it.
_TOTAL = "total_sequence"


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The ONNX input and output names of an exported decoder of ``num_layers`` layers.

    Args:
        num_layers: number of transformer layers.

    Returns:
        (inputs, outputs) in graph order.
    """
    pasts = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents]


def _num_layers(config: Any) -> int:
    # GPT2Config maps num_hidden_layers to n_layer through its attribute_map.
    return int(config.get_text_config(decoder=True).num_hidden_layers)


def _eos_ids(model: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class _FlatKV:
    """Factory of the wrapper module (defined lazily: torch is imported inside)."""

    @staticmethod
    def wrap(model: Any) -> "torch.nn.Module":
        import inspect

        import torch
        from transformers import DynamicCache

        layers = _num_layers(model.config)
        # transformers 5.x renamed the forward's cache argument from past_key_values to
        # cache (the old name still works, with a deprecation warning).
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"

        class FlatKVDecoder(torch.nn.Module):
            """A causal LM whose cache is a flat list of per-layer key/value tensors.

            transformers keeps the cache in a ``DynamicCache`` object, which the exporter
            cannot take as graph input; this builds one from the flat pasts inside
            ``forward`` (so building it is traced away) and returns the flat presents.
            """

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor,
                        past_key_values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
                pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1])
                         for i in range(layers)]
                cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=True,
                                 return_dict=True, **{cache_arg: cache})
                # The cache is updated in place; transformers 5 also returns it as
                # out.cache (4.x: out.past_key_values, deprecated in 5).
                new = out.cache if "cache" in out else out.past_key_values
                flat: list[torch.Tensor] = []
                for layer in new.layers:
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return FlatKVDecoder().eval()


def _kv_shape(model: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's cache, from one tiny forward pass."""
    import torch

    wrapper = _FlatKV.wrap(model)
    layers = _num_layers(model.config)
    ids = torch.zeros((1, 1), dtype=torch.int64)
    cfg = model.config.get_text_config(decoder=True)
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    past = [torch.zeros((1, heads, 0, head_dim)) for _ in range(2 * layers)]
    with torch.no_grad():
        res = wrapper(ids, torch.ones((1, 1), dtype=torch.int64), ids, past)
    kv = res[1]
    return int(kv.shape[1]), int(kv.shape[3])


def decoder_info(model: Any) -> dict[str, Any]:
    """What a server needs to know about an exported decoder, without loading it.

    Written as ``generation.json`` beside the ``.onnx``.

    Args:
        model: the transformers causal LM.

    Returns:
        A JSON-able dict: ``model_type``, ``num_layers``, ``num_key_value_heads``,
        ``head_dim``, ``vocab_size``, ``max_position_embeddings``, ``eos_token_ids``,
        ``bos_token_id``, ``pad_token_id``, ``dtype``, ``inputs``, ``outputs``.
    """
    cfg = model.config.get_text_config(decoder=True)
    layers = _num_layers(model.config)
    kv_heads, head_dim = _kv_shape(model)
    inputs, outputs = decoder_io_names(layers)
    gen = getattr(model, "generation_config", None)
    bos = getattr(gen, "bos_token_id", None) if gen is not None else None
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    return {
        "model_type": str(cfg.model_type),
        "num_layers": layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        "eos_token_ids": _eos_ids(model),
        "bos_token_id": None if bos is None else int(bos),
        "pad_token_id": None if pad is None else int(pad),
        "dtype": "float32",
        "inputs": inputs,
        "outputs": outputs,
    }


def _feeds(info: dict[str, Any], batch: int, seq: int, past: int,
           seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = info["inputs"]
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, info["vocab_size"], (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64),
                                        (batch, seq)).copy(),
    }
    kv = (batch, info["num_key_value_heads"], past, info["head_dim"])
    for name in inputs[3:]:
        feeds[name] = rng.standard_normal(kv).astype(np.float32)
    return feeds


def _torch_args(feeds: dict[str, np.ndarray], inputs: Sequence[str]) -> tuple[Any, ...]:
    import torch

    t = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in inputs]
    return (t[0], t[1], t[2], t[3:])


def _finish_graph(out: Path, opset: int) -> None:
    """Check the opset; name the mask's length ``total_sequence`` (not the exporter's
    symbol)."""
    import onnx

    m = onnx.load(str(out), load_external_data=False)
    got = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        # The dynamo exporter builds opset 18 and converts down with ONNX's version
        # converter, which fails on these graphs (ReduceMean axes from a computed tensor)
        # and then silently keeps 18.
        raise ExportError(f"{out}: expected opset {opset}, the exporter wrote opset {got}; "
                          f"export decoders at opset 18")
    mask = next(i for i in m.graph.input if i.name == "attention_mask")
    old = mask.type.tensor_type.shape.dim[1].dim_param
    if not old or old == _TOTAL:
        return
    for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = _TOTAL
    # Only the graph is rewritten: the external data file and its offsets stay valid.
    onnx.save(m, str(out))


def verify_decoder(wrapper: "torch.nn.Module", onnx_path: str | Path, info: dict[str, Any],
                   atol: float = ATOL) -> float:
    """Compare onnxruntime with torch at prefill (past 0) and decode-like shapes.

    Args:
        wrapper: the flat-KV torch module (``_FlatKV.wrap(model)``).
        onnx_path: the exported file.
        info: ``decoder_info(model)``.
        atol: largest max-abs difference allowed (times the output magnitude above 1).

    Returns:
        The largest max-abs difference seen.

    Raises:
        ExportError: a shape or value differs.
    """
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    # Prefill with no past, one decode token over a past, and a batched chunk over a past.
    for i, (batch, seq, past) in enumerate([(1, 7, 0), (1, 1, 9), (3, 4, 5)]):
        feeds = _feeds(info, batch, seq, past, seed=i)
        if past:
            # Real pasts, from a torch prefill over random tokens: random-normal pasts are
            # far from what a model sees, and on a 30-layer model they blow float32
            # rounding up tenfold (SmolLM2: 2.6e-3 on logits of 30, vs 7e-5 with real ones).
            prefix = _feeds(info, batch, past, 0, seed=10 + i)
            with torch.no_grad():
                made = wrapper(*_torch_args(prefix, info["inputs"]))[1:]
            feeds.update((n, t.numpy()) for n, t in zip(info["inputs"][3:], made))
        got = sess.run(info["outputs"], feeds)
        with torch.no_grad():
            want = wrapper(*_torch_args(feeds, info["inputs"]))
        worst = max(worst, compare_outputs(
            onnx_path, info["outputs"], got, [w.numpy() for w in want], atol,
            f"at batch {batch}, sequence {seq}, past {past}"))
    return worst


def export_decoder(model: Any, out: str | Path, opset: int = 18, verify: bool = True,
                   extra: dict[str, Any] | None = None) -> Path:
    """Export a transformers causal LM to ONNX with a flat per-layer KV cache.

    Works for the Llama family (grouped-query attention included), Qwen2 and GPT-2: any
    model whose forward takes ``input_ids``, ``attention_mask``, ``position_ids`` and a
    ``DynamicCache``. Uses the dynamo exporter (``torch.onnx.export(dynamo=True)``) with
    dynamic batch, sequence and past_sequence; weights go to ``<out>.data`` (tied
    embeddings are stored once). Writes ``generation.json`` beside ``out``.

    Args:
        model: a ``PreTrainedModel`` with an LM head, float32. Its attention is switched
            to ``eager`` (the plain MatMul/Softmax graph every runtime runs).
        out: the ``.onnx`` path; parent dirs are made.
        opset: ONNX opset: 18 (the dynamo exporter cannot convert these graphs down to
            17: ``ExportError``).
        verify: compare onnxruntime with torch at prefill and decode shapes (max abs diff
            <= 1e-4) and raise ``ExportError`` if they differ.
        extra: more keys for ``generation.json``.

    Returns:
        The path of the ``.onnx`` file.
    """
    import torch
    from torch.export import Dim

    out = Path(out)
    # Only when needed: a model read from a GGUF is flagged as quantized (though already
    # dequantized to float32), and transformers refuses .float() on it.
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    info = decoder_info(model)
    info.update(extra or {})
    wrapper = _FlatKV.wrap(model)
    inputs, outputs = info["inputs"], info["outputs"]

    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    # The mask's length is past + sequence, but Dim arithmetic only takes integers
    # (Dim + Dim raises); AUTO lets the tracer derive it from the graph.
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
               "position_ids": {0: batch, 1: seq},
               "past_key_values": [{0: batch, 2: past} for _ in inputs[3:]]}
    # Trace at sizes other than 0 and 1 (torch.export specialises those) and all distinct.
    trace = _feeds(info, batch=2, seq=3, past=5, seed=0)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # All pasts share the batch and past_sequence Dims on purpose; torch warns that it
        # keeps one name per constraint, which is what we want.
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
        torch.onnx.export(wrapper, _torch_args(trace, inputs), str(out), dynamo=True,
                          external_data=True, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_shapes=dynamic, verbose=False)
    _finish_graph(out, opset)
    log.info("exported %s (%d layers) in %.1f s", out, info["num_layers"],
             time.perf_counter() - t0)
    if verify:
        diff = verify_decoder(wrapper, out, info)
        log.info("%s matches torch (max abs diff %.2g)", out, diff)
    (out.parent / GENERATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def export_llama(size: str = "tiny", seed: int = 0, out: str | Path | None = None,
                 opset: int = 18, verify: bool = True) -> Path:
    """A seeded Llama from ``specs.py``'s configs, exported with the KV cache.

    ``tiny`` has 2 layers, hidden 64, 4 heads and 2 KV heads (grouped-query attention),
    vocabulary 1000; ``small`` has 8 layers, hidden 512, 8 heads, 4 KV heads, vocabulary
    32000.

    Args:
        size: ``tiny`` or ``small``.
        seed: weight seed; same seed, same weights.
        out: the ``.onnx`` path; default ``models/llama-<size>-kv/model.onnx``.
        opset: ONNX opset.
        verify: compare with torch, as in ``export_decoder``.

    Returns:
        The path of the ``.onnx`` file.
    """
    model = build_llama(size, seed)
    out = Path(out) if out is not None else Path("models") / f"llama-{size}-kv" / "model.onnx"
    return export_decoder(model, out, opset=opset, verify=verify)


def build_llama(size: str = "tiny", seed: int = 0) -> Any:
    """The seeded ``LlamaForCausalLM`` that ``export_llama`` exports (eval, float32).

    Args:
        size: ``tiny`` or ``small``.
        seed: seeds the initialisation and the perturbation.
    """
    import torch
    import transformers as tf

    spec = get_spec("llama", size)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**spec.config, attn_implementation="eager")
    model = tf.LlamaForCausalLM(cfg)
    _perturb(model, seed)
    return model.eval()


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """Write a fast tokenizer for serving without transformers.

    Writes ``tokenizer.json`` (the ``tokenizers`` library's format) and
    ``tokenizer_config.json`` with ``chat_template``, ``bos_token``, ``eos_token``,
    ``pad_token``, ``unk_token`` and ``add_bos_token`` (what ``edge.text`` reads).

    Args:
        tokenizer: a transformers fast tokenizer (``backend_tokenizer`` present).
        out_dir: the folder.

    Raises:
        ExportError: a slow tokenizer without a ``tokenizers`` backend.
    """
    out_dir = Path(out_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"expected a fast tokenizer (with a tokenizers backend), got "
                          f"{type(tokenizer).__name__}")
    backend.save(str(out_dir / "tokenizer.json"))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: keep the default
        template = template.get("default") or next(iter(template.values()))
    config = {
        "chat_template": template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "tokenizer_class": type(tokenizer).__name__,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _need(*modules: str) -> None:
    import importlib.util

    from edge._extras import missing_package

    for module in modules:
        if importlib.util.find_spec(module) is None:
            err = missing_package(module, "exporting a GGUF model")
            raise err or MissingPackageError(f"{module} is not installed", module, "export")


def export_gguf(gguf_path: str | Path, out: str | Path, opset: int = 18,
                verify: bool = True) -> Path:
    """Export a GGUF causal LM (dequantized to float32) and its tokenizer.

    transformers reads the GGUF (``gguf_file=``) and dequantizes every tensor to float32,
    so the ONNX file is about 4 bytes a parameter whatever the GGUF's quantization.
    Beside ``out`` go ``<out>.data``, ``generation.json``, ``tokenizer.json`` and
    ``tokenizer_config.json``.

    Args:
        gguf_path: the ``.gguf`` file (Llama, Qwen2 or GPT-2 architecture).
        out: the ``.onnx`` path.
        opset: ONNX opset.
        verify: compare with torch, as in ``export_decoder``.

    Returns:
        The path of the ``.onnx`` file.
    """
    _need("gguf", "accelerate", "transformers", "torch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ExportError(f"expected a GGUF file, found nothing at {gguf_path}")
    t0 = time.perf_counter()
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    log.info("loaded %s in %.1f s", gguf_path, time.perf_counter() - t0)
    out = export_decoder(model, out, opset=opset, verify=verify,
                         extra={"source": gguf_path.name})
    save_tokenizer(tokenizer, out.parent)
    return out


def is_causal_lm(model_dir: str | Path) -> bool:
    """Whether a Hugging Face folder holds a causal LM (exported with its KV cache by
    :func:`export_hf_decoder`; other models by ``edge.export.export_hf``)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the exporter says what is wrong with the folder
    return any(a.endswith(("ForCausalLM", "LMHeadModel"))
               for a in config.get("architectures") or ())


def export_hf_decoder(model_dir: str | Path, out: str | Path, opset: int = 18,
                      verify: bool = True) -> Path:
    """Export a local Hugging Face causal-LM folder (no download) with the KV cache.

    Llama, Qwen2 and GPT-2 families (``AutoModelForCausalLM``). If the folder has a
    tokenizer, it is saved beside the ``.onnx`` as in ``export_gguf``.

    Args:
        model_dir: a folder with ``config.json`` and weights.
        out: the ``.onnx`` path.
        opset: ONNX opset.
        verify: compare with torch, as in ``export_decoder``.

    Returns:
        The path of the ``.onnx`` file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = hf_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager")
    out = export_decoder(model, out, opset=opset, verify=verify,
                         extra={"source": model_dir.name})
    if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        save_tokenizer(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True),
                       out.parent)
    return out
