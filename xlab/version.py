"""The XLab release number: the ground floor's one constant, read by the package metadata
(pyproject.toml), checkpoints and manifests (as a record, never as a freshness test: each data
stage judges freshness by its own ``STAGE_VERSION``)."""

__version__ = "0.7.0"
