"""Activation importance of every prunable structure, from one forward pass over calibration data.

Aggregation (docs/REFERENCE.md §6, Minitron): for an activation ``a`` of shape (samples, tokens, channels),
a channel's score is ``sqrt(sum_s (mean_t |a[s, t, c]|)^2)``: the mean of |activation| over the
sequence, then the L2 norm over samples. Structures and where they are read (forward hooks, no
gradients):

- embedding channels (hidden size): each block's pre-norm *output* (what feeds the mixer), scored per
  block as above, then summed over the blocks;
- MLP neurons: the input of ``down_proj`` (``relu(up_proj(x))^2``);
- attention heads: the input of ``o_proj`` (the heads' outputs), per channel, then a head's score is the
  L2 over its ``head_dim`` channels;
- Mamba heads: the ``x`` branch of ``in_proj``'s output, per channel (``mamba_channels``, shape (H, P)),
  then a head's score is the L2 over its P channels and a head-dim channel's score the L2 over heads;
- block importance for the cheap depth rule: ``mean over tokens of 1 - cos(x_in, x_out)`` per block.

``Scores`` round-trips through a safetensors file whose metadata holds a JSON header (the parent's
config, the calibration set, the aggregation), never pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanocli_model.config import ATTENTION, MAMBA, MLP, NanoConfig

from . import PruneError

FORMAT = "nano-prune-scores"
VERSION = 1
AGGREGATION = "channel score = sqrt(sum over samples of (mean over tokens of |activation|)^2); " \
              "hidden = sum over blocks of the block's pre-norm output score"


def config_fingerprint(config: NanoConfig) -> str:
    """Hash of the architecture (not the dtype): a scores file belongs to one parent."""
    d = config.to_dict()
    d.pop("torch_dtype", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Scores:
    """Importance of every structure of one parent model (CPU float32 tensors, parent numbering)."""

    hidden: torch.Tensor  # (hidden,)
    mlp: dict[int, torch.Tensor]  # layer -> (intermediate,)
    attention: dict[int, torch.Tensor]  # layer -> (heads,) head scores
    mamba_channels: dict[int, torch.Tensor]  # layer -> (H, P) channel scores of the x branch
    block: torch.Tensor  # (layers,) mean 1 - cos(x_in, x_out)
    meta: dict[str, Any] = field(default_factory=dict)
    depth: dict[str, list[int]] = field(default_factory=dict)  # cached greedy removal orders, by key

    def mamba_heads(self, layer: int) -> torch.Tensor:
        """(H,) head score: L2 over the head's channels."""
        return torch.linalg.vector_norm(self.mamba_channels[layer], dim=1)

    def mamba_head_dim(self, layer: int) -> torch.Tensor:
        """(P,) head-dim channel score: L2 over heads (the same channels are kept in every head)."""
        return torch.linalg.vector_norm(self.mamba_channels[layer], dim=0)

    def summary(self) -> dict[str, Any]:
        """Small numbers for pruning.json: per structure min / median / max."""
        def stats(t: torch.Tensor) -> dict[str, float]:
            t = t.float().flatten()
            return {"min": round(t.min().item(), 6), "median": round(t.median().item(), 6),
                    "max": round(t.max().item(), 6), "n": t.numel()}

        out: dict[str, Any] = {"hidden": stats(self.hidden), "block_1_minus_cos": [round(x, 6) for x in self.block.tolist()]}
        for name, table in (("mlp", self.mlp), ("attention_heads", self.attention)):
            out[name] = {str(i): stats(t) for i, t in table.items()}
        out["mamba_heads"] = {str(i): stats(self.mamba_heads(i)) for i in self.mamba_channels}
        return out

    # ------------------------------------------------------------------ file
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"hidden": self.hidden, "block": self.block}
        tensors.update({f"mlp.{i}": t for i, t in self.mlp.items()})
        tensors.update({f"attention.{i}": t for i, t in self.attention.items()})
        tensors.update({f"mamba.{i}": t for i, t in self.mamba_channels.items()})
        header = {"format": FORMAT, "version": VERSION, **self.meta, "depth": self.depth}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"nano": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, config: NanoConfig) -> Scores:
        """Read a scores file and check it belongs to a model of ``config``'s architecture."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("nano", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise PruneError(f"{path}: not a readable scores file ({e}); delete it to recompute") from None
        if header.get("format") != FORMAT:
            raise PruneError(f"{path}: not a nano prune scores file; choose another --scores path")
        if header.get("config_fingerprint") != config_fingerprint(config):
            raise PruneError(f"{path}: holds scores of another architecture ({header.get('model')}); "
                              "use another --scores path for this model")
        depth = header.pop("depth", {})
        by = lambda prefix: {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith(prefix + ".")}  # noqa: E731
        return cls(hidden=tensors["hidden"], mlp=by("mlp"), attention=by("attention"), mamba_channels=by("mamba"),
                   block=tensors["block"], meta=header, depth={k: list(v) for k, v in depth.items()})


class _Accumulator:
    """Running sum over samples of (mean over tokens of |a|)^2, per channel."""

    def __init__(self):
        self.sq: torch.Tensor | None = None

    def add(self, a: torch.Tensor) -> None:
        m = a.detach().abs().float().mean(dim=1)  # (b, C): mean |a| over the sequence
        s = m.double().square().sum(0) if m.device.type != "mps" else m.square().sum(0)  # (C,)
        self.sq = s if self.sq is None else self.sq + s

    def result(self) -> torch.Tensor:
        return self.sq.sqrt().float().cpu()  # (C,): L2 over samples


@torch.no_grad()
def compute_scores(model, batches: Iterable[torch.Tensor], total: int | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   meta: dict[str, Any] | None = None) -> Scores:
    """One forward pass over ``batches`` of input ids (b, T) with hooks; returns every score."""
    c: NanoConfig = model.config
    kinds = c.layer_types
    acc: dict[tuple[str, int], _Accumulator] = {}
    cos_sum = torch.zeros(len(kinds), dtype=torch.float64)
    tokens = 0
    handles = []

    def channel_hook(key):
        acc[key] = _Accumulator()
        return acc[key]

    for i, (layer, kind) in enumerate(zip(model.backbone.layers, kinds)):
        norm_acc = channel_hook(("hidden", i))
        handles.append(layer.norm.register_forward_hook(lambda m, a, out, acc=norm_acc: acc.add(out)))

        def block_hook(m, args, out, i=i):
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (b, T)
            cos_sum[i] += (1.0 - cos).double().sum().cpu()

        handles.append(layer.register_forward_hook(block_hook))
        mixer = layer.mixer
        if kind == MLP:
            a = channel_hook(("mlp", i))
            handles.append(mixer.down_proj.register_forward_pre_hook(lambda m, args, acc=a: acc.add(args[0])))
        elif kind == ATTENTION:
            a = channel_hook(("attention", i))
            handles.append(mixer.o_proj.register_forward_pre_hook(lambda m, args, acc=a: acc.add(args[0])))
        elif kind == MAMBA:
            a = channel_hook(("mamba", i))
            inner = mixer.inner

            def x_branch(m, args, out, acc=a, inner=inner):
                acc.add(out[..., inner:2 * inner])  # (b, T, I): in_proj = [z | x | B | C | dt]

            handles.append(mixer.in_proj.register_forward_hook(x_branch))
    try:
        done = 0
        device = model.device
        for ids in batches:
            model(ids.to(device), logits_to_keep=1)  # the hooks see every position; logits are not needed
            done += ids.shape[0]
            tokens += ids.numel()
            if progress is not None:
                progress("importance", done, total or done)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise PruneError("no calibration samples; give --calib-samples >= 1")
    hidden = sum(acc[("hidden", i)].result() for i in range(len(kinds)))
    heads = c.num_attention_heads
    attention = {i: torch.linalg.vector_norm(acc[k].result().view(heads, c.head_dim), dim=1)  # (nh, d) -> (nh,)
                 for k in acc if k[0] == "attention" for i in [k[1]]}
    mamba = {k[1]: acc[k].result().view(c.mamba_num_heads, c.mamba_head_dim)  # (I,) -> (H, P)
             for k in acc if k[0] == "mamba"}
    mlp = {k[1]: acc[k].result() for k in acc if k[0] == "mlp"}
    header = {"model": meta.get("model") if meta else None, "config_fingerprint": config_fingerprint(c),
              "aggregation": AGGREGATION, "tokens": tokens, **(meta or {})}
    return Scores(hidden=hidden, mlp=mlp, attention=attention, mamba_channels=mamba,
                  block=(cos_sum / tokens).float(), meta=header)
