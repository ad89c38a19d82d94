"""``nano generate --input FILE.jsonl``: where the results go (stdout JSONL, --output, --json), the per-line
settings (honoured, each line equal to its prompt run alone with the same flags) and the one-line errors."""

import json

import pytest
from test_generate_cli import build_model, run

FLAGS = ("--greedy", "--max-new-tokens", "6", "--ignore-eos")
RECORD_KEYS = {"id", "text", "thinking", "answer", "finish_reason", "prompt_tokens", "generated_tokens",
               "thinking_tokens", "budget_forced"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("batch"))


def write_lines(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prompts(tmp_path):
    """Three lines (an id, none, messages) and a blank line between."""
    return write_lines(tmp_path / "in.jsonl", {"id": "first", "prompt": "hi"}, "",
                       {"prompt": "a longer prompt than the first"},
                       {"messages": [{"role": "user", "content": "medium"}]})


def alone(capsys, monkeypatch, model_dir, prompt, *flags):
    """The one-shot run of ``prompt`` with ``flags``: its first output as --json gives it."""
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, prompt, "--json", *flags)
    assert code == 0, err
    return json.loads(out)["outputs"][0]


def test_batch_without_output_prints_jsonl_records(capsys, monkeypatch, model_dir, prompts):
    """The issue's case: --input without --output (it crashed once) prints one record a line on stdout."""
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--input", prompts, *FLAGS)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["first", 1, 2]  # the line's own id, else its index among the prompts
    assert rows[0]["prompt"] == "hi" and rows[2]["messages"] == [{"role": "user", "content": "medium"}]
    assert all(RECORD_KEYS <= set(r) for r in rows)
    assert all(r["generated_tokens"] == 6 and r["finish_reason"] == "length" for r in rows)
    assert "tok/s" in err  # the figures line stays on stderr
    assert rows[1]["text"] == alone(capsys, monkeypatch, model_dir, "a longer prompt than the first", *FLAGS)["text"]


@pytest.mark.parametrize("to_file", [False, True], ids=["stdout", "output"])
@pytest.mark.parametrize("as_json", [False, True], ids=["jsonl", "json"])
def test_input_output_json_combinations(capsys, monkeypatch, model_dir, prompts, tmp_path, to_file, as_json):
    target = tmp_path / f"out-{'x' * 90}.jsonl"  # longer than a line: the message keeps it whole
    args = ["-m", model_dir, "--input", prompts, *FLAGS] + (["--output", target] if to_file else []) + \
        (["--json"] if as_json else [])
    code, out, err = run(capsys, monkeypatch, *args)
    assert code == 0, err
    written = [json.loads(line) for line in target.read_text().splitlines()] if to_file else None
    if as_json:  # one object for the whole run: each output its line's record plus the token ids
        whole = json.loads(out)
        assert whole["batches"] == 1 and isinstance(whole["seed"], int) and whole["generated_tokens"] == 18
        outputs = whole["outputs"]
        assert [o["id"] for o in outputs] == ["first", 1, 2]
        assert all(len(o["generated_ids"]) == 6 and o["prompt_ids"] for o in outputs)
        if to_file:  # the file holds the same records, without the ids
            assert written == [{k: v for k, v in o.items() if k not in ("prompt_ids", "generated_ids")}
                               for o in outputs]
    elif to_file:
        assert out == "" and f"wrote 3 results to {target}\n" in err  # one line, the path unbroken
    else:
        assert [json.loads(line)["id"] for line in out.splitlines()] == ["first", 1, 2]
    if to_file:
        assert [r["id"] for r in written] == ["first", 1, 2] and all(RECORD_KEYS <= set(r) for r in written)
        assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_stdout_records_equal_the_output_file(capsys, monkeypatch, model_dir, prompts, tmp_path):
    """One function makes both: the stdout lines and the --output lines are the same records."""
    _, out, _ = run(capsys, monkeypatch, "-m", model_dir, "--input", prompts, *FLAGS)
    code, _, err = run(capsys, monkeypatch, "-m", model_dir, "--input", prompts, *FLAGS, "--output", tmp_path / "o.jsonl")
    assert code == 0, err
    assert out.splitlines() == (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()


def test_a_single_prompt_with_output_writes_its_record(capsys, monkeypatch, model_dir, tmp_path):
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "hello", *FLAGS, "--output", tmp_path / "o.jsonl")
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert row["id"] == 0 and row["prompt"] == "hello" and row["text"] and out.startswith("<think>")  # streamed too


def test_per_line_settings_are_honoured(capsys, monkeypatch, model_dir, tmp_path):
    """Each line equals its prompt run alone with the flags its fields stand for; the order is the file's."""
    lines = [
        ({"prompt": "plain"}, ()),
        ({"prompt": "short", "max_new_tokens": 2}, ("--max-new-tokens", "2")),
        ({"prompt": "no thinking", "think": False}, ("--no-think",)),
        ({"prompt": "with a system", "system": "Be brief."}, ("--system", "Be brief.")),
        ({"prompt": "sampled", "temperature": 1.0, "top_p": 0.9, "top_k": 20, "min_p": 0.01, "seed": 7},
         ("--temperature", "1.0", "--top-p", "0.9", "--top-k", "20", "--min-p", "0.01", "--seed", "7")),
        ({"prompt": "budget", "thinking_budget": 2, "max_new_tokens": 12},
         ("--thinking-budget", "2", "--max-new-tokens", "12")),
        ({"prompt": "plain again"}, ()),
    ]
    src = write_lines(tmp_path / "in.jsonl", *(row for row, _ in lines))
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--input", src, *FLAGS, "--json",
                         "--thinking-grace", "0")
    assert code == 0, err
    whole = json.loads(out)
    assert whole["batches"] == 6 and "6 batches" in " ".join(err.split())
    for (row, flags), got in zip(lines, whole["outputs"]):
        base = FLAGS[1:] if "temperature" in row else FLAGS  # --greedy would win over --temperature alone
        expected = alone(capsys, monkeypatch, model_dir, row["prompt"], *base, "--thinking-grace", "0", *flags)
        assert got["prompt"] == row["prompt"]
        assert got["generated_ids"] == expected["generated_ids"], row
        assert got["prompt_ids"] == expected["prompt_ids"], row
    by_prompt = {o["prompt"]: o for o in whole["outputs"]}
    assert by_prompt["short"]["generated_tokens"] == 2
    assert by_prompt["no thinking"]["thinking_tokens"] == 0 and by_prompt["no thinking"]["thinking"] == ""
    assert by_prompt["budget"]["budget_forced"] and by_prompt["budget"]["thinking_tokens"] == 2


def test_stop_and_a_row_temperature_over_greedy(capsys, monkeypatch, model_dir, tmp_path):
    base = alone(capsys, monkeypatch, model_dir, "Tell me", *FLAGS, "--no-think", "--max-new-tokens", "20")["text"]
    stop = next(base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip() and "\ufffd" not in base[i:i + 2])
    src = write_lines(tmp_path / "in.jsonl", {"prompt": "Tell me", "think": False, "stop": [stop]},
                      {"prompt": "Tell me", "think": False, "temperature": 1.0, "top_p": 1.0, "seed": 3})
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--input", src, *FLAGS, "--max-new-tokens", "20")
    assert code == 0, err
    stopped, sampled = (json.loads(line) for line in out.splitlines())
    assert stopped["finish_reason"] == "stop" and stopped["text"] == base[:base.index(stop)]
    # the line's temperature wins over --greedy: the same as the sampled run alone
    expected = alone(capsys, monkeypatch, model_dir, "Tell me", "--no-think", "--max-new-tokens", "20",
                     "--ignore-eos", "--temperature", "1.0", "--top-p", "1.0", "--seed", "3")
    assert sampled["text"] == expected["text"]


def test_the_reported_seed_reruns_a_sampled_file(capsys, monkeypatch, model_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", {"prompt": "one"}, {"prompt": "two", "top_k": 5})
    flags = ("--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "8", "--ignore-eos", "--json")
    _, out, _ = run(capsys, monkeypatch, "-m", model_dir, "--input", src, *flags)
    first = json.loads(out)
    _, out, _ = run(capsys, monkeypatch, "-m", model_dir, "--input", src, *flags, "--seed", first["seed"])
    again = json.loads(out)
    assert [o["generated_ids"] for o in again["outputs"]] == [o["generated_ids"] for o in first["outputs"]]


@pytest.mark.parametrize("line,needle", [
    ({"prompt": "a", "temp": 1}, 'in.jsonl:3: unknown field "temp"; a line takes id, prompt, messages, think, '
                                 "system, temperature, top_p, top_k, min_p, max_new_tokens, seed, stop, thinking_budget"),
    ({"prompt": "a", "top_p": 0}, 'in.jsonl:3: "top_p" must be in (0, 1], got 0'),
    ({"prompt": "a", "temperature": -1}, 'in.jsonl:3: "temperature" must be a finite number >= 0'),
    ({"prompt": "a", "top_k": 1.5}, 'in.jsonl:3: "top_k" must be an integer'),
    ({"prompt": "a", "min_p": 1}, 'in.jsonl:3: "min_p" must be in [0, 1)'),
    ({"prompt": "a", "max_new_tokens": 0}, 'in.jsonl:3: "max_new_tokens" must be at least 1'),
    ({"prompt": "a", "seed": 2 ** 70}, 'in.jsonl:3: "seed" must be an integer in'),
    ({"prompt": "a", "stop": [1]}, 'in.jsonl:3: "stop" must be a string or a list of strings'),
    ({"prompt": "a", "thinking_budget": -1}, 'in.jsonl:3: "thinking_budget" must be at least 0'),
    ({"prompt": "a", "think": "yes"}, 'in.jsonl:3: "think" must be true, false or null'),
    ({"prompt": "a", "system": 3}, 'in.jsonl:3: "system" must be a string or null'),
    ({"prompt": "a", "temperature": None}, 'in.jsonl:3: "temperature" must be a number, got null'),
    ({"prompt": "a", "id": [1]}, 'in.jsonl:3: "id" must be a string or an integer'),
    ({"prompt": "a", "messages": []}, "in.jsonl:3: give either \"prompt\" (a string) or \"messages\" (a list), not both"),
    ({"id": 1}, "found neither"),
    ({"prompt": ["a"]}, 'in.jsonl:3: "prompt" must be a string'),
    ({"messages": [{"content": "a"}]}, 'in.jsonl:3: "messages"[0]: message role must be a string'),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "system": "x"},
     'in.jsonl:3: "system" and a system message in "messages"'),
    ({"prompt": "a", "max_new_tokens": 5000}, "prompt tokens + 5000 new tokens exceed the context"),
    ("[1, 2]", "in.jsonl:3: expected an object"),
    ('{"prompt": ', "in.jsonl:3: not valid JSON"),
])
def test_a_bad_line_is_one_error_naming_file_line_and_field(capsys, monkeypatch, model_dir, tmp_path, line, needle):
    src = write_lines(tmp_path / "in.jsonl", {"prompt": "fine"}, "", line, {"prompt": "after"})
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--input", src, *FLAGS)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in " ".join(err.split()), err


@pytest.mark.parametrize("line,needle", [
    ({"prompt": "a", "system": "s"}, '"system" has no effect with --raw'),
    ({"prompt": "a", "think": True}, '"think" has no effect with --raw'),
    ({"messages": [{"role": "user", "content": "a"}]}, '"messages" with --raw'),
])
def test_template_fields_are_refused_with_raw(capsys, monkeypatch, model_dir, tmp_path, line, needle):
    src = write_lines(tmp_path / "in.jsonl", line)
    code, _, err = run(capsys, monkeypatch, "-m", model_dir, "--input", src, "--raw", *FLAGS)
    assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("args,needle", [
    (("--input", "{src}", "--output", "{tmp}/missing/out.jsonl"), "the directory {tmp}/missing does not exist"),
    (("--input", "{src}", "--output", "{tmp}"), "is a directory"),
    (("hi", "--output", "{tmp}/missing/out.jsonl"), "does not exist"),
    (("--input", "{src}", "hi"), "--input reads the prompts from its file"),
    (("--input", "{tmp}/none.jsonl"), "none.jsonl: cannot be read"),
    (("--input", "{empty}"), "no prompts in the file"),
    (("-i", "--json"), "--interactive reads its prompts from the terminal: drop --json"),
    (("-i", "--input", "{src}", "--output", "{tmp}/o.jsonl"), "drop --input, --output"),
])
def test_bad_batch_arguments_fail_before_the_model_loads(capsys, monkeypatch, tmp_path, args, needle):
    src = write_lines(tmp_path / "in.jsonl", {"prompt": "a"})
    empty = write_lines(tmp_path / "empty.jsonl", "")
    sub = {"{src}": str(src), "{tmp}": str(tmp_path), "{empty}": str(empty)}

    def fill(text):
        for k, v in sub.items():
            text = text.replace(k, v)
        return text

    # no model directory exists: these fail on their own, before --model is looked at
    code, _, err = run(capsys, monkeypatch, "-m", tmp_path / "no-model", *map(fill, args))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert fill(needle) in " ".join(err.split()), err
