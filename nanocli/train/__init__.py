"""Training mechanics shared by pretrain, align and distill: schedule, optimizer, loop, checkpoints,
distributed set-up, FP8. The choices below are plain data so the CLI can validate without torch."""

PRECISIONS = ("fp32", "bf16", "fp8")
ON_NAN = ("stop", "skip")
PARALLEL = ("ddp", "fsdp")
