"""The options of ``hf-flexoffload eval`` and ``generate``, without importing what they need
(``datasets``, torch, transformers): ``hf-flexoffload --help`` stays fast. ``command`` and
``batch_command`` run them."""

from __future__ import annotations

import argparse

from .metrics import ALL_METRICS
from .scenario import BUILTIN_PREFIX
from .synthetic import MODES


def add_parser(sub, machine_options, parse_max_memory, positive_int, compute_dtype) -> None:
    """Register ``eval`` on the CLI's subparsers (with the CLI's parsers of ``--max-memory``,
    positive integers and compute dtypes)."""
    p = sub.add_parser(
        "eval",
        help="HELM-style evaluation of a model on a scenario or a local dataset",
        description=__doc__.splitlines()[0],
    )
    machine_options(p)
    model_options(p, positive_int, compute_dtype)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--scenario",
        help=f"built in: {', '.join(BUILTIN_PREFIX + m for m in MODES)}",
    )
    what.add_argument("--dataset", help="json, jsonl, csv, parquet or a saved datasets directory")
    p.add_argument("--split", default=None, help="split to evaluate (default: test)")
    p.add_argument("--train-split", default=None, help="split the k-shot examples come from")
    p.add_argument("--prompt-template", default=None, help='e.g. "Q: {question}\\nA:"')
    p.add_argument("--instructions", default=None)
    p.add_argument("--reference-column", default=None)
    p.add_argument("--choices-column", default=None, help="multiple choice: list of options")
    p.add_argument("--answer-column", default=None, help="multiple choice: index or text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--num-shots", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", action="append", default=None, help='stop sequence, e.g. "\\n" (repeatable)'
    )
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--metrics", default=None, help=f"comma-separated, of {','.join(ALL_METRICS)}")
    p.add_argument("--max-instances", type=int, default=None)
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        default=None,
        help="skip rows with a missing or null prompt field, reference, choice or answer "
        "(default: refuse them, naming the rows); counted in stats.json",
    )
    p.add_argument("--run-name", default=None, help="directory name under --output")
    p.add_argument("--output", default="runs", help="runs are written to OUTPUT/RUN_NAME/")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.set_defaults(run=_run, parse_max_memory=parse_max_memory)


def model_options(p: argparse.ArgumentParser, positive_int, compute_dtype) -> None:
    """The options of the model an evaluation or a batch job loads, and how it runs."""
    p.add_argument("--model", required=True, help="hub repo id or checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model's)")
    p.add_argument(
        "--offload-policy", default="auto", help="'auto' or a policy JSON file (see plan)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        type=compute_dtype,
        help="compute dtype, or 'auto' (measured); default: the checkpoint's",
    )
    p.add_argument(
        "--max-memory", action="append", default=[], metavar="TIER=SIZE", help="cap a tier"
    )
    p.add_argument(
        "--block-size", type=positive_int, default=None, help="default: the policy's block"
    )
    p.add_argument("--no-progress", action="store_true")


def add_generate_parser(
    sub, machine_options, parse_max_memory, positive_int, compute_dtype
) -> None:
    """Register ``generate`` (a batch job from a JSON-lines file) on the CLI's subparsers."""
    p = sub.add_parser(
        "generate",
        help='offline batch generation: OpenAI Batch (or {"prompt": ...}) JSONL in, JSONL out',
        description="Run every request of an OpenAI Batch API file (/v1/completions, "
        '/v1/chat/completions) or of plain {"prompt": ...} lines through one offloaded '
        "model, in length-sorted blocks; write one OpenAI Batch output line per request, in "
        "input order. Bad lines go to OUTPUT's .errors.jsonl and do not stop the job.",
    )
    machine_options(p)
    model_options(p, positive_int, compute_dtype)
    p.add_argument("--input", "-i", required=True, help="the requests, one JSON object a line")
    p.add_argument("--output", "-o", required=True, help="the results (JSON lines)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job")
    defaults = p.add_argument_group("defaults for what a request's body does not set")
    defaults.add_argument("--max-tokens", type=positive_int, default=64)
    defaults.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    defaults.add_argument("--top-p", type=float, default=1.0)
    defaults.add_argument(
        "--stop", action="append", default=None, help='stop sequence, e.g. "\\n" (repeatable)'
    )
    defaults.add_argument("--n", type=positive_int, default=1, help="completions per request")
    p.add_argument(
        "--seed", type=int, default=None, help="seed the job's random state once (sampling)"
    )
    p.set_defaults(run=_run_generate, parse_max_memory=parse_max_memory)


def add_lm_eval_parser(sub) -> None:
    """Register ``lm-eval`` (lm-evaluation-harness's CLI with the ``flexoffload`` model type)
    for ``--help``; ``run_lm_eval`` runs it, every argument passed on as it is."""
    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness's own CLI, with --model flexoffload registered "
        "(pip install hf_flexoffload[lm-eval])",
    )


def run_lm_eval(argv: list[str]) -> int:
    """Run ``lm_eval``'s command line on ``argv`` with the ``flexoffload`` type registered
    (for lm-eval releases that do not load plugins from entry points).

    Raises:
        ValueError: lm-eval is not installed (saying how to install it).
    """
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate

        from . import lm_eval_model  # noqa: F401  (registers "flexoffload")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        raise ValueError(
            "lm-eval is not installed: pip install 'hf_flexoffload[lm-eval]' (or the lock's "
            "lm-eval with `make venv`)."
        ) from None
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:  # lm-eval's --help, or its own usage errors
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import command  # heavy: only when an evaluation runs

    return command.run(args)


def _run_generate(args: argparse.Namespace) -> int:
    from . import batch_command  # heavy: only when a job runs

    return batch_command.run(args)
