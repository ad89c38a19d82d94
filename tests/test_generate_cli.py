"""``nano generate`` end to end on a tiny checkpoint with nano's own tokenizer and chat template."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from model_utils import needs_cxx, randomize, tiny_config
from nanocli import cli
from nanocli_model import NanoForCausalLM, save_pretrained
from nanocli_model.tokenizer import build_test_tokenizer

TEXTS = ["The answer is 42.\nLet me think step by step.\n", "Hello world! How are you today?\n"] * 50


def build_model(root: Path) -> Path:
    """A tiny random-weight checkpoint with nano's test tokenizer and chat template: ``root/model``."""
    tok = build_test_tokenizer(root / "tok", TEXTS, vocab_size=300)
    m = NanoForCausalLM(tiny_config(vocab_size=tok.vocab_size))
    randomize(m, 1)
    files = [root / "tok" / f for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")]
    save_pretrained(m, root / "model", extra_files=files)
    return root / "model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("gen"))


def run(capsys, monkeypatch, *args, stdin=None):
    """``nano generate ...`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nano", "generate", *map(str, args)])
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def gen_json(capsys, monkeypatch, model_dir, *args):
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_greedy_is_deterministic_and_reports_timings(capsys, monkeypatch, model_dir):
    a = gen_json(capsys, monkeypatch, model_dir, "What is 2+2?", "--greedy", "--max-new-tokens", "12")
    b = gen_json(capsys, monkeypatch, model_dir, "What is 2+2?", "--greedy", "--max-new-tokens", "12")
    assert a["outputs"][0]["generated_ids"] == b["outputs"][0]["generated_ids"]
    assert a["generated_tokens"] >= 1 and a["prompt_tokens"] == len(a["outputs"][0]["prompt_ids"])
    assert a["decode_tokens_per_s"] > 0 and a["peak_memory_bytes"] > 0
    assert a["kernels"] == "reference" and "CUDA tensors" in a["kernels_detail"]  # says what ran, and why


def test_stats_line_names_the_kernels_and_a_gpu_without_them_says_why(capsys, monkeypatch, model_dir):
    from nanocli.commands.generate import show_generation_stats
    from nanocli.stages.generate import GenerateResult

    code, _, err = run(capsys, monkeypatch, "-m", model_dir, "hi", "--greedy", "--max-new-tokens", "2")
    assert code == 0 and "kernels reference" in " ".join(err.split())  # (rich wraps at the terminal width)
    stats = type("S", (), dict(prompt_tokens=3, generated_tokens=2, prefill_tokens_per_s=1.0, compile_seconds=0.0,
                               decode_tokens_per_s=1.0, peak_memory_bytes=1, peak_memory_source="cuda"))()
    detail = "kernels: scan/step mamba-ssm 2.3.2.post1 (Triton), conv pure PyTorch (causal-conv1d not importable)"
    show_generation_stats(GenerateResult([], stats, "cuda", "bfloat16", "eager", "mamba-ssm", detail))
    err = capsys.readouterr().err
    assert "kernels mamba-ssm" in err and "note: " + detail in " ".join(err.split())


def test_seeded_sampling_is_reproducible(capsys, monkeypatch, model_dir):
    args = ("hello", "--temperature", "1.0", "--top-p", "1", "--max-new-tokens", "16", "--ignore-eos")
    a = gen_json(capsys, monkeypatch, model_dir, *args, "--seed", "3")["outputs"][0]["generated_ids"]
    b = gen_json(capsys, monkeypatch, model_dir, *args, "--seed", "3")["outputs"][0]["generated_ids"]
    c = gen_json(capsys, monkeypatch, model_dir, *args, "--seed", "4")["outputs"][0]["generated_ids"]
    assert a == b and a != c


def test_think_and_no_think_templates(capsys, monkeypatch, model_dir):
    from nanocli_model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    on = gen_json(capsys, monkeypatch, model_dir, "hi", "--greedy", "--max-new-tokens", "2")["outputs"][0]
    off = gen_json(capsys, monkeypatch, model_dir, "hi", "--no-think", "--greedy", "--max-new-tokens", "2")
    off = off["outputs"][0]
    assert tok.decode(on["prompt_ids"]).endswith("<SPECIAL_11>Assistant\n<think>\n")
    assert tok.decode(off["prompt_ids"]).endswith("<SPECIAL_11>Assistant\n<think></think>")
    assert off["thinking"] == "" and off["answer"] == off["text"].strip()
    raw = gen_json(capsys, monkeypatch, model_dir, "hi", "--raw", "--greedy", "--max-new-tokens", "2")
    assert "<SPECIAL_11>" not in tok.decode(raw["outputs"][0]["prompt_ids"])


@pytest.mark.parametrize("budget,grace", [(4, 3), (0, 0), (6, 0)])
def test_thinking_budget_closes_the_span(capsys, monkeypatch, model_dir, budget, grace):
    d = gen_json(capsys, monkeypatch, model_dir, "Why?", "--greedy", "--ignore-eos", "--max-new-tokens", "40",
                 "--thinking-budget", budget, "--thinking-grace", grace)
    o = d["outputs"][0]
    assert o["thinking_tokens"] <= budget + grace
    assert "</think>" in o["text"]
    if o["budget_forced"]:
        assert o["thinking_tokens"] >= budget


LLAMA_CPP_TEMPLATE = (Path(__file__).parent / "fixtures" / "chat_templates" /
                      "llama.cpp-NVIDIA-Nemotron-Nano-v2.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def released_template_dir(model_dir, tmp_path_factory):
    """The same model with llama.cpp's copy of the card's template (generation prompt ``<think>\n\n``)."""
    out = tmp_path_factory.mktemp("released") / "model"
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").write_text(LLAMA_CPP_TEMPLATE, encoding="utf-8")
    return out


@pytest.mark.parametrize("budget", [4, 9])
def test_budget_with_a_think_blank_line_generation_prompt(capsys, monkeypatch, released_template_dir, budget):
    """The issue's case: a prompt ending ``<think>\n\n`` opens the span, so the budget ends it with the card's
    close (``.\n</think>\n\n``, the period only when the thinking lacks one)."""
    from nanocli_model.tokenizer import Tokenizer

    d = gen_json(capsys, monkeypatch, released_template_dir, "Why?", "--greedy", "--ignore-eos", "--max-new-tokens",
                 "40", "--thinking-budget", budget, "--thinking-grace", "0")
    o = d["outputs"][0]
    tok = Tokenizer.from_dir(released_template_dir)
    assert tok.decode(o["prompt_ids"]).endswith("<SPECIAL_11>Assistant\n<think>\n\n")
    assert o["budget_forced"] is True and o["thinking_tokens"] == budget and o["thinking"]
    close = o["generated_ids"][budget:]
    head = tok.decode(o["generated_ids"][:budget])
    expected = ("\n</think>\n\n" if head.rstrip().endswith(".") else ".\n</think>\n\n")
    assert tok.decode(close).startswith(expected)
    assert o["answer"] == o["text"].partition("</think>")[2].strip()


def test_thinking_tokens_are_counted_without_a_budget(capsys, monkeypatch, model_dir, released_template_dir):
    from nanocli_model.tokenizer import Tokenizer

    for d in (model_dir, released_template_dir):
        o = gen_json(capsys, monkeypatch, d, "Why?", "--greedy", "--ignore-eos", "--max-new-tokens", "12")["outputs"][0]
        end = Tokenizer.from_dir(d).think_end_id
        ids = o["generated_ids"]
        assert o["thinking_tokens"] == (ids.index(end) if end in ids else len(ids)) > 0
        assert not o["budget_forced"]
        off = gen_json(capsys, monkeypatch, d, "Why?", "--no-think", "--greedy", "--max-new-tokens", "6")["outputs"][0]
        assert off["thinking_tokens"] == 0 and off["thinking"] == ""


def test_stop_string_cuts_the_text(capsys, monkeypatch, model_dir):
    base = gen_json(capsys, monkeypatch, model_dir, "Tell me", "--no-think", "--greedy", "--ignore-eos",
                    "--max-new-tokens", "30")["outputs"][0]["text"]
    stop = next(base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip() and "\ufffd" not in base[i:i + 2])
    d = gen_json(capsys, monkeypatch, model_dir, "Tell me", "--no-think", "--greedy", "--ignore-eos",
                 "--max-new-tokens", "30", "--stop", stop)["outputs"][0]
    assert d["finish_reason"] == "stop" and stop not in d["text"] and base.startswith(d["text"])
    assert d["text"] == base[:base.index(stop)]


def test_batch_mode_equals_single_prompts(capsys, monkeypatch, model_dir, tmp_path):
    prompts = ["a", "a much longer prompt than the first one", "medium prompt"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts[:2]) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": prompts[2]}]}) + "\n")
    code, _, err = run(capsys, monkeypatch, "-m", model_dir, "--input", src, "--output", tmp_path / "out.jsonl",
                       "--greedy", "--max-new-tokens", "8", "--ignore-eos")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for p, row in zip(prompts, rows):
        alone = gen_json(capsys, monkeypatch, model_dir, p, "--greedy", "--max-new-tokens", "8", "--ignore-eos")
        assert row["text"] == alone["outputs"][0]["text"]


def test_stdin_and_streaming_output(capsys, monkeypatch, model_dir):
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, "--greedy", "--max-new-tokens", "6", stdin="hello\n")
    assert code == 0 and out.startswith("<think>")
    assert "prompt" in err and "decode" in err and "tok/s" in err
    code, out, _ = run(capsys, monkeypatch, "-m", model_dir, "--greedy", "--max-new-tokens", "6", "--hide-thinking",
                       "--thinking-budget", "0", "--thinking-grace", "0", stdin="hello\n")
    assert code == 0 and "<think>" not in out


def test_interactive_chat(capsys, monkeypatch, model_dir):
    code, out, _ = run(capsys, monkeypatch, "-m", model_dir, "-i", "--greedy", "--max-new-tokens", "4",
                       stdin="hello\n/no_think\nagain\n/budget 2\n/budget x\n/reset\n/exit\n")
    assert code == 0
    assert "reasoning off" in out and "thinking budget: 2" in out and "history cleared" in out
    assert "/budget takes a number" in out


@pytest.mark.parametrize("args,needle", [
    (("-m", "/nonexistent", "hi"), "no such model directory"),
    (("hi",), "--model is required"),
    (("-m", "{model}", "--temperature", "-1", "hi"), "temperature"),
    (("-m", "{model}", "--top-p", "0", "hi"), "--top-p"),
    (("-m", "{model}", "   "), "empty"),
    (("-m", "{model}", "--device", "tpu", "hi"), "--device"),
    (("-m", "{model}", "--max-new-tokens", "5000", "hi"), "context limit"),
    (("-m", "{model}", "--max-new-tokens", "0", "hi"), "--max-new-tokens"),
    (("-m", "{model}", "--truncate", "right", "hi"), "--truncate"),
    (("-m", "{model}", "--dtype", "int4", "hi"), "--dtype"),
    (("-m", "{model}", "--thinking-budget", "-1", "hi"), "--thinking-budget"),
    (("-m", "{model}", "--min-p", "1", "hi"), "--min-p"),
])
def test_bad_input_is_one_line_exit_2(capsys, monkeypatch, model_dir, args, needle):
    code, out, err = run(capsys, monkeypatch, *[a.replace("{model}", str(model_dir)) for a in args])
    assert code == 2, err
    assert needle in err and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err


def help_line(out: str, flag: str) -> str:
    """The ``--help`` row of ``flag`` (the terminal is wide enough that a row ends with its default)."""
    return next(line for line in out.splitlines() if line.startswith(f"│ {flag} "))


def test_help_shows_the_real_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run(capsys, monkeypatch, "--help")
    assert code == 0, err
    for flag, default in (("--temperature", "0.6"), ("--top-p", "0.95"), ("--top-k", "0"), ("--min-p", "0.0"),
                          ("--repetition-penalty", "1.0"), ("--prefill-chunk", "2048"), ("--thinking-grace", "500"),
                          ("--device", "auto"), ("--dtype", "auto")):
        assert f"[default: {default}]" in help_line(out, flag), flag
    assert "auto|cpu|cuda" in help_line(out, "--device") and "-m" in help_line(out, "--model")
    assert "[default:" not in help_line(out, "--max-new-tokens")  # no fixed default: what the context leaves


def test_missing_tokenizer_is_one_line(capsys, monkeypatch, model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run(capsys, monkeypatch, "-m", bare, "hi")
    assert code == 2 and "tokenizer.json" in err and err.count("\n") == 1


def test_truncate_left_keeps_the_end(capsys, monkeypatch, model_dir):
    d = gen_json(capsys, monkeypatch, model_dir, "x " * 300, "--greedy", "--max-new-tokens", "4",
                 "--max-context", "64", "--truncate", "left")
    assert len(d["outputs"][0]["prompt_ids"]) == 60


@pytest.fixture(scope="module")
def decode_cache(tmp_path_factory):
    """A nano cache directory of this module's own: its compiled decode libraries start empty."""
    return tmp_path_factory.mktemp("nano-cache")


@needs_cxx
def test_compile_gives_the_eager_tokens_compiles_once_and_says_so(capsys, monkeypatch, model_dir, decode_cache):
    from nanocli.stages import generate as gen

    monkeypatch.setenv("NANO_CACHE", str(decode_cache))
    args = ("-m", model_dir, "What is 2+2?", "--greedy", "--max-new-tokens", "12", "--ignore-eos")
    eager = gen_json(capsys, monkeypatch, model_dir, *args[2:], "--no-compile")
    assert eager["decode"] == "eager" and eager["compile_seconds"] == 0 and eager["compile_source"] == ""
    runs = []
    for _ in range(2):  # the first run compiles and keeps the library, the second loads it
        code, out, err = run(capsys, monkeypatch, *args, "--compile", "--json")
        assert code == 0, err
        runs.append((json.loads(out), " ".join(err.split())))
    (first, first_err), (second, second_err) = runs
    for d in (first, second):
        assert d["outputs"][0]["generated_ids"] == eager["outputs"][0]["generated_ids"]
        assert d["decode"] == "compiled" and d["compile_seconds"] > 0
    assert first["compile_source"] == "built" and second["compile_source"] == "cache"
    assert "compiling the decode step for this model shape" in first_err and "compiled and cached in" in first_err
    assert "compiling" not in second_err and "loaded from the cache in" in second_err
    assert second["compile_seconds"] < first["compile_seconds"] / 5
    assert [p.suffix for p in (decode_cache / "decode").iterdir()] == [".pt2"]
    # no flag: the tiny model stays eager (gen.AUTO_COMPILE_BYTES); a model over the bar compiles by default
    assert gen_json(capsys, monkeypatch, model_dir, *args[2:])["decode"] == "eager"
    monkeypatch.setattr(gen, "AUTO_COMPILE_BYTES", 0)
    default = gen_json(capsys, monkeypatch, model_dir, *args[2:])
    assert default["decode"] == "compiled" and default["compile_source"] == "cache"
    assert gen_json(capsys, monkeypatch, model_dir, *args[2:], "--no-compile")["decode"] == "eager"


def test_the_default_compiles_float32_cpu_models_over_the_bar_with_a_compiler(monkeypatch):
    import torch

    from nanocli.stages import generate as gen

    model = NanoForCausalLM(tiny_config())
    weights = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(gen, "AUTO_COMPILE_BYTES", weights)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert gen.auto_compile(model)
    monkeypatch.setattr(gen, "AUTO_COMPILE_BYTES", weights + 1)
    assert not gen.auto_compile(model)  # under the bar
    monkeypatch.setattr(gen, "AUTO_COMPILE_BYTES", 0)
    assert not gen.auto_compile(model.to(torch.bfloat16))  # not what the ahead-of-time step runs
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not gen.auto_compile(model.float())  # nothing to compile with
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    monkeypatch.setenv("CXX", "clang++")
    assert not gen.auto_compile(model.float())  # inductor would compile with $CXX, which is not there
    monkeypatch.delenv("CXX")
    assert gen.auto_compile(model.float())


def test_a_failed_compile_falls_back_to_eager_and_says_why(capsys, monkeypatch, model_dir, tmp_path):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler")

    monkeypatch.setenv("NANO_CACHE", str(tmp_path))  # no library to load: it must compile
    monkeypatch.setattr(torch.export, "export", broken)
    args = ("What is 2+2?", "--greedy", "--max-new-tokens", "8", "--ignore-eos")
    eager = gen_json(capsys, monkeypatch, model_dir, *args)
    fell = gen_json(capsys, monkeypatch, model_dir, *args, "--compile")
    assert fell["outputs"][0]["generated_ids"] == eager["outputs"][0]["generated_ids"]
    assert fell["decode"].startswith("eager (compile failed: RuntimeError: InductorError: no C++ compiler")
    code, out, err = run(capsys, monkeypatch, "-m", model_dir, *args, "--compile")
    assert code == 0 and "note: the compiled decode step did not run: decode ran eager (compile failed" in " ".join(err.split())


def test_chat_session_keeps_the_history_and_its_own_settings(model_dir):
    from nanocli.stages.chat import ChatSession
    from nanocli.stages.generate import GenerateOptions

    options = GenerateOptions(model=str(model_dir), greedy=True, max_new_tokens=3)
    session = ChatSession(options)
    assert session.send("/no_think").note == "(reasoning off)" and session.options.think is False
    assert options.think is None  # the caller's options are left as they were
    assert session.send("/budget 2").note == "(thinking budget: 2)" and session.options.thinking_budget == 2
    assert session.send("/budget x").error == "/budget takes a number of tokens or 'off'"
    assert session.send("/budget").note == "(thinking budget: off)" and session.options.thinking_budget is None
    assert session.send("   ") == type(session.send("  "))()  # an empty line does nothing
    streamed = []
    turn = session.send("hello", on_text=lambda row, text, thinking: streamed.append(text))
    assert turn.generated and turn.result is not None and streamed
    assert turn.result.outputs[0].text.startswith("".join(streamed))  # streamed as it came
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == turn.result.outputs[0].answer
    assert session.send("again").result is not None and len(session.history) == 4
    assert session.send("/reset").note == "(history cleared)" and session.history == []
    assert session.send("/exit").done and session.send("/quit").done
