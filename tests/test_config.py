"""Layered configuration: code defaults < conf/defaults.yaml < -c files < -o overrides."""

import subprocess
import sys

import pytest
from conftest import ROOT

from xlab.config import ModelConfig, from_dict, load_config, stage_paths, to_dict
from xlab.errors import XLabError


def test_layers_later_wins(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  lr: 0.5\n  batch_size: 7\nmodel:\n  n_layers: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  lr: 0.25\n")
    cfg = load_config([a, b], ["train.batch_size=9"])
    assert cfg.train.lr == 0.25  # b over a
    assert cfg.train.batch_size == 9  # override over files
    assert cfg.model.n_layers == 3  # a over defaults.yaml
    assert cfg.model.d_model == 256  # conf/defaults.yaml
    assert cfg.train.grad_clip == 1.0  # code default


def test_full_config_matches_release_model():
    cfg = load_config(["conf/xlab.yaml"])
    m, t = cfg.model, cfg.train
    assert (cfg.tokenizer.vocab_size, cfg.shards.seq_len) == (32768, 512)
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff) == (512, 6, 8, 2048)
    assert (t.batch_size, t.lr, t.weight_decay, t.grad_clip, t.epochs, t.precision) == (256, 3e-4, 0.1, 1.0, 3, "bf16")
    assert (cfg.data.hf_path, cfg.data.hf_config) == ("wikimedia/wikipedia", "20231101.en")


@pytest.mark.parametrize(
    "override, word",
    [
        (["train.batch_size=abc"], "batch_size"),
        (["train.nope=1"], "nope"),
        (["model.norm=batchnorm"], "model.norm"),
        (["model.n_heads=3"], "divisible"),
        (["data.train_fraction=0.5"], "sum to 1"),
    ],
)
def test_bad_values_are_one_line_errors(override, word):
    with pytest.raises(XLabError) as e:
        load_config([], override)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(XLabError, match="not found"):
        load_config([tmp_path / "none.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(XLabError, match="bad configuration"):
        load_config([bad])


@pytest.mark.parametrize(
    "text, where",
    [
        ("train:\n  lr: 1\n   batch_size: 2\n", ", line 3, column 14: mapping values are not allowed in this context"),
        ("model:\n  n_layers: 2\ntrain: [unclosed\n", ", line 4, column 1: did not find expected ',' or ']' "
         "(while parsing a flow sequence that starts on line 3)"),
        ("train:\n  lr: 1\n  lr: 2\n", ", line 3, column 3: found duplicate key lr "
         "(while constructing a mapping that starts on line 2)"),
        ("- train\n- model\n", ": expected sections such as `train:`, found a list"),
    ],
)  # fmt: skip
def test_a_malformed_file_is_named_with_its_line(tmp_path, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(XLabError) as e:
        load_config([bad])
    assert str(e.value) == f"bad configuration file {bad}{where}"


def test_cli_names_the_file_and_line_of_a_yaml_error(tmp_path, cli):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\n")
    p = cli(["data", "split", "-c", "bad.yaml"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: bad configuration file bad.yaml, line 3"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_round_trip_and_paths():
    cfg = load_config([], ["data.name=tiny", "train.run_name=r1"])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    p = stage_paths(cfg)
    assert str(p.raw) == "data/raw/tiny" and str(p.shards) == "shards/tiny-packed"  # the demo packs
    assert str(stage_paths(load_config([], ["data.name=tiny", "shards.layout=padded"])).shards) == "shards/tiny"
    assert str(p.tokenizer) == "tokenizers/tiny.model" and str(p.tokenizer_manifest) == "tokenizers/tiny.json"
    assert str(p.run) == "runs/r1"


def test_cli_help_does_not_import_heavy_libraries():
    # `xlab --help` must answer at once: the CLI module may not pull in torch, numpy or datasets.
    code = (
        "import sys, xlab.commands.app; heavy = [m for m in ('torch', 'numpy', 'datasets', 'sentencepiece', "
        "'pyarrow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_bad_option_exit_code_2(tmp_path, cli):
    p = cli(["data", "split", "-o", "train.batch_size=abc"], cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: bad configuration") and "Traceback" not in p.stderr


@pytest.mark.parametrize("extra", sorted(p.name for p in (ROOT / "conf" / "extra").glob("*.yaml")))
def test_extra_configs_load_over_both_bases(extra):
    """Each extra file sets exactly its own keys, to its own values, over either base."""
    import yaml

    path = ROOT / "conf" / "extra" / extra
    wanted = {(sec, k): v for sec, keys in yaml.safe_load(path.read_text()).items() for k, v in keys.items()}
    assert wanted
    for base in ([], [ROOT / "conf" / "xlab.yaml"]):
        before, after = to_dict(load_config(base)), to_dict(load_config(base + [path]))
        changed = {(sec, k) for sec in after for k in after[sec] if after[sec][k] != before[sec][k]}
        assert changed <= set(wanted)
        assert all(after[sec][k] == v for (sec, k), v in wanted.items())


def test_modern_extra_builds_a_model_that_runs():
    import torch

    from xlab.model import Transformer

    cfg = load_config(
        [ROOT / "conf" / "extra" / "modern.yaml"],
        [
            "model.d_model=32",
            "model.n_heads=4",
            "model.d_ff=64",
            "model.n_layers=2",
        ],
    )
    model = Transformer(ModelConfig.of(cfg.model, vocab_size=64, max_len=16))
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64)
    assert model.cfg.position == "rope" and model.cfg.n_kv_heads == 2


def test_cli_unusable_path_is_one_line_exit_2(tmp_path, cli):
    (tmp_path / "data").write_text("a file where the data folder should be")
    p = cli(["data", "download", "-o", "data.max_articles=5"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert err.startswith("error: Not a directory") and "data" in err and len(err.splitlines()) == 1
    assert (tmp_path / "data").read_text() == "a file where the data folder should be"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_heads=0", "model.n_heads"),
        ("model.n_heads=-2", "model.n_heads"),
        ("model.n_kv_heads=0", "model.n_kv_heads"),
        ("train.log_every=0", "train.log_every"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.loss_chunk_tokens=0", "train.loss_chunk_tokens"),
        ("train.beta1=1.5", "train.beta1"),
        ("train.warmup_steps=-10", "train.warmup_steps"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("train.lr=nan", "train.lr"),
        ("generate.top_p=0", "generate.top_p"),
        ("train.seed=99999999999999999999", "train.seed"),  # was a 48-line OverflowError in xlab train
        ("generate.seed=-1", "generate.seed"),
        ("train.run_name=${nope}", "train.run_name"),
        ("train.run_name=${oc.env:XLAB_SURELY_UNSET}", "train.run_name"),
    ],
)
def test_out_of_range_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(XLabError, match=key.replace(".", r"\.")):
        load_config([], [override], use_defaults_file=False)


def test_every_numeric_setting_declares_its_range():
    """A new int or float setting cannot forget its range: it must be declared with setting()."""
    import dataclasses

    from xlab.config import XLabConfig

    missing = []
    for section in dataclasses.fields(XLabConfig):
        for f in dataclasses.fields(section.default_factory):
            if any(t in str(f.type) for t in ("int", "float")) and "range" not in f.metadata:
                missing.append(f"{section.name}.{f.name}")
    assert missing == []


@pytest.mark.parametrize("name", ["/tmp/victim", ".", "..", "../../shards", "a/b", "a b", "'a\\b'", "x~"])
@pytest.mark.parametrize("key", ["data.name", "train.run_name"])
def test_a_name_is_one_path_component(key, name):
    with pytest.raises(XLabError, match=f"{key.replace('.', r'.')} must be one folder name"):
        load_config([], [f"{key}={name}"], use_defaults_file=False)
    assert load_config([], [f"{key}=wiki-2023.en_v1"], use_defaults_file=False)
    for empty in ("", "~", "''"):  # YAML's empty, null and empty string: refused too
        with pytest.raises(XLabError):
            load_config([], [f"{key}={empty}"], use_defaults_file=False)


def test_a_name_pointing_elsewhere_leaves_that_folder_alone(tmp_path, cli):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("precious")
    r = cli(["data", "download", "-o", f"data.name={victim}", "-o", "data.max_articles=20"], cwd=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: data.name must be one folder name"), r.stderr
    assert (victim / "precious.txt").read_text() == "precious" and (victim / "sub").is_dir()
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.parametrize(
    "args, words",
    [
        (["nope"], "No such command 'nope'"),
        (["train", "--nope"], "No such option: --nope"),
        (["generate"], "Missing argument"),
        (["generate", "x.pt", "--top-k", "abc"], "--top-k"),
    ],
)
def test_bad_commands_and_options_are_one_line_exit_2(tmp_path, cli, args, words):
    p = cli(args, cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and words in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--help" in p.stderr


def _commands(cmd, path=()):
    yield list(path), cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_flags_show_no_value_in_any_help():
    """Every flag's help line is the flag and its text: `--force <bool>` read as if it took a value."""
    import re

    import typer.main
    from typer.testing import CliRunner

    from xlab.commands.app import app

    runner = CliRunner()
    flags = 0
    for path, cmd in _commands(typer.main.get_command(app)):
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"}).output
        assert "<bool>" not in out, path
        assert re.search(r"--help\s+Show this message", out), (path, out)
        for p in cmd.params:
            if getattr(p, "is_flag", False):
                flags += 1
                assert re.search(rf"{p.opts[0]}\s+{re.escape(p.help.split()[0])}", out), (path, p.opts, out)
    assert flags >= 9  # --force (5 commands), --resume, --greedy (2), --continue, --stream


def test_cli_py_without_the_environment_says_to_run_make_setup(tmp_path):
    """A clone without .venv, run by a Python that lacks XLab's dependencies (-S: no site-packages)."""
    for name in ("xlab", "pipelines"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "cli.py").write_bytes((ROOT / "cli.py").read_bytes())
    bare = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "cli.py"), "train", "--help"], capture_output=True, text=True
    )
    assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare.stderr
    assert bare.stderr.startswith("error: XLab's dependencies are not installed") and "`make setup`" in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1 and bare.stdout == ""
    ok = subprocess.run([sys.executable, str(tmp_path / "cli.py"), "train", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--resume" in ok.stdout, ok.stderr


# What a recipe decides: the architecture options and the optimizer (sizes and data are the run's).
RECIPE_MODEL = (
    "position",
    "norm",
    "activation",
    "bias",
    "tie_embeddings",
    "qk_norm",
    "zero_init_proj",
    "logit_softcap",
)


def _recipe(cfg) -> dict:
    return {
        **{k: str(cfg.model[k]) for k in RECIPE_MODEL},
        "optimizer": str(cfg.train.optimizer),
        "layout": str(cfg.shards.layout),
    }


def test_recipe_files_layer_as_documented():
    from xlab.config import ModelConfig, TrainConfig

    conf = ROOT / "conf"
    from xlab.config import ShardsConfig

    v02 = {
        **{k: str(getattr(ModelConfig(), k)) for k in RECIPE_MODEL},
        "optimizer": str(TrainConfig().optimizer),
        "layout": str(ShardsConfig().layout),
    }
    modern = _recipe(load_config([conf / "recipe" / "modern.yaml"]))
    assert modern != v02
    # conf/xlab.yaml stays the 0.2 release's recipe whatever the demo defaults carry
    assert _recipe(load_config([conf / "xlab.yaml"])) == v02
    assert _recipe(load_config([conf / "recipe" / "v0.2.yaml"])) == v02
    # the demo runs the modern recipe
    assert _recipe(load_config([])) == modern
    # the modern full run is the full run with the modern recipe, its own learning rates and run name
    full = load_config([conf / "xlab.yaml", conf / "recipe" / "modern.yaml"])
    full_modern = load_config([conf / "xlab-modern.yaml"])
    assert _recipe(full_modern) == modern
    a, b = to_dict(full), to_dict(full_modern)
    for d in (a, b):
        for key in ("run_name", "lr", "muon_lr"):
            d["train"].pop(key)
    assert a == b


def test_output_to_a_file_or_pipe_gets_tables_120_columns_wide():
    """rich cut wider numbers to "1,816,9…" in 80 columns when the output was a log file."""
    import io

    from xlab.commands.main import wide_logs

    class Tty(io.StringIO):
        def isatty(self):
            return True

    env = {}
    wide_logs(io.StringIO(), env)
    assert env == {"COLUMNS": "120"}
    env = {"COLUMNS": "60"}
    wide_logs(io.StringIO(), env)
    assert env == {"COLUMNS": "60"}  # the user's own width wins
    env = {}
    wide_logs(Tty(), env)
    assert env == {}  # a terminal keeps its width


def test_paths_and_overrides_a_user_gets_wrong_say_what_to_pass(tmp_path, cli):
    """`-c adir.yaml` (a folder) said "not found"; `-o train.lr` (no `=`) said "Incompatible value 'None'"."""
    (tmp_path / "adir.yaml").mkdir()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "small.yaml").write_text("train:\n  lr: 0.01\n")
    for files, overrides, want in (
        (
            [tmp_path / "adir.yaml"],
            [],
            f"config file {tmp_path / 'adir.yaml'} is a folder, not a .yaml file; pass a .yaml file",
        ),
        ([tmp_path / "conf.d"], [], f"pass one of the .yaml/.yml files it holds: {tmp_path / 'conf.d' / 'small.yaml'}"),
        ([], ["train.lr"], "-o train.lr has no value: write -o train.lr=VALUE"),
        ([], ["=3"], "-o =3 names no setting"),
    ):
        with pytest.raises(XLabError) as e:
            load_config(files, overrides)
        assert want in str(e.value) and "\n" not in str(e.value)
    assert load_config([], ["train.max_steps="]).train.max_steps is None  # `key=` is still null
    for args, want in (
        (["-c", "adir.yaml"], "config file adir.yaml is a folder"),
        (["-o", "train.lr"], "has no value"),
    ):
        p = cli(["data", "split", *args], cwd=tmp_path, check=False)
        assert p.returncode == 2 and p.stderr.startswith(f"error: {want}" if args[0] == "-c" else "error: -o train.lr")
        assert len(p.stderr.strip().splitlines()) == 1 and want in p.stderr, p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.yaml", "conf.d"]  # nothing left behind


def test_an_end_of_file_is_bad_input_not_an_interrupt(monkeypatch, capsys, tmp_path):
    """Click turns an uncaught EOFError (a cut compressed file, say) into Abort, which read as Ctrl-C:
    "interrupted; rerun the same command", exit 130, though no rerun could help."""
    from pipelines import stats
    from xlab.commands.main import main

    def cut(*a, **k):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(stats, "run", cut)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["xlab", "stats"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().startswith("error: a file or stream ended before its end (Compressed")
    assert "interrupted" not in err and len(err.strip().splitlines()) == 1


def test_seq_len_has_an_upper_bound():
    """-o shards.seq_len=100000000 encoded with a 15 GB worker until killed: rows beyond 2**20 tokens
    are refused at load."""
    with pytest.raises(XLabError, match="shards.seq_len must be at most 1,048,576"):
        load_config([], ["shards.seq_len=100000000"])
    assert load_config([], ["shards.seq_len=1048576"]).shards.seq_len == 2**20
