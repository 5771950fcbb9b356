"""What each exportable model is: configs, input/output names, default shapes.

Pure data, no torch: ``example_inputs`` and the tests read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "SPECS", "get_spec", "kinds", "sizes"]


@dataclass(frozen=True)
class ModelSpec:
    """One (kind, size) pair.

    Attributes:
        kind: ``bert``, ``gpt2`` or ``unet``.
        size: ``tiny``, ``small`` or ``base``.
        config: keyword arguments of the model's config (a transformers config class for
            bert/gpt2, ``UNet`` for unet).
        inputs: ONNX input names, in order.
        outputs: ONNX output names, in order.
        vocab_size: token-id upper bound (text models), else 0.
        default_seq: default sequence length (text) or image side (unet) of example inputs.
    """

    kind: str
    size: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    vocab_size: int = 0
    default_seq: int = 128


_BERT_IO = dict(inputs=("input_ids", "attention_mask"),
                outputs=("last_hidden_state", "pooler_output"), vocab_size=30522)
_GPT2_IO = dict(inputs=("input_ids",), outputs=("logits",), vocab_size=50257)
_UNET_IO = dict(inputs=("image",), outputs=("mask",))

SPECS: dict[tuple[str, str], ModelSpec] = {
    ("bert", "tiny"): ModelSpec("bert", "tiny", dict(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
        **_BERT_IO),
    ("bert", "small"): ModelSpec("bert", "small", dict(
        num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
        **_BERT_IO),
    # BertConfig defaults: 12 layers, hidden 768, 12 heads, intermediate 3072.
    ("bert", "base"): ModelSpec("bert", "base", {}, **_BERT_IO),
    ("gpt2", "tiny"): ModelSpec("gpt2", "tiny", dict(n_layer=2, n_embd=128, n_head=2),
                                **_GPT2_IO),
    # GPT2Config defaults are GPT-2 small: 12 layers, n_embd 768, 12 heads.
    ("gpt2", "small"): ModelSpec("gpt2", "small", {}, **_GPT2_IO),
    ("unet", "tiny"): ModelSpec("unet", "tiny", dict(in_channels=3, out_channels=1, width=8),
                                default_seq=64, **_UNET_IO),
    ("unet", "small"): ModelSpec("unet", "small", dict(in_channels=3, out_channels=1, width=32),
                                 default_seq=128, **_UNET_IO),
}


def kinds() -> list[str]:
    """The model kinds ``export_model`` knows."""
    return sorted({k for k, _ in SPECS})


def sizes(kind: str) -> list[str]:
    """The sizes of one kind."""
    return [s for k, s in SPECS if k == kind]


def get_spec(kind: str, size: str) -> ModelSpec:
    """The spec of (kind, size).

    Args:
        kind: model kind, e.g. ``bert``.
        size: model size, e.g. ``tiny``.

    Raises:
        ValueError: unknown kind or size, naming the known ones.
    """
    if kind not in kinds():
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(kinds())}")
    spec = SPECS.get((kind, size))
    if spec is None:
        raise ValueError(f"unknown size {size!r} for {kind}; known: {', '.join(sizes(kind))}")
    return spec
