"""``nano demo`` (``make demo``): for now, what exists today and which stages are still to come.

A placeholder until the pipeline issues land; it will grow into the tiny end-to-end run
(pretrain -> align -> prune -> distill -> generate on the ``tiny`` profile, on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import GpuProfile, list_gpu_profiles, list_model_profiles
from .roadmap import STAGES, Stage
from .summary import ModelSummary, summarize


@dataclass(frozen=True)
class DemoReport:
    """What the demo found: every shipped profile, and every pipeline stage with its status."""

    models: list[ModelSummary]
    gpus: list[GpuProfile]
    stages: tuple[Stage, ...]

    @property
    def not_built(self) -> list[Stage]:
        """The stages whose issue has not landed yet."""
        return [s for s in self.stages if not s.built]


def run() -> DemoReport:
    """Load every profile (so a broken one fails the demo) and report the stages."""
    models = [summarize(p.name, p.config, p.description) for p in list_model_profiles()]
    return DemoReport(models=models, gpus=list_gpu_profiles(), stages=STAGES)
