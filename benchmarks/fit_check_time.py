"""Wall time of ``nano fit-check`` on a full-size Nemotron-Nano-9B-v2 checkpoint directory (target < 0.3 s).

    .venv/bin/python benchmarks/fit_check_time.py [--runs 15] [--keep DIR]

Builds a 9B-v2 checkpoint directory whose four safetensors shards carry the real headers (every tensor
name, BF16 dtype, shape and offset of the released layout) but sparse data: each file is extended with
``truncate`` to its full size (17.8 GB in all) and costs no disk. Then times
``nano fit-check --model DIR --gpu a10g`` as a fresh process, several times, and prints the median.
The command reads config.json and the four headers (a few hundred KB) and never imports torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanocli.profiles import load_model_profile  # noqa: E402
from nanocli_model import NanoConfig  # noqa: E402

SHARDS = 4


def tensor_shapes(config: NanoConfig) -> dict[str, list[int]]:
    """Every tensor name and shape of the released layout, from the meta-device model (no memory)."""
    import torch

    from nanocli_model.model import NanoForCausalLM

    with torch.device("meta"):
        model = NanoForCausalLM(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def write_sparse_shard(path: Path, shapes: dict[str, list[int]]) -> int:
    """A safetensors file with a real header and a hole where the BF16 data would be."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def build_checkpoint(out: Path) -> int:
    config = load_model_profile("nemotron-nano-9b-v2").config  # nanocli/profiles/models/
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_string())
    shapes = tensor_shapes(config)
    names = list(shapes)
    per = -(-len(names) // SHARDS)
    weight_map, total = {}, 0
    for i in range(SHARDS):
        fname = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {k: shapes[k] for k in names[i * per:(i + 1) * per]}
        total += write_sparse_shard(out / fname, part)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def time_command(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=False)  # warm the page cache once
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if result.returncode != 0 or "FITS" not in result.stdout:
            raise SystemExit(f"unexpected result (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = ap.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="nano-fit-9b-"))
    try:
        data = build_checkpoint(out)
        disk = sum(f.stat().st_blocks * 512 for f in out.iterdir())
        print(f"checkpoint: {out} ({SHARDS} shards, {data / 1e9:.1f} GB of tensor data, "
              f"{disk / 1e3:.0f} KB on disk)")
        nano = Path(sys.executable).parent / "nano"
        cmd = [str(nano) if nano.exists() else "nano", "fit-check", "--model", str(out), "--gpu", "a10g"]
        times = time_command(cmd, args.runs)
        print(f"command: nano {' '.join(cmd[1:])}")
        print(f"wall time over {len(times)} runs: median {statistics.median(times):.3f} s, "
              f"min {min(times):.3f} s, max {max(times):.3f} s (target < 0.3 s)")
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
