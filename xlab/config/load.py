"""Layered configuration: defaults in code < conf/defaults.yaml < a run's saved config.yaml (``xlab
train --resume``) < each ``-c FILE.yaml`` < ``-o key=value`` < a command's own options.

OmegaConf merges the layers and checks every value's type against the schema
(:mod:`xlab.config.schema`), so ``train.batch_size=abc`` is refused with a clear message instead of
failing deep in a run; :func:`validate_config` then checks the ranges and the rules types cannot
express. The configuration in force is saved with every stage manifest and every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlab.config.schema import FROM_STORE, ModelConfig, XLabConfig, check_ranges, name_problem
from xlab.errors import XLabError, first_line
from xlab.pathcheck import file_problem

if TYPE_CHECKING:  # omegaconf is imported where a configuration is built, keeping `xlab --help` fast
    from omegaconf import DictConfig


def default_conf_path() -> Path:
    """``conf/defaults.yaml`` of the working folder if it exists, else the one beside the package."""
    local = Path("conf/defaults.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parents[2] / "conf" / "defaults.yaml"


def _load_file(path: Path) -> DictConfig:
    """One YAML layer; XLabError naming the file (and, for a syntax error, the line) if unusable."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or first_line(e)
        if getattr(e, "context", None) and ctx is not None and (mark is None or ctx.line != mark.line):
            what += f" ({e.context} that starts on line {ctx.line + 1})"  # the unclosed bracket, say
        raise XLabError(f"bad configuration file {path}{where}: {what}") from None
    except UnicodeDecodeError as e:
        raise XLabError(f"bad configuration file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # unreadable, or OmegaConf's "Invalid loaded object type" for a lone scalar
        raise XLabError(f"bad configuration file {path}: {e.strerror or first_line(e)}") from None
    if not isinstance(layer, DictConfig):
        raise XLabError(f"bad configuration file {path}: expected sections such as `train:`, found a list")
    return layer


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    values: dict | None = None,
    use_defaults_file: bool = True,
    saved: str | Path | None = None,
) -> DictConfig:
    """Merge the configuration layers; later layers win.

    Args:
        files: YAML files given with ``-c``, in order.
        overrides: ``section.key=value`` strings (OmegaConf dotlist), applied after the files.
        values: ``{"section.key": value}`` from a command's own options, applied last; None is "not given".
        use_defaults_file: merge ``conf/defaults.yaml`` after the code defaults.
        saved: a run's saved ``config.yaml`` (what ``xlab train --resume`` continues), merged
            before ``files``; the store's ``model.vocab_size`` / ``max_len`` that runs before 0.7
            saved in it are dropped.

    Returns:
        An OmegaConf ``DictConfig`` with the :class:`XLabConfig` schema (attribute access).

    Raises:
        XLabError: a missing file, malformed YAML, an unknown key or a value of the wrong type.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = []
    paths = [Path(f) for f in files]
    if use_defaults_file:
        d = default_conf_path()
        if d.exists():
            paths.insert(0, d)
    try:
        cfg = OmegaConf.structured(XLabConfig)
        for p in paths:
            problem = file_problem(p, "config file", ".yaml", (".yaml", ".yml"))
            if problem:
                raise XLabError(problem)
            layers.append(_no_store_settings(_load_file(p), str(p)))
        if saved is not None:  # over conf/defaults.yaml, under the -c files
            run_layer = _load_file(Path(saved))
            if hasattr(run_layer.get("model"), "keys"):
                for key in FROM_STORE:
                    run_layer.model.pop(key, None)
            layers.insert(len(layers) - len(files), run_layer)
        if overrides:
            _check_dotlist(overrides)
            layers.append(_no_store_settings(OmegaConf.from_dotlist(list(overrides)), "-o"))
        cfg = OmegaConf.merge(cfg, *layers)
        for key, value in (values or {}).items():
            if value is not None:
                OmegaConf.update(cfg, key, str(value) if isinstance(value, Path) else value, merge=False)
        OmegaConf.resolve(cfg)  # an interpolation that cannot resolve fails here, as one line
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        where = f" (key {key})" if key and str(key) not in msg else ""
        raise XLabError(f"bad configuration: {msg}{where}") from None
    except Exception as e:  # yaml.YAMLError and friends
        if isinstance(e, XLabError):
            raise
        raise XLabError(f"bad configuration: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


def _check_dotlist(overrides: Sequence[str]) -> None:
    """Refuse an ``-o`` that is not ``key=value``: OmegaConf reads ``-o train.lr`` as the key set to
    null, which it then reports as "Incompatible value 'None'". (``-o key=`` stays: null, the default
    of an optional setting.)

    Raises:
        XLabError: naming the ``-o`` and the form it takes.
    """
    for o in overrides:
        key, eq, _ = o.partition("=")
        if not eq:
            raise XLabError(f"-o {o} has no value: write -o {o}=VALUE (key=value, e.g. -o train.lr=0.001)")
        if not key.strip():
            raise XLabError(f"-o {o} names no setting: write -o section.key=VALUE (e.g. -o train.lr=0.001)")


def _no_store_settings(layer: DictConfig, where: str) -> DictConfig:
    """``layer``, refused in one line if its ``model:`` section sets what the shard store decides.

    Raises:
        XLabError: naming the key, where it was set and the setting that does decide it.
    """
    model = layer.get("model") if hasattr(layer, "get") else None
    for key in FROM_STORE if hasattr(model, "keys") else ():
        if key in model:
            decided = (
                "tokenizer.vocab_size (before `xlab tokenizer train`)" if key == "vocab_size" else "shards.seq_len"
            )
            raise XLabError(
                f"model.{key} ({where}) is not a setting: the shard store decides it; set {decided} instead"
            )
    return layer


def validate_config(cfg: DictConfig) -> None:
    """Check what types alone cannot: every :func:`setting`'s range, the names that become paths,
    the split fractions, and the model's own rules (:meth:`ModelConfig.check`), so a bad value is
    refused at load, before any stage runs.

    Raises:
        XLabError: the first problem, naming the key.
    """
    for section in fields(XLabConfig):
        check_ranges(section.default_factory, cfg[section.name], section.name)
    check_names(cfg)
    fr = [cfg.data.train_fraction, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.predict_fraction]
    if abs(sum(fr) - 1.0) >= 1e-6:
        raise XLabError(f"data.*_fraction must sum to 1, got {sum(fr):g}")
    ModelConfig(**cfg.model).check()


def check_names(cfg: DictConfig) -> None:
    """Check the names that become path components (``data.name``, ``train.run_name``) with
    :func:`~xlab.config.schema.name_problem`: the one check for a name typed by the user and for one
    read from a file (a checkpoint's or an export's saved configuration), so that no name, wherever
    it came from, leads a stage (or an export) outside its folder.

    Raises:
        XLabError: the first bad name, naming its key.
    """
    for key in ("data.name", "train.run_name"):
        section, _, name = key.partition(".")
        problem = name_problem(key, cfg[section][name])
        if problem:
            raise XLabError(problem)


def to_dict(cfg: DictConfig) -> dict:
    """The configuration as plain Python containers, options as their value strings (for manifests
    and checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a schema-checked configuration from :func:`to_dict` output (e.g. from a checkpoint),
    its names checked (:func:`check_names`; XLabError naming the key).

    A configuration saved by XLab 0.6 or earlier holds ``model.vocab_size`` and ``model.max_len``
    (the store's values, written back into it then): they are dropped here, since the checkpoint's
    ``model_config`` (or, before 0.7, those very values: see :func:`stored_model_config`) keeps them.
    """
    from omegaconf import OmegaConf

    if isinstance(d.get("model"), dict) and any(k in d["model"] for k in FROM_STORE):
        d = {**d, "model": {k: v for k, v in d["model"].items() if k not in FROM_STORE}}
    cfg = OmegaConf.merge(OmegaConf.structured(XLabConfig), OmegaConf.create(d))
    check_names(cfg)  # a saved name becomes a path again (export's folder, a resumed run's)
    return cfg


def stored_model_config(saved: dict) -> dict:
    """The model configuration a checkpoint or export was built from, as a dict: its
    ``model_config`` (XLab 0.7 on), else the ``model`` section of its saved configuration, which
    held ``vocab_size`` and ``max_len`` before 0.7. Returns ``{}`` when neither is a mapping."""
    mc = saved.get("model_config")
    if isinstance(mc, dict):
        return mc
    cfg = saved.get("config")
    return dict(cfg["model"]) if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else {}


def _interpolation(d: Any, key: str = "") -> str | None:
    """The first key (dotted) of ``d`` whose string value holds an OmegaConf interpolation ``${``."""
    if isinstance(d, dict):
        for k, v in d.items():
            found = _interpolation(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            found = _interpolation(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(d, str) and "${" in d:
        return key or "a value"
    return None


def saved_config(saved: Any, where: Path) -> tuple[Any, dict]:
    """``(cfg, model_config)`` of a checkpoint's (or an export's) saved ``config`` and ``model_config``
    (:func:`stored_model_config`), both checked against this XLab's schema without
    building the model: every option and range (:meth:`~xlab.config.ModelConfig.check`), and the two
    agreeing on every model setting.

    Settings that this XLab no longer has (e.g. a data option dropped since the run) are ignored
    outside the model configuration, so older checkpoints still load for generate, evaluate, export
    and ``--resume``; an unknown model setting could change the architecture, so it fails loudly.

    Raises:
        XLabError: ``{where} holds an unusable configuration: ...`` naming the setting.
    """
    cfg_dict = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("model"), dict):
        raise XLabError(f"{where} holds no XLab model configuration (expected a mapping with a 'model' section)")
    crafted = _interpolation(cfg_dict) or _interpolation(saved.get("model_config"))
    if crafted:  # saved configurations are resolved: ${...} would read the environment or files
        raise XLabError(f"{where} holds an unusable configuration: {crafted} is an interpolation, not a value")
    try:
        try:
            cfg = from_dict(cfg_dict)
        except Exception:  # noqa: BLE001 - retried without the settings the schema no longer knows
            from omegaconf import OmegaConf

            schema = OmegaConf.to_container(OmegaConf.structured(XLabConfig))
            cfg = from_dict(_known_settings(cfg_dict, schema))
        mc = stored_model_config(saved)
        section = to_dict(cfg)["model"]
        differ = sorted(k for k in section if k in mc and mc[k] != section[k])
        if differ:  # one of the two was edited: which one the weights fit is unknowable
            raise XLabError(f"its model_config and config disagree on model.{', model.'.join(differ)}")
        ModelConfig(**mc).check()
    except Exception as e:  # noqa: BLE001 - schema errors, impossible sizes: a bad file, not a bug
        key = getattr(e, "full_key", None)  # OmegaConf's messages do not always name the setting
        at = f" (key {key})" if key and str(key) not in first_line(e) else ""
        raise XLabError(f"{where} holds an unusable configuration: {first_line(e)}{at}") from None
    return cfg, mc


def _known_settings(d: dict, schema: dict, top: bool = True) -> dict:
    """``d`` without the settings the current schema does not know, except in the ``model`` section
    (an unknown model setting could change the architecture, so it stays and fails loudly)."""
    out = {}
    for k, v in d.items():
        if k not in schema:
            continue
        if isinstance(v, dict) and isinstance(schema[k], dict) and not (top and k == "model"):
            v = _known_settings(v, schema[k], top=False)
        out[k] = v
    return out
