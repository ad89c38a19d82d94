"""Training mechanics shared by pretrain, align and distill: their options (``options.py``), the one training
run (``run.py``) and its token-stream side (``tokens.py``), schedule, optimizer, loop, checkpoints,
distributed set-up, FP8. Importing this package does not import torch."""

PARALLEL = ("ddp", "fsdp")  # as options.Run.parallel: wrap() checks callers that skip the options
