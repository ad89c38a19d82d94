"""Chat templates rendered exactly as transformers' ``apply_chat_template`` renders them.

``compile_template`` builds a template in transformers' sandbox (no attribute starting with ``_``, no mutation of
lists or dicts), made strict: an unsafe attribute raises at once, ``*`` / ``**`` cannot build a value that
exhausts memory, and a template naming a Python-internal attribute is refused before it runs. Its globals and
filters are transformers' (``raise_exception``, ``strftime_now``, ``tojson``, ``{% generation %}``).

``template_messages`` builds what a template sees (transformers' rules: keys whose value is None dropped, a
message's reasoning under each name templates read); ``mark_final_message`` and ``cut_at_marker`` are
``continue_final_message``: a marker appended to the final message's content, the render cut there.
``nanocli_model.tokenizer.Tokenizer.apply_chat_template`` puts them together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from .errors import TokenizerError

__all__ = ["compile_template", "template_messages", "mark_final_message", "cut_at_marker"]


# ---------------------------------------------------------------------------- jinja, as transformers
def _raise_exception(message: str):
    raise TokenizerError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


_MAX_REPEAT = 1_000_000  # longest string or list a template may build with `*`
_MAX_EXPONENT = 1000


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox (no attribute starting with ``_``, no mutation of lists or dicts), made
    strict: reaching for an unsafe attribute raises at once instead of rendering as empty text, and
    ``*`` / ``**`` cannot build a string, list or number large enough to exhaust memory."""

    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} "
                                           "object is unsafe")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise jinja2.sandbox.SecurityError(f"repeating a {type(seq).__name__} {n} times is too large")
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise jinja2.sandbox.SecurityError(f"the exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


def _internal_access(env: jinja2.Environment, template: str) -> jinja2.nodes.Node | None:
    """The first node of ``template`` that names a Python-internal attribute (``x.__class__``,
    ``x['__globals__']``, ``x|attr('_y')``), or None."""
    for node in env.parse(template).find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem, jinja2.nodes.Filter)):
        if isinstance(node, jinja2.nodes.Getattr):
            name = node.attr
        elif isinstance(node, jinja2.nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, jinja2.nodes.Const) else None
        else:
            arg = node.args[0] if node.name == "attr" and node.args else None
            name = arg.value if isinstance(arg, jinja2.nodes.Const) else None
        if isinstance(name, str) and name.startswith("__" if isinstance(node, jinja2.nodes.Getitem) else "_"):
            node.internal_name = name
            return node
    return None


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template string, in the (sandboxed) environment transformers uses.
    A template that names a Python-internal attribute is refused before it runs."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    bad = _internal_access(env, template)
    if bad is not None:
        raise jinja2.sandbox.SecurityError(f"it reads the Python-internal attribute {bad.internal_name!r} "
                                           f"(line {bad.lineno})")
    return env.from_string(template)


# ---------------------------------------------------------------------------- messages, as transformers
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # one value under the names templates read
_CONTINUE_MARK = "CONTINUE_FINAL_MESSAGE_TAG "


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What a template sees, as transformers builds it: fresh dicts without the keys whose value is None, and a
    message's reasoning under each of ``_REASONING_FIELDS``."""
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(f"a chat message must be a mapping with 'role' and 'content', got {message!r:.80}")
        m = {k: v for k, v in message.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    return chat


def mark_final_message(chat: list[dict[str, Any]], field: bool | str, template: str, source: str) -> str:
    """Append the continuation marker to the final message's ``field`` (``content`` for True); return the text
    to continue."""
    field = field if isinstance(field, str) else "content"
    if not chat:
        raise TokenizerError("continue_final_message: the conversation is empty; give the message to continue")
    final = chat[-1].get(field)
    if final is None:
        raise TokenizerError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in template for f in fields):
        raise TokenizerError(f"{source}: continue_final_message: the chat template never reads {field!r}")
    if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in final]
        for block in reversed(blocks):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                final, block["text"] = block["text"], block["text"] + _CONTINUE_MARK
                break
        else:
            raise TokenizerError("continue_final_message: the final message has no text block to continue")
        chat[-1][field] = blocks
        return final
    if not isinstance(final, str):
        raise TokenizerError(f"continue_final_message: the final message's {field!r} is not text")
    for f in fields:
        chat[-1][f] = final + _CONTINUE_MARK
    return final


def cut_at_marker(text: str, final: str, source: str) -> str:
    """The render up to the continuation marker (and without the whitespace before it, when the template trimmed
    the whitespace after it)."""
    mark = _CONTINUE_MARK.strip()
    if final.strip() not in text or mark not in text:
        raise TokenizerError(f"{source}: continue_final_message: the chat template does not write the final message "
                             "as given (it rewrites or drops part of it), so there is nothing to continue")
    at = text.rindex(mark)
    return text[:at] if text[at:at + len(_CONTINUE_MARK)] == _CONTINUE_MARK else text[:at].rstrip()
