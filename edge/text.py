"""Text in and out of an exported decoder on the serving side: ``tokenizers`` and jinja2 only.

Reads what ``edge.export.decoder`` writes beside the ``.onnx``: ``tokenizer.json``,
``tokenizer_config.json`` (chat template and special tokens) and ``generation.json``.
Never imports torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge.errors import ConfigError

__all__ = ["ChatTokenizer", "load_tokenizer", "render_chat"]


def _template_env() -> Any:
    # The environment transformers' apply_chat_template renders with: sandboxed,
    # trim_blocks and lstrip_blocks, loop controls, raise_exception, strftime_now and a
    # tojson that does not escape HTML. Templates are written against exactly this.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template_config: Mapping[str, Any], messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True) -> str:
    """Render a chat with the model's template, as transformers' ``apply_chat_template``.

    Args:
        template_config: ``tokenizer_config.json``'s content (``chat_template`` and the
            special tokens ``bos_token``, ``eos_token``, ... the template may use).
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt: end with the assistant's turn header.

    Returns:
        The prompt text; encode it without adding special tokens (the template has them).

    Raises:
        ConfigError: the config has no chat template.
    """
    template = template_config.get("chat_template")
    if not template:
        raise ConfigError("tokenizer_config.json: expected a chat_template, found none")
    specials = {k: v for k, v in template_config.items()
                if k.endswith("_token") and isinstance(v, str)}
    return _template_env().from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **specials)


@dataclass
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with the model's chat template and stop tokens.

    Attributes:
        tokenizer: the fast tokenizer (``tokenizer.json``).
        config: ``tokenizer_config.json``'s content.
        eos_token_ids: ids that end generation (``generation.json``, else the eos token).
    """

    tokenizer: Any
    config: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat prompt rendered with the model's template.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: end with the assistant's turn header.
        """
        text = render_chat(self.config, messages, add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain text.

        Args:
            text: the text.
            add_special_tokens: apply the tokenizer's post-processor (e.g. a BOS token).
        """
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids.

        Args:
            ids: token ids.
            skip_special_tokens: drop special tokens such as ``<|im_end|>``.
        """
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """The tokenizer that an export saved beside its ``.onnx``.

    Args:
        model_dir: the folder with ``tokenizer.json`` (and ideally ``tokenizer_config.json``
            and ``generation.json``), or the ``.onnx`` file in it.

    Raises:
        ConfigError: no ``tokenizer.json`` there.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: expected tokenizer.json (written by export_gguf or "
                          f"export_hf_decoder), found none")
    tok = Tokenizer.from_file(str(path))
    cfg_path = model_dir / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    gen_path = model_dir / "generation.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_ids", []) if gen_path.is_file() else []
    if not eos and config.get("eos_token"):
        eid = tok.token_to_id(config["eos_token"])
        eos = [] if eid is None else [eid]
    return ChatTokenizer(tok, config, [int(e) for e in eos])
