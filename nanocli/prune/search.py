"""The architecture search under a budget: which pruned shapes exist, and which fit (no torch here).

Axes (each fixed to one value when a flag / the target YAML gives it):

- depth: ``num_layers`` from the parent's down to ``DEPTH_MIN`` of it (steps of 2 above 24 layers:
  a Mamba layer and its MLP go together in these layouts), and the attention layers kept, from the
  parent's count down to half of it;
- ``hidden_size``: multiples of ``hidden_step`` (64 for the released sizes) from ``WIDTH_MIN`` of the parent's;
- ``ffn_hidden_size``: multiples of ``F / 64`` (320 for the 12B: 13440, 15680, ... 20480) from ``FFN_MIN``;
- ``mamba_num_heads``: multiples of ``n_groups`` (the same heads per B/C group) from ``WIDTH_MIN``;
- ``mamba_head_dim``, attention heads and KV groups: the parent's unless given.

A candidate's memory is fit-check's estimate (``nanocli_model.fit.estimate``: weights + KV + Mamba
state + prefill activations at the target context and batch); with ``--target-params``, its parameter
count. Memory grows with every width, so for each combination of the other axes the fitting FFN sizes
are a prefix, found by bisection. The layer pattern of a depth comes from the depth rule's removal order
when weights are scored; without weights (a profile, ``--dry-run``) it is the *heaviest* mix of Mamba and
MLP layers for that depth (the attention layers dropped first and last, as the 9B did), so the memory
shown is an upper bound for any removal order.

The candidates the search scores are the Pareto frontier of the fitting ones (no other fitting shape is
at least as large on every axis), largest memory first (the report sorted its candidates by memory).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from nanocli_model import fit
from nanocli_model.config import ATTENTION, KIND_TO_LETTER, LETTER_TO_KIND, MAMBA, MLP, NanoConfig
from nanocli_model.memory import dtype_bytes, mamba_layer_params, mlp_layer_params, param_count

from .shape import Shape, attention_shape, check_shape

DEPTH_MIN, WIDTH_MIN, FFN_MIN = 0.8, 0.75, 0.6
GIB = 2**30


# ---------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """What a candidate must stay within: bytes at (context, batch, dtype), or parameters."""

    kind: str  # "memory" | "params"
    limit: float  # bytes or parameters
    context: int = 131072
    batch: int = 1
    dtype: str = "bf16"
    source: str = ""  # where the limit came from, for the report

    def measure(self, c: NanoConfig, params: int | None = None) -> int:
        """Parameters, or fit-check's estimate in bytes (``params``, when known, spares a recount)."""
        params = param_count(c).total if params is None else params
        if self.kind == "params":
            return params
        weights = None if fit.weight_dtype(self.dtype) == "fp8" else params * dtype_bytes(self.dtype)
        return fit.estimate(c, context=self.context, batch=self.batch, dtype=self.dtype, weights=weights).total

    def describe(self, value: float) -> str:
        if self.kind == "memory":  # small models in MiB, so a budget never reads "0.00 GiB"
            return f"{value / GIB:.2f} GiB" if value >= GIB / 4 else f"{value / 2**20:.2f} MiB"
        return f"{value / 1e9:.3f}B params" if value >= 1e8 else f"{value:,.0f} params"


# ---------------------------------------------------------------------------------------------- axes
def _step(size: int, cap: int) -> int:
    """The largest power of two <= size / 8 (at most ``cap``) that divides ``size``; 1 at worst."""
    step = 1
    while step * 2 <= min(cap, size // 8) and size % (step * 2) == 0:
        step *= 2
    return step


def _multiples(size: int, step: int, low: float) -> list[int]:
    first = max(step, math.ceil(size * low / step) * step)
    return list(range(first, size + 1, step)) if size % step == 0 else [size]


@dataclass
class Axes:
    depth: list[tuple[int, int]]  # (num_layers, attention layers kept)
    hidden_size: list[int]
    ffn_hidden_size: list[int]
    mamba_num_heads: list[int]
    mamba_head_dim: list[int]
    attention: list[tuple[int, int]]  # (num_attention_heads, num_query_groups)

    @property
    def size(self) -> int:
        return (len(self.depth) * len(self.hidden_size) * len(self.ffn_hidden_size) * len(self.mamba_num_heads)
                * len(self.mamba_head_dim) * len(self.attention))


def default_axes(parent: NanoConfig, fixed: dict[str, int | None]) -> Axes:
    """Every axis, with the ``fixed`` values (ModelOpt names, plus num_layers / keep_attention) pinned."""
    p = Shape.of(parent)
    L, A = p.num_layers, p.num_attention_layers
    if fixed.get("num_layers") is not None:
        layers = [fixed["num_layers"]]
    else:
        step = 2 if L > 24 else 1
        layers = list(range(L, max(1, math.ceil(DEPTH_MIN * L)) - 1, -step))
    attn = [fixed["keep_attention"]] if fixed.get("keep_attention") is not None else \
        list(range(A, max(1, math.ceil(A / 2)) - 1, -1)) if A else [0]
    depth = [(n, a) for n in layers for a in attn if 0 <= A - a <= L - n and n - a <= L - A and a <= n]

    def axis(name: str, values: list[int]) -> list[int]:
        return [fixed[name]] if fixed.get(name) is not None else values

    G = parent.n_groups
    per_group = parent.mamba_num_heads // G
    heads = [k * G for k in range(max(1, math.ceil(WIDTH_MIN * per_group)), per_group + 1)]
    q, kv = attention_shape(p, fixed)
    F = parent.intermediate_size
    return Axes(depth=depth,
                hidden_size=axis("hidden_size", _multiples(parent.hidden_size, _step(parent.hidden_size, 64), WIDTH_MIN)),
                ffn_hidden_size=axis("ffn_hidden_size", _multiples(F, F // 64 if F % 64 == 0 else _step(F, 64), FFN_MIN)),
                mamba_num_heads=axis("mamba_num_heads", heads),
                mamba_head_dim=axis("mamba_head_dim", [p.mamba_head_dim]),
                attention=[(q, kv)])


# ---------------------------------------------------------------------------------------------- patterns
PatternFn = Callable[[Shape], str]


def fast_config(parent: NanoConfig, shape: Shape, pattern: str) -> NanoConfig:
    """``shape.config`` without re-validation (the search calls it ~10^4 times; ``check_shape`` has vetted the
    widths, and the config written to disk is built by ``shape.config``)."""
    c = copy.copy(parent)
    c.hybrid_override_pattern, c.hidden_size, c.intermediate_size = pattern, shape.hidden_size, shape.ffn_hidden_size
    c.num_attention_heads, c.num_key_value_heads = shape.num_attention_heads, shape.num_query_groups
    c.mamba_num_heads, c.mamba_head_dim = shape.mamba_num_heads, shape.mamba_head_dim
    return c


@functools.lru_cache(maxsize=4096)
def _heaviest(parent_pattern: str, num_layers: int, num_attention: int, mlp_first: bool) -> str:
    kinds = [LETTER_TO_KIND[x] for x in parent_pattern]
    att = [i for i, k in enumerate(kinds) if k == ATTENTION]
    ends = [att[j // 2] if j % 2 == 0 else att[-1 - j // 2] for j in range(len(att))]
    removed = set(ends[:len(att) - num_attention])
    n_remove = len(kinds) - num_layers - len(removed)
    for kind in ((MLP, MAMBA) if mlp_first else (MAMBA, MLP)):
        for i in reversed(range(len(kinds))):
            if n_remove and kinds[i] == kind and i not in removed:
                removed.add(i)
                n_remove -= 1
    return "".join(KIND_TO_LETTER[k] for i, k in enumerate(kinds) if i not in removed)


def heaviest_pattern(parent: NanoConfig, shape: Shape, dtype: str = "bf16") -> str:
    """The depth-``shape.num_layers`` pattern that holds the most memory: attention layers dropped from the
    ends (first, last, second, ...), then the cheaper of Mamba / MLP layers dropped from the end."""
    c = fast_config(parent, shape, parent.hybrid_override_pattern)
    w = dtype_bytes(fit.compute_dtype(dtype))
    mlp_cost = mlp_layer_params(c) * w
    mamba_cost = mamba_layer_params(c) * w + shape.mamba_num_heads * shape.mamba_head_dim * c.ssm_state_size * 4
    return _heaviest(parent.hybrid_override_pattern, shape.num_layers, shape.num_attention_layers,
                     mlp_cost <= mamba_cost)


# ---------------------------------------------------------------------------------------------- search
@dataclass
class Candidate:
    shape: Shape
    pattern: str
    params: int
    value: int  # bytes at the target context (memory budget) or params (params budget)
    fits: bool
    proxy: float | None = None  # KL(parent || candidate) per token on held-out calibration data
    lm_loss: float | None = None
    distilled: float | None = None  # the same KL after the short distillation
    chosen: bool = False

    def to_json(self) -> dict:
        return {"shape": self.shape.to_dict(), "pattern": self.pattern, "params": self.params, "value": self.value,
                "fits": self.fits, "proxy_kl": self.proxy, "lm_loss": self.lm_loss, "distilled_kl": self.distilled,
                "chosen": self.chosen}


@dataclass
class Space:
    """The searched space: its size, how many fit, the frontier of the fitting ones, the smallest point."""

    parent: NanoConfig
    axes: Axes
    budget: Budget
    pattern_for: PatternFn
    total: int = 0
    fitting: int = 0
    frontier: list[Candidate] = field(default_factory=list)
    smallest: Candidate | None = None
    pattern_source: str = "heaviest mix"
    _max_ffn: dict = field(default_factory=dict, repr=False)  # other axes -> largest fitting FFN (or None)

    def candidate(self, shape: Shape) -> Candidate:
        pattern = self.pattern_for(shape)
        c = fast_config(self.parent, shape, pattern)
        params = param_count(c).total
        value = self.budget.measure(c, params)
        return Candidate(shape, pattern, params, value, value <= self.budget.limit)

    def contains(self, shape: Shape) -> bool:
        a = self.axes
        return ((shape.num_layers, shape.num_attention_layers) in a.depth and shape.hidden_size in a.hidden_size
                and shape.ffn_hidden_size in a.ffn_hidden_size and shape.mamba_num_heads in a.mamba_num_heads
                and shape.mamba_head_dim in a.mamba_head_dim
                and (shape.num_attention_heads, shape.num_query_groups) in a.attention)

    def is_fitting(self, shape: Shape) -> bool:
        """In the space and within the budget (what the bisection found)."""
        if not self.contains(shape):
            return False
        key = tuple(v for k, v in shape.to_dict().items() if k != "ffn_hidden_size")
        best = self._max_ffn.get(key)
        return best is not None and shape.ffn_hidden_size <= best


def _shape(key: tuple, ffn: int) -> Shape:
    (n, a), h, heads, hd, (q, kv) = key
    return Shape(num_layers=n, num_attention_layers=a, hidden_size=h, ffn_hidden_size=ffn, num_attention_heads=q,
                 num_query_groups=kv, mamba_num_heads=heads, mamba_head_dim=hd)


def search(parent: NanoConfig, axes: Axes, budget: Budget, pattern_for: PatternFn | None = None,
           pattern_source: str = "heaviest mix") -> Space:
    """Enumerate the space; the fitting FFN sizes of each combination by bisection (memory grows with FFN)."""
    pattern_for = pattern_for or (lambda s: heaviest_pattern(parent, s, budget.dtype))
    space = Space(parent, axes, budget, pattern_for, total=axes.size, pattern_source=pattern_source)
    ffns = sorted(axes.ffn_hidden_size)
    maximal: list[Candidate] = []
    for key in itertools.product(axes.depth, axes.hidden_size, axes.mamba_num_heads, axes.mamba_head_dim,
                                 axes.attention):
        check_shape(parent, _shape(key, ffns[-1]))
        low = space.candidate(_shape(key, ffns[0]))
        if space.smallest is None or low.value < space.smallest.value:
            space.smallest = low
        if not low.fits:
            space._max_ffn[_key(key)] = None
            continue
        lo, hi, best = 0, len(ffns), low  # ffns[lo] fits; find the last that does
        if len(ffns) > 1:
            top = space.candidate(_shape(key, ffns[-1]))
            lo, best = (len(ffns) - 1, top) if top.fits else (lo, best)
            hi = len(ffns) if top.fits else len(ffns) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = space.candidate(_shape(key, ffns[mid]))
            lo, hi, best = (mid, hi, c) if c.fits else (lo, mid, best)
        space._max_ffn[_key(key)] = ffns[lo]
        space.fitting += lo + 1
        maximal.append(best)
    space.frontier = sorted(_pareto(maximal), key=lambda c: (-c.value, c.shape.label()))
    return space


def _key(key: tuple) -> tuple:
    (n, a), h, heads, hd, (q, kv) = key
    return (n, a, h, q, kv, heads, hd)


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate matches or beats on every axis (and beats on one)."""
    import numpy as np

    if not cands:
        return []
    x = np.array([[v for v in c.shape.to_dict().values()] for c in cands])  # (n, axes)
    ge = (x[None, :, :] >= x[:, None, :]).all(-1)  # ge[i, j]: j >= i everywhere
    gt = (x[None, :, :] > x[:, None, :]).any(-1)
    dominated = (ge & gt).any(1)
    return [c for c, d in zip(cands, dominated) if not d]
