"""Text in and out of an exported decoder on the serving side: ``tokenizers`` and jinja2 only.

Reads what ``edge.export.decoder`` writes beside the ``.onnx``: ``tokenizer.json``,
``tokenizer_config.json`` (chat template and special tokens) and ``generation.json``.
Never imports torch or transformers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge.errors import ConfigError, EdgeError

__all__ = ["ChatTokenizer", "ChatError", "ROLES", "chat_messages", "load_tokenizer",
           "render_chat"]

# The roles a chat may have; a template renders each of them in its own way.
ROLES = ("system", "user", "assistant")


class ChatError(EdgeError):
    """A chat's messages are malformed (not a list, an unknown role, no text)."""


def _content(content: Any, where: str) -> str:
    # OpenAI's content is a string or a list of parts; the text parts are joined (a text
    # model has no use for the others, and says so rather than dropping them).
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatError(f"{where}.content[{k}]: expected a text part "
                                f'{{"type": "text", "text": "..."}}, got {kind!r}')
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"{where}.content: expected a string or a list of text parts, got "
                    f"{type(content).__name__}")


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """A chat's messages checked and reduced to ``{"role", "content"}`` with text content.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str or text parts},
            ...]`` as OpenAI's chat API takes them.

    Raises:
        ChatError: not a non-empty list, a message that is not an object, a role other than
            :data:`ROLES`, content that is not text.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"messages: expected a non-empty list of {{role, content}} objects, "
                        f"got {type(messages).__name__ if messages != [] else 'an empty list'}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatError(f"{where}: expected an object with role and content, got "
                            f"{type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if m.get("content") is None:
            raise ChatError(f"{where}.content: expected text, got none")
        out.append({"role": role, "content": _content(m["content"], where)})
    return out


@functools.lru_cache(maxsize=1)
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
    return _compiled(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **specials)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    # Compiling is the cost of a chat request (13 ms for Llama 3.1's template on a desktop
    # core, several times that on a Pi); rendering the compiled one takes 0.02 ms.
    return _template_env().from_string(template)


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
