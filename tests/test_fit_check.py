"""``nano fit-check``: the report's numbers, exact inverse solves, NVML (fake and absent), the CLI contract
(exit codes, one-line errors, JSON, no torch), the safetensors header reader, and the estimate's honesty
against a really allocated model + cache."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nanocli import cli, nvml
from nanocli.profiles import load_gpu_profile, load_model_profile, profile_names
from nanocli.stages import fit_check, fit_gpu
from nanocli.stages.fit_check import FitCheckError, FitCheckOptions
from nanocli_model import fit, memory
from nanocli_model.errors import CheckpointError, NanoError
from nanocli_model.headers import read_checkpoint_tensors, read_safetensors_header

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "NANO_PROFILES_DIR"}, "COLUMNS": "100"}


def config(name: str):
    return load_model_profile(name).config


def check(model: str = "nemotron-nano-9b-v2", **kw) -> fit_check.FitCheckResult:
    return fit_check.run(FitCheckOptions(model=model, gpu=kw.pop("gpu", "a10g"), **kw))


def nano(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``nano ARGS`` as a fresh process; ``code`` runs before main() (e.g. to hide pynvml)."""
    prelude = (code or "") + "\nimport sys\nfrom nanocli.cli import main\nsys.argv = ['nano', *sys.argv[1:]]\nmain()"
    return subprocess.run([sys.executable, "-c", prelude, *args], capture_output=True, text=True, timeout=60,
                          env=ENV, cwd=ROOT)


def main_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``cli.main()`` in this process (fast): exit code, stdout, stderr."""
    old = sys.argv
    sys.argv = ["nano", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny profile saved by save_pretrained in bf16 (one file) and fp32 (shards + index)."""
    import torch

    from nanocli_model import build_model, save_pretrained

    root = tmp_path_factory.mktemp("ckpt")
    c = config("tiny")
    save_pretrained(build_model(c, dtype=torch.bfloat16, seed=0), root / "bf16")
    save_pretrained(build_model(c, dtype=torch.float32, seed=0), root / "fp32", max_shard_size="300KB")
    return root


def test_a_saved_int8_directory_is_checked_at_its_stored_bytes(capsys, tiny_checkpoint, tmp_path):
    """``nano generate --dtype int8 --save-quantized`` writes int8 weights with float32 scales and smoothing
    divisors: fit-check takes it as int8 and its weights term is exactly the bytes the headers hold."""
    from nanocli_model import load_pretrained, save_pretrained

    saved = save_pretrained(load_pretrained(tiny_checkpoint / "fp32", dtype="int8"), tmp_path / "int8")
    code, out, err = main_in_process(capsys, "fit-check", "--model", str(saved), "--gpu", "24GB", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["dtype"] == "int8"
    assert data["terms"]["weights"] == sum(t.nbytes for t in read_checkpoint_tensors(saved).tensors)


# ---------------------------------------------------------------------------- the report's case
def test_9b_v2_fits_the_a10g_profile_at_128k_as_in_the_report():
    r = check("nemotron-nano-9b-v2", context=131072, batch=1, dtype="bf16")
    e, c = r.estimate, r.model.config
    # docs/REFERENCE.md section 6, by hand: 8,888,227,328 params x 2 bytes; KV = 4 layers x 8 heads x 128 x 2 (K,V)
    # x 2 bytes x 131072 = 2 GiB; SSM state = 27 layers x 128 heads x 80 x 128 x 4 bytes (fp32).
    assert e.weights == 8_888_227_328 * 2 and round(e.weights / GIB, 2) == 16.56
    assert e.kv == 4 * 8 * 128 * 2 * 2 * 131072 == 2 * GIB
    assert e.ssm == 27 * 128 * 80 * 128 * 4 and round(e.ssm / GIB, 3) == 0.132
    assert e.conv == 27 * 12288 * 3 * 2
    assert round((e.weights + e.kv + e.conv + e.ssm) / GIB, 2) == 18.69  # the report's ~18.7 GiB
    assert round(r.gpu.budget / GIB, 2) == 19.66 == round(load_gpu_profile("a10g").budget_gib, 2)
    assert r.fits and r.verdict == "FITS" and r.exit_code == 0
    assert 0 < r.headroom < 1 * GIB and e.activations.total < r.gpu.budget - (e.weights + e.cache)
    assert r.max_batch == 1 and r.max_context >= 131072 and c.count("attention") == 4


def test_ssm_state_in_bf16_halves_it():
    r = check(ssm_cache_dtype="bf16")
    assert r.estimate.ssm == 27 * 128 * 80 * 128 * 2 and round(r.estimate.ssm / GIB, 3) == 0.066


def test_12b_base_does_not_fit_its_weights_alone_exceed_the_budget():
    r = check("nemotron-nano-12b-v2-base")
    assert r.estimate.weights == 12_310_001_152 * 2 and round(r.estimate.weights / GIB, 2) == 22.93
    assert r.estimate.weights > r.gpu.budget
    assert r.estimate.kv == 6 * 8 * 128 * 2 * 2 * 131072 == 3 * GIB
    assert not r.fits and r.verdict == "DOES NOT FIT" and r.exit_code == 1
    assert r.max_context == 0 and r.max_batch == 0 and r.max_prefill_chunk == 0


def test_all_attention_counterfactual_holds_kv_in_every_mixer_layer():
    r = check()
    e = r.estimate
    kv_all = (27 + 4) * 8 * 128 * 2 * 2 * 131072  # 31 layers x 0.5 GiB
    assert r.all_attention == e.weights + e.activations.total + kv_all
    assert round((r.all_attention - e.total) / GIB, 2) == round((kv_all - e.cache) / GIB, 2) == 13.37
    assert r.all_attention_max_context < 32768 < r.max_context


# ---------------------------------------------------------------------------- exact inverse solves
SOLVE_CASES = [  # (model, gpu, context, batch, extra)
    ("nemotron-nano-9b-v2", "a10g", 131072, 1, {}),
    ("nemotron-nano-9b-v2", "h100-80gb", 131072, 1, {"dtype": "fp8", "prefill_chunk": 8192}),
    ("nemotron-nano-9b-v2-base", "l4", 32768, 1, {"ssm_cache_dtype": "bf16"}),
    ("nemotron-nano-9b-v2", "a100-40gb", 8192, 3, {"attention": "eager"}),
]


@pytest.mark.parametrize("model,gpu,context,batch,extra", SOLVE_CASES)
def test_largest_context_batch_and_chunk_are_the_boundary(model, gpu, context, batch, extra):
    r = check(model, gpu=gpu, context=context, batch=batch, **extra)
    c, e, budget = r.model.config, r.estimate, r.gpu.budget
    kw = dict(dtype=e.dtype, ssm_cache_dtype=e.ssm_dtype, attention=e.attention, weights=e.weights)
    chunk = r.prefill_chunk

    def total(**over):
        args = dict(context=context, batch=batch, prefill_chunk=chunk, **kw)
        args.update(over)
        return fit.estimate(c, **args).total

    assert r.max_context > 0 and r.max_batch > 0
    assert total(context=r.max_context) <= budget < total(context=r.max_context + 1)
    assert total(batch=r.max_batch) <= budget < total(batch=r.max_batch + 1)
    if r.max_prefill_chunk < context:
        assert total(prefill_chunk=r.max_prefill_chunk) <= budget < total(prefill_chunk=r.max_prefill_chunk + 1)
    assert r.fits == (context <= r.max_context) == (batch <= r.max_batch)


def test_largest_fitting_edges():
    assert fit.largest_fitting(lambda n: n <= 1) == 1
    assert fit.largest_fitting(lambda n: n <= 12345) == 12345
    assert fit.largest_fitting(lambda n: False) == 0
    assert fit.largest_fitting(lambda n: True) is None  # no limit


def test_a_model_without_attention_has_no_context_limit_from_memory():
    c = config("tiny").replace(hybrid_override_pattern="M-M-")
    e = fit.estimate(c, context=4096)
    assert e.kv == 0 and fit.max_context(c, e.total + GIB) is None and fit.all_attention(c) is None


def test_fp8_keeps_embeddings_and_small_tensors_at_two_bytes():
    c = config("nemotron-nano-9b-v2")
    total, mm = memory.param_count(c).total, fit.matmul_params(c)
    assert fit.weights_bytes(c, "fp8") == mm + 2 * (total - mm)
    assert total - mm > 2 * memory.param_count(c).embedding  # embeddings, lm_head, norms, conv, ...
    assert fit.estimate(c, 131072, dtype="fp8").kv == fit.estimate(c, 131072, dtype="bf16").kv


def test_eager_attention_adds_the_score_matrix():
    flash, eager = check(), check(attention="eager")
    scores = 2 * 40 * 2048 * 131072 * 2
    assert eager.estimate.activations.layers["attention"]["scores + probabilities"] == scores
    assert eager.estimate.activations.total > flash.estimate.activations.total + scores // 2
    assert not eager.fits and eager.estimate.activations.peak_kind == "attention"


# ---------------------------------------------------------------------------- NVML
def fake_device(total_gib: float, free_gib: float, name: str = "NVIDIA A10G"):
    calls = []

    def query(index: int) -> nvml.DeviceMemory:
        calls.append(index)
        return nvml.DeviceMemory(index=index, name=name, total=round(total_gib * GIB), free=round(free_gib * GIB),
                                 used=round((total_gib - free_gib) * GIB))

    query.calls = calls
    return query


def test_gpu_auto_judges_against_free_memory_of_the_fake_device():
    query = fake_device(80.0, 30.0, "NVIDIA H100 80GB HBM3")
    r = fit_check.run(FitCheckOptions(model="nemotron-nano-9b-v2", gpu="auto", device_index=1), nvml_query=query)
    assert query.calls == [1]
    assert r.gpu.source == "nvml" and r.gpu.name == "NVIDIA H100 80GB HBM3" and r.gpu.device_index == 1
    assert r.gpu.available == 30 * GIB and r.gpu.budget == 30 * GIB - round(0.05 * 80 * GIB)
    assert r.fits and r.headroom == r.gpu.budget - r.estimate.total
    busy = fit_check.run(FitCheckOptions(model="nemotron-nano-9b-v2"), nvml_query=fake_device(80.0, 12.0))
    assert not busy.fits and busy.exit_code == 1  # the same GPU, mostly taken by others


def test_gpu_auto_through_the_cli_with_a_fake_device(monkeypatch, capsys):
    monkeypatch.setattr(nvml, "query_device", fake_device(24.0, 23.5, "NVIDIA L4"))
    code, out, _ = main_in_process(capsys, "fit-check", "--model", "tiny", "--context", "4k")
    assert code == 0 and "NVIDIA L4" in out and "FITS" in out and "free" in out


def test_no_nvml_asks_for_a_profile():
    def absent(index):
        raise nvml.NvmlUnavailable("NVML is not available (NVML Shared Library Not Found)")

    with pytest.raises(FitCheckError) as info:
        fit_check.run(FitCheckOptions(model="tiny"), nvml_query=absent)
    message = str(info.value)
    assert "--gpu PROFILE" in message and all(name in message for name in profile_names("gpus"))
    assert "24GiB" in message  # or a memory size


def test_no_nvml_library_is_one_line_exit_2_in_a_real_process():
    result = nano("fit-check", "--model", "tiny", code="import sys; sys.modules['pynvml'] = None")
    assert result.returncode == 2 and result.stdout == ""
    line = one_line_error(result.stderr)
    assert "pynvml" in line and "--gpu PROFILE" in line and "a10g" in line


class FakePynvml:
    """Enough of pynvml for query_device: v2 memory info optional, names as bytes (old bindings)."""

    class NVMLError(Exception):
        pass

    def __init__(self, v2: bool, count: int = 1):
        self.v2, self.count = v2, count
        if v2:
            self.nvmlMemory_v2 = 0x02000028

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA A10G"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        from types import SimpleNamespace

        if version is not None and not self.v2:
            raise self.NVMLError("Function Not Found")
        used = 500 * 2**20 if version else 800 * 2**20  # v1 counts driver-reserved memory as used
        return SimpleNamespace(total=23028 * 2**20, free=23028 * 2**20 - used, used=used)


@pytest.mark.parametrize("v2", [True, False])
def test_query_device_reads_v2_memory_info_and_falls_back_to_v1(monkeypatch, v2):
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(v2=v2))
    d = nvml.query_device(0)
    assert d.name == "NVIDIA A10G" and d.api == ("v2" if v2 else "v1")
    assert d.used == (500 if v2 else 800) * 2**20 and d.total == 23028 * 2**20


def test_query_device_rejects_a_missing_device_index(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(v2=True, count=2))
    with pytest.raises(nvml.DeviceIndexError, match="0..1"):
        nvml.query_device(2)


# ---------------------------------------------------------------------------- the CLI contract
def test_cli_exit_codes_and_no_torch_on_the_estimate_path(tiny_checkpoint):
    probe = "\nimport atexit, sys\natexit.register(lambda: print('TORCH', 'torch' in sys.modules))"
    fits = nano("fit-check", "--model", str(tiny_checkpoint / "bf16"), "--gpu", "a10g", code=probe)
    assert fits.returncode == 0, fits.stderr
    assert "FITS" in fits.stdout and fits.stdout.strip().endswith("TORCH False")
    big = nano("fit-check", "--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g", code=probe)
    assert big.returncode == 1 and "DOES NOT FIT" in big.stdout and "TORCH False" in big.stdout
    bad = nano("fit-check", "--model", "tiny", "--gpu", "nope", code=probe)
    assert bad.returncode == 2 and "TORCH False" in bad.stdout
    assert "a10g" in one_line_error(bad.stderr)


def test_json_output_for_ci(capsys):
    code, out, err = main_in_process(capsys, "fit-check", "--model", "nemotron-nano-9b-v2", "--gpu", "a10g", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["verdict"] == "FITS" and data["fits"] is True
    assert data["terms"]["weights"] == 8_888_227_328 * 2 and data["terms"]["kv_cache"] == 2 * GIB
    assert set(data["terms"]) == {"weights", "kv_cache", "conv_state", "ssm_state", "activations",
                                  "framework_overhead", "reserved"}
    assert data["model_bytes"] == sum(v for k, v in data["terms"].items() if k not in ("framework_overhead",
                                                                                       "reserved"))
    assert data["max_batch"] == 1 and data["max_context"] > 131072
    assert data["gpu"]["source"] == "profile" and data["gpu"]["name"] == "a10g"
    assert data["all_attention"]["bytes"] > data["model_bytes"]
    code, out, _ = main_in_process(capsys, "fit-check", "--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g",
                                   "--json")
    assert code == 1 and json.loads(out)["verdict"] == "DOES NOT FIT"


def test_terminal_report_shows_every_term(capsys):
    code, out, _ = main_in_process(capsys, "fit-check", "--model", "nemotron-nano-9b-v2", "--gpu", "a10g")
    assert code == 0
    for text in ["weights", "16.56 GiB", "KV cache", "2.00 GiB", "Mamba conv state", "Mamba SSM state",
                 "activations", "framework + CUDA", "reserved", "19.66 GiB", "FITS", "headroom",
                 "largest context", "largest batch", "all-attention", "in_proj output", "█"]:
        assert text in out, text


BAD_INPUTS = [
    (["--gpu", "no-such-gpu"], "a10g"),
    (["--context", "0"], "--context"),
    (["--context", "-5"], "--context"),
    (["--context", "lots"], "--context"),
    (["--batch", "0"], "--batch"),
    (["--batch", "two"], "--batch"),
    (["--device-index", "-1"], "--device-index"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--dtype", "int4"], "--dtype"),
    (["--ssm-cache-dtype", "fp64"], "--ssm-cache-dtype"),
    (["--attention", "sparse"], "--attention"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_are_one_line_errors_exit_2(capsys, args, needle):
    code, out, err = main_in_process(capsys, "fit-check", "--model", "tiny", "--gpu", "a10g", *args)
    assert code == 2 and needle in one_line_error(err) and out == ""


def test_bad_models_are_one_line_errors_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial").mkdir()
    tiny = config("tiny").to_dict()
    (tmp_path / "partial" / "config.json").write_text(json.dumps(
        {k: v for k, v in tiny.items() if k not in ("hidden_size", "mamba_head_dim")}))
    (tmp_path / "nolayout").mkdir()
    (tmp_path / "nolayout" / "config.json").write_text('{"hidden_size": 64, "vocab_size": 512}')
    cases = [(["--model", str(tmp_path / "missing")], "no such model directory"),
             (["--model", str(tmp_path / "empty")], "config.json"),
             (["--model", str(tmp_path / "partial")], "missing hidden_size, mamba_head_dim"),
             (["--model", str(tmp_path / "nolayout")], "hybrid_override_pattern"),
             (["--model", "no-such-profile"], "nemotron-nano-9b-v2")]
    for args, needle in cases:
        code, out, err = main_in_process(capsys, "fit-check", "--gpu", "a10g", *args)
        assert code == 2 and needle in one_line_error(err), (args, err)


def test_a_config_json_path_is_a_model(tmp_path):
    (tmp_path / "config.json").write_text(config("tiny").to_json_string())
    r = check(str(tmp_path / "config.json"), context="4k")
    assert r.model.kind == "config" and r.model.tensors is None and r.estimate.context == 4096
    assert r.estimate.weights == memory.weight_bytes(config("tiny"), "bf16")
    assert check(str(tmp_path)).model.kind == "config"  # a directory without weights: config only


def test_context_accepts_k_suffix():
    assert fit_check.parse_tokens("128k", "--context") == 131072 == fit_check.parse_tokens("131_072", "--context")


# ---------------------------------------------------------------------------- headers and honesty
def test_header_reader_gives_exact_bytes_of_a_saved_checkpoint(tiny_checkpoint):
    c = config("tiny")
    for name, dtype in (("bf16", "bf16"), ("fp32", "fp32")):
        t = read_checkpoint_tensors(tiny_checkpoint / name)
        assert t.params == memory.param_count(c).total
        assert t.stored_bytes == memory.weight_bytes(c, dtype)
        assert t.dtypes == {"BF16" if dtype == "bf16" else "F32": len(t.tensors)} and not t.mtp
        pairs = [(x.name, x.numel) for x in t.tensors]
        assert fit.tensor_weights_bytes(pairs, "fp8") == fit.weights_bytes(c, "fp8")
    assert len(read_checkpoint_tensors(tiny_checkpoint / "fp32").files) > 1  # sharded, read via the index
    r = check(str(tiny_checkpoint / "fp32"))  # no --dtype: the stored dtype, as load_pretrained keeps it
    assert r.model.kind == "checkpoint" and r.estimate.dtype == "fp32"
    assert r.estimate.weights == memory.weight_bytes(c, "fp32")


def test_mtp_tensors_are_not_counted_and_said_so(tiny_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "with-mtp"
    shutil.copytree(tiny_checkpoint / "bf16", ckpt)
    header = json.dumps({"mtp.layers.0.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}})
    single = ckpt / "model.safetensors"
    names = list(read_safetensors_header(single))
    (ckpt / "mtp.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(32))
    index = {"weight_map": {**{n: "model.safetensors" for n in names}, "mtp.layers.0.weight": "mtp.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    r = check(str(ckpt))
    assert len(r.model.tensors.mtp) == 1 and r.model.tensors.params == memory.param_count(config("tiny")).total
    assert any("mtp.*" in n and "not counted" in n for n in r.notes)


def write_raw(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def corrupt_files(tmp_path: Path) -> list[tuple[Path, str]]:
    ok = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    listed = ok.replace(b'"BF16"', b"[]")
    return [
        (write_raw(tmp_path / "short.safetensors", b"\x01\x02"), "8-byte"),
        (write_raw(tmp_path / "huge.safetensors", struct.pack("<Q", 10**12) + b"{}"), "header length"),
        (write_raw(tmp_path / "notjson.safetensors", struct.pack("<Q", 5) + b"{oops" + bytes(8)), "not JSON"),
        (write_raw(tmp_path / "dtype.safetensors", struct.pack("<Q", len(ok)) + ok.replace(b"BF16", b"Q4_K")
                   + bytes(8)), "dtype"),
        (write_raw(tmp_path / "trunc.safetensors", struct.pack("<Q", len(ok)) + ok + bytes(4)), "claims bytes"),
        (write_raw(tmp_path / "listdtype.safetensors", struct.pack("<Q", len(listed)) + listed + bytes(8)),
         "unknown dtype []"),  # the fuzz soak's draw: unhashable, was a TypeError
    ]


def test_corrupt_headers_are_checkpoint_errors_naming_the_file(tmp_path):
    for path, needle in corrupt_files(tmp_path):
        with pytest.raises(CheckpointError) as info:
            read_safetensors_header(path)
        assert str(path) in str(info.value) and needle in str(info.value), str(info.value)


def test_corrupt_checkpoint_through_the_cli_is_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint / "bf16", ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:8] + b"#" + data[9:])
    code, _, err = main_in_process(capsys, "fit-check", "--model", str(ckpt), "--gpu", "a10g")
    assert code == 2 and "model.safetensors" in one_line_error(err)
    (ckpt / "config.json").write_text(config("tiny").replace(hidden_size=32).to_json_string())
    (ckpt / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="do not match config.json"):
        check(str(ckpt))


@pytest.mark.parametrize("dtype,ssm", [("bf16", None), ("fp32", "bf16")])
def test_tiny_estimate_equals_a_really_allocated_model_and_cache(dtype, ssm):
    import torch

    from nanocli_model import HybridCache, build_model

    c = config("tiny")
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = build_model(c, dtype=tdtype)
    cache = HybridCache.allocate(c, batch=3, max_len=300, dtype=tdtype,
                                 ssm_dtype=None if ssm is None else torch.bfloat16)
    e = fit.estimate(c, context=300, batch=3, dtype=dtype, ssm_cache_dtype=ssm)
    assert e.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert e.kv + e.conv + e.ssm == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_measure_path_builds_on_device_and_fills_the_cache_exactly():
    import torch

    from nanocli import measure
    from nanocli_model import HybridCache

    c = config("tiny")
    model = measure.build_on_device(c, torch.bfloat16, torch.device("cpu"))
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == fit.weights_bytes(c, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cache = HybridCache.allocate(c, batch=2, max_len=45, dtype=torch.bfloat16)
    measure.prefill_then_decode(model, cache, context=45, chunk=16, batch=2, device="cpu")
    assert cache.seq_len == 45


def test_measure_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --measure would run for real")
    for gpu in ("a10g", "auto"):
        code, out, err = main_in_process(capsys, "fit-check", "--model", "tiny", "--gpu", gpu, "--measure")
        assert code == 2 and one_line_error(err) == "error: --measure needs a CUDA GPU" and out == ""


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fit.png"
    code, out, _ = main_in_process(capsys, "fit-check", "--model", "nemotron-nano-9b-v2", "--gpu", "a10g",
                                   "--plot", str(path))
    assert code == 0 and str(path) in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    code, _, err = main_in_process(capsys, "fit-check", "--model", "tiny", "--gpu", "a10g", "--plot",
                                   str(tmp_path / "fit.jpg"))
    assert code == 2 and ".png" in one_line_error(err)


def test_every_error_is_a_nano_error():
    assert issubclass(FitCheckError, NanoError) and issubclass(nvml.NvmlUnavailable, NanoError)


# ---------------------------------------------------------------------------- issue #18: the model card's question
def test_without_a_model_it_is_the_released_9b_v2(capsys):
    """`nano fit-check --gpu a10g` answers the report's question: the 9B-v2 at 128k in bf16 on the A10G."""
    assert FitCheckOptions().model == "nemotron-nano-9b-v2" and FitCheckOptions().gpu == "auto"
    default, explicit = (main_in_process(capsys, "fit-check", *args, "--gpu", "a10g", "--json")
                         for args in ((), ("--model", "nemotron-nano-9b-v2")))
    assert default[0] == explicit[0] == 0 and json.loads(default[1]) == json.loads(explicit[1])
    data = json.loads(default[1])
    assert (data["model"], data["context"], data["dtype"], data["batch"]) == ("nemotron-nano-9b-v2", 131072, "bf16", 1)
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "a10g")
    assert code == 0 and out.startswith("nemotron-nano-9b-v2 (profile): 131,072 tokens x batch 1, bf16 weights")


def test_with_nothing_it_still_asks_nvml_and_says_so_in_one_line(monkeypatch, capsys):
    def absent(index):
        raise nvml.NvmlUnavailable("NVML is not available (NVML Shared Library Not Found)")

    monkeypatch.setattr(nvml, "query_device", absent)
    code, out, err = main_in_process(capsys, "fit-check")
    assert code == 2 and out == "" and "--gpu auto found no GPU" in one_line_error(err)


@pytest.mark.parametrize("spelling", ["A10G", "a10G", "A10g"])
def test_gpu_names_are_case_insensitive(spelling):
    r, ref = check(gpu=spelling), check(gpu="a10g")
    assert r.gpu == ref.gpu and r.gpu.name == "a10g" and r.to_json() == ref.to_json()


@pytest.mark.parametrize("alias,name", [("h100", "h100-80gb"), ("4090", "rtx-4090"), ("rtx4090", "rtx-4090"),
                                        ("RTX-3090", "rtx-3090")])
def test_gpu_aliases(alias, name):
    assert check(gpu=alias).gpu.name == name


@pytest.mark.parametrize("gpu,needle", [
    ("a100", "gpu profile 'a100' is ambiguous; did you mean a100-40gb or a100-80gb?"),
    ("a10gg", "did you mean a10g"),
    ("h10", "did you mean h100-80gb?"),
    ("0GiB", "--gpu 0GiB: a memory size must be more than 0"),
    ("-3GB", "--gpu -3GB: a memory size must be more than 0"),
    ("lotsGiB", "unknown gpu profile 'lotsGiB'"),
    ("24", "or a memory size such as 24GiB"),
    ("1" + "0" * 400 + "GiB", "too large for a GPU's memory"),
])
def test_bad_gpus_are_one_line_errors_with_a_hint(capsys, gpu, needle):
    code, out, err = main_in_process(capsys, "fit-check", "--gpu", gpu)
    assert code == 2 and out == "" and needle in one_line_error(err)


@pytest.mark.parametrize("text,total", [("24GiB", 24 * GIB), ("24GB", 24 * 10**9), ("80gib", 80 * GIB),
                                        ("16G", 16 * GIB), ("16Gi", 16 * GIB), ("1.5 TB", 1_500_000_000_000),
                                        ("512MiB", 512 * 2**20), ("22.06GiB", round(22.06 * GIB))])
def test_gpu_memory_sizes_need_no_profile(text, total):
    r = check(gpu=text, context="4k")
    g = r.gpu
    assert (g.source, g.name, g.total, g.available, g.reserved) == ("size", text, total, total, 0)
    assert g.framework == round(0.05 * total) and g.budget == total - round(0.05 * total)
    assert fit_gpu.parse_size("lotsGiB") is None and fit_gpu.parse_size("a100-80gb") is None


def test_a_size_equal_to_a_profile_judges_the_same():
    sized, profile = check(gpu="22.06GiB", reserve=1.3), check(gpu="a10g")
    assert sized.gpu.budget == profile.gpu.budget and sized.max_context == profile.max_context


def test_the_a10g_reservation_is_named_and_reserve_replaces_it(capsys):
    r = check()
    assert r.gpu.reserved == round(1.3 * GIB) and r.gpu.reserved_for == "a vision encoder, as in the report"
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "a10g")
    gpu_line = " ".join(out.split("Memory, term by term")[0].split())
    assert code == 0 and "1.30 GiB reserved for a vision encoder, as in the report (--reserve 0 frees it)" in gpu_line
    assert "= 19.66 GiB for the model" in gpu_line
    total, framework = round(22.06 * GIB), round(round(22.06 * GIB) * 0.05)
    for reserve, reserved in ((0, 0), (0.5, GIB // 2), (2.25, round(2.25 * GIB))):
        g = check(reserve=reserve).gpu
        assert g.reserved == reserved and g.budget == total - framework - reserved and g.reserve_given
    assert check(reserve=0).gpu.budget - r.gpu.budget == round(1.3 * GIB)
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "a10g", "--reserve", "0")
    gpu_line = " ".join(out.split("Memory, term by term")[0].split())
    assert "0 B reserved (--reserve; the profile keeps 1.30 GiB for a vision encoder" in gpu_line
    assert "= 20.96 GiB for the model" in gpu_line
    assert check(gpu="24GiB", reserve=2).gpu.reserved == 2 * GIB
    auto = fit_check.run(FitCheckOptions(gpu="auto", reserve=1), nvml_query=fake_device(80.0, 30.0))
    assert auto.gpu.budget == 30 * GIB - round(0.05 * 80 * GIB) - GIB


@pytest.mark.parametrize("args,needle", [(["--reserve", "-1"], "--reserve must be"),
                                         (["--reserve", "nan"], "--reserve must be"),
                                         (["--reserve", "30"], "--reserve 30: leaves nothing for the model")])
def test_bad_reserves_are_one_line_errors(capsys, args, needle):
    code, out, err = main_in_process(capsys, "fit-check", "--gpu", "a10g", *args)
    assert code == 2 and out == "" and needle in one_line_error(err)


JSON_CASES = [  # fitting and not, profile, size and NVML, with and without --reserve
    ["--gpu", "a10g"], ["--gpu", "a10g", "--reserve", "0"], ["--gpu", "a10g", "--prefill-chunk", "8192"],
    ["--gpu", "a10g", "--reserve", "1.35"], ["--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g"],
    ["--gpu", "t4"], ["--gpu", "24GB", "--batch", "4", "--context", "32k"], ["--gpu", "h100", "--batch", "24"],
    ["--gpu", "auto"], ["--gpu", "auto", "--reserve", "10"],
]


@pytest.mark.parametrize("args", JSON_CASES, ids=" ".join)
def test_json_needed_and_budget_compare_like_for_like(monkeypatch, capsys, args):
    monkeypatch.setattr(nvml, "query_device", fake_device(24.0, 21.0, "NVIDIA A10G"))
    code, out, err = main_in_process(capsys, "fit-check", *args, "--json")
    d = json.loads(out)
    assert code == (0 if d["fits"] else 1), err
    assert d["fits"] == (d["needed_bytes"] <= d["budget_bytes"]) == (d["verdict"] == "FITS")
    assert d["fits"] == (d["needed_on_gpu_bytes"] <= d["gpu"]["available_bytes"])
    assert d["needed_bytes"] == d["model_bytes"] and d["headroom_bytes"] == d["budget_bytes"] - d["needed_bytes"]
    g = d["gpu"]
    assert d["budget_bytes"] == g["available_bytes"] - g["framework_bytes"] - g["reserved_bytes"]
    assert (g["framework_bytes"], g["reserved_bytes"]) == (d["terms"]["framework_overhead"], d["terms"]["reserved"])


def test_the_report_verdicts_in_json():
    fits, big = check().to_json(), check("nemotron-nano-12b-v2-base").to_json()
    assert fits["fits"] and fits["needed_bytes"] <= fits["budget_bytes"] == 21106543034  # 19.66 GiB
    assert not big["fits"] and big["needed_bytes"] > big["budget_bytes"]


def test_a_gpu_without_bf16_says_so_for_bf16_only(capsys):
    note = "t4 has no bf16 arithmetic (its profile says bf16: false): serve the model in fp16, --dtype fp16"
    assert any(note in n for n in check(gpu="t4").notes)
    assert not any("bf16 arithmetic" in n for n in check(gpu="t4", dtype="fp16").notes)
    assert not any("bf16 arithmetic" in n for n in check(gpu="a10g").notes)
    assert check(gpu="t4").to_json()["gpu"]["bf16"] is False and check().to_json()["gpu"]["bf16"] is True
    auto = fit_check.run(FitCheckOptions(context="4k", model="tiny"), nvml_query=fake_device(15.0, 14.5, "Tesla T4"))
    assert auto.gpu.bf16 is False and any("no bf16 arithmetic" in n for n in auto.notes)
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "T4")
    assert code == 1 and "no bf16 arithmetic" in out and "--dtype fp16" in out


def smaller_chunk_boundary(r, chunk: int) -> int:
    e, c = r.estimate, r.model.config
    kw = dict(dtype=e.dtype, ssm_cache_dtype=e.ssm_dtype, attention=e.attention, weights=e.weights)
    return fit.max_context(c, r.gpu.budget, batch=e.batch, prefill_chunk=chunk, **kw)


def test_a_smaller_prefill_chunk_is_offered_at_batch_above_1_when_it_fits_more(capsys):
    r = check(gpu="24GB", batch=4, context="32k")
    assert [c for c, _ in r.smaller_chunks] == [1024, 512, 256]
    assert all(n == smaller_chunk_boundary(r, c) for c, n in r.smaller_chunks)
    contexts = [r.max_context] + [n for _, n in r.smaller_chunks]
    assert contexts == sorted(set(contexts))  # each one gains
    assert r.to_json()["max_context_smaller_prefill_chunk"] == [{"prefill_chunk": c, "max_context": n}
                                                                for c, n in r.smaller_chunks]
    c1, n1 = r.smaller_chunks[0]
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "24GB", "--batch", "4", "--context", "32k")
    line = " ".join(out.split("largest context at batch 4:")[1].split("largest batch")[0].split())
    assert code == 0 and line.startswith(f"{r.max_context:,} tokens; with --prefill-chunk {c1}: {n1:,} tokens, ")


def test_only_the_halvings_that_gain_are_offered():
    """At 18 GiB and batch 2 the 9B fits 654 tokens at chunk 2048; chunk 1024 is capped at the context there too
    (no gain, not offered); 512 and 256 gain."""
    r = check(gpu="18GiB", batch=2, context="1k")
    assert r.max_context == smaller_chunk_boundary(r, 1024) == 654
    assert [c for c, _ in r.smaller_chunks] == [512, 256]
    assert all(n == smaller_chunk_boundary(r, c) > r.max_context for c, n in r.smaller_chunks)


@pytest.mark.parametrize("kw", [dict(gpu="24GB", batch=1), dict(gpu="24GB", batch=4, context="32k", prefill_chunk=256),
                                dict(gpu="24GB", batch=2, prefill_chunk=300), dict(gpu="17.8GiB", batch=2),
                                dict(model="nemotron-nano-12b-v2-base", batch=2)])
def test_no_prefill_chunk_hint_when_it_gains_nothing(capsys, kw):
    """batch 1; a chunk at 256 or halving below it; 205 tokens fit (below every smaller chunk: the same
    activations); the 12B's weights alone exceed the budget (0 tokens at any chunk)."""
    r = check(**kw)
    assert r.smaller_chunks == [] and r.to_json()["max_context_smaller_prefill_chunk"] == []
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {"gpu": "a10g", **kw}.items()]
    code, out, _ = main_in_process(capsys, "fit-check", *args)
    assert code in (0, 1) and "with --prefill-chunk" not in out


def test_no_prefill_chunk_hint_without_a_context_limit(tmp_path):
    (tmp_path / "config.json").write_text(config("tiny").replace(hybrid_override_pattern="M-M-").to_json_string())
    r = check(str(tmp_path / "config.json"), batch=4, context="4k")
    assert r.max_context is None and r.smaller_chunks == []


def test_a_huge_size_has_no_context_limit_and_says_why(capsys, tmp_path):
    assert check(gpu="100000TiB").max_context is None
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "100000TiB")
    assert code == 0 and "no limit from memory (2^40 tokens still fit)" in out


def test_plot_against_a_memory_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, _ = main_in_process(capsys, "fit-check", "--gpu", "24GB", "--context", "32k", "--plot",
                                   str(tmp_path / "fit.png"))
    assert code == 0 and (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
