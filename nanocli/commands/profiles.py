"""``nano profiles``: the shipped model profiles and GPU profiles."""

from __future__ import annotations

import typer

from .. import ui
from .flags import command


def register(app: typer.Typer) -> None:
    command(app, "profiles", profiles, examples=["nano profiles"])


def profiles() -> None:
    """List the shipped model profiles (layers, parameters, bf16 weights, KV cache at 128k) and GPU profiles.

    Profiles live in nanocli/profiles/models and nanocli/profiles/gpus (or $NANO_PROFILES_DIR).
    """
    from ..profiles import list_gpu_profiles, list_model_profiles
    from ..summary import summarize

    models = [summarize(p.name, p.config, p.description) for p in list_model_profiles()]
    ui.show_profiles(models, list_gpu_profiles())
