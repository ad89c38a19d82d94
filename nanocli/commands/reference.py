"""``docs/CLI.md``: every command and every flag, written from the option layer so it cannot drift.

``python -m nanocli.commands.reference > docs/CLI.md`` rewrites the page; ``tests/test_cli_help.py`` fails when
the page in the repository differs from what this writes. The page walks the same click commands that
``nano --help`` renders (``cli.build_app``): the panels, metavars, defaults, help texts, the old spellings of
renamed flags and the examples all come from there; only the conventions below are written here.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

CONVENTIONS = """\
## Conventions

- **One model flag.** `-m, --model MODEL` wherever a command reads one model (`info`, `fit-check`, `generate`,
  `eval`, `bench`, `prune`, `pretrain` to continue training, `align`). MODEL is a model directory
  (`config.json`, `model.safetensors`, the tokenizer), or a run directory of `nano pretrain` / `align` /
  `distill` (its `final/`, else its newest `checkpoint-N/`); where no weights are needed (`info`, `fit-check`,
  `bench`, `prune --dry-run`) also a model profile name (`nano profiles`) or a `config.json`. `nano distill`
  reads two models, `--teacher` and `--student`; `nano info` also takes the model as its argument.
- **`--out` is a directory, `--output` a file.** `--out DIR` is where a command writes a run, a checkpoint or
  the demo's stages; `--output FILE` is one file written (`generate --output FILE.jsonl`, `eval --output
  FILE.json`); `--plot FILE` a PNG; `--input FILE` and `--file FILE` are files read.
- **`--json` is one line.** `--json` prints one JSON object on one line; `--json-indent N` prints it indented
  (and implies `--json`), every list of numbers or strings on one line.
- **One meaning per name.** `--batch N` is a whole number of sequences in every command (`bench --max-batch`
  asks for the largest batch that fits `--memory GiB`); `--top-k` is sampling in `generate` only (the
  teacher's top-k logits are `distill --kd-top-k`, prune's distilled candidates `--distill-candidates`); `--seed N`,
  `--device auto|cpu|cuda`, `--dtype`, `--data SPEC`, `--cache-dir DIR`, `--recipe NAME|FILE` and
  `--dry-run` mean the same wherever they appear.
- **Values.** `N` a whole number (`--context`, `--prefill-chunk` of `fit-check` and `prune`, and
  `bench --lengths` also take `k` = x1024 and `m` = x1048576: `128k`), `FLOAT` a number, `TEXT` free text,
  `a|b|c` one of those words, `A,B,C` a comma-separated list, `SPEC` a data spec (files, globs, directories,
  shards or `synthetic:reasoning?...`, blended with `SOURCE@WEIGHT;SOURCE@WEIGHT`), `NAME` a profile
  (`nano profiles`) or recipe name. A flag without a value is on/off; `--x/--no-x` shows both.
- **Settings.** defaults < `--recipe` YAML < flags given on the command line. A recipe's keys are the field
  names in each table's *recipe key* column.
- **Errors.** A mistake is one line on stderr, `error: ...`, exit code 2: a bad flag or value ends with
  ``see `nano COMMAND --help` `` (and `did you mean --x?` for a near miss); a bad file names the file and the
  field. `nano fit-check` exits 1 for "does not fit". A renamed flag's old spelling still works, hidden from
  `--help`, with one `warning:` line.
- **`nano FILE`.** With nano's environment active, `nano` may be what `EDITOR=nano` runs: when the first
  argument is an existing path and no command, the line goes to the `nano` text editor on PATH, or one line
  says how to reach it.
"""


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "\\<")


def _default(param: Any) -> str:
    """The default as ``--help`` shows it (none for None, off or an empty list)."""
    value = param.default
    if not param.show_default or value is None or value is False or value in ([], ()):
        return ""
    return "on" if value is True else f"`{_cell(value)}`"


def _flag(param: Any) -> str:
    longs = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
    shorts = [o for o in param.opts if not o.startswith("--")]
    return ", ".join(f"`{o}`" for o in [*shorts, "/".join(longs)] if o)


def _section(path: str, cmd: Any, recipe_keys: bool) -> list[str]:
    from .flags import DEPRECATED, examples

    lines = [f"## `{path}`", "", _cell((cmd.help or "").split("\n\n")[0]), ""]
    rest = (cmd.help or "").split("\n\n")[1:]
    if rest:
        lines += [_cell(" ".join(rest)), ""]
    params = [p for p in cmd.params if p.name != "help"]
    arguments = [p for p in params if p.param_type_name == "argument"]
    usage = " ".join([path, "[OPTIONS]", *(f"[{p.metavar}]{'...' if p.nargs != 1 else ''}" for p in arguments)])
    if getattr(cmd, "commands", None):
        usage += " COMMAND [ARGS]..."
    lines += ["```", usage, "```", ""]
    for p in arguments:
        lines += [f"- `{p.metavar}`: {_cell(p.help or '')}"]
    if arguments:
        lines.append("")
    renamed = {p.name.split("_", 3)[3]: p.opts[0] for p in params if p.name.startswith(DEPRECATED)}
    panels: dict[str, list[Any]] = {}
    for p in params:
        if p.param_type_name == "option" and not p.hidden:
            panels.setdefault(p.rich_help_panel or "Options", []).append(p)
    for panel, group in panels.items():
        head = ["flag", "value", "default", *(["recipe key"] if recipe_keys else []), "what it sets"]
        lines += [f"**{panel}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in group:
            what = _cell(p.help or "") + (f" (old spelling `{renamed[p.name]}` still works)" if p.name in renamed
                                          else "")
            key = [f"`{p.name}`" if p.name != "recipe" else ""] if recipe_keys else []
            value = f"`{_cell(p.metavar)}`" if p.metavar else ""
            lines.append("| " + " | ".join([_flag(p), value, _default(p), *key, what]) + " |")
        lines.append("")
    shown = examples(cmd.epilog)
    if shown:
        lines += ["Examples:", "", "```bash", *(" ".join(_quoted(a) for a in e) for e in shown), "```", ""]
    return lines


def _quoted(arg: str) -> str:
    import shlex

    return arg if arg and all(c.isalnum() or c in "-_./:,=+@" for c in arg) else shlex.quote(arg)


def _walk(cmd: Any, path: str) -> list[tuple[str, Any]]:
    found = [(path, cmd)]
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        found += _walk(sub, f"{path} {name}")
    return found


def markdown() -> str:
    """The whole page."""
    from ..cli import build_app
    from . import NAMES

    root = typer.main.get_command(build_app())
    order = {name: i for i, name in enumerate(NAMES)}
    commands = sorted(_walk(root, "nano")[1:], key=lambda pc: (order.get(pc[0].split()[1], 99), pc[0]))
    lines = ["# nano command-line reference", "",
             "Every `nano` command and every flag, in the order of `nano --help`. Written by",
             "`python -m nanocli.commands.reference > docs/CLI.md` from the option layer (`nanocli/settings.py` groups",
             "through `nanocli/commands/flags.py`); `tests/test_cli_help.py` fails when this page and the code",
             "differ. `nano COMMAND --help` shows the same tables as its help panels.", "",
             CONVENTIONS, "## Commands", ""]
    lines += [f"- [`{path}`](#{path.replace(' ', '-')}): {_cell((cmd.help or '').split(chr(10))[0])}"
              for path, cmd in commands]
    lines.append("")
    for path, cmd in commands:
        recipe = any(p.name == "recipe" for p in cmd.params) and path != "nano demo"
        lines += _section(path, cmd, recipe)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
