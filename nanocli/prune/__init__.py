"""Minitron structured pruning of NemotronH models (``nano prune``).

- ``importance``: activation scores from calibration data (one forward pass with hooks), cached to a
  safetensors file with a JSON header;
- ``depth``: which layers to drop (the report's iterative greedy logit-MSE rule, or ``1 - cos``);
- ``slicing``: kept indices per structure (group-aware Mamba heads, GQA-respecting attention heads) and
  the exact slicing of a parent's weights into a smaller NemotronH model;
- ``search``: the candidate architectures under a memory / parameter budget (torch-free), their proxy
  score and the short distillation of the best few.

The stage that composes them is ``nanocli.stages.prune``.
"""
