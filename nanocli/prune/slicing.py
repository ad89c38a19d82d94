"""What to keep, and the exact slicing of a parent NemotronH model into the pruned one.

``make_plan`` turns importance scores and a target ``Shape`` (``shape.py``) into kept indices (parent
numbering, sorted ascending, so the kept structures keep their order):

- hidden channels: the top ``hidden_size`` by score; they slice the embeddings (columns), every norm,
  every projection's input columns / output rows, ``norm_f`` and ``lm_head``;
- MLP neurons: the top ``ffn_hidden_size`` per layer (rows of ``up_proj``, columns of ``down_proj``);
- attention (GQA-respecting): KV groups ranked by the L2 of their query heads' scores, the top
  ``num_query_groups`` kept, then within each kept group the top ``num_attention_heads / num_query_groups``
  query heads; so query head j of the result reads KV head ``j // R'`` as before;
- Mamba (group-aware): heads ranked *within* each of the ``n_groups`` groups, the same k kept in each
  (``mamba_num_heads = k * n_groups``), so head h still reads the B/C of group ``h // k``; optional
  head-dim pruning keeps the same channels in every head. B and C (and n_groups, the state size) are
  never pruned. Sliced: z and x rows and the dt row of ``in_proj``, the x part of ``conv1d``,
  ``dt_bias``, ``A_log``, ``D``, the gated norm's weight (it keeps G groups of k*P' channels) and
  ``out_proj``'s columns;
- layers: ``Plan.layers`` are the parent layers kept, in order (the depth rule picks them).

``prune_model`` builds the smaller model and fills it with ``index_select`` slices of the parent:
nothing is recomputed, so pruning nothing reproduces the parent bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nanocli_model.config import ATTENTION, KIND_TO_LETTER, MLP, NanoConfig

from . import PruneError
from .shape import Shape, check_shape


@dataclass
class Plan:
    """Kept indices per structure, in parent numbering (sorted), and the resulting config."""

    config: NanoConfig
    layers: list[int]  # parent layers kept, in order
    hidden: torch.Tensor  # (hidden',)
    per_layer: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # parent layer -> name -> idx

    def to_json(self, parent: NanoConfig) -> dict[str, Any]:
        kinds = parent.layer_types
        return {
            "layers": self.layers,
            "removed_layers": [{"layer": i, "kind": kinds[i]} for i in range(len(kinds)) if i not in self.layers],
            "hidden": self.hidden.tolist(),
            "per_layer": {str(i): {"kind": kinds[i], **{k: v.tolist() for k, v in d.items()}}
                          for i, d in self.per_layer.items()},
        }


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (ties: the lower index)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values


def attention_heads(head_scores: torch.Tensor, n_kv: int, q_out: int, kv_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads): whole KV groups by the L2 of their heads, then heads within groups."""
    R = head_scores.numel() // n_kv
    grouped = head_scores.view(n_kv, R)  # (kv, R): head g*R + r reads KV head g
    groups = top(torch.linalg.vector_norm(grouped, dim=1), kv_out)
    per = q_out // kv_out
    heads = torch.cat([g * R + top(grouped[g], per) for g in groups.tolist()])
    return heads, groups


def mamba_heads(head_scores: torch.Tensor, n_groups: int, h_out: int) -> torch.Tensor:
    """Group-aware: the top k = h_out / G heads of every group (head h belongs to group h // (H/G))."""
    H = head_scores.numel()
    per, k = H // n_groups, h_out // n_groups
    grouped = head_scores.view(n_groups, per)  # (G, H/G)
    return torch.cat([g * per + top(grouped[g], k) for g in range(n_groups)])


def make_plan(parent: NanoConfig, scores, shape: Shape, layers: list[int]) -> Plan:
    """Kept indices for ``shape`` given the kept ``layers`` (parent indices) and the importance ``scores``."""
    check_shape(parent, shape)
    kinds = parent.layer_types
    if len(layers) != shape.num_layers or sum(kinds[i] == ATTENTION for i in layers) != shape.num_attention_layers:
        raise PruneError(f"internal: {len(layers)} kept layers do not match the target depth {shape.num_layers}")
    pattern = "".join(KIND_TO_LETTER[kinds[i]] for i in layers)
    plan = Plan(config=shape.config(parent, pattern), layers=list(layers), hidden=top(scores.hidden, shape.hidden_size))
    for i in layers:
        if kinds[i] == MLP:
            plan.per_layer[i] = {"neurons": top(scores.mlp[i], shape.ffn_hidden_size)}
        elif kinds[i] == ATTENTION:
            heads, groups = attention_heads(scores.attention[i], parent.num_key_value_heads,
                                            shape.num_attention_heads, shape.num_query_groups)
            plan.per_layer[i] = {"heads": heads, "kv_heads": groups}
        else:
            plan.per_layer[i] = {"heads": mamba_heads(scores.mamba_heads(i), parent.n_groups, shape.mamba_num_heads),
                                 "head_dim": top(scores.mamba_head_dim(i), shape.mamba_head_dim)}
    return plan


def identity_plan(parent: NanoConfig) -> Plan:
    """Keep everything (pruning nothing must reproduce the parent exactly)."""
    ar = torch.arange
    plan = Plan(config=parent, layers=list(range(parent.num_hidden_layers)), hidden=ar(parent.hidden_size))
    for i, kind in enumerate(parent.layer_types):
        if kind == MLP:
            plan.per_layer[i] = {"neurons": ar(parent.intermediate_size)}
        elif kind == ATTENTION:
            plan.per_layer[i] = {"heads": ar(parent.num_attention_heads), "kv_heads": ar(parent.num_key_value_heads)}
        else:
            plan.per_layer[i] = {"heads": ar(parent.mamba_num_heads), "head_dim": ar(parent.mamba_head_dim)}
    return plan


# ---------------------------------------------------------------------------------------------- slicing
def _rows(block: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of kept blocks: block b of ``size`` rows -> b*size .. b*size + size - 1, in order."""
    return (block[:, None] * size + torch.arange(size)[None, :]).reshape(-1)  # (n, size) -> (n*size,)


def mamba_indices(parent: NanoConfig, heads: torch.Tensor, head_dim: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row indices into in_proj ([z | x | B | C | dt]), conv1d ([x | B | C]) and the inner width I."""
    P, width, GN = parent.mamba_head_dim, parent.mamba_intermediate_size, parent.n_groups * parent.ssm_state_size
    inner = (heads[:, None] * P + head_dim[None, :]).reshape(-1)  # (H', P') -> (I',): channel h*P + p
    bc = torch.arange(2 * GN)  # B and C: never pruned
    return {"inner": inner, "heads": heads,
            "in_proj": torch.cat([inner, width + inner, 2 * width + bc, 2 * width + 2 * GN + heads]),
            "conv": torch.cat([inner, width + bc])}


def sliced_state(parent_model, plan: Plan) -> dict[str, torch.Tensor]:
    """The pruned model's state dict: ``index_select`` slices of the parent's tensors."""
    pc: NanoConfig = parent_model.config
    sd = parent_model.state_dict()
    hid = plan.hidden
    kinds = pc.layer_types

    def sel(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return t.index_select(dim, idx.to(t.device))

    out = {"backbone.embeddings.weight": sel(sd["backbone.embeddings.weight"], 1, hid),
           "backbone.norm_f.weight": sel(sd["backbone.norm_f.weight"], 0, hid)}
    if not pc.tie_word_embeddings:
        out["lm_head.weight"] = sel(sd["lm_head.weight"], 1, hid)
    for j, i in enumerate(plan.layers):
        src, dst = f"backbone.layers.{i}.", f"backbone.layers.{j}."
        out[dst + "norm.weight"] = sel(sd[src + "norm.weight"], 0, hid)
        keep = plan.per_layer[i]
        # (name, row index or None = all rows... handled below, column index)
        if kinds[i] == MLP:
            n = keep["neurons"]
            items = [("up_proj", n, hid), ("down_proj", hid, n)]
        elif kinds[i] == ATTENTION:
            q = _rows(keep["heads"], pc.head_dim)
            kv = _rows(keep["kv_heads"], pc.head_dim)
            items = [("q_proj", q, hid), ("k_proj", kv, hid), ("v_proj", kv, hid), ("o_proj", hid, q)]
        else:
            m = mamba_indices(pc, keep["heads"], keep["head_dim"])
            items = [("in_proj", m["in_proj"], hid), ("out_proj", hid, m["inner"])]
            conv_w = sd[src + "mixer.conv1d.weight"]  # (conv_dim, 1, K)
            out[dst + "mixer.conv1d.weight"] = sel(conv_w, 0, m["conv"])
            if src + "mixer.conv1d.bias" in sd:
                out[dst + "mixer.conv1d.bias"] = sel(sd[src + "mixer.conv1d.bias"], 0, m["conv"])
            for name in ("dt_bias", "A_log", "D"):
                out[dst + f"mixer.{name}"] = sel(sd[src + f"mixer.{name}"], 0, m["heads"])
            out[dst + "mixer.norm.weight"] = sel(sd[src + "mixer.norm.weight"], 0, m["inner"])
        for name, rows, cols in items:
            w = sd[src + f"mixer.{name}.weight"]  # (out, in)
            out[dst + f"mixer.{name}.weight"] = sel(sel(w, 0, rows), 1, cols)
            if src + f"mixer.{name}.bias" in sd:
                out[dst + f"mixer.{name}.bias"] = sel(sd[src + f"mixer.{name}.bias"], 0, rows)
    return out


def prune_model(parent_model, plan: Plan):
    """A new ``NanoForCausalLM`` of ``plan.config`` holding the parent's sliced weights (same dtype, device)."""
    from nanocli_model.model import NanoForCausalLM

    with torch.device("meta"):
        model = NanoForCausalLM(plan.config)
    state = {k: v.clone() for k, v in sliced_state(parent_model, plan).items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if plan.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:1]
        raise PruneError(f"internal: sliced tensors do not match the pruned config ({bad})")
    model.load_state_dict(state, strict=not plan.config.tie_word_embeddings, assign=True)
    if plan.config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()
