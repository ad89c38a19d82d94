"""The pipeline stages behind the ``nano`` commands: each module exposes ``run(options) -> Result``.

Stages compute and return results; ``cli.py`` and ``ui.py`` talk to people. Importing a stage does not
import torch unless the stage needs it to run.
"""
