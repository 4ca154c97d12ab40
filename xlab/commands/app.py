"""The ``xlab`` command line (Typer): one command per stage of the data flow (see the README).

Heavy libraries (torch, datasets, sentencepiece) are imported inside the commands that need them,
so ``xlab --help`` answers at once. Every :class:`~xlab.errors.XLabError` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from xlab.commands.plot import plot as plot_command
from xlab.errors import XLabError


def _flags_show_no_value() -> None:
    """Typer's rich help prints a value type beside every option, flags included (``--force
    <bool>``, ``--help <bool>``), which reads as if the flag took a value; ``--force true`` is then
    refused. A flag's help shows the flag alone. Patched on the option class because ``--help`` and
    the options of every command (those added later too) are built from it."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_show_no_value", False):  # another Typer, or done already
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_show_no_value = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_value()


class _PipelineOrder(typer.core.TyperGroup):
    """``xlab --help`` lists the commands in the order of the data flow (Typer lists them in
    registration order, with the command groups last)."""

    ORDER = ("pipeline", "data", "tokenizer", "stats", "train", "plot", "evaluate", "generate", "predict", "export")

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(self.ORDER)}
        return sorted(super().list_commands(ctx), key=lambda n: rank.get(n, len(rank)))


app = typer.Typer(
    cls=_PipelineOrder,
    help="XLab: train transformer language models on Wikipedia, from raw text to generated text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data stages: download, split, encode, validate, merge.", no_args_is_help=True)
tok_app = typer.Typer(help="Tokenizer: train, show.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tok_app, name="tokenizer")

ConfigOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--config", "-c", help="YAML file layered over conf/defaults.yaml (repeatable)."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-o", help="Override one value, e.g. -o train.lr=1e-3 (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its manifest is up to date.")]


def _cfg(config: Optional[list[Path]], overrides: Optional[list[str]], extra: dict | None = None):
    """Load the layered configuration; ``extra`` holds command options (None means not given)."""
    from xlab.config import load_config

    return load_config(config or [], overrides or [], values=extra)


# ----------------------------------------------------------------------------------------- data
@data_app.command("download")
def data_download(
    source: Annotated[Optional[str], typer.Option(help="sample (built-in Wikipedia sample) | hf | dump")] = None,
    dump: Annotated[
        Optional[Path], typer.Option("--dump", help="MediaWiki XML dump (.xml or .xml.bz2) for --source dump.")
    ] = None,
    max_articles: Annotated[Optional[int], typer.Option(help="Keep only the first N articles.")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Download (or read) Wikipedia articles into data/raw/<name>/articles.parquet."""
    cfg = _cfg(config, set_, {"data.source": source, "data.dump_path": dump, "data.max_articles": max_articles})
    from pipelines import download

    download.run(cfg, force=force)


@data_app.command("split")
def data_split(
    seed: Annotated[Optional[int], typer.Option(help="Split seed.")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Split the articles into train 90% / val 5% / test 2.5% / predict 2.5%."""
    cfg = _cfg(config, set_, {"data.split_seed": seed})
    from pipelines import split

    split.run(cfg, force=force)


@data_app.command("encode")
def data_encode(
    num_proc: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    num_shards: Annotated[
        Optional[int],
        typer.Option(help="Partition the work into N parts (default: torchrun's or a Slurm job array's, else 1)."),
    ] = None,
    shard_index: Annotated[
        Optional[int],
        typer.Option(help="Which part this process encodes, 0..N-1 (default: torchrun's RANK or the array task)."),
    ] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Encode the splits into memory-mapped .npy token shards (shards/<name>/).

    Under torchrun or a Slurm job array each process encodes its part; the last one writes the manifest."""
    from pipelines import encode, encode_parts
    from pipelines.stage import console

    n, i, source = encode_parts.choose_part(num_shards, shard_index)  # bad launcher variables: exit 2 first
    cfg = _cfg(config, set_, {"shards.num_proc": num_proc})
    if source is not None:
        console.print(f"[bold]encode[/bold]: part {i} of {n} (from {source})", soft_wrap=True)  # one line
    encode.run(cfg, force=force, num_shards=n, shard_index=i)


@data_app.command("merge")
def data_merge(config: ConfigOpt = None, set_: SetOpt = None):
    """Merge the parts written with --num-shards/--shard-index into one store manifest."""
    cfg = _cfg(config, set_)
    from pipelines import encode_parts

    encode_parts.merge(cfg)


@data_app.command("validate")
def data_validate(
    shards: Annotated[
        Optional[Path],
        typer.Option(help="Shard store folder (default: shards/<name>, shards/<name>-packed when packed)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Check every shard against the manifest and the tokenizer; exit 1 listing every problem."""
    cfg = _cfg(config, set_)
    from pipelines import validate

    code = validate.run(cfg, shards_dir=shards)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------ tokenizer
@tok_app.command("train")
def tokenizer_train(
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size.")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Train the reversible SentencePiece BPE tokenizer on the train split."""
    cfg = _cfg(config, set_, {"tokenizer.vocab_size": vocab_size})
    from pipelines import train_tokenizer

    train_tokenizer.run(cfg, force=force)


@tok_app.command("show")
def tokenizer_show(
    text: Annotated[str, typer.Argument(help="Text to tokenize.")],
    tokenizer: Annotated[
        Optional[Path], typer.Option(help="Tokenizer .model (default: tokenizers/<name>.model).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Print the pieces and ids of TEXT; byte-fallback pieces are marked."""
    cfg = _cfg(config, set_)
    from pipelines import train_tokenizer

    train_tokenizer.show(cfg, text, tokenizer_path=tokenizer)


# ---------------------------------------------------------------------------------------- stats
@app.command("stats")
def stats(
    shards: Annotated[
        Optional[Path],
        typer.Option(help="Shard store folder (default: shards/<name>, shards/<name>-packed when packed)."),
    ] = None,
    plot: Annotated[
        Optional[Path], typer.Option(help="Draw the article-length histogram per split to this PNG.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Statistics of the shard store and the tokenizer, as tables."""
    cfg = _cfg(config, set_)
    from pipelines import stats as stats_mod

    stats_mod.run(cfg, shards_dir=shards, plot=plot)


# ------------------------------------------------------------------------------------- training
@app.command("train")
def train(
    shards: Annotated[
        Optional[Path],
        typer.Option(help="Shard store folder (default: shards/<name>, shards/<name>-packed when packed)."),
    ] = None,
    run_name: Annotated[Optional[str], typer.Option(help="Run folder name under runs/.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from runs/<run>/checkpoints/last.pt.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: the configured epochs).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    threads: Annotated[
        Optional[int], typer.Option(help="torch CPU threads per process (train.threads; default: torch's).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Train the decoder on a shard store (single process, or DDP under torchrun).

    --resume without -c continues with the run's own saved runs/<run>/config.yaml (-o and flags
    still override it)."""
    from xlab.distributed import die_with_launcher

    die_with_launcher()  # first, before torch loads: the window in which a killed torchrun leaves an orphan
    flags = {"train.run_name": run_name, "train.max_steps": max_steps, "train.device": device, "train.threads": threads}
    cfg = _cfg(config, set_, flags)
    if resume and not config:
        from xlab.config import load_config, stage_paths

        saved = stage_paths(cfg).run / "config.yaml"
        if saved.is_file():
            cfg = load_config([], set_ or [], values=flags, saved=saved)
            if os.environ.get("RANK", "0") == "0":  # one line, not one per torchrun process
                print(f"train: resuming with the settings of {saved} (-o and flags override them)", flush=True)
    from xlab.train import train as run_training

    run_training(cfg, shards_dir=shards, resume=resume)


app.command("plot")(plot_command)


@app.command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint .pt or export folder.")],
    split: Annotated[str, typer.Option(help="A split of the store: val | test | train | predict.")] = "val",
    shards: Annotated[
        Optional[Path], typer.Option(help="Shard store folder (default: the one the model was trained on).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_batches: Annotated[Optional[int], typer.Option(help="Evaluate at most this many batches.")] = None,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the metrics to this JSON file.")
    ] = None,
):
    """Loss, accuracy, perplexity and bits per byte over a whole split."""
    from xlab.commands import evaluate as evaluate_cmd

    evaluate_cmd.run(
        checkpoint, split=split, shards_dir=shards, device=device, max_batches=max_batches, json_out=json_out
    )


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint .pt")],
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Output folder; with --format hf, exports/<run>-step<step>-hf unless given (default: exports/<run>-step<step>)."
        ),
    ] = None,
    format_: Annotated[
        str,
        typer.Option("--format", help="xlab (safetensors + XLab's configuration) | hf (Hugging Face transformers)."),
    ] = "xlab",
    force: Annotated[bool, typer.Option("--force", help="--format hf: replace an earlier export at --out.")] = False,
):
    """Write the weights as safetensors plus the configuration and tokenizer; never overwrites.

    --format hf writes a folder for transformers' AutoModelForCausalLM and AutoTokenizer
    (docs/export.md: which architecture each model option maps to)."""
    if format_ not in ("xlab", "hf"):
        raise XLabError(f"--format must be xlab or hf, got {format_!r}")
    if format_ == "xlab":
        if force:
            raise XLabError("--force applies to --format hf; the xlab format never overwrites")
        from xlab.export import export as export_folder

        export_folder(checkpoint, out)
        return
    from xlab.hf import export_hf

    export_hf(checkpoint, out, force=force)


# ----------------------------------------------------------------------------------- generation
def _generate_cfg(config, overrides, flags: dict):
    """The ``generate:`` section of the layered configuration with the command's flags applied
    (a flag not given is None and leaves the section's value)."""
    return _cfg(config, overrides, {f"generate.{k}": v for k, v in flags.items()}).generate


@app.command("generate")
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint .pt or export folder.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")] = "",
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(help="Tokens to generate (generate.max_new_tokens; one model step per token)."),
    ] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature; 0 is greedy.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most probable tokens (0: off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass in (0, 1].")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy search.")] = False,
    beam_width: Annotated[Optional[int], typer.Option(help="Beam search with this many beams (1: off).")] = None,
    length_penalty: Annotated[
        Optional[float], typer.Option(help="Beam score = logprob / n_tokens**length_penalty.")
    ] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Independent samples to print.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (sample i uses seed + i).")] = None,
    continue_: Annotated[bool, typer.Option("--continue", help="No <sos> before the prompt.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is generated.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Generate text from PROMPT by sampling, greedy search or beam search.

    Options not given come from the configuration's generate: section (-c/-o; conf/defaults.yaml)."""
    flags = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 beam_width=beam_width, length_penalty=length_penalty, num_samples=num_samples, seed=seed)  # fmt: skip
    g = _generate_cfg(config, set_, flags)
    from xlab.commands.generate import cli_generate

    cli_generate(
        checkpoint,
        prompt,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        greedy=greedy,
        beam_width=g.beam_width,
        length_penalty=g.length_penalty,
        num_samples=g.num_samples,
        seed=g.seed,
        add_sos=not continue_,
        device=device,
        stream=stream,
    )


@app.command("predict")
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint .pt or export folder.")],
    out: Annotated[Path, typer.Option(help="JSONL output file.")] = Path("predictions.jsonl"),
    num_articles: Annotated[int, typer.Option("-n", "--num-articles", help="Articles of the predict split.")] = 20,
    prompt_tokens: Annotated[int, typer.Option(help="K: prompt length in tokens.")] = 32,
    max_new_tokens: Annotated[
        Optional[int], typer.Option(help="Tokens to generate per article (generate.max_new_tokens).")
    ] = None,
    shards: Annotated[Optional[Path], typer.Option(help="Shard store folder (default: the model's).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy search instead of sampling.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (article i uses seed + i).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists (else refused).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Continue the first K tokens of N predict-split articles; write prompt, reference and generation.

    Sampling (temperature, top-k, top-p) and the options not given come from the configuration's
    generate: section (-c/-o; conf/defaults.yaml)."""
    g = _generate_cfg(config, set_, dict(max_new_tokens=max_new_tokens, seed=seed))
    from xlab.commands.predict import cli_predict

    cli_predict(
        checkpoint,
        out=out,
        num_articles=num_articles,
        prompt_tokens=prompt_tokens,
        max_new_tokens=g.max_new_tokens,
        shards_dir=shards,
        greedy=greedy,
        seed=g.seed,
        device=device,
        force=force,
        sampling={"temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p},
    )


# ------------------------------------------------------------------------------------- pipeline
@app.command("pipeline")
def pipeline(
    force: Annotated[
        bool, typer.Option("--force", help="Redo every stage, the training run included, even those up to date.")
    ] = False,
    prompt: Annotated[str, typer.Option(help="Prompt for the closing generation.")] = "The history of",
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Run every stage (download to generate), skipping those that are up to date."""
    cfg = _cfg(config, set_)
    from xlab.commands import pipeline as pipeline_cmd

    pipeline_cmd.run(cfg, force=force, prompt=prompt)
