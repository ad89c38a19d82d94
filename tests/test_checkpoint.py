"""Checkpoints: bit-exact round trips, shards, strictness, clear errors, atomic writes."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_utils import randomize, tiny_config
from nanocli_model import CheckpointError, ConfigError, NanoForCausalLM, load_pretrained, save_pretrained
from nanocli_model import checkpoint as ckpt


@pytest.fixture
def model():
    m = NanoForCausalLM(tiny_config()).eval()
    randomize(m, 3)
    return m


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, model, dtype):
    model = model.to(dtype)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.dtype == dtype and _same_weights(model, loaded)
    assert loaded.config.to_dict() == model.config.replace(torch_dtype=str(dtype)[6:]).to_dict()
    ids = torch.randint(0, 96, (1, 13))
    assert torch.equal(model(ids), loaded(ids))


def test_load_casts_to_requested_dtype(tmp_path, model):
    save_pretrained(model, tmp_path / "m")
    assert load_pretrained(tmp_path / "m", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        load_pretrained(tmp_path / "m", dtype="int7")


def test_sharded_save_loads(tmp_path, model):
    save_pretrained(model, tmp_path / "m", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert _same_weights(model, load_pretrained(tmp_path / "m"))


def test_transformers_prefix_and_mtp_tensors(tmp_path, model, caplog):
    save_pretrained(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    state = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state.items()}
    state["mtp.layers.0.norm.weight"] = torch.ones(4)
    save_file(state, f)
    loaded = load_pretrained(tmp_path / "m")
    assert _same_weights(model, loaded)
    assert "mtp" in caplog.text


def test_tied_embeddings_round_trip(tmp_path):
    m = NanoForCausalLM(tiny_config(tie_word_embeddings=True))
    randomize(m, 1)
    save_pretrained(m, tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight and _same_weights(m, loaded)


def _edit(tmp_path, model, fn):
    save_pretrained(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f)
    return tmp_path / "m"


def test_missing_tensor_is_named(tmp_path, model):
    d = _edit(tmp_path, model, lambda s: s.pop("backbone.layers.3.mixer.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor backbone\.layers\.3\.mixer\.q_proj\.weight"):
        load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path, model):
    d = _edit(tmp_path, model, lambda s: s.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor backbone\.layers\.0\.mixer\.extra"):
        load_pretrained(d)


def test_wrong_shape_is_named(tmp_path, model):
    d = _edit(tmp_path, model, lambda s: s.__setitem__("backbone.layers.0.mixer.A_log", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"A_log has shape \[5\], config.json implies \[8\]"):
        load_pretrained(d)


def test_non_float_tensor_rejected(tmp_path, model):
    d = _edit(tmp_path, model, lambda s: s.__setitem__("backbone.layers.0.mixer.D", torch.zeros(8, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="dtype I32"):
        load_pretrained(d)


def test_truncated_file_is_named(tmp_path, model):
    save_pretrained(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("payload", [b"", b"\x00" * 4, struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 5) + b"nope!"])
def test_corrupt_header_is_named(tmp_path, model, payload):
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(tmp_path / "m")


def test_missing_pieces(tmp_path, model):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    save_pretrained(model, tmp_path / "m", max_shard_size="20KB")
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing; the checkpoint is incomplete"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_pretrained(tmp_path / "m")
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text(tiny_config().to_json_string())
    with pytest.raises(CheckpointError, match="no safetensors weights in"):
        load_pretrained(empty)
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_pretrained(empty)
    (empty / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_pretrained(empty)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, model, monkeypatch):
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "trainer_state.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt, "save_file", boom)
    other = NanoForCausalLM(tiny_config())
    with pytest.raises(OSError, match="No space"):
        save_pretrained(other, tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_overwrite_keeps_side_files_and_replaces_weights(tmp_path, model):
    save_pretrained(model, tmp_path / "m", max_shard_size="20KB")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    m2 = NanoForCausalLM(tiny_config())
    randomize(m2, 9)
    save_pretrained(m2, tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _same_weights(m2, load_pretrained(tmp_path / "m"))
    with pytest.raises(CheckpointError, match="not a directory"):
        (tmp_path / "f").write_text("x")
        save_pretrained(m2, tmp_path / "f")


def test_meta_build_keeps_one_copy(tmp_path, model):
    # Loading assigns the file's tensors into a meta-built model: no parameter is left on meta.
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert not loaded.training


def test_load_holds_one_copy_of_the_weights(tmp_path):
    # Peak resident memory of a fresh process loading (and touching) a ~100 MB checkpoint stays
    # near one copy: meta-device build + memory-mapped tensors assigned in place, no second copy.
    import subprocess
    import sys

    c = tiny_config(vocab_size=16384, hidden_size=512, intermediate_size=2048, hybrid_override_pattern="M-M*-M-")
    m = NanoForCausalLM(c)
    save_pretrained(m, tmp_path / "m")
    size_mib = sum(p.numel() for p in m.parameters()) * 4 / 2**20
    code = (
        "import resource, torch, nanocli_model, nanocli_model.model;"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"m = nanocli_model.load_pretrained({str(tmp_path / 'm')!r});"
        "s = sum(float(p.sum()) for p in m.parameters());"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = float(out.stdout.strip())
    assert size_mib > 80
    assert grown < 1.4 * size_mib, f"loading {size_mib:.0f} MiB grew the peak RSS by {grown:.0f} MiB"
