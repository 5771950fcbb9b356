"""Sentence embeddings from an encoder plan (BERT, MiniLM: no KV caches), for
``POST /v1/embeddings``.

Each input goes through the pipeline's Infer path alone (batch 1, its own length: no
padding to compute or to mask). The pooled output is ``last_hidden_state`` when the model
has it, else its only output of rank 3 ([batch, sequence, hidden]); it is averaged over
the attention mask and L2-normalized, as sentence-transformers' all-MiniLM-L6-v2 does
(its Pooling and Normalize modules).

Text needs the tokenizer that ``edge export hf`` saves beside the ``.onnx`` and
``edge plan`` copies to ``<plan>/tokenizer/``; without one, token-id inputs still work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge.coordinator.openai_api import ApiError
from edge.transport.codec import decode_tensors

__all__ = ["Embedder", "mean_pool", "parse_inputs"]

log = logging.getLogger(__name__)

# The inputs /v1/embeddings knows how to fill; an encoder with others is refused.
_FILLED = ("input_ids", "attention_mask", "token_type_ids")


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` [batch, sequence, dim] over the positions ``mask`` [batch,
    sequence] marks, L2-normalized: [batch, dim]."""
    m = mask.astype(np.float32)[:, :, None]
    pooled = (hidden.astype(np.float32) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def parse_inputs(value: Any) -> list[str | list[int]]:
    """``input`` of an embeddings request: a string, a list of strings, token ids, or a
    list of token-id lists.

    Raises:
        ApiError: 400 for anything else or an empty input.
    """
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

    if isinstance(value, str) and value:
        return [value]
    if ids(value):
        return [list(value)]
    if isinstance(value, list) and value and all(
            (isinstance(x, str) and x) or ids(x) for x in value):
        return [x if isinstance(x, str) else list(x) for x in value]
    shown = repr(value)[:80]
    raise ApiError(400, f"input: expected a non-empty string, a list of them, a list of "
                        f"token ids or a list of such lists, got {shown}", param="input",
                   code="invalid_value")


class Embedder:
    """Embeds inputs over a :class:`~edge.coordinator.pipeline.Pipeline` serving an
    encoder.

    Args:
        pipeline: the pipeline.
        tokenizer: a tokenizer with ``encode(text)`` (default: ``tokenizer.json`` from
            ``<plan>/tokenizer/`` or beside the source model, on first use).
    """

    def __init__(self, pipeline: Any, tokenizer: Any = None):
        self.pipeline = pipeline
        self._tokenizer = tokenizer
        self._looked = tokenizer is not None

    def tokenizer_places(self) -> list[Path]:
        """Where a ``tokenizer.json`` is looked for, in order."""
        plan_dir = Path(self.pipeline.plan_dir)
        places = [plan_dir / "tokenizer"]
        if self.pipeline.plan.model.path:
            places.append((plan_dir / self.pipeline.plan.model.path).parent)
        return places

    @property
    def tokenizer(self) -> Any:
        if not self._looked:
            from edge.text import load_tokenizer

            for place in self.tokenizer_places():
                if (place / "tokenizer.json").is_file():
                    self._tokenizer = load_tokenizer(place)
                    # Exports often pad and truncate to a fixed length (all-MiniLM's
                    # tokenizer.json: 128). Each input goes alone, unpadded, its mask all
                    # ones, and whole: past the model's positions the guard refuses it
                    # (400) rather than embed part of it.
                    self._tokenizer.tokenizer.no_padding()
                    self._tokenizer.tokenizer.no_truncation()
                    break
            self._looked = True
        return self._tokenizer

    def pooled_output(self) -> str:
        """The output averaged into an embedding (module docstring).

        Raises:
            ApiError: 400 for a model without a [batch, sequence, hidden] output, or a
                decoder planned for generation.
        """
        model = self.pipeline.plan.model
        if model.generation is not None:
            raise ApiError(400, f"{model.name} is a decoder planned for generation; "
                                f"/v1/embeddings needs an encoder plan (e.g. `edge export "
                                f"hf` of all-MiniLM-L6-v2)", code="model_not_encoder")
        names = [t.name for t in model.outputs]
        if "last_hidden_state" in names:
            return "last_hidden_state"
        rank3 = [t.name for t in model.outputs if len(t.shape) == 3]
        if len(rank3) == 1:
            return rank3[0]
        raise ApiError(400, f"{model.name}: /v1/embeddings pools a last_hidden_state "
                            f"[batch, sequence, hidden] output; the model's outputs are "
                            f"{', '.join(names)}", code="model_not_encoder")

    def token_ids(self, item: str | list[int]) -> list[int]:
        """An input's token ids (text through the tokenizer, with its special tokens).

        Raises:
            ApiError: 400 for text when the plan has no tokenizer.
        """
        if not isinstance(item, str):
            return item
        tok = self.tokenizer
        if tok is None:
            where = " or ".join(str(p / "tokenizer.json") for p in self.tokenizer_places())
            raise ApiError(400, f"text input needs the model's tokenizer, and this plan has "
                                f"none (expected {where}; `edge export hf` saves it beside "
                                f"the .onnx when the model folder has tokenizer.json, and "
                                f"`edge plan` copies it); send token ids instead",
                           code="no_tokenizer")
        return tok.encode(item)

    def embed(self, items: Sequence[str | list[int]]) -> tuple[list[np.ndarray], int]:
        """The embeddings of ``items`` and the tokens they took.

        Raises:
            ApiError: see :meth:`pooled_output` and :meth:`token_ids`.
            InferError: the pipeline refused or failed a request.
        """
        output = self.pooled_output()
        names = {t.name for t in self.pipeline.plan.model.inputs}
        unknown = sorted(names - set(_FILLED))
        if "input_ids" not in names or unknown:
            raise ApiError(400, f"/v1/embeddings feeds input_ids, attention_mask and "
                                f"token_type_ids; the model takes {', '.join(sorted(names))}",
                           code="model_not_encoder")
        all_ids = [self.token_ids(x) for x in items]
        vectors, tokens = [], 0
        for ids in all_ids:
            n = len(ids)
            feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                     "attention_mask": np.ones((1, n), dtype=np.int64),
                     "token_type_ids": np.zeros((1, n), dtype=np.int64)}
            feeds = {k: v for k, v in feeds.items() if k in names}
            result = self.pipeline.infer(feeds)
            hidden = decode_tensors([t for t in result.outputs if t.name == output])[output]
            vectors.append(mean_pool(hidden, feeds.get("attention_mask",
                                                       np.ones((1, n), np.int64)))[0])
            tokens += n
        return vectors, tokens
