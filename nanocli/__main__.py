"""``python -m nanocli ...`` (and ``torchrun ... -m nanocli pretrain ...``): the ``nano`` command."""

from .cli import main

if __name__ == "__main__":
    main()
