"""``nano`` with every checkpoint write held open longer, for the kill trials (``tests/test_interrupt.py``).

``python tests/held_writes.py SECONDS ARGS...`` runs ``nano ARGS...`` with ``checkpoints.write_hold`` set:
each write pauses SECONDS x its share at the points nano marks inside it (training: after the training state
is written, before the model; prune: after its staging directory appears and before the rename), so that a
SIGKILL lands inside a write however fast the machine writes. nano itself never pauses.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's nanocli, not an installed one

from nanocli.cli import main  # noqa: E402
from nanocli.train import checkpoints  # noqa: E402

if __name__ == "__main__":
    seconds = float(sys.argv[1])
    checkpoints.write_hold = lambda share: time.sleep(seconds * share)
    main(sys.argv[2:])
