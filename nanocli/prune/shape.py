"""A pruning target: the architecture in ModelOpt's export names plus the depth (no torch here).

``Shape`` is a target (widths, layers, attention layers kept); ``check_shape`` holds it against the
parent (never larger, divisible as the layout requires: GQA groups, the Mamba B/C groups). A target is
given explicitly by a ``--target`` YAML (``read_target``) and the flags over it; the axes left open take
the parent's value (``explicit_shape``) or, under a budget, are searched (``search.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nanocli_model.config import ATTENTION, MAMBA, NanoConfig

from . import PruneError

# ModelOpt export-config names -> NanoConfig fields.
SHAPE_KEYS = {"hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
              "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
              "mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim"}
# what a target may fix: the widths, the layers kept and the attention layers kept
TARGET_KEYS = (*SHAPE_KEYS, "num_layers", "keep_attention")


@dataclass(frozen=True)
class Shape:
    """A target architecture (ModelOpt names) plus the depth: layers and attention layers kept."""

    num_layers: int
    num_attention_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    mamba_num_heads: int
    mamba_head_dim: int

    @classmethod
    def of(cls, c: NanoConfig) -> Shape:
        return cls(num_layers=c.num_hidden_layers, num_attention_layers=c.count(ATTENTION), hidden_size=c.hidden_size,
                   ffn_hidden_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                   num_query_groups=c.num_key_value_heads, mamba_num_heads=c.mamba_num_heads,
                   mamba_head_dim=c.mamba_head_dim)

    def config(self, parent: NanoConfig, pattern: str) -> NanoConfig:
        """The pruned model's config: the parent's with the new widths and layer pattern."""
        return parent.replace(hybrid_override_pattern=pattern, hidden_size=self.hidden_size,
                              intermediate_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
                              num_key_value_heads=self.num_query_groups, mamba_num_heads=self.mamba_num_heads,
                              mamba_head_dim=self.mamba_head_dim)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def label(self) -> str:
        return (f"{self.num_layers}L/{self.num_attention_layers}A h{self.hidden_size} ffn{self.ffn_hidden_size} "
                f"mamba{self.mamba_num_heads}x{self.mamba_head_dim} attn{self.num_attention_heads}/{self.num_query_groups}")


def check_shape(parent: NanoConfig, s: Shape) -> None:
    """Every target no larger than the parent and divisible as the layout requires; PruneError otherwise."""
    p = Shape.of(parent)
    for name, flag in (("num_layers", "--num-layers"), ("num_attention_layers", "--keep-attention"),
                       ("hidden_size", "--hidden-size"), ("ffn_hidden_size", "--ffn-hidden-size"),
                       ("num_attention_heads", "--num-attention-heads"), ("num_query_groups", "--num-query-groups"),
                       ("mamba_num_heads", "--mamba-num-heads"), ("mamba_head_dim", "--mamba-head-dim")):
        value, limit = getattr(s, name), getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PruneError(f"{flag}: expected a whole number, got {value!r}")
        if value > limit:
            raise PruneError(f"{flag} {value} is larger than the model's {limit}; pruning only removes")
        minimum = 0 if name == "num_attention_layers" else 1
        if value < minimum:
            raise PruneError(f"{flag} must be at least {minimum}, got {value}")
    if s.num_layers - s.num_attention_layers < 0 or s.num_layers < 1:
        raise PruneError(f"--num-layers {s.num_layers} cannot hold {s.num_attention_layers} attention layers")
    removed_attention = p.num_attention_layers - s.num_attention_layers
    if removed_attention > p.num_layers - s.num_layers:
        raise PruneError(f"--keep-attention {s.num_attention_layers} removes {removed_attention} attention layers "
                         f"but --num-layers {s.num_layers} removes only {p.num_layers - s.num_layers} layers")
    if s.num_layers - s.num_attention_layers > p.num_layers - p.num_attention_layers:
        raise PruneError(f"--num-layers {s.num_layers} with --keep-attention {s.num_attention_layers} needs "
                         f"{s.num_layers - s.num_attention_layers} Mamba/MLP layers; the model has "
                         f"{p.num_layers - p.num_attention_layers}")
    if p.num_attention_layers:
        if s.num_attention_heads % s.num_query_groups:
            raise PruneError(f"--num-attention-heads {s.num_attention_heads} is not a multiple of --num-query-groups "
                             f"{s.num_query_groups}; GQA needs the same number of query heads per KV group")
        per_group = p.num_attention_heads // p.num_query_groups
        if s.num_attention_heads // s.num_query_groups > per_group:
            raise PruneError(f"--num-attention-heads {s.num_attention_heads} / --num-query-groups {s.num_query_groups} "
                             f"= {s.num_attention_heads // s.num_query_groups} query heads per KV group; the model "
                             f"has {per_group} (prune whole KV groups or query heads within groups)")
    if parent.count(MAMBA) and s.mamba_num_heads % parent.n_groups:
        raise PruneError(f"--mamba-num-heads {s.mamba_num_heads} is not a multiple of n_groups ({parent.n_groups}); "
                         "group-aware pruning keeps the same number of heads in every B/C group")


def read_target(path: str | None, given: dict[str, int | None]) -> dict[str, int | None]:
    """The fixed axes (``TARGET_KEYS`` -> value, None: open): the ``--target`` YAML at ``path``, then the
    values ``given`` on the command line over it."""
    fixed: dict[str, int | None] = {k: None for k in TARGET_KEYS}
    if path is not None:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise PruneError(f"--target {path}: cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise PruneError(f"--target {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise PruneError(f"--target {path}: expected a mapping such as hidden_size: 4480")
        for key, value in raw.items():
            if key not in TARGET_KEYS:
                raise PruneError(f"--target {path}: unknown key {key!r}; use {', '.join(TARGET_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise PruneError(f"--target {path}: {key} must be a whole number, got {value!r}")
            fixed[key] = value
    fixed.update({k: v for k, v in given.items() if k in TARGET_KEYS and v is not None})
    return fixed


def attention_shape(parent: Shape, fixed: dict[str, int | None]) -> tuple[int, int]:
    """(query heads, KV groups): the fixed ones, else the parent's KV groups when the heads divide into them."""
    q = fixed.get("num_attention_heads") or parent.num_attention_heads
    kv = fixed.get("num_query_groups") or (parent.num_query_groups if q % parent.num_query_groups == 0 else 0)
    if kv == 0:
        raise PruneError(f"--num-attention-heads {q} is not a multiple of the model's {parent.num_query_groups} KV "
                         "groups; give --num-query-groups too")
    return q, kv


def explicit_shape(parent: NanoConfig, fixed: dict[str, int | None]) -> Shape:
    """The target with every open axis at the parent's value (attention layers: as many as the depth holds)."""
    p = Shape.of(parent)
    n = fixed["num_layers"] if fixed["num_layers"] is not None else p.num_layers
    att = fixed["keep_attention"] if fixed["keep_attention"] is not None else min(p.num_attention_layers, n)
    q, kv = attention_shape(p, fixed)
    shape = Shape(num_layers=n, num_attention_layers=att, hidden_size=fixed["hidden_size"] or p.hidden_size,
                  ffn_hidden_size=fixed["ffn_hidden_size"] or p.ffn_hidden_size, num_attention_heads=q,
                  num_query_groups=kv, mamba_num_heads=fixed["mamba_num_heads"] or p.mamba_num_heads,
                  mamba_head_dim=fixed["mamba_head_dim"] or p.mamba_head_dim)
    check_shape(parent, shape)
    return shape
