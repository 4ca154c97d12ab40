"""``python -m xlab ...`` (and ``torchrun ... -m xlab train ...``): the ``xlab`` command."""

from xlab.commands.app import main

if __name__ == "__main__":
    main()
