"""Fixtures shared by several test modules (built once per session, on CPU, in seconds)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# nano keeps compiled decode steps and token shards in its cache directory: the suite (and the commands it runs
# in subprocesses) uses one of its own, shared by the session, never the user's.
if "NANO_CACHE" not in os.environ:
    os.environ["NANO_CACHE"] = tempfile.mkdtemp(prefix="nano-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NANO_CACHE"], ignore_errors=True)

# Triton decorates its own library functions (tl.cumsum, ...) when it is first imported, for the interpreter
# only if TRITON_INTERPRET is set by then, and torch.compile may import triton in any earlier test. Without a
# GPU the only Triton code the suite runs is test_kernels_triton.py's, interpreted: set it for the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # transformers' NemotronH (the parity oracle) binds its Mamba-2 kernels when its module is first imported:
    # mamba_ssm if that imports, else its PyTorch path. nano's kernels.py puts a bare mamba_ssm package (its
    # Triton ops, without the CUDA __init__) in sys.modules; imported after that, the oracle would call Triton
    # on CPU tensors and fail. Bind it now, while `import mamba_ssm` still fails here as it does for users.
    try:
        import transformers.models.nemotron_h.modeling_nemotron_h  # noqa: F401
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A `tiny` model pretrained for 30 steps on the built-in corpus, with its trained BPE tokenizer and
    chat template: ``.../final`` (an HF NemotronH directory). Its token cache sits beside it."""
    from nanocli.stages import pretrain as pt

    out = tmp_path_factory.mktemp("tiny-base")
    pt.run(pt.PretrainOptions(profile="tiny", data="synthetic:reasoning?docs=1500&difficulty=1-2", seq_len=64,
                              global_batch=8, steps=30, lr=3e-3, warmup=1, decay=5, precision="fp32",
                              heldout_fraction=0.0, out=str(out), cache_dir=str(out / "cache")))
    return out / "final"
