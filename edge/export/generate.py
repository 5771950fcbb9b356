"""A single-process reference generator for exported decoders: numpy and onnxruntime only.

It runs the KV-cache convention of ``edge.export.decoder``: a prefill over the prompt with
zero-length pasts, then one token a step with the previous presents fed back as pasts. Tests
compare it with transformers' ``generate``; benchmarks use it as the unsharded baseline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["OnnxDecoder", "greedy_generate"]

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


class OnnxDecoder:
    """One sequence (batch 1) through an exported decoder, step by step, with its cache.

    Attributes:
        session: the onnxruntime session.
        eos_token_ids: from ``generation.json`` beside the model, if present.
        length: tokens in the cache so far.
    """

    def __init__(self, onnx_path: str | Path, threads: int = 0) -> None:
        """Load the model.

        Args:
            onnx_path: an ``.onnx`` file exported by ``edge.export.decoder``.
            threads: intra-op threads (0: onnxruntime's default).
        """
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Idle spinning threads steal cores from other sessions on small machines.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), opts,
                                            providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._pasts = sorted((n for n in self._inputs if _PAST.match(n)),
                             key=lambda n: (int(_PAST.match(n).group(1)), n.endswith("value")))
        if "input_ids" not in self._inputs or not self._pasts:
            raise ValueError(f"{onnx_path}: expected inputs input_ids and "
                             f"past_key_values.N.key/value, got {sorted(self._inputs)}")
        self._outputs = ["logits"] + [n.replace("past_key_values", "present")
                                      for n in self._pasts]
        shape = self._inputs[self._pasts[0]].shape  # [batch, kv_heads, past, head_dim]
        self._kv = (int(shape[1]), int(shape[3]))
        info = Path(onnx_path).parent / "generation.json"
        self.eos_token_ids: list[int] = (json.loads(info.read_text()).get("eos_token_ids", [])
                                         if info.is_file() else [])
        self.length = 0
        self._cache: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        """Forget the cache (a new sequence)."""
        self.length = 0
        self._cache = [np.zeros((1, self._kv[0], 0, self._kv[1]), np.float32)
                       for _ in self._pasts]

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run ``token_ids`` after what is in the cache; extend the cache.

        Args:
            token_ids: the prompt (prefill) or the one new token (decode step).

        Returns:
            float32 logits [len(token_ids), vocab].
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.ones((1, self.length + n), np.int64),
        }
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.arange(self.length, self.length + n,
                                              dtype=np.int64).reshape(1, n)
        feeds.update(zip(self._pasts, self._cache))
        logits, *presents = self.session.run(self._outputs, feeds)
        self._cache = presents
        self.length += n
        return logits[0]


def greedy_generate(onnx_path: str | Path | OnnxDecoder, prompt_ids: Sequence[int],
                    max_new_tokens: int,
                    eos_token_ids: Sequence[int] | None = None) -> list[int]:
    """Greedy decoding with the KV cache: prefill, then one token a step.

    Args:
        onnx_path: an exported decoder, or an ``OnnxDecoder`` (reused: its cache is reset).
        prompt_ids: the prompt's token ids.
        max_new_tokens: most tokens to generate.
        eos_token_ids: stop after any of these; default from ``generation.json`` beside
            the model (none if absent).

    Returns:
        The new tokens, the EOS token included when generation stopped on it (as
        transformers' ``generate`` returns it).
    """
    dec = onnx_path if isinstance(onnx_path, OnnxDecoder) else OnnxDecoder(onnx_path)
    dec.reset()
    stop = set(dec.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if not len(prompt_ids):
        raise ValueError("expected a prompt of at least one token, got none")
    new: list[int] = []
    logits = dec.feed(prompt_ids)
    while len(new) < max_new_tokens:
        token = int(np.argmax(logits[-1]))
        new.append(token)
        if token in stop or len(new) == max_new_tokens:
            break
        logits = dec.feed([token])
    return new
