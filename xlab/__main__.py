"""``python -m xlab ...`` (and ``torchrun ... -m xlab train ...``): the ``xlab`` command."""

from xlab.commands.main import main

if __name__ == "__main__":
    main()
