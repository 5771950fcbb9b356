"""Turn models into ONNX files that edge can plan and cut.

``export_model`` builds bert / gpt2 / unet from configs with seeded weights (nothing is
downloaded); ``export_hf`` exports a local Hugging Face encoder folder; ``example_inputs``
gives the matching seeded numpy inputs without torch. ``edge.export.decoder`` exports causal
LMs with a per-layer KV cache (``export_decoder``, ``export_llama``, ``export_gguf``,
``export_hf_decoder``) and ``edge.export.generate`` runs them greedily (numpy + onnxruntime).

torch and transformers (the ``edge[export]`` extra) are imported only when exporting.
"""

from __future__ import annotations

from edge.export.decoder import export_decoder, export_gguf, export_hf_decoder, export_llama
from edge.export.generate import greedy_generate
from edge.export.inputs import example_inputs, text_inputs
from edge.export.onnx_export import ExportError, build_model, export_hf, export_model, verify_onnx
from edge.export.specs import ModelSpec, get_spec, kinds, sizes

__all__ = [
    "ExportError",
    "ModelSpec",
    "build_model",
    "example_inputs",
    "export_decoder",
    "export_gguf",
    "export_hf_decoder",
    "export_llama",
    "greedy_generate",
    "export_hf",
    "export_model",
    "get_spec",
    "kinds",
    "sizes",
    "text_inputs",
    "verify_onnx",
]
