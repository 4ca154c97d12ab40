"""The command layer: the Typer app (:mod:`~xlab.commands.app`), ``xlab pipeline`` and the thin
glue of ``xlab evaluate``, ``generate`` and ``predict``. The only part of ``xlab`` that imports
``pipelines``; nothing imports it but the entry points (``xlab``, ``python -m xlab``, ``./cli.py``).
"""
