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
        kind: ``bert``, ``gpt2``, ``unet``, ``resnet``, ``convnext``, ``vit``,
            ``distilbert`` or ``llama``.
        size: ``tiny`` (a toy for tests), or a larger size of the kind.
        config: keyword arguments of the model's config (a transformers config class, or
            ``UNet`` for unet).
        inputs: ONNX input names, in order.
        outputs: ONNX output names, in order.
        vocab_size: token-id upper bound (text models), else 0.
        default_seq: default sequence length (text) or image side (images) of example
            inputs.
        fixed_side: an image model whose height and width are fixed at ``default_seq``
            (ViT: its position embeddings are for one grid); others take any side.
    """

    kind: str
    size: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    vocab_size: int = 0
    default_seq: int = 128
    fixed_side: bool = False

    @property
    def is_image(self) -> bool:
        """True when the one input is an image [batch, 3, height, width]."""
        return self.inputs[:1] in (("image",), ("pixel_values",))


_BERT_IO = dict(inputs=("input_ids", "attention_mask"),
                outputs=("last_hidden_state", "pooler_output"), vocab_size=30522)
_GPT2_IO = dict(inputs=("input_ids",), outputs=("logits",), vocab_size=50257)
_UNET_IO = dict(inputs=("image",), outputs=("mask",))
_IMAGE_IO = dict(inputs=("pixel_values",), outputs=("logits",), default_seq=224)
_DISTILBERT_IO = dict(inputs=("input_ids", "attention_mask"), outputs=("last_hidden_state",),
                      vocab_size=30522)
_LLAMA_IO = dict(inputs=("input_ids",), outputs=("logits",), vocab_size=32000)

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
    # Wide layers (up to 1152 channels, three 3x3 convs a level): 216 MiB of fp32 weights,
    # most of them in a few convolutions of 24-48 MiB each.
    ("unet", "wide"): ModelSpec("unet", "wide", dict(in_channels=3, out_channels=1, width=144,
                                                     convs=3),
                                default_seq=64, **_UNET_IO),
    # Image classifiers and more transformers from transformers' configs. "tiny" is a toy
    # for tests; the other size is the named architecture (ResNetConfig's defaults are
    # ResNet-50, ConvNextConfig's ConvNeXt-T, ViTConfig's ViT-B/16, DistilBertConfig's
    # distilbert-base).
    ("resnet", "tiny"): ModelSpec("resnet", "tiny", dict(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=10), **dict(_IMAGE_IO, default_seq=32)),
    ("resnet", "50"): ModelSpec("resnet", "50", dict(num_labels=1000), **_IMAGE_IO),
    ("convnext", "tiny"): ModelSpec("convnext", "tiny", dict(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10),
        **dict(_IMAGE_IO, default_seq=32)),
    ("convnext", "t"): ModelSpec("convnext", "t", dict(num_labels=1000), **_IMAGE_IO),
    ("vit", "tiny"): ModelSpec("vit", "tiny", dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, num_labels=10),
        **dict(_IMAGE_IO, default_seq=32, fixed_side=True)),
    ("vit", "base"): ModelSpec("vit", "base", dict(num_labels=1000),
                               **dict(_IMAGE_IO, fixed_side=True)),
    ("distilbert", "tiny"): ModelSpec("distilbert", "tiny", dict(
        n_layers=2, dim=128, n_heads=2, hidden_dim=512), **_DISTILBERT_IO),
    ("distilbert", "base"): ModelSpec("distilbert", "base", {}, **_DISTILBERT_IO),
    ("llama", "tiny"): ModelSpec("llama", "tiny", dict(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2),
        **dict(_LLAMA_IO, vocab_size=1000)),
    # A small Llama (about 56 M parameters, 215 MiB fp32): 8 layers, grouped-query
    # attention, SwiGLU, an untied LM head over a 32000-token vocabulary.
    ("llama", "small"): ModelSpec("llama", "small", dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
        **_LLAMA_IO),
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
