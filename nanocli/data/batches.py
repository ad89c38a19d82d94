"""The batch plan: which tokens every sequence of every step reads, as a pure function of the step.

Packing. A source's token stream (documents, each ending in EOS, concatenated) is cut into windows of
``seq_len + 1`` tokens with stride ``seq_len``: window ``i`` is ``tokens[i*L : i*L + L + 1]``, so a
source of ``n`` tokens has ``(n - 1) // L`` windows and documents run across window boundaries as in
standard LM packing. The caller makes ``inputs = w[:-1]`` and ``labels = w[1:]``.

Global sequence index. Step ``t`` of phase ``p`` (steps ``[start_p, end_p)``) owns the in-phase
sequence indices ``k = (t - start_p)*B + slot`` for ``slot`` in ``[0, B)``; row ``j`` of the step's
global batch reads ``slot = rows_t(j)``, a seeded permutation of the ``B`` rows (so every rank gets a
mixed share of the sources; it does not change which sequences the step reads).

Blend (which source). Each phase's weights are quantised to integer quotas ``q_s`` summing to
``PERIOD = 2**16`` (largest remainder; every positive weight keeps at least one slot). One cycle lays
source ``s``'s ``q_s`` slots at ideal positions ``(j + 1/2) * PERIOD / q_s`` and merges all sources
by position (a stratified, Sainte-Laguë-like interleave); cycles repeat. Any prefix of ``r``
sequences then holds ``r*w_s`` of source ``s`` to within about one sequence, so any span of steps
matches the weights closely. The point of the fixed cycle: the number of earlier sequences of the
same source, the *draw count*, is closed form: ``d = (k // PERIOD) * q_s + ordinal_s(k % PERIOD)``,
plus the whole earlier phases' counts (also closed form: ``counts(K) = (K // PERIOD) * q +
bincount(cycle[:K % PERIOD])``). No simulation, no iterator state.

Window (which part of the source). Draw ``d`` of source ``s`` is in epoch ``e = d // m_s`` at position
``d % m_s`` (``m_s`` training windows); the window is ``σ_{s,e}(d % m_s)``, where ``σ_{s,e}`` is a
keyed pseudo-random bijection of ``[0, m_s)`` (``permute``: a Feistel network cycle-walked into
range, keyed by seed, source and epoch). A bijection evaluated at one point needs no table and no
state, and being a bijection it visits every training window exactly once per epoch, in a new order
each epoch. Hence ``batch(step)`` depends only on (sources, phases, seq_len, global_batch,
total_steps, seed, step): resuming is "continue at step s", and any world size reads the same
global batch (rank ``r`` of ``w`` takes rows ``[r*B/w, (r+1)*B/w)``).

Held-out windows. With ``heldout_fraction > 0`` each source's windows go through one more keyed
bijection ``π_s`` (keyed by the source's content only, not the seed, so the eval set is the same
across training runs): windows ``π_s(0..h-1)`` (``h = round(fraction * n)``, at least 1) are held
out and training position ``x`` reads ``π_s(h + x)``, so batches never return a held-out window.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .shards import TokenSource
from .sources import DataError, SourceSpec

__all__ = ["Phase", "BatchPlan", "permute", "blend_phase", "PERIOD"]

PERIOD = 1 << 16   # blend cycle length: weights are resolved to 1/PERIOD
_ROUNDS = 6
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Phase:
    """A blend over source names (weights, normalised) for a share ``fraction`` of the total steps."""

    weights: dict[str, float]
    fraction: float


def blend_phase(specs: Sequence[SourceSpec]) -> Phase:
    """The single phase a ``--data`` spec describes: every source at its weight, all steps."""
    return Phase({s.name: s.weight for s in specs}, 1.0)


# ---------------------------------------------------------------------------------------------- permutation
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def _round_keys(key: Any) -> list[np.uint64]:
    digest = hashlib.sha512(json.dumps(key, separators=(",", ":")).encode()).digest()
    return [np.uint64(int.from_bytes(digest[8 * r:8 * r + 8], "little")) for r in range(_ROUNDS)]


def permute(index: np.ndarray | Sequence[int] | int, n: int, key: Any) -> np.ndarray:
    """``π(index)`` for a pseudo-random bijection ``π`` of ``[0, n)`` chosen by ``key`` (JSON-able):
    a balanced Feistel network on the smallest even bit width covering ``n``, cycle-walked (applied
    again while the value is ``>= n``), which keeps it a bijection of ``[0, n)``. No table, O(1) memory."""
    x, n = np.array(index, dtype=np.uint64).reshape(-1), int(n)   # (N,)
    if n <= 1 or x.size == 0:
        return x.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(key)
    todo = np.arange(x.size)
    while todo.size:
        left, right = x[todo] >> half, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x[todo] = (left << half) | right
        todo = todo[x[todo] >= n]
    return x.astype(np.int64)


# ---------------------------------------------------------------------------------------------- blend
def _quotas(weights: np.ndarray, period: int) -> np.ndarray:
    """Integer slots per source summing to ``period`` (largest remainder; positive weights get >= 1)."""
    raw = weights / weights.sum() * period
    q = np.floor(raw).astype(np.int64)
    q[np.argsort(-(raw - q), kind="stable")[:period - int(q.sum())]] += 1
    for s in np.flatnonzero((q == 0) & (weights > 0)):
        q[np.argmax(q)] -= 1
        q[s] = 1
    return q


class _Blend:
    """One cycle of ``PERIOD`` source slots (stratified interleave), repeated forever."""

    def __init__(self, weights: np.ndarray):
        self.q = _quotas(weights, PERIOD)                                       # (S,)
        src = np.repeat(np.arange(len(self.q)), self.q)                          # (PERIOD,)
        ordinal = np.concatenate([np.arange(c) for c in self.q])                 # (PERIOD,)
        ideal = (2 * ordinal + 1) * PERIOD / (2 * self.q[src])
        order = np.lexsort((src, ideal))                                         # by position, then source
        self.src, self.ordinal = src[order], ordinal[order]

    def assign(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source of each sequence index ``k`` and its draw count within this blend."""
        cycle, r = np.divmod(k, PERIOD)
        s = self.src[r]
        return s, cycle * self.q[s] + self.ordinal[r]

    def counts(self, total: int) -> np.ndarray:
        """How many of the first ``total`` sequences each source gets."""
        cycle, r = divmod(total, PERIOD)
        return cycle * self.q + np.bincount(self.src[:r], minlength=len(self.q))


# ---------------------------------------------------------------------------------------------- plan
def phase_bounds(phases: Sequence[Phase], total_steps: int) -> list[int]:
    """First step of each phase, then ``total_steps``: step ``s`` is in phase ``p`` when
    ``cum[p-1] <= s / total_steps < cum[p]`` (cum: the running sum of the fractions)."""
    cum, bounds = 0.0, [0]
    for phase in phases[:-1]:
        cum += phase.fraction
        bounds.append(max(bounds[-1], min(total_steps, math.ceil(round(cum * total_steps, 6)))))
    return bounds + [total_steps]


class BatchPlan:
    """Which (source, window) every row of every step reads; see the module docstring."""

    def __init__(self, sources: Mapping[str, TokenSource], phases: Sequence[Phase], seq_len: int,
                 global_batch: int, total_steps: int, seed: int, heldout_fraction: float = 0.0):
        for label, value in (("seq_len", seq_len), ("global_batch", global_batch), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"{label} must be a positive integer, got {value!r}")
        if not isinstance(heldout_fraction, (int, float)) or not 0 <= heldout_fraction < 1:
            raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
        if not sources:
            raise DataError("no data sources; give at least one with --data")
        self.sources, self.names = dict(sources), list(sources)
        self.seq_len, self.global_batch, self.total_steps = int(seq_len), int(global_batch), int(total_steps)
        self.seed, self.heldout_fraction = int(seed), float(heldout_fraction)
        self.phases = list(phases)
        self._weights = self._check_phases(self.phases)                           # (P, S)
        self._bounds = self._phase_bounds()
        self._keys = [self.sources[n].key for n in self.names]
        self._windows = np.array([self._window_count(n) for n in self.names])     # (S,)
        held = [0 if self.heldout_fraction == 0 else min(w - 1, max(1, round(self.heldout_fraction * w)))
                for w in self._windows]
        self._held = np.array(held, dtype=np.int64)
        self._train = self._windows - self._held
        for name, w in zip(self.names, self._windows):
            if self.heldout_fraction > 0 and w < 2:
                raise DataError(f"source {name!r} has only {w} window of {self.seq_len + 1} tokens, too few to "
                                "hold some out; add data, lower seq_len or set heldout_fraction to 0")
        self._blends = [_Blend(w) for w in self._weights]
        base = np.zeros((len(self.phases) + 1, len(self.names)), dtype=np.int64)
        for p, blend in enumerate(self._blends):
            base[p + 1] = base[p] + blend.counts((self._bounds[p + 1] - self._bounds[p]) * self.global_batch)
        self._base = base  # (P + 1, S): draws of each source before each phase (last row: the whole run)
        self._eval_blend: _Blend | None = None

    def _check_phases(self, phases: Sequence[Phase]) -> np.ndarray:
        if not phases:
            raise DataError("no blend phases; give at least one (weights over the sources, fraction 1)")
        weights = np.zeros((len(phases), len(self.names)))
        total = 0.0
        for p, phase in enumerate(phases):
            if not isinstance(phase.fraction, (int, float)) or not phase.fraction > 0:
                raise DataError(f"phase {p}: fraction must be > 0, got {phase.fraction!r}")
            total += phase.fraction
            for name, w in phase.weights.items():
                if name not in self.sources:
                    raise DataError(f"phase {p}: unknown source {name!r}; the sources are {', '.join(self.names)}")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise DataError(f"phase {p}: weight of {name!r} must be a number >= 0, got {w!r}")
                weights[p, self.names.index(name)] = w
            if weights[p].sum() <= 0:
                raise DataError(f"phase {p}: no source has a positive weight; give at least one")
        if abs(total - 1.0) > 1e-6:
            raise DataError(f"phase fractions add up to {total:g}, not 1; make them sum to 1")
        return weights

    def _phase_bounds(self) -> list[int]:
        return phase_bounds(self.phases, self.total_steps)

    def _window_count(self, name: str) -> int:
        n = self.sources[name].n_tokens
        if n < self.seq_len + 1:
            raise DataError(f"source {name!r} has {n} tokens but seq_len {self.seq_len} needs at least "
                            f"{self.seq_len + 1} for one window; add data or lower seq_len")
        return (n - 1) // self.seq_len

    # -- the pure functions of the step
    def _check_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.total_steps:
            raise DataError(f"step {step!r} is outside the plan's 0..{self.total_steps - 1}; resume within "
                            "total_steps or make a plan with more steps")
        return int(step)

    def phase_at(self, step: int) -> int:
        """Index of the phase step ``step`` belongs to."""
        return bisect.bisect_right(self._bounds, self._check_step(step)) - 1

    def _rows(self, step: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Source index and window of rows ``[lo, hi)`` of the step's global batch."""
        p = self.phase_at(step)
        slot = permute(np.arange(lo, hi), self.global_batch, ["rows", self.seed, step])
        k = (step - self._bounds[p]) * self.global_batch + slot            # in-phase sequence index
        s, draw = self._blends[p].assign(k)
        return s, self._train_windows(s, draw + self._base[p][s])

    def _train_windows(self, s: np.ndarray, draw: np.ndarray) -> np.ndarray:
        out = np.empty_like(draw)
        for si in np.unique(s):
            sel = s == si
            epoch, pos = np.divmod(draw[sel], self._train[si])
            x = np.empty_like(pos)
            for e in np.unique(epoch):
                here = epoch == e
                x[here] = permute(pos[here], int(self._train[si]),
                                  ["epoch", self.seed, self.names[si], self._keys[si], int(e)])
            out[sel] = self._heldout_perm(si, x + self._held[si]) if self._held[si] else x
        return out

    def _heldout_perm(self, si: int, i: np.ndarray) -> np.ndarray:
        return permute(i, int(self._windows[si]), ["heldout", self._keys[si]])

    def _gather(self, s: np.ndarray, windows: np.ndarray):
        import torch

        out = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)   # (N, L + 1)
        offsets = np.arange(self.seq_len + 1)
        for si in np.unique(s):
            sel = s == si
            out[sel] = self.sources[self.names[si]].tokens[windows[sel, None] * self.seq_len + offsets]
        return torch.from_numpy(out)

    def global_batch_ids(self, step: int) -> list[tuple[str, int]]:
        """``(source, window)`` of each of the ``global_batch`` rows of step ``step``, in row order."""
        s, windows = self._rows(self._check_step(step), 0, self.global_batch)
        return [(self.names[i], int(w)) for i, w in zip(s, windows)]

    def batch(self, step: int, rank: int = 0, world: int = 1):
        """This rank's rows of step ``step``: a ``(global_batch // world, seq_len + 1)`` int64 tensor."""
        step = self._check_step(step)
        if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
            raise DataError(f"rank {rank!r} of world {world!r}: need 0 <= rank < world")
        if self.global_batch % world:
            raise DataError(f"global_batch {self.global_batch} does not split evenly over {world} processes; "
                            f"use a multiple of {world}")
        per = self.global_batch // world
        return self._gather(*self._rows(step, rank * per, (rank + 1) * per))

    # -- held-out evaluation
    def heldout_windows(self, name: str) -> np.ndarray:
        """The held-out window indices of source ``name`` (empty without ``heldout_fraction``)."""
        si = self._source_index(name)
        return self._heldout_perm(si, np.arange(self._held[si]))

    def _source_index(self, name: str) -> int:
        if name not in self.sources:
            raise DataError(f"unknown source {name!r}; the sources are {', '.join(self.names)}")
        return self.names.index(name)

    def eval_batches(self, n_batches: int, batch_size: int, source: str | None = None) -> Iterator:
        """``n_batches`` tensors ``(batch_size, seq_len + 1)`` from held-out windows only: of ``source``,
        or of all sources blended by their run-average weights. Deterministic; cycles through the
        held-out windows when more are asked for than there are."""
        if self.heldout_fraction == 0:
            raise DataError("no held-out windows: make the plan with heldout_fraction > 0 to evaluate")
        if batch_size < 1 or n_batches < 0:
            raise DataError(f"eval needs batch_size >= 1 and n_batches >= 0, got {batch_size}, {n_batches}")
        si = None if source is None else self._source_index(source)
        if si is None and self._eval_blend is None:
            fractions = np.array([p.fraction for p in self.phases])[:, None]
            self._eval_blend = _Blend((self._weights / self._weights.sum(1, keepdims=True) * fractions).sum(0))
        for b in range(n_batches):
            k = np.arange(b * batch_size, (b + 1) * batch_size)
            s, draw = (np.full_like(k, si), k) if si is not None else self._eval_blend.assign(k)
            windows = np.empty_like(draw)
            for i in np.unique(s):
                sel = s == i
                windows[sel] = self._heldout_perm(i, draw[sel] % self._held[i])
            yield self._gather(s, windows)

    # -- reporting
    @property
    def fingerprint(self) -> str:
        """Hash of everything ``batch`` depends on; a checkpoint stores it to check a resume."""
        payload = {"sources": dict(zip(self.names, self._keys)), "weights": self._weights.tolist(),
                   "bounds": self._bounds, "seq_len": self.seq_len, "global_batch": self.global_batch,
                   "seed": self.seed, "heldout": self.heldout_fraction}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """Tokens per step, per-phase step ranges and weights, per-source windows, draws and epochs."""
        tokens_per_step = self.global_batch * self.seq_len
        phases = []
        for p, blend in enumerate(self._blends):
            lo, hi = self._bounds[p], self._bounds[p + 1]
            phases.append({"phase": p, "steps": [lo, hi], "fraction": self.phases[p].fraction,
                           "weights": {n: float(q) / PERIOD for n, q in zip(self.names, blend.q) if q},
                           "tokens": (hi - lo) * tokens_per_step})
        sources = {}
        for si, name in enumerate(self.names):
            src, draws = self.sources[name], int(self._base[-1][si])
            sources[name] = {"path": str(src.path), "docs": src.n_docs, "tokens": src.n_tokens,
                             "windows": int(self._windows[si]), "heldout_windows": int(self._held[si]),
                             "train_windows": int(self._train[si]), "sequences": draws,
                             "tokens_read": draws * self.seq_len, "epochs": draws / int(self._train[si])}
        return {"seq_len": self.seq_len, "global_batch": self.global_batch, "total_steps": self.total_steps,
                "tokens_per_step": tokens_per_step, "total_tokens": tokens_per_step * self.total_steps,
                "seed": self.seed, "heldout_fraction": self.heldout_fraction, "fingerprint": self.fingerprint,
                "phases": phases, "sources": sources}
