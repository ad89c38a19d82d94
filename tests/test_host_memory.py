"""The host-memory check before a model loads on the CPU (``nanocli/host_memory.py``): the reader, the arithmetic,
and ``nano generate`` / ``nano eval`` / ``nano bench``, ``nano prune`` and the training stages (``pretrain``,
``align``, ``distill``) on a full-size Nemotron-Nano-9B-v2 directory whose safetensors data is a hole (real
headers, sparse files: no disk, and nothing to load). The machine's memory is a fake in-process reader."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_generate_cli import run

from model_utils import tiny_config, write_header_only_checkpoint
from nanocli import cli, host_memory
from nanocli.host_memory import (
    GIB,
    HostMemory,
    HostMemoryError,
    checkpoint_need,
    load_need,
    plan_cpu_load,
    read_host_memory,
)
from nanocli.profiles import load_model_profile
from nanocli_model.headers import read_checkpoint_tensors
from nanocli_model.tokenizer import build_test_tokenizer

PARAMS_9B = 8_888_227_328
EMBEDDING_9B = 131072 * 4480  # the largest tensor (embeddings; lm_head is the same size)
GB24 = HostMemory(24 * 10**9, "MemAvailable")  # a 24 GB machine: 22.35 GiB


class NotLoaded(Exception):
    """Raised by the patched loader: the check let the load start (the message: its dtype and device)."""


def refuse(path, dtype=None, device="cpu"):
    raise NotLoaded(f"{dtype} {device}")


@pytest.fixture(scope="module")
def nine_b(tmp_path_factory):
    """A 9B-v2 directory: config.json, four sparse BF16 shards + index (17.8 GB of headers, ~100 KB of disk),
    nano's test tokenizer."""
    out = tmp_path_factory.mktemp("host") / "NVIDIA-Nemotron-Nano-9B-v2"
    assert write_header_only_checkpoint(out, load_model_profile("nemotron-nano-9b-v2").config) == 2 * PARAMS_9B
    build_test_tokenizer(out, ["The answer is 42.\nHello world!\n"] * 20, vocab_size=300)
    return out


@pytest.fixture
def machine(monkeypatch):
    """Set the memory the check sees; the real loader fails the test if the check lets it run."""
    def set_memory(memory: HostMemory | None):
        monkeypatch.setattr(host_memory, "read_host_memory", lambda: memory)

    def no_load(*args, **kwargs):
        raise AssertionError("load_pretrained was called: the check should have stopped before any weight")

    monkeypatch.setattr("nanocli_model.load_pretrained", no_load)
    set_memory(GB24)
    return set_memory


# ------------------------------------------------------------------------------------------ the reader
def test_reader_takes_mem_available(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       24683784 kB\nMemFree:  1000 kB\n"
                                      "MemAvailable:   20971520 kB\n")
    assert read_host_memory(tmp_path / "meminfo", tmp_path / "no-cgroup") == HostMemory(20 * GIB, "MemAvailable")
    assert read_host_memory(tmp_path / "missing", tmp_path / "no-cgroup") is None  # not Linux: nothing to check


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_reader_respects_a_tighter_cgroup_limit(tmp_path, layout):
    (tmp_path / "meminfo").write_text("MemAvailable:   20971520 kB\n")
    cg = tmp_path / "cgroup"
    if layout == "v2":
        files = {"memory.max": 8 * GIB, "memory.current": 3 * GIB, "memory.stat": f"anon 1\ninactive_file {GIB}\n"}
    else:
        files = {"memory/memory.limit_in_bytes": 8 * GIB, "memory/memory.usage_in_bytes": 3 * GIB,
                 "memory/memory.stat": f"inactive_file 0\ntotal_inactive_file {GIB}\n"}
    for name, value in files.items():
        (cg / name).parent.mkdir(parents=True, exist_ok=True)
        (cg / name).write_text(f"{value}\n")
    # 8 GiB limit, 3 GiB charged of which 1 GiB is reclaimable page cache: 6 GiB of room, below MemAvailable
    assert read_host_memory(tmp_path / "meminfo", cg) == HostMemory(6 * GIB, "cgroup limit 8.00 GiB")


@pytest.mark.parametrize("limit", ["max", str(9223372036854771712)])
def test_reader_ignores_an_unlimited_cgroup(tmp_path, limit):
    (tmp_path / "meminfo").write_text("MemAvailable:   20971520 kB\n")
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert read_host_memory(tmp_path / "meminfo", tmp_path).source == "MemAvailable"


# ------------------------------------------------------------------------------------------ the arithmetic
def test_the_need_is_fit_checks_weights_plus_the_load_transient_plus_the_margin(nine_b):
    tensors = read_checkpoint_tensors(nine_b)
    fp32, bf16 = load_need(tensors, "fp32"), load_need(tensors, "bf16")
    assert fp32.weights == 4 * PARAMS_9B and bf16.weights == 2 * PARAMS_9B  # exact, from the headers
    # the largest tensor (embedding, lm_head) once more in the load dtype: the decode-layout copy, which is more
    # than the load's (stored bf16 while cast + the finite check's mask: 3 bytes per element, fp32; 1, bf16)
    assert fp32.transient == EMBEDDING_9B * 4 and bf16.transient == EMBEDDING_9B * 2
    assert fp32.runtime == bf16.runtime == host_memory.RUNTIME_MARGIN == GIB
    assert f"{fp32.total / GIB:.2f} {bf16.total / GIB:.2f}" == "36.30 18.65"


def test_a_cast_to_a_narrower_dtype_holds_the_stored_tensor_while_it_casts(tmp_path):
    write_header_only_checkpoint(tmp_path, tiny_config(), shards=1, st_dtype="F32")
    tensors = read_checkpoint_tensors(tmp_path)
    largest = max(t.numel for t in tensors.tensors)
    assert load_need(tensors, "bf16").transient == largest * (4 + 1)  # stored fp32 + the check > a bf16 copy (2)
    assert load_need(tensors, "fp32").transient == largest * 4  # no cast: the decode-layout copy > the check (1)


def test_unreadable_memory_checks_nothing_and_auto_stays_fp32(nine_b):
    need = checkpoint_need(read_checkpoint_tensors(nine_b))
    assert plan_cpu_load("m", need, "auto", read=lambda: None).dtype == "fp32"
    assert plan_cpu_load("m", None, "bf16", read=lambda: GB24).dtype == "bf16"  # no headers: the loader says why


# ------------------------------------------------------------------------------------------ nano generate
def test_fp32_that_does_not_fit_is_one_line_naming_the_need_and_bf16(capsys, monkeypatch, nine_b, machine):
    code, out, err = run(capsys, monkeypatch, "-m", nine_b, "hi", "--dtype", "fp32")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.splitlines() == [
        f"error: {nine_b} in fp32 needs 36.30 GiB of host memory (33.11 GiB of weights + 3.19 GiB to load and run "
        "them); this machine has 22.35 GiB available (MemAvailable): use --dtype bf16 (18.65 GiB)"]


def test_auto_picks_bf16_when_only_bf16_fits_and_says_why(capsys, monkeypatch, nine_b, machine):
    import torch

    from nanocli_model import NanoForCausalLM

    asked = {}

    def tiny_in_bf16(path, dtype=None, device="cpu"):  # stands in for the 9B once the check has chosen
        asked.update(path=path, dtype=dtype, device=device)
        return NanoForCausalLM(tiny_config(vocab_size=300)).to(torch.bfloat16).eval()

    monkeypatch.setattr("nanocli_model.load_pretrained", tiny_in_bf16)
    code, out, err = run(capsys, monkeypatch, "-m", nine_b, "hi", "--greedy", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert asked == {"path": nine_b, "dtype": "bf16", "device": "cpu"}
    result = json.loads(out)
    assert result["dtype"] == "bfloat16" and result["notes"] == [
        "--dtype auto: bf16, since fp32 needs 36.30 GiB of host memory and this machine has 22.35 GiB available "
        "(MemAvailable)"]
    assert "note: --dtype auto: bf16, since fp32 needs 36.30 GiB" in " ".join(err.split())  # the stats lines


def test_auto_with_room_for_fp32_keeps_fp32(capsys, monkeypatch, nine_b, machine):
    machine(HostMemory(40 * GIB, "MemAvailable"))
    monkeypatch.setattr("nanocli_model.load_pretrained", refuse)
    with pytest.raises(NotLoaded, match="fp32 cpu"):
        run(capsys, monkeypatch, "-m", nine_b, "hi")


@pytest.mark.parametrize("dtype,memory,message", [
    ("auto", 10 * GIB, "needs 18.65 GiB of host memory (16.56 GiB of weights + 2.09 GiB to load and run them) even "
                       "in bf16 (fp32: 36.30 GiB); this machine has 10.00 GiB available (MemAvailable): free some "
                       "memory, or run it on a GPU"),
    ("fp32", 10 * GIB, "in fp32 needs 36.30 GiB of host memory (33.11 GiB of weights + 3.19 GiB to load and run "
                       "them); this machine has 10.00 GiB available (MemAvailable): even --dtype bf16 needs 18.65 GiB"),
    ("bf16", 10 * GIB, "in bf16 needs 18.65 GiB of host memory (16.56 GiB of weights + 2.09 GiB to load and run "
                       "them); this machine has 10.00 GiB available (MemAvailable): no smaller dtype loads on the CPU"),
])
def test_nothing_that_fits_is_one_line(capsys, monkeypatch, nine_b, machine, dtype, memory, message):
    machine(HostMemory(memory, "MemAvailable"))
    code, _, err = run(capsys, monkeypatch, "-m", nine_b, "hi", "--dtype", dtype)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err


def test_a_gpu_load_is_not_checked_against_host_memory(capsys, monkeypatch, nine_b, machine):
    monkeypatch.setattr("nanocli.resolve.visible_device", lambda name, flag="--device": "cuda")
    machine(HostMemory(GIB, "MemAvailable"))  # far too little for the CPU: not consulted for a GPU
    monkeypatch.setattr("nanocli_model.load_pretrained", refuse)
    with pytest.raises(NotLoaded, match="None cuda"):  # auto on a GPU: the stored dtype, as before
        run(capsys, monkeypatch, "-m", nine_b, "hi")


# ------------------------------------------------------------------------------------------ nano eval
def test_eval_checks_the_same_way(capsys, monkeypatch, nine_b, machine):
    monkeypatch.setattr("sys.argv", ["nano", "eval", "--model", str(nine_b), "--dtype", "fp32", "-n", "1"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "in fp32 needs 36.30 GiB of host memory" in err and "use --dtype bf16 (18.65 GiB)" in err


def test_the_error_is_a_nano_error():  # so every command ends it as one error: line, exit 2
    from nanocli_model.errors import NanoError

    assert issubclass(HostMemoryError, NanoError)


# ------------------------------------------------------------------------------------------ nano bench
def test_bench_counts_the_model_and_its_twin(capsys, monkeypatch, machine):
    from nanocli.bench import BenchOptions, resolve

    # a 9B profile is built with random weights: in fp32 it would not fit, in bf16 it does (without the twin)
    plan = resolve(BenchOptions(model="nemotron-nano-9b-v2", compare_transformer=False, device="cpu"))
    assert plan.dtype == "bf16" and plan.note.startswith("--dtype auto: bf16, since fp32 needs 36.30 GiB")
    monkeypatch.setattr("sys.argv", ["nano", "bench", "--model", "nemotron-nano-9b-v2", "--quick"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "error: nemotron-nano-9b-v2 with its pure-attention twin needs" in err and "even in bf16" in err


def test_bench_with_room_keeps_fp32(machine):
    from nanocli.bench import BenchOptions, resolve

    plan = resolve(BenchOptions(model="small", device="cpu"))
    assert plan.dtype == "fp32" and plan.note is None


def test_int8_from_bf16_needs_the_int8_model_and_one_float_layer_so_the_9b_fits_24_gb(
        capsys, monkeypatch, nine_b, machine, tmp_path):
    """--dtype int8 from a float checkpoint reads the projections layer by layer (``quant.quantize_int8``): the
    int8 model's bytes (config arithmetic and headers agree) plus the largest step, the 9B's lm_head in fp32
    while its bf16 copy is cast; a saved int8 directory loads as stored (its headers' bytes)."""
    from model_utils import randomize
    from nanocli_model import NanoForCausalLM, fit, save_pretrained
    from nanocli_model.checkpoint import load_pretrained  # the real one (the fixture replaces the package's)

    tensors = read_checkpoint_tensors(nine_b)
    config = load_model_profile("nemotron-nano-9b-v2").config
    need = load_need(tensors, "int8")
    assert need.weights == fit.weights_bytes(config, "int8")
    assert need.transient == EMBEDDING_9B * (4 + 2)  # lm_head: fp32 + its bf16 copy, more than any layer
    assert need.total < load_need(tensors, "bf16").total < GB24.available < load_need(tensors, "fp32").total
    monkeypatch.setattr("nanocli_model.load_pretrained", refuse)
    with pytest.raises(NotLoaded, match="int8 cpu"):  # the check lets it load on a 24 GB machine
        run(capsys, monkeypatch, "-m", nine_b, "hi", "--dtype", "int8", "--max-new-tokens", "1")

    src = save_pretrained(randomize_model(NanoForCausalLM, randomize), tmp_path / "fp32")
    saved = save_pretrained(load_pretrained(src, dtype="int8"), tmp_path / "int8")
    stored = read_checkpoint_tensors(saved)
    need = load_need(stored, "int8")
    assert need.weights == sum(t.nbytes for t in stored.tensors) < load_need(read_checkpoint_tensors(src), "fp32").weights
    assert any(t.dtype == "I8" for t in stored.tensors)


def randomize_model(cls, randomize):
    m = cls(tiny_config())
    randomize(m, 0)
    return m


# ------------------------------------------------------------------------------------------ prune and training
FP32_9B = 4 * PARAMS_9B  # 33.11 GiB
LOAD_9B = EMBEDDING_9B * 4 + host_memory.RUNTIME_MARGIN  # fp32 load transient (the embedding) + the margin


def nano(capsys, monkeypatch, *args) -> tuple[int, str]:
    """``nano ARGS`` in-process: (exit code, stderr without the blank line a stage's progress display leaves)."""
    monkeypatch.setattr("sys.argv", ["nano", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err.strip()


DATA = "synthetic:reasoning?docs=20&difficulty=1"


def stage_args(stage: str, nine_b, out) -> list:
    common = ["--out", out, "--device", "cpu"]
    return {"prune": ["prune", "-m", nine_b, "--hidden-size", 2048, *common],
            "pretrain": ["pretrain", "-m", nine_b, "--data", DATA, "--steps", 1, *common],
            "pretrain-profile": ["pretrain", "--profile", "nemotron-nano-9b-v2", "--tokenizer", nine_b, "--data",
                                 DATA, "--steps", 1, *common],
            "align": ["align", "--method", "dpo", "-m", nine_b, "--data", DATA, "--steps", 1, *common],
            "distill": ["distill", "--teacher", nine_b, "--student", nine_b, "--data", DATA, "--steps", 1,
                        *common]}[stage]


# what each stage holds on the CPU: the 9B trained (16 bytes a parameter: fp32 weights, gradients, AdamW's two
# moments; loaded, or built from the profile), its DPO reference (fp32), the teacher (bf16, distill's default
# under the default precision), the pruned parent (fp32); the parts as the error names them
STAGES = {
    "prune": (FP32_9B + LOAD_9B, "the parent's fp32 weights 33.11 GiB + 3.19 GiB to load and run them"),
    "pretrain": (4 * FP32_9B + LOAD_9B, "the model's fp32 weights, gradients and AdamW moments 132.44 GiB + 3.19 GiB"),
    "pretrain-profile": (4 * FP32_9B + LOAD_9B, "the model's fp32 weights, gradients and AdamW moments 132.44 GiB"),
    "align": (5 * FP32_9B + LOAD_9B, "the policy's fp32 weights, gradients and AdamW moments 132.44 GiB + the "
                                     "reference's fp32 weights 33.11 GiB + 3.19 GiB"),
    "distill": (4 * FP32_9B + 2 * PARAMS_9B + LOAD_9B, "the student's fp32 weights, gradients and AdamW moments "
                                                       "132.44 GiB + the teacher's bf16 weights 16.56 GiB + 3.19 GiB"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_that_does_not_fit_is_one_line_before_any_weight_or_file(capsys, monkeypatch, nine_b, machine,
                                                                         tmp_path, stage):
    """On a 24 GB machine each stage stops with one line and exit 2: no weight read (the fixture's loader
    fails the test), and not even the output directory (or its lock) written."""
    def no_build(*args, **kwargs):
        raise AssertionError("build_model was called: the check should have stopped before any weight")

    monkeypatch.setattr("nanocli_model.build_model", no_build)  # pretrain --profile builds its weights
    monkeypatch.setenv("NANO_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # were the data read
    need, parts = STAGES[stage]
    out = tmp_path / "out"
    code, err = nano(capsys, monkeypatch, *stage_args(stage, nine_b, out))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: nano {stage.split('-')[0]}")  # align: "nano align (dpo) needs"
    assert f"needs {need / GIB:.2f} GiB of host memory ({parts}" in err
    assert "this machine has 22.35 GiB available (MemAvailable): free some memory, or run it on a GPU" in err
    assert list(tmp_path.iterdir()) == []  # no OUT, no lock beside it


@pytest.mark.parametrize("stage", ["prune", "distill"])
def test_the_need_is_the_boundary(capsys, monkeypatch, nine_b, machine, tmp_path, stage):
    """Exactly the need available: the stage goes on to load (the patched loader says so); a byte less: refused."""
    need, _ = STAGES[stage]
    monkeypatch.setenv("NANO_CACHE", str(tmp_path / "cache"))  # distill tokenizes its data before the load
    machine(HostMemory(need - 1, "MemAvailable"))
    code, err = nano(capsys, monkeypatch, *stage_args(stage, nine_b, tmp_path / "a"))
    assert code == 2 and "free some memory" in err
    machine(HostMemory(need, "MemAvailable"))
    monkeypatch.setattr("nanocli_model.load_pretrained", refuse)
    with pytest.raises(NotLoaded, match="fp32|bf16"):
        nano(capsys, monkeypatch, *stage_args(stage, nine_b, tmp_path / "b"))


def test_training_counts_16_bytes_a_parameter_sharded_by_fsdp_but_never_below_the_fp32_load(nine_b):
    load = host_memory.loaded(nine_b, "fp32")
    assert load.weights == FP32_9B
    assert host_memory.training(load).weights == 16 * PARAMS_9B
    assert host_memory.training(load, shards=2).weights == 8 * PARAMS_9B
    assert host_memory.training(load, shards=8).weights == 4 * PARAMS_9B  # each process loads it whole first
    assert host_memory.training(load).transient == load.transient and host_memory.training(load).runtime == GIB


def test_every_process_on_the_host_holds_its_own(nine_b):
    parts = [("the model's weights", host_memory.loaded(nine_b, "bf16"))]  # 18.65 GiB
    fits = host_memory.check_cpu("nano x", parts, processes=1, read=lambda: GB24)
    assert fits is not None and fits.total == parts[0][1].total
    with pytest.raises(HostMemoryError, match=r"needs 37\.30 GiB .* in each of 2 processes\)"):
        host_memory.check_cpu("nano x", parts, processes=2, read=lambda: GB24)
    assert host_memory.check_cpu("nano x", parts, read=lambda: None) is None  # unreadable: nothing checked
    assert host_memory.check_cpu("nano x", [], read=lambda: HostMemory(0, "MemAvailable")) is None  # all on a GPU


def test_distill_counts_only_the_models_on_the_cpu(nine_b):
    """A student on a GPU is fit-check's: only a CPU teacher is counted; with both on a GPU, nothing."""
    import torch

    from nanocli.stages import distill as ds
    from nanocli.train.distributed import Dist

    o = ds.DistillOptions(teacher=str(nine_b), student=str(nine_b), data=DATA, steps=1, out="unused",
                          teacher_device="cpu")
    p = ds.plan(o)
    on_gpu = Dist(device=torch.device("cuda", 0))
    parts = ds._Distill(p, ds.DistillResult(p)).host_need(on_gpu, 1)
    assert [label for label, _ in parts] == ["the teacher's bf16 weights"]
    assert parts[0][1].weights == 2 * PARAMS_9B
    both = ds.plan(dataclasses.replace(o, teacher_device="auto"))
    assert ds._Distill(both, ds.DistillResult(both)).host_need(on_gpu, 1) == []
