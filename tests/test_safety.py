"""No unsafe loading anywhere (issue #10, deliverable 7).

* A source scan (``ast``, over nanocli/, nanocli_model/, benchmarks/) fails on a new pickle import,
  ``torch.load`` without ``weights_only=True``, a non-safe YAML loader, ``eval`` / ``exec`` /
  ``compile``, ``numpy.load(allow_pickle=True)``, or a Jinja environment that is not sandboxed. The
  scanner itself is tested on snippets, so the check can fail.
* A malicious ``chat_template`` (Python internals through attributes, items, ``attr``, ``format``;
  mutating a list; building a huge string or number) is refused with a one-line ``TokenizerError``
  by the library and with exit code 2 by ``nano generate``; ordinary templates still render.
* YAML with Python tags and pickle weights are refused before anything runs.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanocli_model.errors import CheckpointError, NanoError, TokenizerError

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("nanocli", "nanocli_model", "benchmarks")
ENV = {**{k: v for k, v in os.environ.items() if k != "NANO_PROFILES_DIR"}, "COLUMNS": "100"}

# ---------------------------------------------------------------------------------------------- source scan
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
               "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
UNSAFE_JINJA = {"Environment", "Template", "NativeEnvironment", "NativeTemplate"}
DYNAMIC_CODE = {"eval", "exec", "compile", "__import__"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


UNSAFE_JINJA_NAMES = {f"jinja2.{n}" for n in UNSAFE_JINJA} | {f"jinja2.environment.{n}" for n in UNSAFE_JINJA}


def _resolve(dotted: str, aliases: dict[str, str]) -> str:
    """``dotted`` with its first name replaced by what it was imported as."""
    head, _, rest = dotted.partition(".")
    return f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)


def _kwarg_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loading(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe-loading construct in ``source``, as ``file:line: what``."""
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    aliases: dict[str, str] = {}  # local name -> module or module.attr it stands for
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
                if a.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"import {a.name} (pickle-family deserialisation)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module.split(".")[0]
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if base in PICKLE_MODULES:
                    flag(node, f"from {node.module} import {a.name} (pickle-family deserialisation)")
                elif base == "yaml" and a.name in UNSAFE_YAML:
                    flag(node, f"from yaml import {a.name} (use yaml.safe_load)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            full = _resolve(dotted, aliases)
            if full.startswith("yaml.") and full.split(".")[-1] in UNSAFE_YAML and full.count(".") == 1:
                flag(node, f"{dotted} (use yaml.safe_load)")
            if full in ("pandas.read_pickle", "torch.jit.load") or full.endswith(".read_pickle"):
                flag(node, f"{dotted} (unpickles)")
        if isinstance(node, ast.ClassDef):  # a subclass of an unsandboxed environment
            for base in node.bases:
                if _resolve(_dotted(base), aliases) in UNSAFE_JINJA_NAMES:
                    flag(node, f"class {node.name}({_dotted(base)}) (subclass jinja2.sandbox instead)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        full = _resolve(name, aliases)
        if full in UNSAFE_JINJA_NAMES:
            flag(node, f"{name}() (use jinja2.sandbox.ImmutableSandboxedEnvironment)")
        if isinstance(node.func, ast.Name) and node.func.id in DYNAMIC_CODE and node.func.id not in aliases:
            flag(node, f"{node.func.id}() (runs text as code)")
        if full == "torch.load" and not _kwarg_is(node, "weights_only", True):
            flag(node, "torch.load without weights_only=True")
        if full in ("numpy.load", "np.load") and not all(
                k.arg != "allow_pickle" or (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords):
            flag(node, "numpy.load with allow_pickle")
    return found


def _sources() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_the_source_has_no_unsafe_loading():
    files = _sources()
    assert len(files) > 40, "the scan did not find the source tree"
    found = [hit for f in files for hit in unsafe_loading(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not found, "unsafe loading:\n" + "\n".join(found)


def test_the_scan_sees_the_safe_uses_it_must_allow():
    """The places that read untrusted bytes are there and use the safe spelling (so the scan looked)."""
    text = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in _sources()}
    assert "weights_only=True" in text["nanocli/train/checkpoints.py"]
    assert "yaml.safe_load" in text["nanocli/profiles/__init__.py"] and "yaml.safe_load" in text["nanocli/train/recipe.py"]
    assert "ImmutableSandboxedEnvironment" in text["nanocli_model/chat_template.py"]


@pytest.mark.parametrize("snippet, what", [
    ("import pickle", "pickle"),
    ("import cloudpickle as cp", "pickle"),
    ("from pickle import loads", "pickle"),
    ("import torch\ntorch.load(f)", "weights_only"),
    ("import torch\ntorch.load(f, weights_only=False)", "weights_only"),
    ("import torch as t\nt.load(f, map_location='cpu')", "weights_only"),
    ("from torch import load\nload(f)", "weights_only"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "safe_load"),
    ("import yaml\nyaml.full_load(text)", "safe_load"),
    ("import yaml\nyaml.unsafe_load(text)", "safe_load"),
    ("from yaml import load", "safe_load"),
    ("eval(config['act'])", "as code"),
    ("exec(text)", "as code"),
    ("compile(src, 'f', 'exec')", "as code"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "allow_pickle"),
    ("import jinja2\njinja2.Environment().from_string(t)", "sandbox"),
    ("from jinja2 import Template\nTemplate(t)", "sandbox"),
    ("import jinja2\nclass E(jinja2.Environment): pass", "sandbox"),
    ("import pandas as pd\npd.read_pickle(p)", "unpickles"),
])
def test_the_scan_catches_each_unsafe_pattern(snippet, what):
    found = unsafe_loading(snippet)
    assert found and what in found[0], found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(f, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(text)\nyaml.safe_dump(data)",
    "import numpy as np\nnp.load(p, mmap_mode='r')",
    "import jinja2.sandbox\njinja2.sandbox.ImmutableSandboxedEnvironment()",
    "model.eval()",
    "import torch\ntorch.save(state, f)",
    "import jinja2\ndef f(t: jinja2.Template) -> jinja2.Environment: ...",
])
def test_the_scan_allows_the_safe_spellings(snippet):
    assert unsafe_loading(snippet) == []


# ---------------------------------------------------------------------------------------------- chat templates
MALICIOUS_TEMPLATES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__ }}",  # a plain sandbox renders this as empty text; nano refuses it
    "{{ joiner.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ messages[0]['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{% set a = '__cla' ~ 'ss__' %}{{ ''|attr(a) }}",  # built at run time: caught by the sandbox
    "{{ '{0.__class__}'.format(1) }}",
    "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{% set l = [] %}{{ l.append(1) }}",  # mutation: the immutable sandbox
    "{{ 'x' * 1000000000 }}",  # memory: refused before it is built
    "{{ [0] * 1000000000 }}",
    "{{ 7 ** 1000000 }}",
]
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from nanocli_model.tokenizer import build_test_tokenizer

    path = tmp_path_factory.mktemp("safety-tok")
    build_test_tokenizer(path, ["the cat sat on the mat"] * 10, vocab_size=64)
    return path


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


@pytest.mark.parametrize("template", MALICIOUS_TEMPLATES)
def test_malicious_chat_template_is_refused_by_the_library(tok_dir, tmp_path, template):
    from nanocli_model.tokenizer import Tokenizer

    path = _with_template(tok_dir, tmp_path / "tok", template)
    tok = Tokenizer.from_dir(path)
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template(USER)
    message = str(err.value)
    assert "refused" in message and str(path / "tokenizer_config.json") in message and "\n" not in message
    assert not (Path.cwd() / "PWNED").exists()
    with pytest.raises(TokenizerError, match="refused"):  # a template passed in directly: the same rule
        tok.apply_chat_template(USER, chat_template=template)


def test_internal_attribute_refusal_names_the_attribute_and_line(tok_dir):
    from nanocli_model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    with pytest.raises(TokenizerError, match=r"'__globals__' \(line 2\)"):
        tok.apply_chat_template(USER, chat_template="ok\n{{ cycler.__init__.__globals__ }}")


@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}{{ loop.index0 }}:{{ m['role'] }}={{ m.content }};{% endfor %}", "0:user=hi;"),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "1"),
    ("{{ messages | tojson }}", '[{"role": "user", "content": "hi"}]'),
    ("{{ (messages | first).content | upper }}{{ '-' * 3 }}{{ 2 ** 10 }}", "HI---1024"),
    ("{%- if messages[0]['role'] == 'user' %}{{ bos_token + messages[0]['content'].strip() }}{% endif -%}", "<s>hi"),
    ("{{ '%s!' % messages[0].content }}{{ messages[0].get('name', 'anon') }}", "hi!anon"),
])
def test_ordinary_templates_still_render(tok_dir, template, expected):
    from nanocli_model.tokenizer import Tokenizer

    assert Tokenizer.from_dir(tok_dir).apply_chat_template(USER, chat_template=template) == expected


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir) -> Path:
    import torch

    from nanocli_model.checkpoint import save_pretrained
    from nanocli_model.model import NanoForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from model_utils import tiny_config

    torch.manual_seed(0)
    path = save_pretrained(NanoForCausalLM(tiny_config(vocab_size=288)), tmp_path_factory.mktemp("safety") / "m")
    for f in tok_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("template", [MALICIOUS_TEMPLATES[0], MALICIOUS_TEMPLATES[1]])
def test_malicious_chat_template_is_refused_by_nano_generate(model_dir, tmp_path, template):
    path = _with_template(model_dir, tmp_path / "m", template)
    before = _tree(tmp_path)
    result = subprocess.run([sys.executable, "-m", "nanocli.cli", "generate", "--model", str(path), "--device", "cpu",
                             "--max-new-tokens", "2", "hi"], capture_output=True, text=True, timeout=120, env=ENV,
                            cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "chat template refused" in lines[0] and "Traceback" not in result.stderr
    assert _tree(tmp_path) == before and not (tmp_path / "PWNED").exists()


def test_a_chat_template_jinja_file_is_held_to_the_same_rule(tok_dir, tmp_path):
    from nanocli_model.tokenizer import Tokenizer

    path = tmp_path / "tok"
    shutil.copytree(tok_dir, path)
    (path / "chat_template.jinja").write_text(MALICIOUS_TEMPLATES[1], encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja: chat template refused"):
        Tokenizer.from_dir(path).apply_chat_template(USER)


# ---------------------------------------------------------------------------------------------- YAML, pickle
class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("loader", ["model", "gpu", "recipe"])
def test_yaml_python_tags_are_refused_not_run(tmp_path, loader):
    from nanocli.profiles import load_gpu_profile, load_model_profile
    from nanocli.train.recipe import read_recipe

    marker = tmp_path / "PWNED"
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n",
                    encoding="utf-8")
    load = {"model": load_model_profile, "gpu": load_gpu_profile, "recipe": read_recipe}[loader]
    with pytest.raises(NanoError, match="not valid YAML"):
        load(str(path))
    assert not marker.exists()


def test_pickle_weights_are_refused_not_unpickled(model_dir, tmp_path):
    from nanocli_model import load_pretrained

    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_pretrained(path)
    assert not marker.exists()
