"""``nano bench``: the pure-attention twin, the measurements' bookkeeping, JSON / plot output, bad input.

Fast (tiny profile, a few dozen tokens); no timing assertions: speed lives in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model_utils import needs_cxx
from nanocli import bench, bench_memory, cli
from nanocli.bench import BenchError, BenchOptions
from nanocli.profiles import load_model_profile
from nanocli_model import fit, memory
from nanocli_model.config import NanoConfig
from nanocli_model.errors import ConfigError

ENV_COLUMNS = {"COLUMNS": "100"}


def _config(name: str) -> NanoConfig:
    return load_model_profile(name).config


# ------------------------------------------------------------------------------------------ the twin
@pytest.mark.parametrize("name", ["tiny", "small", "medium", "nemotron-nano-9b-v2", "nemotron-nano-12b-v2-base"])
def test_twin_is_pure_attention_of_the_same_width_and_size(name):
    c = _config(name)
    twin = bench.transformer_twin(c)
    assert set(twin.hybrid_override_pattern) == {"*", "-"}  # attention + MLP only, no Mamba
    assert twin.count("mamba") == 0 and twin.count("attention") == twin.count("mlp") >= 1
    assert twin.hidden_size == c.hidden_size and twin.vocab_size == c.vocab_size
    assert (twin.num_attention_heads, twin.num_key_value_heads, twin.head_dim) == (
        c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    hybrid_params, twin_params = memory.param_count(c).total, memory.param_count(twin).total
    assert abs(twin_params - hybrid_params) <= bench.TWIN_TOLERANCE * hybrid_params
    # the point of the comparison: the twin keeps more KV per token (every layer pair has attention)
    assert memory.kv_cache_bytes(twin, 1, 1) > memory.kv_cache_bytes(c, 1, 1)


def test_twin_of_the_9b_is_a_qwen3_8b_sized_transformer():
    twin = bench.transformer_twin(_config("nemotron-nano-9b-v2"))
    assert 30 <= twin.count("attention") <= 45  # Qwen3-8B: 36 layers
    # docs/REFERENCE.md: ~144 KiB of bf16 KV per token for a dense 36-layer GQA model vs 16 KiB for the 9B
    assert 120 * 1024 <= memory.kv_cache_bytes(twin, 1, 1, "bf16") <= 170 * 1024


def test_twin_of_a_model_without_attention_gets_a_gqa_shape():
    c = _config("tiny").replace(hybrid_override_pattern="M-M-M-M-")
    twin = bench.transformer_twin(c)
    assert twin.count("mamba") == 0 and twin.hidden_size == c.hidden_size
    assert twin.num_attention_heads % twin.num_key_value_heads == 0
    assert abs(memory.param_count(twin).total - memory.param_count(c).total) <= 0.05 * memory.param_count(c).total


def test_twin_that_cannot_match_is_an_error():
    with pytest.raises(BenchError, match="no-compare-transformer"):
        bench.transformer_twin(_config("tiny"), tolerance=1e-9)


# ---------------------------------------------------------------------------------------- parsing
def test_batch_max_plans_with_the_given_prefill_chunk():
    # --max-batch on CUDA sizes the batch with fit.estimate at --prefill-chunk (the activations grow with it)
    c = load_model_profile("nemotron-nano-9b-v2").config
    plan = bench._Plan(c, "9b", "profile", None, [(8192, 1024)], "max", "cuda", "bf16", 1)
    free = 60 * 2**30
    budget = bench_memory.gpu_budget(None, free)
    assert budget.bytes == int(free * bench_memory.GPU_MEMORY_SHARE)
    sizes = {chunk: bench.batches(plan, 8192, 1024, chunk, budget)["hybrid"] for chunk in (512, 8192)}
    for chunk, n in sizes.items():
        assert n == min(bench.MAX_AUTO_BATCH, fit.max_batch(c, budget.bytes + fit.weights_bytes(c, "bf16"),
                                                             context=9216, dtype="bf16", prefill_chunk=chunk))
    assert sizes[512] > sizes[8192]


def _cpu_plan(**kw):
    return bench.resolve(BenchOptions(model="tiny", device="cpu", max_batch=True, **kw))


def test_cpu_max_batch_is_the_memory_arithmetic():
    """--max-batch on CPU: each model's batch is the largest whose cache + prefill activations (fit.estimate on the
    CPU path, the weights aside) fit --memory; at long context the hybrid's is the larger (the twin's KV)."""
    plan = _cpu_plan(memory=0.05, lengths="256:512,2k:6k", prefill_chunk=256)
    budget = round(0.05 * 2**30)
    assert plan.budget.bytes == budget and plan.budget.source == "--memory"
    configs = {"hybrid": plan.config, "transformer": plan.twin}
    sizes = {}
    for prompt, output in plan.lengths:
        sizes[prompt] = bench.batches(plan, prompt, output, 256, plan.budget)
        for role, n in sizes[prompt].items():
            need = [fit.estimate(configs[role], context=prompt + output, batch=b, dtype="fp32",
                                 prefill_chunk=min(prompt, 256), path="cpu") for b in (n, n + 1)]
            assert need[0].total - need[0].weights <= budget < need[1].total - need[1].weights, (prompt, role, n)
    assert sizes[2048]["hybrid"] > 2 * sizes[2048]["transformer"] >= 2
    assert sizes[256]["transformer"] > sizes[256]["hybrid"]  # short context: the Mamba prefill's buffers dominate


def test_cpu_activations_model_the_cpu_scan():
    from nanocli_model import kernels

    for n in (16, 64, 128, 256):
        assert fit.cpu_ssd_block(n) == kernels.cpu_ssd_block(n)
    c = _config("small")
    cpu, cuda = (fit.activation_bytes(c, 2, 2048, 4096, "fp32", path=p) for p in ("cpu", "cuda"))
    assert cpu.working_set("mamba") > cuda.working_set("mamba")  # the per-chunk states and decay matrices
    assert cpu.layers["mlp"] == cuda.layers["mlp"] and cpu.layers["attention"] == cuda.layers["attention"]
    with pytest.raises(ConfigError, match="path"):
        fit.activation_bytes(c, 1, 16, 16, path="tpu")


def test_cpu_default_budget_is_available_memory_less_the_load(monkeypatch):
    from nanocli import host_memory

    available = 3 * 2**30
    monkeypatch.setattr(host_memory, "read_host_memory", lambda: host_memory.HostMemory(available, "MemAvailable"))
    plan = _cpu_plan(lengths="256:512")
    need = host_memory.built_need(plan.config, "fp32") + host_memory.built_need(plan.twin, "fp32")
    assert plan.budget.bytes == available - need.total and "MemAvailable" in plan.budget.source
    with pytest.raises(BenchError, match="more than this machine can give"):
        _cpu_plan(lengths="256:512", memory=2.5)
    monkeypatch.setattr(host_memory, "read_host_memory", lambda: None)
    with pytest.raises(BenchError, match="give --memory"):
        _cpu_plan(lengths="256:512")
    assert _cpu_plan(lengths="256:512", memory=0.5).budget.bytes == 2**29  # nothing to check it against


def test_parse_lengths():
    assert bench.parse_lengths("512:1024, 8k:16k") == [(512, 1024), (8192, 16384)]
    assert bench.parse_lengths("1_024:2048") == [(1024, 2048)]


@pytest.mark.parametrize("text", ["512", "512:1024:2", "a:b", "0:10", "10:0", "-5:10", "", "512:1024,512:1024",
                                  "1.5:2"])
def test_parse_lengths_rejects(text):
    with pytest.raises(BenchError, match="--lengths"):
        bench.parse_lengths(text)


def test_curve_positions_follow_the_context():
    steps = [0.001 * (1 + i / 100) for i in range(99)]  # a step gets slower as the context grows
    points = bench.curve(100, steps, points=5)  # segments 0-18, 19-38, ... at their middle steps
    assert [c for c, _ in points] == [110, 129, 149, 169, 189]
    assert [ms for _, ms in points] == sorted(ms for _, ms in points)
    assert points[0][1] == pytest.approx(1e3 * steps[9])  # the median of the first segment, steps 0..18
    assert bench.curve(10, [0.002, 0.004], points=8) == [(11, 2.0), (12, 4.0)]  # fewer steps than points
    assert bench.curve(10, []) == []


# -------------------------------------------------------------------------------------- measuring
@pytest.fixture(scope="module")
def result():
    return bench.run(BenchOptions(model="tiny", lengths="16:24,32:40", repeats=2, threads=1, batch=2))


def test_result_has_both_models_and_positive_rates(result):
    assert [m.role for m in result.models] == ["hybrid", "transformer"]
    assert result.hybrid.params == memory.param_count(_config("tiny")).total
    assert [(p.prompt, p.output) for p in result.pairs] == [(16, 24), (32, 40)]
    for p in result.pairs:
        for m in (p.hybrid, p.transformer):
            assert m.batch == 2 and len(m.runs) == 2
            assert m.prefill_tokens_per_s > 0 and m.decode_tokens_per_s > 0 and m.output_tokens_per_s > 0
            for run in m.runs:  # EOS ignored: every row generates all its tokens
                assert run.output_tokens == 2 * p.output and run.prefill_tokens == 2 * p.prompt
            contexts = [c for c, _ in m.ms_per_token]
            assert contexts == sorted(contexts) and p.prompt < contexts[0] and contexts[-1] <= p.prompt + p.output
            assert all(ms > 0 for _, ms in m.ms_per_token)
        assert p.ratio == pytest.approx(p.hybrid.output_tokens_per_s / p.transformer.output_tokens_per_s)


def test_measured_cache_bytes_equal_the_memory_model(result):
    configs = {"hybrid": _config("tiny"), "transformer": bench.transformer_twin(_config("tiny"))}
    for p in result.pairs:
        for m in (p.hybrid, p.transformer):
            predicted = memory.cache_bytes(configs[m.role], 2, p.prompt + p.output, dtype="fp32")
            assert m.cache_measured == predicted.total == m.cache_predicted.total
            assert m.cache_predicted.kv == predicted.kv
        assert p.transformer.cache_predicted.ssm == 0 < p.hybrid.cache_predicted.ssm


def test_json_is_plain_data(result):
    data = json.loads(json.dumps(result.to_json()))
    assert {"models", "pairs", "device", "dtype", "threads", "batch", "repeats", "load_before"} <= set(data)
    pair = data["pairs"][0]
    assert {"prompt", "output", "hybrid", "transformer", "ratio", "decode_ratio", "prefill_ratio"} <= set(pair)
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "ms_per_token",
            "cache_predicted", "cache_measured"} <= set(pair["hybrid"])
    assert data["threads"] == 1 and data["batch"] == "2"


def test_without_the_transformer():
    r = bench.run(BenchOptions(model="tiny", lengths="8:12", compare_transformer=False, threads=1))
    assert len(r.models) == 1 and r.transformer is None
    assert r.pairs[0].transformer is None and r.pairs[0].ratio is None and r.repeats == 3


def test_checkpoint_directory(tmp_path):
    from model_utils import tiny_config
    from nanocli_model import NanoForCausalLM, save_pretrained

    c = tiny_config()
    save_pretrained(NanoForCausalLM(c), tmp_path / "m")
    r = bench.run(BenchOptions(model=str(tmp_path / "m"), quick=True, lengths="8:8", threads=1))
    assert r.hybrid.source == "checkpoint" and r.hybrid.params == memory.param_count(c).total
    assert r.pairs[0].hybrid.cache_measured == memory.cache_bytes(c, 1, 16, "fp32").total


@needs_cxx
def test_compile_times_compiled_steps(tmp_path):
    r = bench.run(BenchOptions(model="tiny", quick=True, lengths="8:16", threads=1, compile=True,
                               compare_transformer=False))
    assert r.decode == "compiled" and not r.notes and r.to_json()["decode"] == "compiled"
    assert r.pairs[0].hybrid.decode_tokens_per_s > 0


# -------------------------------------------------------------------------------------------- CLI
def nano_bench(capsys, monkeypatch, *args):
    """``nano bench ARGS`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nano", "bench", *map(str, args)])
    for k, v in ENV_COLUMNS.items():
        monkeypatch.setenv(k, v)
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_and_plot(capsys, monkeypatch, tmp_path):
    png = tmp_path / "bench.png"
    code, out, err = nano_bench(capsys, monkeypatch, "--model", "tiny", "--quick", "--lengths", "8:16,16:16",
                                "--threads", "1", "--json", "--plot", png)
    assert code == 0, err
    data = json.loads(out)
    assert data["plot"] == str(png) and len(data["pairs"]) == 2 and data["repeats"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_table(capsys, monkeypatch):
    code, out, err = nano_bench(capsys, monkeypatch, "--model", "tiny", "--quick", "--lengths", "8:16",
                                "--threads", "1")
    assert code == 0, err
    for text in ("hybrid", "transformer", "8:16", "Generation throughput", "Time per output token",
                 "allocated = memory.py's prediction"):
        assert text in out
    assert "8:16 hybrid run 1/1" in err  # progress goes to stderr


def test_help_shows_the_real_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--help"])
    assert done.value.code == 0
    rows = capsys.readouterr().out.splitlines()
    for flag, default in (("--batch", "1"), ("--prefill-chunk", "2048"), ("--seed", "0"), ("--device", "auto"),
                          ("--dtype", "auto")):
        row = next(r for r in rows if r.startswith(f"│ {flag} "))
        assert f"[default: {default}]" in row, (flag, row)
    assert "[default: compare-transformer]" in "".join(rows)  # on (its row wraps)


@pytest.mark.parametrize("args, words", [
    (["--lengths", "512-1024"], "PROMPT:OUTPUT"),
    (["--lengths", "0:16"], "at least 1"),
    (["--lengths", "-8:16"], "--lengths"),
    (["--batch", "0"], "--batch"),
    (["--max-batch", "--memory", "0"], "--memory must be a finite number > 0"),
    (["--max-batch", "--memory", "-2"], "--memory must be a finite number > 0"),
    (["--max-batch", "--memory", "nan"], "--memory must be a finite number > 0"),
    (["--max-batch", "--memory", "lots"], "--memory"),
    (["--max-batch", "--memory", "0.001", "--lengths", "2k:6k"], "not even one sequence of 8,192 tokens"),
    (["--memory", "1"], "give --max-batch too"),
    (["--batch", "max"], "--batch max: not a whole number"),
    (["--batch", "2", "--max-batch"], "not both"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "-1"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--plot", "out.jpg"], ".png"),
])
def test_cli_bad_input_is_one_line(capsys, monkeypatch, args, words):
    code, out, err = nano_bench(capsys, monkeypatch, "--model", "tiny", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err


def test_cli_max_batch_on_cpu(capsys, monkeypatch):
    code, out, err = nano_bench(capsys, monkeypatch, "--model", "tiny", "--quick", "--lengths", "16:16", "--threads",
                                "1", "--max-batch", "--memory", "0.02", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["batch"] == "max" and data["memory_budget"] == round(0.02 * 2**30)
    assert data["memory_budget_source"] == "--memory"
    hybrid, twin = data["pairs"][0]["hybrid"], data["pairs"][0]["transformer"]
    for m in (hybrid, twin):
        assert 1 < m["batch"] <= bench.MAX_AUTO_BATCH and 0 < m["memory_predicted"] <= data["memory_budget"]
        assert m["cache_measured"] == m["cache_predicted"]["total"]
        assert m["runs"][0]["output_tokens"] == 16 * m["batch"]
    code, out, err = nano_bench(capsys, monkeypatch, "--model", "tiny", "--quick", "--lengths", "16:16", "--threads",
                                "1", "--max-batch", "--memory", "0.02")
    assert code == 0, err
    assert "--max-batch: each model's largest batch in 0.02 GiB (--memory)" in out


def test_cli_unknown_profile_and_missing_dir(capsys, monkeypatch, tmp_path):
    code, _, err = nano_bench(capsys, monkeypatch, "--model", "no-such-profile")
    assert code == 2 and err.count("\n") == 1 and "unknown model profile" in err and "tiny" in err
    code, _, err = nano_bench(capsys, monkeypatch, "--model", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "no such model directory" in err
    code, _, err = nano_bench(capsys, monkeypatch, "--model", str(tmp_path))  # a directory without config.json
    assert code == 2 and err.count("\n") == 1 and "config.json" in err
    code, _, err = nano_bench(capsys, monkeypatch)
    assert code == 2 and "--model is required" in err


def test_real_process_error_exit_code():
    """The console script path: a real process, one line on stderr, exit 2, no traceback."""
    result = subprocess.run([sys.executable, "-m", "nanocli.cli", "bench", "--model", "tiny", "--lengths", "x:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --lengths") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
