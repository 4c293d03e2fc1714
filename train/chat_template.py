"""A model's chat template (the Jinja text from ``tokenizer_config.json`` or a GGUF's ``tokenizer.chat_template``),
rendered with jinja2's sandbox, and the split of a rendered conversation into the parts trained on.

Templates are written for the environment Hugging Face tokenizers render them in, so this module provides the
same one: trimmed blocks, ``loopcontrols``, a ``tojson`` filter that keeps non-ASCII text, ``raise_exception`` and
``strftime_now``, and the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``.

Which tokens are the assistant's is found by rendering, not by parsing the template: for the assistant message
``i``, the text between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])`` is
that reply with its end-of-turn marker, provided both are prefixes of the whole conversation's rendering. A reply
the template renders differently once later turns follow (Qwen3 drops reasoning from earlier turns) fails that
test; it stays in the context but is not trained on, and :meth:`ChatTemplate.pieces` reports how many did.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from train import storage

__all__ = ["ChatTemplate", "ChatTemplateError", "special_token_text"]

Message = Mapping[str, Any]


# The roles named when a template drops another one.
_COMMON_ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered for a conversation, or is missing."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates need the text as it is.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def special_token_text(tokenizer: Any, token_id: int | None) -> str:
    """The text of a special token (``""`` when the tokenizer has no such token or cannot name it)."""
    id_to_token = getattr(tokenizer, "id_to_token", None)
    if token_id is None or id_to_token is None:
        return ""
    return id_to_token(token_id) or ""


class ChatTemplate:
    """A compiled chat template.

    Args:
      source: the Jinja text.
      bos_token, eos_token: the special-token strings the template may reference.
      origin: where the template came from, for error messages.

    Raises:
      ChatTemplateError: the template does not compile.

    Example:
      >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
      ...                  "{% if add_generation_prompt %}<assistant>{% endif %}")
      >>> t.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
      '<user>Hi</s><assistant>'
      >>> t.pieces([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
      ([('<user>Hi</s><assistant>', False), ('Hello</s>', True)], 0)
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "chat template"):
        self.source = source
        self.origin = origin
        self._variables = {"bos_token": bos_token, "eos_token": eos_token}
        self._renders_role: dict[Any, bool] = {}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{origin} does not compile as Jinja: {e}") from None

    @classmethod
    def for_model(cls, tokenizer: Any, path: str = "") -> ChatTemplate | None:
        """The template in the file ``path`` if given, else the tokenizer's own; ``None`` when there is neither."""
        bos = special_token_text(tokenizer, getattr(tokenizer, "bos_id", None))
        eos = special_token_text(tokenizer, getattr(tokenizer, "eos_id", None))
        if path:
            path = storage.local_copy(path)  # a gs:// template: read from a downloaded copy
            if not os.path.isfile(path):
                raise ChatTemplateError(f"data.chat_template file {path!r} does not exist")
            with open(path, encoding="utf-8") as f:
                return cls(f.read(), bos_token=bos, eos_token=eos, origin=f"chat template {path}")
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        return cls(source, bos_token=bos, eos_token=eos, origin="the model's chat template")

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False, **variables: Any) -> str:
        """The conversation as text, ending with the assistant's header when ``add_generation_prompt``; as
        transformers' ``apply_chat_template`` renders it, so a message of a role the template skips is left out
        (:meth:`check_roles` refuses those where the project feeds a user's conversation: training rows, chat).

        Raises:
          ChatTemplateError: the template fails on the conversation.
        """
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **self._variables,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin} failed on this conversation: {e}") from None

    def check_roles(self, roles: Iterable[Any]) -> None:
        """Raises :class:`ChatTemplateError` for the first of ``roles`` the template does not render."""
        for role in dict.fromkeys(roles):
            if not self.renders_role(role):
                known = [r for r in _COMMON_ROLES if r != role and self.renders_role(r)]
                raise ChatTemplateError(
                    f"{self.origin} does not render messages of role {role!r}: they would be left out silently; "
                    f"use a role it renders ({', '.join(known) or 'none of ' + ', '.join(_COMMON_ROLES)})"
                )

    def renders_role(self, role: Any) -> bool:
        """Whether a message of ``role`` shows up in the rendering (many templates only know a few roles and skip
        the others without a word). A template that refuses every probe conversation is given the benefit of the
        doubt: rendering the real conversation reports its own error."""
        if role not in self._renders_role:
            probe = "zq_role_probe_qz"
            message = {"role": role, "content": probe}
            verdict = True
            for conversation in ([message], [{"role": "user", "content": "hi"}, message]):
                try:
                    text = self._template.render(messages=conversation, add_generation_prompt=False, **self._variables)
                except Exception:  # noqa: BLE001 - a template may raise anything on a probe; the real render says why
                    continue
                verdict = probe in text
                break
            self._renders_role[role] = verdict
        return self._renders_role[role]

    def end_of_turn(self) -> str:
        """The text the template puts right after an assistant reply (``"<|im_end|>"`` for ChatML), stripped of
        whitespace; generation stops there. ``""`` when the template puts nothing there."""
        marker = "\x00reply\x00"
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        except ChatTemplateError:
            return ""
        at = text.find(marker)
        return text[at + len(marker) :].strip() if at >= 0 else ""

    def pieces(self, messages: Sequence[Message], **variables: Any) -> tuple[list[tuple[str, bool]], int]:
        """The rendered conversation cut into ``(text, is_assistant_reply)`` pieces, plus the number of assistant
        replies that stay untrained because the template renders them differently once later turns follow.

        Text after the last trained reply is dropped (nothing in it is trained on).

        Raises:
          ChatTemplateError: rendering fails, a message has a role the template does not render, or no assistant
            reply can be located.
        """
        self.check_roles(m.get("role") for m in messages)
        full = self.render(messages, **variables)
        spans: list[tuple[int, int]] = []
        untrained = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, **variables)
            through = self.render(messages[: i + 1], **variables)
            start, end = len(before), len(through)
            consistent = full.startswith(through) and through.startswith(before) and end > start
            if consistent and (not spans or start >= spans[-1][1]):
                spans.append((start, end))
            else:
                untrained += 1
        if not spans:
            raise ChatTemplateError(
                f"{self.origin}: no assistant reply could be located in the rendered conversation"
                + (" (every reply renders differently once later turns follow)" if untrained else "")
            )
        out: list[tuple[str, bool]] = []
        at = 0
        for start, end in spans:
            if start > at:
                out.append((full[at:start], False))
            out.append((full[start:end], True))
            at = end
        return out, untrained
