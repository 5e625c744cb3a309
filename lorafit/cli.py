"""The `lorafit` command line: train, eval, generate, merge, export, init-model, recipes, config, data, serve, bench.

Imported at the top: what checks arguments and configs and needs no torch (a typo fails in a fraction of a
second). Each torch-side module is imported inside the command that uses it, after those checks, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

from lorafit.bench import add_arguments  # argument definitions only: the benchmark loads when run
from lorafit.config import annotated_yaml, apply_overrides, build_config, list_recipes, load_config, run_config
from lorafit.console import log, progress_bar
from lorafit.data.templates import generation_prompt, resolve_template
from lorafit.errors import EXIT_USER_ERROR, OFFLINE_REASON, ConfigError, LorafitError, Stopped, not_utf8, shorten
from lorafit.init_model import SIZES, describe_sizes, init_model
from lorafit.localpaths import looks_like_a_path
from lorafit.preflight import check_local_paths
from lorafit.recipes import DESCRIPTIONS
from lorafit.rundir import CONFIG_FILE, REFERENCE_FILE, RunDir, to_json, write_error
from lorafit.trackers import check_available

USAGE_EXAMPLES = """examples:
  lorafit train quotes
  lorafit train quotes lora.r=16 train.max_steps=100 output_dir=runs/r16
  lorafit eval runs/quotes
  lorafit eval runs/quotes --data general.txt --tasks hellaswag,arc_easy --limit 200
  lorafit generate runs/quotes "The secret to happiness is" --compare-base
  lorafit merge runs/quotes models/gpt2-quotes
  lorafit export runs/quotes gguf/quotes.f16.gguf --ollama
  lorafit init-model --config gpt2 --tokenizer ../shared/assets/gpt2-tokenizer models/gpt2-random
"""


def _offline_if_hub_unreachable() -> None:
    """No route to the Hub: use offline mode, so cached files still load and failures come at once
    (instead of a minute of retries). Must run before huggingface_hub is imported."""
    if os.environ.get("HF_HUB_OFFLINE") or "huggingface_hub" in sys.modules:
        return
    import socket  # start-up: socket (about 10 ms) only for the commands that may reach the Hub

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ[OFFLINE_REASON] = f"{host} does not resolve: this machine looks offline, so lorafit ran in offline mode"


def _quiet_libraries() -> None:
    """Warnings and progress bars a user need not see. Environment variables, read when the libraries load:
    importing transformers here would cost seconds before a config error could be reported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # transformers' "Loading weights" bars follow huggingface_hub's switch; they say nothing a user needs
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging  # start-up: logging (about 10 ms), kept out of `lorafit --help`

    # FutureWarnings are the libraries' deprecation notices to developers (e.g. transformers'
    # `is_gradient_checkpointing`, which PEFT itself calls on every load): nothing a user of the command can act
    # on. The test suite still shows them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # PEFT's UserWarnings show but two: fan_in_fan_out set by PEFT (lora.peft_detects_fan_in_fan_out), and, when
    # saving an adapter of a Hub base offline, that it could not check the base's vocabulary on the Hub (lorafit
    # never resizes it, so there is nothing to check).
    warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary was "
                            "not modified", category=UserWarning)
    logging.getLogger("peft").setLevel(logging.ERROR)


def _without_bitsandbytes() -> None:
    """Make bitsandbytes look absent when nothing is quantised. PEFT imports it at import time whenever it is
    installed, and its import prints a kernel warning on a CPU machine ("Failed to load CPU gemm_4bit_forward ..."):
    noise on every command that quantises nothing. A None entry in sys.modules makes both `import bitsandbytes`
    and importlib's find_spec say "not installed". Must run before PEFT (or transformers' bnb checks) load."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


# ---------------------------------------------------------------- commands


def cmd_train(args) -> int:
    recipe, overrides, resume = train_target(args)
    cfg = load_config(recipe, overrides)  # a bad config stops here, before any process starts or torch loads
    if not cfg.model.quantize:
        _without_bitsandbytes()
    check_local_paths(cfg)  # and a missing data file or local model directory, before seconds of model loading
    run = RunDir(cfg.output_dir)
    run.check_new_run(resume, args.overwrite and not resume)  # so does a run in the way (train() then skips it)

    check_available(cfg.train.report_to)  # and a tracker whose extra is missing
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.nproc, sys.argv[1:] if args.argv is None else args.argv)
    from lorafit import distributed as dist  # start-up: torch
    from lorafit.train import train  # start-up: torch

    world = dist.init()
    try:
        train(cfg, resume=resume, overwrite=args.overwrite, progress=not args.no_progress, force_base=args.force_base,
              checked=run)
    except (Stopped, KeyboardInterrupt) as exc:
        if world.is_main:
            command = shlex.join(["lorafit", "train", recipe, *overrides, "--resume"])
            print(f"{str(exc) or 'interrupted'}\nResume with: {command}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except torch_distributed_errors() as exc:  # a peer died: this rank cannot go on alone
        print(f"error: rank {world.rank}: another process of this job stopped ({type(exc).__name__}); the newest "
              f"complete checkpoint in {cfg.output_dir}/checkpoints stays resumable: run the same command with --resume.",
              file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        dist.shutdown()
    return 0


def train_target(args) -> tuple[str, list[str], bool]:
    """(recipe, overrides, resume) from `train [RECIPE] [key=value ...] [--resume [RUN_DIR]]`.

    `--resume` alone continues the recipe's run; `--resume RUN_DIR` (no recipe) continues the run in RUN_DIR from
    its own config.yaml, the overrides on top. argparse hands `--resume`'s optional value whatever follows it, so
    a value that is an override or a recipe goes back where it belongs."""
    recipe, overrides, value = args.recipe, list(args.overrides), args.resume
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # `train --resume RUN k=v`
        recipe, overrides = None, [recipe, *overrides]
    if not isinstance(value, str):
        if recipe is None:
            raise LorafitError("Give a recipe (`lorafit train quotes`, see `lorafit recipes`) or a run to continue "
                               "(`lorafit train --resume RUN_DIR`).")
        return recipe, overrides, bool(value)
    if Path(value).is_dir():
        if recipe is not None:
            raise LorafitError(f"--resume {value}: give either a recipe or a run directory to resume, not both "
                               f"(`lorafit train --resume {value}` uses the run's own config.yaml).")
        config = Path(value) / CONFIG_FILE
        if not config.is_file():
            raise LorafitError(f"--resume {value}: the directory holds no {CONFIG_FILE}, so it is not a run lorafit "
                               "can resume. Give a run directory, or a recipe and --resume.")
        # the run is where it is now, even if it was moved since
        return str(config), [*overrides, f"output_dir={value}"], True
    if "=" in value:  # `train RECIPE --resume key=value`: an override
        overrides = [value, *overrides]
    elif recipe is None and (Path(value).is_file() or "/" not in value):  # `train --resume RECIPE`, as before
        recipe = value
    else:
        raise LorafitError(f"--resume {value}: no such run directory. Give an existing run directory "
                           "(`lorafit train --resume runs/NAME`), or put --resume after the recipe's overrides.")
    return recipe, overrides, True


def torch_distributed_errors() -> tuple[type, ...]:
    import torch.distributed as td  # start-up: torch

    return tuple(e for e in (getattr(td, "DistBackendError", None), getattr(td, "DistNetworkError", None),
                             getattr(td, "DistError", None)) if e is not None)


def launch_processes(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: the same command as N data-parallel processes on this machine, started by torchrun."""
    import subprocess  # start-up: subprocess (about 15 ms) only for --nproc

    have, what = processors()
    if nproc > have:  # each process holds the model and its data: more than the machine runs only thrash (or OOM)
        raise LorafitError(f"--nproc {nproc}: this machine has {have} {what}, and each process holds a copy of the "
                           f"model and the data. Use --nproc {have} or fewer.")
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
            and not (i > 0 and argv[i - 1] == "--nproc")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorafit", *rest]
    return subprocess.call(command, env=threads_per_process(nproc))


def threads_per_process(nproc: int) -> dict[str, str]:
    """The environment of N processes on one machine: OMP_NUM_THREADS = usable cores // N each (at least 1),
    unless the user set it. Said once here; torchrun, finding it set, prints no banner of its own."""
    env = dict(os.environ)
    if env.get("OMP_NUM_THREADS"):
        print(f"--nproc {nproc}: {nproc} processes, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each (from the "
              "environment)", file=sys.stderr, flush=True)
        return env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    print(f"--nproc {nproc}: {nproc} processes, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each ({cores} cores // "
          f"{nproc}; set OMP_NUM_THREADS to choose otherwise)", file=sys.stderr, flush=True)
    return env


def processors() -> tuple[int, str]:
    """How many processes `--nproc` may start here, and what they run on: one per GPU, else one per CPU core
    this process may use."""
    import torch  # start-up: torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU core(s) usable (no GPU)"


# `lorafit eval` flags that belong to --data or --tasks (their comparison: lorafit/forgetting.py)
DATA_ONLY = ("text_field", "max_examples")
TASKS_ONLY = ("limit", "num_fewshot", "batch_size", "include_path")


def wants_comparison(args) -> bool:
    """True when `lorafit eval` was given --data or --tasks; their sub-options alone are an error."""
    for names, main, example in ((DATA_ONLY, "data", "--data FILE --text-field text"),
                                 (TASKS_ONLY, "tasks", "--tasks hellaswag --limit 100")):
        stray = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
        if stray and getattr(args, main, None) is None:
            verb = "applies" if len(stray) == 1 else "apply"
            raise LorafitError(f"{', '.join(stray)} only {verb} with --{main}, e.g. lorafit eval RUN {example}.")
    return getattr(args, "data", None) is not None or getattr(args, "tasks", None) is not None


def cmd_eval(args) -> int:
    if wants_comparison(args):  # --data / --tasks: base vs base + adapter (lorafit/forgetting.py)
        from lorafit.forgetting import eval_command  # start-up: torch, loaded after the flags are checked

        return eval_command(args)
    from lorafit.data.prepare import prepare_data  # start-up: torch
    from lorafit.evaluate import evaluate_run, saved_scoring  # start-up: torch
    from lorafit.generate import load_for_inference, resolve_adapter_dir  # start-up: torch
    from lorafit.modeling import default_device, resolve_precision  # start-up: torch

    run = Path(args.run)
    adapter_dir = resolve_adapter_dir(run)
    if not (run / CONFIG_FILE).is_file() and not args.recipe:
        raise LorafitError(f"'{run}' has no {CONFIG_FILE}; pass --recipe NAME to say which data to evaluate on.")
    cfg = run_config(run, args.recipe, args.overrides)
    log(f"loading the base and the adapter from {adapter_dir} ...")
    precision = resolve_precision(cfg.model.precision, default_device())  # once: the weights' dtype and autocast
    model, tokenizer, base_name = load_for_inference(adapter_dir, base=args.base, precision=precision,
                                                     attn_implementation=args.attn_implementation,
                                                     trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    scoring = saved_scoring(run, cfg, model, tokenizer, precision, base=args.base)
    data = prepare_data(cfg, tokenizer, splits=("val",))  # the training set is never tokenised here
    log(f"scoring {len(data.val):,} validation examples on {scoring.device} ...")
    if cfg.train.objective == "sft":
        metrics = evaluate_run(model, data.val, data.source_names, scoring, progress="scoring")
    else:  # preference accuracy and margin on held-out pairs against the run's reference (val_preference)
        # start-up: torch, as the CLI's other torch-side imports
        from lorafit.preference import evaluate_pairs, settings
        from lorafit.reference import attach

        # the reference values the run stored, where their key still holds (else computed again)
        attach(cfg, model, {"val": data.val}, scoring, precision, run / REFERENCE_FILE, policy_is_start=False)
        metrics = evaluate_pairs(model, data.val, data.source_names, scoring, cfg.train.objective, settings(cfg))
    result = {"run": str(run), "base_model": base_name, **metrics}
    print(json.dumps(json.loads(to_json(result)), indent=2))
    return 0


def cmd_generate(args) -> int:
    from lorafit.generate import (  # start-up: torch
        SamplingConfig, check_generation, check_sampling, load_for_inference, sample, sample_base,
    )

    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.num_return_sequences, args.seed)
    check_sampling(cfg)  # before minutes of loading
    for i, prompt in enumerate(args.prompts, 1):  # argv hands bytes that are not UTF-8 over as lone surrogates
        if why := not_utf8(prompt):
            name = "the prompt" if len(args.prompts) == 1 else f"prompt {i}"
            raise LorafitError(f"{name}: {why}. Give the prompt in UTF-8 (check the terminal's encoding).")
    template = None
    if args.template:  # the prompt rendered as training rendered a prompt (lorafit/data/templates.py)
        template = resolve_template(args.template)  # a bad name or file, also before the model loads
    print(f"loading the base and the adapter from {args.run} ...", file=sys.stderr, flush=True)
    model, tokenizer, base_name = load_for_inference(args.run, base=args.base, precision=args.precision,
                                                     attn_implementation=args.attn_implementation,
                                                     trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    rendered = [generation_prompt(template, tokenizer, p) if template else None for p in args.prompts]
    for i, (prompt, segments) in enumerate(zip(args.prompts, rendered), 1):
        check_generation(model, tokenizer, "".join(segments) if segments else prompt, cfg.max_new_tokens,
                         prompt_name="the prompt" if len(args.prompts) == 1 else f"prompt {i}")
    print(f"generating {cfg.num_return_sequences * len(args.prompts)} sample(s) of up to {cfg.max_new_tokens} tokens"
          f"{' (and the base)' if args.compare_base else ''} ...", file=sys.stderr, flush=True)
    # Generated first, under a bar on stderr, then shown: the bar never lands among the samples.
    bar = progress_bar(len(args.prompts) * (2 if args.compare_base else 1), "generating", "prompt")
    results = []
    for prompt, segments in zip(args.prompts, rendered):
        tuned = sample(model, tokenizer, prompt, cfg, segments)
        bar is not None and bar.update(1)
        base = sample_base(model, tokenizer, prompt, cfg, segments) if args.compare_base else None
        bar is not None and args.compare_base and bar.update(1)
        results.append(("".join(segments) if segments else prompt, tuned, base))
    if bar is not None:
        bar.close()
    for shown, tuned, base in results:
        show_json(shown, tuned, base) if args.json else show(shown, tuned, base, base_name)
    return 0


def show(prompt: str, tuned: list[str], base: list[str] | None, base_name: str) -> None:
    """The samples of one prompt. stdout gets the text exactly as decoded, prompt first, one newline after each
    sample: no wrapping, no cut, nothing added (`> out.txt` keeps what the model said). On a terminal rich lays it
    out; elsewhere labels and separators go to stderr."""
    if sys.stdout.isatty():
        return show_on_terminal(prompt, tuned, base, base_name)
    columns = [("fine-tuned (base + adapter)", tuned)] if base is None else \
        [(f"base ({Path(base_name).name})", base), ("fine-tuned (base + adapter)", tuned)]
    for i in range(len(tuned)):
        for label, texts in columns:
            if base is not None or len(tuned) > 1:
                print(f"--- {label}" + (f", sample {i + 1}" if len(tuned) > 1 else "") + " ---", file=sys.stderr, flush=True)
            sys.stdout.write(prompt + texts[i] + "\n")
            sys.stdout.flush()


def show_on_terminal(prompt: str, tuned: list[str], base: list[str] | None, base_name: str) -> None:
    # start-up: rich (about 0.1 s) only for --compare-base's table
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Prompts and model output are plain text: as rich markup, "[/i]" raises and "[b]" vanishes. soft_wrap: the
    # terminal wraps, so a copied line is the model's line; in the table, fold: a long token is never cut with "…".
    console = Console()
    if base is None:
        for i, text in enumerate(tuned):
            console.print(Text.assemble((prompt, "bold"), text), highlight=False, soft_wrap=True)
            if i + 1 < len(tuned):
                console.rule(style="dim")
        return
    table = Table(title=Text(f"prompt: {prompt!r}"), show_lines=True, expand=True)
    table.add_column(Text(f"base ({Path(base_name).name})"), ratio=1, overflow="fold")
    table.add_column("fine-tuned (base + adapter)", ratio=1, overflow="fold")
    for b, t in zip(base, tuned):
        table.add_row(Text(prompt + b, overflow="fold"), Text(prompt + t, overflow="fold"))
    console.print(table)


def show_json(prompt: str, tuned: list[str], base: list[str] | None) -> None:
    """`--json`: one object a sample, one line each (JSON Lines), the texts exact."""
    for i, text in enumerate(tuned):
        record = {"prompt": prompt, "sample": i, "completion": text}
        if base is not None:
            record["base_completion"] = base[i]
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def cmd_merge(args) -> int:
    from lorafit.merge import merge  # start-up: torch

    out = merge(args.run, Path(args.out), base=args.base, dtype=args.dtype, attn_implementation=args.attn_implementation,
                trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from lorafit.export import export  # start-up: torch and the gguf extra

    written = export(args.run, Path(args.out), quant=args.quant, adapter_only=args.adapter_only, ollama=args.ollama,
                     base=args.base)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_init_model(args) -> int:
    out = init_model(args.config, args.tokenizer, Path(args.out), seed=args.seed)
    print(f"random {args.config} model written to {out}", file=sys.stderr)
    return 0


def cmd_recipes(args) -> int:
    for name in list_recipes():
        cfg = load_config(name)
        length = f"epochs={cfg.train.epochs:g}" + (f" max_steps={cfg.train.max_steps}" if cfg.train.max_steps else "")
        print(f"{name:24s} {length:10s} model={cfg.model.name} sources={', '.join(cfg.data.sources)}")
        print(f"{'':24s} {DESCRIPTIONS.get(name, '')}")
    print("\n`lorafit config NAME` shows a recipe in full; `lorafit train NAME key=value ...` runs it.")
    return 0


def cmd_config(args) -> int:
    if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).exists():  # `config k=v`: defaults
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    if args.recipe is not None and Path(args.recipe).is_dir():  # a run directory, as `train --resume RUN_DIR` takes
        if not (Path(args.recipe) / CONFIG_FILE).is_file():
            raise LorafitError(f"{args.recipe} is a directory without a {CONFIG_FILE}: give a run directory, a recipe "
                               "name or a YAML file.")
        args.recipe = str(Path(args.recipe) / CONFIG_FILE)
    if args.recipe is None:
        problems: list[str] = []
        raw = apply_overrides({"data": {"sources": {"text": {"path": "data.jsonl"}}}}, args.overrides, problems)
        if problems:
            raise ConfigError(problems)
        cfg = build_config(raw)
        print("# lorafit's defaults (no recipe given); data.sources holds one example source")
    else:
        cfg = load_config(args.recipe, args.overrides)
    print(annotated_yaml(cfg), end="")
    return 0


def cmd_data(args) -> int:
    if args.show < 1:
        raise LorafitError(f"--show {args.show}: give a positive number of examples.")
    cfg = load_config(args.recipe, args.overrides)
    check_local_paths(cfg)
    # start-up: torch and transformers (the tokenizer), loaded after the config is checked
    from lorafit.data.show import show_examples
    from lorafit.data.sources import offline_hint
    from lorafit.modeling import load_tokenizer

    m = cfg.model
    hint = offline_hint(cfg.data, None if looks_like_a_path(m.name) else m.name)
    tokenizer = load_tokenizer(m.name, m.revision, m.trust_remote_code, hint=hint)
    show_examples(cfg, tokenizer, args.show)
    return 0


def cmd_serve(args) -> int:
    from lorafit.serve.app import serve  # start-up: torch and the serve extra

    return serve(args)


def cmd_bench(args) -> int:
    from lorafit.bench.run import main as bench_main  # start-up: torch and the bench extra

    return bench_main(args)


# ---------------------------------------------------------------- parser


def add_attn_argument(parser: argparse.ArgumentParser) -> None:
    """The options of every command that loads an adapter's base: attention, trust and identity."""
    parser.add_argument("--attn-implementation", default=None, metavar="NAME",
                        help="attention implementation for the base (auto, eager, sdpa, ...; default: the one the run used)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the base model (only for models you trust; never taken "
                             "from the adapter's files)")
    add_force_base_argument(parser)


def add_force_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force-base", action="store_true",
                        help="use the adapter or checkpoint even if its recorded base fingerprint differs from this "
                             "base's (other weights of the same shapes)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit", description="Fast, honest LoRA fine-tuning of small causal language models.",
        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a LoRA adapter from a recipe", epilog=USAGE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", help="a shipped recipe name (see `lorafit recipes`) or a YAML file; "
                                             "not needed with --resume RUN_DIR")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. lora.r=16")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue from the newest checkpoint in output_dir; with RUN_DIR, the run there from its own "
                        "config.yaml (train.max_steps / train.epochs may be raised to train on)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_force_base_argument(t)
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train data parallel in N processes on this machine (through torchrun; one per GPU, or CPU processes)")
    t.set_defaults(func=cmd_train, argv=None)

    e = sub.add_parser("eval", help="evaluate a run on its validation data, or base vs adapter (--data, --tasks); prints JSON")
    e.add_argument("run", help="run directory (or adapter directory with --recipe)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.max_examples=100")
    e.add_argument("--recipe", help="recipe whose data to use when RUN has no config.yaml")
    e.add_argument("--base", help="base model (default: the adapter's own)")
    add_attn_argument(e)
    f = e.add_argument_group("did it forget? base vs base + adapter (results in RUN/eval/ and the model card)")
    f.add_argument("--data", action="append", metavar="SOURCE",
                   help="score this text with lorafit's evaluator: a local file (jsonl, json, csv, tsv, txt, parquet) "
                        "or a Hub dataset id, PATH:FIELD for its own field, or a YAML file of sources written as a "
                        "recipe's data.sources; repeatable")
    f.add_argument("--text-field", help="--data: the field holding the text of sources given without :FIELD "
                                        "(default: text)")
    f.add_argument("--max-examples", type=int, help="--data: score a seeded sample of at most N examples a source")
    f.add_argument("--tasks", metavar="T1,T2", help="run these lm-evaluation-harness tasks (extra lm-eval)")
    f.add_argument("--limit", help="--tasks: at most N examples a task (or a fraction below 1)")
    f.add_argument("--num-fewshot", type=int, metavar="K", help="--tasks: few-shot examples (default: the task's)")
    f.add_argument("--batch-size", metavar="B", help="--tasks: lm-eval batch size, or auto (default: 1)")
    f.add_argument("--include-path", metavar="DIR", help="--tasks: a directory of task YAML files of your own")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample from base + adapter")
    g.add_argument("run", help="run directory or PEFT adapter directory")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.add_argument("--max-new-tokens", type=int, default=70, metavar="N", help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling (default: off)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K likeliest tokens (default: off)")
    g.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="samples a prompt (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--compare-base", action="store_true", help="show the base model's continuation beside it")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object a sample (prompt, sample, completion, base_completion), one a line")
    g.add_argument("--template", metavar="NAME|FILE", default=None,
                   help="render each prompt as a prompt_completion or chat source was in training: plain, alpaca, "
                        "chat (the model's chat template; PROMPT is the user's message), roles, or a file holding a "
                        "format string with {prompt} (default: the prompt as given)")
    g.add_argument("--base", help="base model (default: the adapter's own)")
    g.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: the precision the run was trained in")
    add_attn_argument(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge the adapter into the base and save a full model")
    m.add_argument("run", help="run directory or PEFT adapter directory")
    m.add_argument("out", help="output directory")
    m.add_argument("--base", help="base model (default: the adapter's own)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    add_attn_argument(m)
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", help="write a GGUF file for llama.cpp / Ollama (base + adapter merged, or the adapter alone)")
    x.add_argument("run", help="run directory or PEFT adapter directory")
    x.add_argument("out", help="the GGUF file to write, e.g. quotes.f16.gguf")
    x.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_k_m"],
                   help="weight type in the file (default: %(default)s); q4_k_m by llama.cpp's own quantiser")
    x.add_argument("--adapter-only", action="store_true",
                   help="write the LoRA adapter alone, as a GGUF LoRA (llama.cpp --lora, Ollama's ADAPTER)")
    x.add_argument("--ollama", action="store_true",
                   help="also write a Modelfile beside OUT (with --adapter-only, the base's GGUF too)")
    x.add_argument("--base", help="base model (default: the adapter's own)")
    x.set_defaults(func=cmd_export)


    i = sub.add_parser("init-model", help="write a randomly initialised GPT-2 model (offline runs, benchmarks)")
    i.add_argument("--config", required=True, choices=list(SIZES), help=f"the model's size: {describe_sizes()}")
    i.add_argument("--tokenizer", required=True, help="tokenizer directory (or GPT-2 vocab.json + merges.txt)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("out")
    i.set_defaults(func=cmd_init_model)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    c = sub.add_parser("config", help="print the resolved config as YAML, each key with its one-line doc")
    c.add_argument("recipe", nargs="?", help="a shipped recipe name, a YAML file or a run directory (its config.yaml; "
                                             "default: lorafit's defaults)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. lora.r=16")
    c.set_defaults(func=cmd_config)

    dp = sub.add_parser("data", help="show training examples as rendered and tokenised, the scored tokens marked")
    dp.add_argument("recipe", help="a shipped recipe name, a YAML file or a run's config.yaml")
    dp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.seq_len=128")
    dp.add_argument("--show", type=int, default=3, metavar="N", help="how many examples (default: %(default)s)")
    dp.set_defaults(func=cmd_data)

    s = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API, with a browser playground")
    s.add_argument("adapters", nargs="*", metavar="RUN_DIR or NAME=RUN_DIR", help="adapters to serve (name: the directory's)")
    s.add_argument("--base", help="base model (default: the first adapter's own)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--adapters-root", help="allow POST /v1/adapters to load adapters from under this directory")
    s.add_argument("--api-key", default=os.environ.get("LORAFIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API request (default: $LORAFIT_API_KEY)")
    s.add_argument("--allow-admin", action="store_true",
                   help="without --api-key, still allow POST/DELETE /v1/adapters (off by default: anyone reaching the "
                        "server could load or unload adapters)")
    s.add_argument("--log-prompts", action="store_true", help="write prompt text into the request log (default: not)")
    s.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: the precision the first adapter's run was trained in (auto for --base alone)")
    add_attn_argument(s)
    s.set_defaults(func=cmd_serve)


    b = sub.add_parser("bench", help="benchmark lorafit against the original pipeline")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`train quotes --resume lora.r=4`): collect strays.
    args, extra = parser.parse_known_args(argv)
    strays = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra != strays or (strays and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if strays:
        args.overrides = list(args.overrides) + strays
    if getattr(args, "nproc", 1) < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if argv is not None and hasattr(args, "argv"):
        args.argv = list(argv)  # what --nproc relaunches
    if args.command in ("train", "eval", "generate", "merge", "export", "bench", "serve", "data"):
        _offline_if_hub_unreachable()
    _quiet_libraries()
    if args.command not in ("train", "bench"):  # only a training config can ask for model.quantize
        _without_bitsandbytes()
    try:
        return args.func(args)
    except LorafitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `lorafit generate ... | head`: the reader has what it wanted; nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit raises nothing
        return 0
    except OSError as exc:  # the environment, not lorafit: a permission, a full disk, a vanished file
        where = f": {shorten(str(exc.filename))}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}. Check the path, its permissions and the free space.", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a write failure a writer reported in its own type (torch, safetensors) outside `saving`
        error = write_error(exc, "a file", "Check the path, its permissions and the free space.")
        if error is None:
            raise  # a bug: keep its traceback
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
