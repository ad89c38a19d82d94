"""The decode step compiled ahead of time and kept on disk (``nanocli_model.aot_decode``): what ``nano generate``
decodes with on CPU.

References: transformers' NemotronH ``generate``, a float64 eager model, nano's eager model on the same weights.
The module compiles two libraries (batch 1, and batch 3 left-padded) into one directory; every later use of
the same shape loads them, as a second run of ``nano generate`` would.
"""

from __future__ import annotations

import os
import time
import zipfile

import pytest
import torch

from model_utils import decode_model, needs_cxx, random_prompts
from nanocli_model import aot_decode, row_gemv, save_pretrained
from nanocli_model.generation import SamplingParams, generate

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=20)


def _model(seed=0, dtype=torch.float32, **overrides):
    """``decode_model`` cut to one layer of each kind (Mamba, attention, MLP): compiles in two-thirds of the time.
    The MLP is wide enough (512) that its down_proj takes nano's own GEMV in a compiled step
    (``layers.ROW_GEMV_MIN_IN``) while the narrower projections take inductor's row-dot loop: both paths."""
    return decode_model(seed, dtype, **{"hybrid_override_pattern": "M*-", "intermediate_size": 512, **overrides})


def _eager(seed, prompts, **overrides):
    return [generate(_model(seed, **overrides), [p], GREEDY).completions[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The directory the module's libraries are compiled into, and the AotDecode that compiled them."""
    directory = tmp_path_factory.mktemp("decode")
    m = _model(seed=5)
    step = aot_decode.AotDecode(m, directory)
    generate(m, random_prompts([11]), GREEDY, decode_step=step)  # batch 1
    generate(m, random_prompts([9, 3, 6], seed=2), GREEDY, decode_step=step)  # batch 3, left-padded
    assert step.fallback_reason is None, step.fallback_reason
    return directory, m, step


@needs_cxx
def test_compiled_once_per_batch_shape_and_kept_in_the_directory(library):
    directory, _, step = library
    assert (step.built, step.loaded) == (2, 0)
    assert step.compile_seconds > 0 and step.calls == 19 + 19
    packages = sorted(p.name for p in directory.iterdir())
    assert len(packages) == 2 and all(p.startswith("decode-") and p.endswith(".pt2") for p in packages)
    if row_gemv.available():  # the down_proj (rows of 512) calls nano's GEMV through its C shim, once a step
        for package in directory.iterdir():
            with zipfile.ZipFile(package) as z:
                code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
            assert code.count("AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_row_gemv_f32(") == 1


@needs_cxx
def test_steps_match_a_float64_model_at_any_kv_length_without_recompiling(library):
    directory, _, _ = library
    m, ref = _model(seed=5), _model(seed=5, dtype=torch.float64)
    step = aot_decode.AotDecode(m, directory)
    with torch.inference_mode():
        for max_len in (30, 200):  # the KV length and the position are symbolic in the library
            cache, cache64 = m.allocate_cache(1, max_len), ref.allocate_cache(1, max_len)
            prompt = torch.tensor(random_prompts([9], seed=max_len))
            m(prompt, cache)
            ref(prompt, cache64)
            for t in range(12):
                tok = torch.tensor([[3 + 7 * t % 90]])
                got, want = step(tok, cache), ref(tok, cache64)
                assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
            for a, b in zip(cache.tensors(), cache64.tensors()):  # the states it wrote in place
                assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    assert (step.built, step.loaded, step.calls) == (0, 1, 24)


@needs_cxx
def test_greedy_equals_transformers_generate(tmp_path, library):
    transformers = pytest.importorskip("transformers")
    directory, m, _ = library
    save_pretrained(m, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    step = aot_decode.AotDecode(_model(seed=5), directory)
    for prompt in random_prompts([13, 4], seed=1):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               eos_token_id=None)[0, len(prompt):].tolist()
        assert generate(step.model, [prompt], GREEDY, decode_step=step).completions[0].token_ids == expected
    assert step.loaded == 1 and step.built == 0


@needs_cxx
def test_another_model_of_the_shape_loads_the_library_and_decodes_with_its_own_weights(library):
    """The library holds no weights: a model of another seed reads its own (user-managed constants), one padded
    batch equals each prompt alone through that model's eager forward."""
    directory, _, _ = library
    prompts = random_prompts([9, 3, 6], seed=4)
    m = _model(seed=9)
    step = aot_decode.AotDecode(m, directory)
    for package in directory.glob("decode-*.pt2"):
        os.utime(package, (1e9, 1e9))  # used in 2001
    batched = generate(m, prompts, GREEDY, decode_step=step)
    used = [p for p in directory.glob("decode-*.pt2") if p.stat().st_mtime > 1e9]
    assert len(used) == 1  # loading marked the batch-3 package used (what prune keeps), not the other
    assert [c.token_ids for c in batched.completions] == _eager(9, prompts)
    assert [c.token_ids for c in batched.completions] != _eager(5, prompts)  # not the compiling model's
    assert (step.built, step.loaded) == (0, 1) and step.compiled


def test_prune_keeps_the_most_recently_used_packages_and_drops_a_killed_compiles_leftovers(tmp_path):
    now = time.time()
    ages = {f"decode-{i}.pt2": i * 3600 for i in range(5)}  # decode-0 used last
    ages.update({".decode-7.123.tmp.pt2": 2 * 86400, ".decode-8.456.tmp.pt2": 60, "notes.txt": 10 * 86400})
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    removed = aot_decode.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [".decode-7.123.tmp.pt2", "decode-2.pt2", "decode-3.pt2",
                                               "decode-4.pt2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".decode-8.456.tmp.pt2", "decode-0.pt2", "decode-1.pt2",
                                                          "notes.txt"]  # a compile may still be writing .8
    assert aot_decode.prune(tmp_path / "missing") == []


def test_the_key_names_what_the_compiled_code_depends_on():
    m = _model(seed=1)
    cache = m.allocate_cache(1, 16)
    key = aot_decode.artefact_key(m, cache)
    assert key == aot_decode.artefact_key(_model(seed=2), m.allocate_cache(1, 99))  # weights, KV length: no
    wider = _model(intermediate_size=64)
    assert key != aot_decode.artefact_key(wider, wider.allocate_cache(1, 16))
    assert key != aot_decode.artefact_key(m, m.allocate_cache(2, 16))
    if row_gemv.available():
        with row_gemv.use(False):  # a step built without nano's GEMVs
            assert key != aot_decode.artefact_key(m, cache)
    cache.left_pad(torch.tensor([1]))
    assert key != aot_decode.artefact_key(m, cache)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key != aot_decode.artefact_key(m, m.allocate_cache(1, 16))
    finally:
        torch.set_num_threads(threads)


@needs_cxx
def test_an_unreadable_library_is_compiled_again(tmp_path, library, monkeypatch):
    directory, _, _ = library
    good = next(p for p in sorted(directory.iterdir()))
    m = _model(seed=5)
    cache = m.allocate_cache(1, 40)
    path = tmp_path / f"decode-{aot_decode.artefact_key(m, cache)}.pt2"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])  # a truncated file under the right name
    compiled = []

    def compile_(self, cache, target):  # stands in for the real compile: that shape's library, whole
        compiled.append(target)
        src = next(p for p in directory.iterdir() if p.name == target.name)
        target.write_bytes(src.read_bytes())

    monkeypatch.setattr(aot_decode.AotDecode, "_compile", compile_)
    step = aot_decode.AotDecode(m, tmp_path)
    prompt = random_prompts([7], seed=3)
    got = generate(m, prompt, GREEDY, decode_step=step).completions[0].token_ids
    assert compiled == [path] and (step.built, step.loaded) == (1, 0) and step.fallback_reason is None
    assert len(step.notes) == 1 and "unreadable" in step.notes[0] and "\n" not in step.notes[0]
    assert "running eager" not in step.notes[0]
    assert got == _eager(5, prompt)[0]


def test_a_failed_compile_leaves_no_file_and_decodes_eagerly(tmp_path, monkeypatch):
    def broken(program, package_path, **kwargs):
        with open(package_path, "wb") as f:
            f.write(b"half a library")
        raise RuntimeError("InductorError: C++ compile error\nlong trace")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    m = _model(seed=6)
    step = aot_decode.AotDecode(m, tmp_path)
    prompt = random_prompts([7], seed=6)
    got = generate(m, prompt, GREEDY, decode_step=step)
    assert got.completions[0].token_ids == _eager(6, prompt)[0]
    assert not step.compiled and step.fallback_reason.startswith("RuntimeError: InductorError: C++ compile error")
    assert "\n" not in step.fallback_reason and list(tmp_path.iterdir()) == []


def test_models_it_does_not_compile_decode_eagerly_and_say_why(tmp_path):
    m = _model(seed=3, dtype=torch.bfloat16)
    step = aot_decode.AotDecode(m, tmp_path)
    assert not step.compiled and "float32" in step.fallback_reason
    prompt = random_prompts([5], seed=3)
    got = generate(m, prompt, GREEDY, decode_step=step).completions[0].token_ids
    assert got == generate(_model(seed=3, dtype=torch.bfloat16), prompt, GREEDY).completions[0].token_ids
    assert list(tmp_path.iterdir()) == []


def test_a_cache_of_another_layout_decodes_eagerly(tmp_path):
    m = _model(seed=4)
    step = aot_decode.AotDecode(m, tmp_path)
    cache = m.allocate_cache(1, 20)
    for layer in cache.layers:  # the SSM state as a transposed copy: same values, other strides
        if hasattr(layer, "ssm"):
            layer.ssm = layer.ssm.transpose(2, 3).contiguous().transpose(2, 3)
    ref = _model(seed=4)
    ref_cache = ref.allocate_cache(1, 20)
    prompt = torch.tensor(random_prompts([5], seed=4))
    with torch.inference_mode():
        m(prompt, cache)
        ref(prompt, ref_cache)
        for t in range(3):
            tok = torch.tensor([[7 + t]])
            assert torch.allclose(step(tok, cache), ref(tok, ref_cache), rtol=1e-5, atol=1e-5)
    assert not step.compiled and "HybridCache.allocate" in step.fallback_reason
    assert list(tmp_path.iterdir()) == []


def test_a_library_that_holds_its_own_copy_of_a_weight_is_refused(tmp_path, monkeypatch):
    """A library built without runtime constant folding keeps the compiling model's A_log / D / dt_bias: loading
    it for another model must fail (and so decode eagerly), not decode with those values."""
    m = _model(seed=2)
    names = [f"model.{n}" for n, _ in m.named_parameters() if not n.endswith("A_log")]

    class Baked:
        def get_constant_fqns(self):
            return names

        def load_constants(self, *args, **kwargs):
            raise AssertionError("must not be loaded")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: Baked())
    step = aot_decode.AotDecode(m, tmp_path)
    with pytest.raises(ValueError, match="A_log"):
        step._load(tmp_path / "decode-x.pt2")
