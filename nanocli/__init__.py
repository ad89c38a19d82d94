"""nanocli: the nano toolchain (the ``nano`` command, profiles, pipeline stages).

``nanocli`` imports ``nanocli_model``; never the other way round. Importing this package (or
``nanocli.cli``) does not import torch: commands that need it import it when they run.
"""

from __future__ import annotations

__version__ = "0.1.0"
