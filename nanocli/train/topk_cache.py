"""The teacher's top-k logits per data window on disk (``nano distill --kd-top-k K --teacher-cache DIR``).

Reused whenever a window comes round again (later epochs, later runs): ``DIR/<fingerprint>/<source
key>/<window>.safetensors`` holding ``values`` (T, k) float32 and ``indices`` (T, k) int32. The fingerprint
is what the logits depend on (the teacher's config, its weight files' names, sizes and times, its dtype, k
and the window length), so a changed teacher gets a new directory instead of stale logits. Written
atomically (temporary file + rename); safetensors, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nanocli_model.errors import NanoError


def fingerprint(teacher: Path, dtype: str, k: int, seq_len: int) -> str:
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in teacher.glob("*.safetensors"))
    payload = {"config": (teacher / "config.json").read_text(encoding="utf-8"), "files": files,
               "dtype": dtype, "top_k": k, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheUse:
    """What a run got from the cache."""

    hits: int  # windows read from disk
    misses: int  # windows the teacher computed (and the cache stored)
    path: Path


class TopKCache:
    """``get`` the teacher's top-k for a batch of windows, computing and storing those not yet on disk."""

    def __init__(self, root: Path, fingerprint: str, k: int, chunk: int, error: type[NanoError] = NanoError):
        self.dir, self.k, self.chunk, self.error = root / fingerprint, k, chunk, error
        self.hits = self.misses = 0

    @classmethod
    def for_teacher(cls, teacher: Path, dtype: str, k: int, seq_len: int, chunk: int, root: Path,
                    error: type[NanoError] = NanoError) -> TopKCache:
        return cls(root, fingerprint(teacher, dtype, k, seq_len), k, chunk, error)

    def use(self) -> CacheUse:
        return CacheUse(self.hits, self.misses, self.dir)

    def _path(self, key: tuple[str, int]) -> Path:
        return self.dir / key[0][:32] / f"{int(key[1]):09d}.safetensors"

    def get(self, teacher, input_ids, keys: list[tuple[str, int]]):
        """TeacherTopK (B, T, k) for the rows ``input_ids`` (B, T) whose windows are ``keys``."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        from .kd import TeacherTopK, teacher_topk

        paths = [self._path(k) for k in keys]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        fresh = {}
        if missing:
            top = teacher_topk(teacher, input_ids[missing], self.k, self.chunk)  # (m, T, k)
            for j, i in enumerate(missing):
                fresh[i] = (top.values[j], top.indices[j])
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.tmp")
                save_file({"values": top.values[j].contiguous(), "indices": top.indices[j].int().contiguous()},
                          str(tmp))
                os.replace(tmp, paths[i])
        vals, idx = [], []
        for i, p in enumerate(paths):
            if i in fresh:
                v, x = fresh[i]
            else:
                try:
                    t = load_file(str(p))
                except (SafetensorError, OSError) as e:
                    raise self.error(f"{p}: unreadable teacher cache file ({e}); delete it to recompute") from None
                v, x = t["values"], t["indices"]
                if v.shape != (input_ids.shape[1], self.k):
                    raise self.error(f"{p}: cached logits of shape {tuple(v.shape)}, expected "
                                     f"{(input_ids.shape[1], self.k)}; delete the cache directory")
            vals.append(v)
            idx.append(x.long())
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        return TeacherTopK(torch.stack(vals), torch.stack(idx))  # (B, T, k)
