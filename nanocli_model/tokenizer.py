"""Tokenizers and chat templates, read from a checkpoint's own files (no transformers needed).

A tokenizer directory holds ``tokenizer.json`` (the ``tokenizers`` library format), usually
``tokenizer_config.json`` (special tokens, added tokens, the Jinja ``chat_template``; newer saves put
the template in ``chat_template.jinja``) and ``generation_config.json`` (EOS ids). ``Tokenizer``
loads them; chat templates render exactly as transformers renders them (``chat_template.py``).

``NANO_CHAT_TEMPLATE`` is nano's own template with the Nemotron-Nano-9B-v2 structure and reasoning
controls (``/think`` / ``/no_think``); ``build_test_tokenizer`` trains the byte-level BPE that
nano's own models (and the tests) use. ``StreamDecoder`` turns ids into text as they arrive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from .chat_template import compile_template, cut_at_marker, mark_final_message, template_messages
from .errors import TokenizerError

__all__ = ["Tokenizer", "StreamDecoder", "NANO_CHAT_TEMPLATE", "NANO_SPECIAL_TOKENS", "THINK_TAGS",
           "render_chat", "build_test_tokenizer"]

NANO_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>",
                       "<think>", "</think>"]
THINK_TAGS = ("/think", "/no_think")  # the reasoning switches a system or user message may carry
_TEMPLATE_FILE = "chat_template.jinja"
_PROBE = "nano: 12 + 30 = 42 <think>é</think>\n"  # encoded once at load, to catch a tokenizer that cannot work

# nano's chat template: the Nemotron-Nano-9B-v2 card's structure and reasoning switches, without tools. Reasoning
# is on unless the last system or user message holding a switch holds /no_think and not /think (the card's
# precedence: a message with both turns it on); the switches are removed from the rendered text. Past assistant
# turns keep only their answer (after the first </think>; `reasoning_content` is dropped). A trailing assistant
# message with add_generation_prompt=False is the turn being trained on and keeps its thinking (from
# `reasoning_content`, or before </think>), so render(messages[:-1], True) is a prefix of it; with
# add_generation_prompt=True its text follows the generation prompt, for the model to continue (as the card's).
# On system/user/assistant conversations in the card's own form it renders what the card renders.
NANO_CHAT_TEMPLATE = r"""{#- nano chat template (Nemotron-Nano-9B-v2 structure) -#}
{%- set ns = namespace(think=true, prefill='') -%}
{%- for m in messages if m.role in ['system', 'user'] and m.content is string -%}
{%- if '/think' in m.content -%}{%- set ns.think = true -%}
{%- elif '/no_think' in m.content -%}{%- set ns.think = false -%}
{%- endif -%}
{%- endfor -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system = messages[0].content or '' -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
{{- '<SPECIAL_10>System\n' + system.replace('/think', '').replace('/no_think', '').strip() + '\n' -}}
{%- for m in turns -%}
{%- set content = m.content or '' -%}
{%- if content is not string -%}{{- raise_exception('message content must be a string, got ' ~ content) -}}
{%- elif m.role == 'user' -%}
{{- '<SPECIAL_11>User\n' + content.replace('/think', '').replace('/no_think', '').strip() + '\n' -}}
{%- elif m.role == 'assistant' and loop.last and add_generation_prompt -%}
{%- set ns.prefill = content.strip() -%}
{%- elif m.role == 'assistant' -%}
{%- set answer = (content.split('</think>')[1] if '</think>' in content else content).strip() -%}
{%- if loop.last -%}
{%- if m.reasoning_content is string -%}{%- set thinking = m.reasoning_content -%}
{%- elif '</think>' in content -%}{%- set thinking = content.split('</think>')[0].replace('<think>', '') -%}
{%- else -%}{%- set thinking = '' -%}
{%- endif -%}
{%- if ns.think -%}{{- '<SPECIAL_11>Assistant\n<think>\n' + thinking.strip() + '\n</think>\n' + answer -}}
{%- else -%}{{- '<SPECIAL_11>Assistant\n<think></think>' + answer -}}
{%- endif -%}
{{- '\n<SPECIAL_12>\n' -}}
{%- else -%}{{- '<SPECIAL_11>Assistant\n' + answer + '\n<SPECIAL_12>\n' -}}
{%- endif -%}
{%- elif m.role == 'system' -%}{{- raise_exception('only the first message may be a system message') -}}
{%- else -%}{{- raise_exception('unknown role ' ~ m.role ~ '; use system, user or assistant') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<SPECIAL_11>Assistant\n' + ('<think>\n' if ns.think else '<think></think>') + ns.prefill -}}
{%- endif -%}"""


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc}); restore the file from the model's "
                             "original release") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}; restore the file")
    return data


# ---------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    """A ``tokenizers`` tokenizer plus the special tokens, EOS ids and chat template of a checkpoint."""

    def __init__(self, tokenizer: _HFTokenizer, config: Mapping[str, Any] | None = None,
                 generation_config: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 source: str = "tokenizer_config.json", template_source: str | None = None,
                 generation_source: str = "generation_config.json"):
        """Wrap ``tokenizer``; ``config`` / ``generation_config`` are the parsed JSON files (or None);
        ``chat_template`` overrides the one in ``config``; ``source`` names the config file in errors (``template_source`` the file the chat template came from,
        ``generation_source`` the generation config)."""
        self.hf = tokenizer
        self.source = source
        self.template_source = template_source or source
        config, gen = dict(config or {}), dict(generation_config or {})
        self._add_declared_tokens(config.get("added_tokens_decoder") or {})
        self.special_tokens = {k: _token_content(config.get(k))
                               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        ids = {k: self._special_id(k, tok) for k, tok in self.special_tokens.items() if tok is not None}
        for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
            values = gen.get(key)
            for i in values if isinstance(values, list) and key == "eos_token_id" else [values]:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size):
                    raise TokenizerError(f"{generation_source}: {key} {i!r} is not a token id below "
                                         f"{self.vocab_size}; fix the file")
        self.bos_id: int | None = ids.get("bos_token", gen.get("bos_token_id"))
        self.pad_id: int | None = ids.get("pad_token", gen.get("pad_token_id"))
        self.unk_id: int | None = ids.get("unk_token")
        eos = [ids["eos_token"]] if "eos_token" in ids else []
        gen_eos = gen.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
            if i not in eos:
                eos.append(i)
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self.chat_templates = self._templates(config.get("chat_template"))
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.chat_template: str | None = self.chat_templates.get("default")
        self.think_start_id = self._single_id("<think>")
        self.think_end_id = self._single_id("</think>")

    # -- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required), ``tokenizer_config.json``, ``chat_template.jinja`` and
        ``generation_config.json`` (optional) from a model or tokenizer directory."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: not found; a model directory needs the tokenizer.json of its base "
                                 "model (copy it from the release)")
        try:
            hf = _HFTokenizer.from_file(str(file))
            hf.decode(hf.encode(_PROBE).ids)  # a malformed normalizer or decoder can load, then panic on use
        except BaseException as exc:  # plain Exception, or a Rust panic (pyo3's PanicException is a BaseException)
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise
            raise TokenizerError(f"{file}: the tokenizers library cannot use it ({' '.join(str(exc).split())[:200]}); "
                                 "restore the file from the model's original release") from None
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        gen_file = path / "generation_config.json"
        gen = _read_json(gen_file) if gen_file.is_file() else {}
        template, template_source = None, None
        if (path / _TEMPLATE_FILE).is_file():
            template_source = str(path / _TEMPLATE_FILE)
            try:
                template = (path / _TEMPLATE_FILE).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{template_source}: cannot be read ({exc}); restore the file from the "
                                     "model's original release") from None
        return cls(hf, config, gen, chat_template=template, source=str(config_file),
                   template_source=template_source, generation_source=str(gen_file))

    def _templates(self, templates: Any) -> dict[str, str]:
        """``chat_template`` of tokenizer_config.json: a string, or ``[{"name": ..., "template": ...}]``."""
        if templates is None:
            return {}
        if isinstance(templates, str):
            return {"default": templates}
        if isinstance(templates, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                               and isinstance(t.get("template"), str) for t in templates):
            return {t["name"]: t["template"] for t in templates}
        raise TokenizerError(f"{self.source}: chat_template must be a string or a list of {{\"name\": ..., "
                             "\"template\": ...}} strings; fix the file")

    def _add_declared_tokens(self, declared: Mapping[str, Any]) -> None:
        """Add ``added_tokens_decoder`` entries tokenizer.json lacks; every id must then agree."""
        if not isinstance(declared, Mapping) or not all(re.fullmatch(r"[0-9]+", str(k)) for k in declared):
            raise TokenizerError(f"{self.source}: added_tokens_decoder must map token ids to tokens; fix the file")
        for key, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry)
            if not content:
                continue
            entry = entry if isinstance(entry, Mapping) else {}
            if self.hf.token_to_id(content) is None:
                flags = {k: bool(entry.get(k, d)) for k, d in (("single_word", False), ("lstrip", False),
                                                                ("rstrip", False), ("normalized", False))}
                token = AddedToken(content, special=bool(entry.get("special", True)), **flags)
                (self.hf.add_special_tokens if token.special else self.hf.add_tokens)([token])
            if self.hf.token_to_id(content) != int(key):
                raise TokenizerError(f"{self.source}: added token {content!r} is declared with id {key} but "
                                     f"tokenizer.json gives it {self.hf.token_to_id(content)}; the two files "
                                     "come from different tokenizers")

    def _special_id(self, name: str, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: {name} {token!r} is not a token of tokenizer.json; fix the "
                                 "name or add it to added_tokens_decoder")
        return i

    def _single_id(self, token: str) -> int | None:
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None

    # -- text <-> ids
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens`` applies tokenizer.json's post-processor)."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; incomplete UTF-8 at either end shows as U+FFFD."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    # -- chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None = None,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the checkpoint's template (or ``chat_template``: a template name or a
        Jinja string), the way transformers' ``apply_chat_template(tokenize=False)`` does.

        ``add_generation_prompt`` defaults to True (open an assistant turn), or False with
        ``continue_final_message``: then the text ends where the final message's content (or the field it names,
        e.g. ``"reasoning_content"``) ends, whatever the template writes after it, so the model continues that
        message (transformers' rule: a marker is appended to the content, the render is cut at the marker)."""
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt exclude each other: continue the "
                                 "final message, or open a new assistant turn")
        add_generation_prompt = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        template, source = self.chat_template, self.template_source
        if chat_template in self.chat_templates:
            template, source = self.chat_templates[chat_template], f"{self.source} ({chat_template} template)"
        elif chat_template is not None:
            template = chat_template
            source = "nano's default chat template" if template == NANO_CHAT_TEMPLATE else "the given chat template"
        if template is None:
            raise TokenizerError(f"{self.source}: no chat_template; send the prompt untemplated (--raw) or "
                                 "add a template to the file")
        if not isinstance(template, str):
            raise TokenizerError(f"{source}: the chat template is a {type(template).__name__}, not text; fix it "
                                 "or use --raw")
        chat = template_messages(messages)
        final = mark_final_message(chat, continue_final_message, template, source) if continue_final_message else None
        try:
            compiled = compile_template(template)
            text = compiled.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                   **{**self._specials(), **kwargs})
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(f"{source}: chat template does not parse (line {exc.lineno}: {exc.message}); "
                                 "fix the template or use --raw") from None
        except jinja2.sandbox.SecurityError as exc:
            raise TokenizerError(f"{source}: chat template refused: {exc}; a chat template may not reach Python "
                                 "internals (use the model's original template or --raw)") from None
        except TokenizerError as exc:  # raise_exception() in the template: its own message
            raise TokenizerError(f"{source}: chat template refused the messages: {exc}") from None
        except Exception as exc:  # the template is code from a file: whatever it raises is its error
            raise TokenizerError(f"{source}: chat template failed to render ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); check the messages or use --raw") from None
        if not isinstance(text, str):
            raise TokenizerError(f"{source}: chat template rendered a {type(text).__name__}, not text")
        return text if final is None else cut_at_marker(text, final, source)

    def _specials(self) -> dict[str, str]:
        return {k: v for k, v in self.special_tokens.items() if v is not None}

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None = None,
                    **kwargs: Any) -> list[int]:
        """``apply_chat_template`` then ``encode`` (no special tokens added: the template writes them)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], think: bool | None = None,
                add_generation_prompt: bool | None = None, **kwargs: Any) -> str:
    """Render a chat, forcing reasoning on (``think=True``) or off (``False``): existing ``/think`` and
    ``/no_think`` tags are removed from system and user messages and the chosen one is appended to the
    system message (created when absent). ``think=None`` renders ``messages`` as they are."""
    messages = [dict(m) for m in messages]
    if think is not None:
        for m in messages:
            if m.get("role") in ("system", "user") and isinstance(m.get("content"), str):
                m["content"] = _strip_tags(m["content"])
        tag = "/think" if think else "/no_think"
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']} {tag}".strip()
        else:
            messages.insert(0, {"role": "system", "content": tag})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


def _strip_tags(text: str) -> str:
    for tag in THINK_TAGS:
        text = text.replace(tag, "")
    return text.strip()


# ---------------------------------------------------------------------------- streaming
class StreamDecoder:
    """Incremental detokenizer (the vLLM / TGI scheme): decode a short window of ids, previous plus new,
    and emit the text past what the previous ids gave once it no longer ends in U+FFFD (an incomplete
    UTF-8 character or byte-level piece). Concatenating every ``put`` and the final ``flush`` equals
    ``tokenizer.decode(all ids)`` for byte-level tokenizers.

    ``context_ids`` (e.g. the prompt's last ids) give the first new token its left context, so
    decoders that strip a leading space (SentencePiece ``▁``) stream correctly."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context_ids)[-5:]
        self.prefix_offset = 0             # window start: ids before it are already emitted
        self.read_offset = len(self.ids)   # ids before this are emitted; after it, held back
        self._prefix = self._decode(0, self.read_offset)  # text of ids[prefix_offset:read_offset]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Take one id; return the newly completed text ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        text = self._decode(self.prefix_offset)
        if len(text) > len(self._prefix) and not text.endswith("\ufffd"):
            delta = text[len(self._prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix = self._decode(self.prefix_offset, self.read_offset)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (U+FFFD for a character the ids never completed)."""
        delta = self._decode(self.prefix_offset)[len(self._prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix = ""
        return delta


# ---------------------------------------------------------------------------- nano's own tokenizer
def build_test_tokenizer(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with ``NANO_SPECIAL_TOKENS`` (ids 0..8; ``<think>`` and
    ``</think>`` are added tokens that decoding keeps) and write ``tokenizer.json``,
    ``tokenizer_config.json`` (``NANO_CHAT_TEMPLATE``, eos ``<SPECIAL_12>``) and
    ``generation_config.json`` (eos ``<SPECIAL_12>`` and ``</s>``) into ``out_dir``; return it loaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=NANO_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(list(texts), trainer=trainer)
    data = json.loads(hf.to_str())
    for entry in data["added_tokens"]:  # the think tags are text the user should see: not "special"
        entry["special"] = entry["content"] not in ("<think>", "</think>")
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ids = {t: data["model"]["vocab"][t] for t in NANO_SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 17,
        "clean_up_tokenization_spaces": False, "bos_token": "<s>", "eos_token": "<SPECIAL_12>",
        "pad_token": "<pad>", "unk_token": "<unk>",
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False,
                                               "special": t not in ("<think>", "</think>")}
                                 for t in NANO_SPECIAL_TOKENS},
        "chat_template": NANO_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<SPECIAL_12>"], ids["</s>"]],
           "pad_token_id": ids["<pad>"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return Tokenizer.from_dir(out)
