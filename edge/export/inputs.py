"""Seeded example inputs, shared by tests, the demo and benchmarks. numpy only."""

from __future__ import annotations

import numpy as np

from edge.export.specs import get_spec

__all__ = ["example_inputs", "text_inputs"]

# BERT's special tokens ([PAD]=0, [CLS]=101, [SEP]=102); ordinary word pieces start near
# 1000, so random ids are drawn from [1000, vocab) to look like real text.
_PAD, _CLS, _SEP, _FIRST_WORD = 0, 101, 102, 1000


def text_inputs(vocab_size: int, batch: int = 1, seq: int = 128, seed: int = 0,
                with_mask: bool = True) -> dict[str, np.ndarray]:
    """BERT-style ``input_ids`` (+ ``attention_mask``) for any vocabulary.

    Row 0 is full length; for batch > 1, later rows are shorter and padded at the end
    (mask 0, id [PAD]), the way a tokenizer pads a batch.

    Args:
        vocab_size: ids are drawn below this.
        batch: rows.
        seq: sequence length.
        seed: numpy seed.
        with_mask: also return ``attention_mask``.
    """
    if batch < 1 or seq < 2:
        raise ValueError(f"need batch >= 1 and seq >= 2, got batch={batch}, seq={seq}")
    rng = np.random.default_rng(seed)
    low = _FIRST_WORD if vocab_size > 2 * _FIRST_WORD else 0
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int64)
    out = {"input_ids": ids}
    if not with_mask:
        return out
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):
        # Down to half length for the last row; at least 2 real tokens.
        length = max(2, seq - (row * (seq // 2)) // (batch - 1))
        mask[row, length:] = 0
        ids[row, length:] = _PAD
    if vocab_size > _SEP:
        ids[:, 0] = _CLS
        lengths = mask.sum(axis=1)
        ids[np.arange(batch), lengths - 1] = _SEP
    out["attention_mask"] = mask
    return out


def example_inputs(kind: str, size: str = "tiny", batch: int = 1, seq: int | None = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded numpy inputs for a model that ``export_model(kind, size)`` makes.

    Args:
        kind: a kind of ``edge.export.kinds()``, e.g. ``bert``, ``gpt2`` or ``unet``.
        size: model size.
        batch: batch size.
        seq: sequence length for text models; image height and width for image models
            (unet: a multiple of 8 is typical, but any size >= 8 works). Default: the
            spec's ``default_seq``.
        seed: numpy seed.

    Returns:
        Input name -> array: int64 ``input_ids`` and ``attention_mask`` (bert),
        int64 ``input_ids`` (gpt2, llama), float32 ``image`` (unet) or ``pixel_values``
        (resnet, convnext, vit) in [0, 1).
    """
    spec = get_spec(kind, size)
    seq = spec.default_seq if seq is None else seq
    if spec.is_image:
        rng = np.random.default_rng(seed)
        return {spec.inputs[0]: rng.random((batch, 3, seq, seq), dtype=np.float32)}
    # GPT-2 has no padding mask in our export (no attention_mask input): unpadded ids.
    return text_inputs(spec.vocab_size, batch=batch, seq=seq, seed=seed,
                       with_mask="attention_mask" in spec.inputs)
