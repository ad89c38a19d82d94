"""Minitron structured pruning of NemotronH models (``nano prune``).

- ``shape``: a target architecture in ModelOpt's export names, its checks against the parent, a
  ``--target`` YAML, the explicit target (torch-free);
- ``importance``: activation scores from calibration data (one forward pass with hooks), cached to a
  safetensors file with a JSON header;
- ``depth``: which layers to drop (the report's iterative greedy logit-MSE rule, or ``1 - cos``);
- ``slicing``: kept indices per structure (group-aware Mamba heads, GQA-respecting attention heads) and
  the exact slicing of a parent's weights into a smaller NemotronH model;
- ``search``: the candidate architectures under a memory / parameter budget (torch-free);
- ``evaluate``: their proxy score and the short distillation of the best few.

The stage that composes them is ``nanocli.stages.prune``; ``PruneError`` is its error (and theirs).
"""

from nanocli_model.errors import NanoError


class PruneError(NanoError):
    """A pruning request that cannot be met as given (one line, exit 2)."""
