"""The options of ``hf-flexoffload eval``, without importing what evaluation needs (``datasets``,
torch, transformers): ``hf-flexoffload --help`` stays fast. ``command`` runs it."""

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
    p.add_argument("--model", required=True, help="hub repo id or checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model's)")
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
    p.set_defaults(run=_run, parse_max_memory=parse_max_memory)


def _run(args: argparse.Namespace) -> int:
    from . import command  # heavy: only when an evaluation runs

    return command.run(args)
