"""safetensors headers, read in pure Python: tensor names, dtypes and shapes without the data.

A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON
(``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw data. ``nano fit-check`` reads only the first 8 + N bytes of each file, so a 17 GB
checkpoint costs a few kilobytes of I/O and no torch. Every malformed header is a one-line
``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
# Bytes per element of every safetensors dtype.
ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                  "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, ...
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class CheckpointTensors:
    """What the safetensors headers of a model directory hold (``mtp.*`` tensors kept apart)."""

    files: list[Path]
    tensors: list[TensorInfo]  # the model's tensors (mtp.* excluded)
    mtp: list[TensorInfo] = field(default_factory=list)  # multi-token-prediction tensors: not loaded by nano

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        """Stored dtype -> number of tensors (model tensors only)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def read_safetensors_header(file: str | Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} from one safetensors file, reading only its header."""
    file = Path(file)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a valid safetensors file ({why}); re-download or re-save it")

    try:
        size = os.stat(file).st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"{len(prefix)} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise bad(f"header length {n} does not fit a file of {size} bytes")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPE_BYTES:  # a list or an object is unhashable
            raise bad(f"tensor {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name} has shape {shape!r}")
        info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=file)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise bad(f"tensor {name} has data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != info.nbytes:
            raise bad(f"tensor {name} claims bytes {begin}..{end} of {data_bytes}, "
                      f"its {dtype} shape {list(shape)} needs {info.nbytes}")
        out[name] = info
    return out


def weight_file_list(path: Path) -> list[Path]:
    """The safetensors files of a model directory: from the index, else ``model.safetensors``; [] if none."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-save the checkpoint") from None
        names = list(weight_map.values())
        for name in names:  # shard file names only: an index never points outside its directory
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{index}: weight_map lists {name!r}, not a file name in the checkpoint "
                                      "directory; re-save the checkpoint")
        files = sorted({path / name for name in names})
        for f in files:
            try:
                present = f.is_file()
            except OSError as e:
                raise CheckpointError(f"{index}: cannot use the shard name {f.name[:60]!r} ({e.strerror}); "
                                      "re-save the checkpoint") from None
            if not present:
                raise CheckpointError(f"{f}: listed in {INDEX_NAME} but missing; the checkpoint is incomplete")
        return files
    single = path / SINGLE_NAME
    return [single] if single.is_file() else []


def read_checkpoint_tensors(path: str | Path) -> CheckpointTensors | None:
    """Every tensor of a model directory, from its headers only; None when it holds no safetensors."""
    path = Path(path)
    files = weight_file_list(path)
    if not files:
        return None
    tensors, mtp, seen = [], [], {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in seen:
                raise CheckpointError(f"{f}: tensor {name} is also stored in {seen[name]}; the checkpoint is inconsistent")
            seen[name] = f
            (mtp if name.startswith("mtp.") else tensors).append(info)
    return CheckpointTensors(files=files, tensors=tensors, mtp=mtp)
