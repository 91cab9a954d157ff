"""Command line: ``hf-flexoffload demo | profile | plan | eval | generate | lm-eval``. Printing
happens here and in the evaluation's and batch job's commands and progress bars, nowhere else.

Exit codes: 0 success; 1 the demo's tokens differ from transformers'; 2 bad input (a missing
model, an unparsable size, an unknown dtype, a prompt longer than the model's positions, bad
evaluation data, a batch file with no runnable line, an output directory or file holding
another run or in use by one); 3 the model, a policy or a block does not fit the memory
(``plan``, ``eval``, ``generate``, ``demo``); 130 interrupted (Ctrl-C: ``eval`` and
``generate`` continue with the same command and ``--resume``). User errors print one
``error:`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Only light modules here: torch, transformers and datasets are imported by the commands that
# need them, so ``hf-flexoffload --help`` answers at once.
from .config.policy import TIERS
from .config.workload import Workload
from .eval import arguments as eval_arguments

EXIT_MISMATCH, EXIT_USAGE, EXIT_INFEASIBLE, EXIT_INTERRUPTED = 1, 2, 3, 130
INTERRUPTED = "interrupted: rerun the same command with --resume"


def profile(args: argparse.Namespace) -> int:
    """Measure (or show the cached) hardware profile of this machine."""
    import torch

    from .architectures import architecture_for
    from .planning.hardware import HardwareProfile
    from .storage.transfer import resolve_device

    matrix = (2048, 8192)
    if args.model:
        arch = architecture_for(_model_config(args))
        matrix = (arch.hidden, arch.ffn)
    measured = HardwareProfile.measure(
        resolve_device(args.device),
        getattr(torch, args.dtype),
        offload_dir=args.offload_dir,
        matrix=matrix,
        force=args.force,
    )
    print(measured.describe())
    if args.output:
        with open(args.output, "w") as f:
            f.write(measured.to_json())
        print(f"wrote {args.output}")
    return 0


def plan(args: argparse.Namespace) -> int:
    """Print the policy ``offload_policy="auto"`` would choose for a model, and its estimate."""
    from .config.counters import human_bytes
    from .planning.dtype_choice import MEASURED
    from .planning.load_plan import plan_policy
    from .planning.optimizer import InfeasiblePolicyError
    from .storage.tier_store import dtype_name
    from .storage.transfer import resolve_device

    config = _model_config(args)
    workload = Workload(
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        batch_size=args.batch_size,
        allow_compression=args.allow_compression,
    )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.prompt_len + args.gen_len > positions:
        raise _UsageError(
            f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} = "
            f"{args.prompt_len + args.gen_len} tokens, but the model has {positions} positions "
            "(max_position_embeddings): generation would fail. Shorten the prompt or generation."
        )
    try:
        planned = plan_policy(
            config.name_or_path,
            config=config,
            device=resolve_device(args.device),
            dtype=args.dtype,
            offload_dir=args.offload_dir,
            max_memory=args.max_memory,
            workload=workload,
        )
    except InfeasiblePolicyError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INFEASIBLE
    policy, est, hw, choice = planned.policy, planned.estimate, planned.profile, planned.choice
    print(
        f"Compute dtype: {dtype_name(choice.dtype)} ({choice.reason}; CPU capability "
        f"{choice.cpu_capability})"
    )
    if choice.reason == MEASURED:
        for candidate in choice.candidates:
            chosen = "  <- chosen" if candidate.dtype == choice.dtype else ""
            print(f"  {candidate.describe()}{chosen}")
    print(f"Policy ({workload.prompt_len}-token prompts, {workload.gen_len} new tokens):")
    print("  " + policy.to_json(indent=None))
    print(
        f"Predicted: {est.tokens_per_second:.1f} tok/s for a block of {est.block_size} "
        f"sequences; prefill {est.prefill_seconds:.2f}s, decode {est.decode_seconds:.2f}s; "
        f"bottleneck: {est.bottleneck}"
        + (" (disk reads from the page cache)" if est.page_cached else "")
    )
    print(f"{'tier':<8}{'needs':>12}{'has':>12}")
    for tier in TIERS:
        note = " (same RAM as device)" if hw.shared and tier == "host" else ""
        print(
            f"{tier:<8}{human_bytes(est.peak_bytes[tier]):>12}"
            f"{human_bytes(hw.capacity(tier)):>12}{note}"
        )
    if args.output:
        policy.save(args.output)
        print(f"wrote {args.output} (load it with offload_policy={args.output!r})")
    return 0


def _model_config(args: argparse.Namespace):
    """The config of ``--model`` (a local directory or a hub id, fetched at ``--revision``);
    its ``name_or_path`` is the local directory."""
    from transformers import AutoConfig

    from .architectures import ARCHITECTURES
    from .checkpoints.hub import resolve_pretrained

    path = resolve_pretrained(args.model, revision=args.revision)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise _UsageError(f"--model {path!r} is not a checkpoint directory with a config.json.")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ARCHITECTURES:
        raise _UsageError(
            f"--model {args.model!r} is a {config.model_type!r} model; supported model types: "
            f"{', '.join(ARCHITECTURES)}."
        )
    config.name_or_path = path
    return config


class _UsageError(Exception):
    """Bad command-line input: printed with exit code 2."""


def _max_memory(items: list[str]) -> dict[str, int]:
    """``TIER=SIZE`` items checked by the rules ``from_pretrained(max_memory=)`` applies."""
    from .planning.budget import check_max_memory, parse_size

    raw = {}
    for item in items:
        tier, sep, size = item.partition("=")
        if not sep or tier not in TIERS:
            raise _UsageError(f"--max-memory {item!r}: use TIER=SIZE with TIER in {list(TIERS)}.")
        raw[tier] = size
    try:
        check_max_memory(raw)
    except ValueError as err:
        raise _UsageError(f"--max-memory: {err}") from err
    return {tier: parse_size(size) for tier, size in raw.items()}


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _compute_dtype(text: str) -> str:
    """An argparse type: a compute dtype name (or ``auto``)."""
    if text not in COMPUTE_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(COMPUTE_DTYPES)}")
    return text


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-flexoffload", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offloaded generation next to stock transformers")
    p.add_argument("--toy", action="store_true", help="random weights even if real ones exist")
    p.add_argument(
        "--model",
        choices=("smollm2", "gemma3"),
        default="smollm2",
        help="the real weights: SmolLM2-135M-Instruct (llama) or Gemma 3 270M (gemma3_text)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="random-weight model only")
    p.add_argument("--prompt-len", type=int, default=32, help="random-weight model only")
    p.add_argument("--new-tokens", type=int, default=None, help="default 40 (real), 16 (toy)")
    p.add_argument("--cache-dir", default=None, help="default: $HF_FLEXOFFLOAD_CACHE or ~/.cache")
    p.add_argument(
        "--eval-instances", type=int, default=16, help="then evaluate this many (0: skip)"
    )
    p.set_defaults(run=_demo)

    def machine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="compute device (default: cuda:0 or cpu)")
        p.add_argument("--offload-dir", default=None, help="where the disk tier will be")
        p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --model")

    p = sub.add_parser("profile", help="measure and cache this machine's hardware profile")
    machine_options(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--model", default=None, help="measure matmuls at this model's shape (directory or hub id)"
    )
    p.add_argument("--force", action="store_true", help="measure again, ignoring the cache")
    p.add_argument("--output", default=None, help="also write the profile as JSON here")
    p.set_defaults(run=profile)

    p = sub.add_parser("plan", help="the policy offload_policy='auto' would choose, and why")
    machine_options(p)
    p.add_argument("--model", required=True, help="hub repo id or checkpoint directory")
    p.add_argument("--prompt-len", type=_positive_int, default=512)
    p.add_argument("--gen-len", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="fix the block size")
    p.add_argument(
        "--dtype",
        default=None,
        type=_compute_dtype,
        help="compute dtype, or 'auto': the fastest predicted here of those measured (float32, "
        "bfloat16; float16 on CUDA); default: the checkpoint's",
    )
    p.add_argument(
        "--max-memory",
        action="append",
        default=[],
        metavar="TIER=SIZE",
        help="cap a tier, e.g. host=8GiB (repeatable)",
    )
    p.add_argument("--allow-compression", action="store_true", help="consider 4-bit weights/KV")
    p.add_argument("--output", default=None, help="write the chosen policy as JSON here")
    p.set_defaults(run=plan)

    eval_arguments.add_parser(sub, machine_options, _max_memory, _positive_int, _compute_dtype)
    eval_arguments.add_generate_parser(
        sub, machine_options, _max_memory, _positive_int, _compute_dtype
    )
    eval_arguments.add_lm_eval_parser(sub)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's
        try:
            return eval_arguments.run_lm_eval(argv[1:])
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE

    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0), or a bad option (2) that argparse has printed
        return int(done.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    _say_when_measuring()
    if args.command == "demo" and args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (two micro-batches)")
    try:  # bad input is a usage error, reported without a traceback
        if args.command == "plan":
            args.max_memory = _max_memory(args.max_memory)
            Workload(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=args.batch_size)
        return args.run(args)
    except KeyboardInterrupt:
        resumable = args.command in ("eval", "generate")
        print(INTERRUPTED if resumable else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        code = _exit_code(err)
        if code is None:
            raise  # a bug, not a user error: the traceback is wanted
        print(f"error: {err}", file=sys.stderr)
        return code


def _say_when_measuring() -> None:
    """Print the library's notice that it measures the machine (30 s to 2 min, once), and a
    line as each of its probes starts, as plain lines on stderr, so a long first ``plan``,
    ``eval`` or ``profile`` says why and how far it is."""
    for name in ("hf_flexoffload.planning.hardware", "hf_flexoffload.planning.probes"):
        measuring = logging.getLogger(name)
        if not any(isinstance(h, _PlainStderr) for h in measuring.handlers):
            measuring.addHandler(_PlainStderr())
            measuring.propagate = False
    probes = logging.getLogger("hf_flexoffload.planning.probes")
    if probes.getEffectiveLevel() > logging.INFO:
        probes.setLevel(logging.INFO)


class _PlainStderr(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


def _exit_code(err: Exception) -> int | None:
    """The exit code of a user error (None: not one)."""
    if "hf_flexoffload.planning.budget" in sys.modules:  # else nothing could have raised these
        from .planning.budget import InsufficientMemoryError
        from .planning.optimizer import InfeasiblePolicyError

        if isinstance(err, (InfeasiblePolicyError, InsufficientMemoryError)):
            return EXIT_INFEASIBLE
    if isinstance(err, (_UsageError, ValueError, FileExistsError, OSError)):
        return EXIT_USAGE
    return None


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    from .planning.hardware import default_cache_dir

    args.cache_dir = args.cache_dir or default_cache_dir()
    return demo.demo(args)


if __name__ == "__main__":
    sys.exit(main())
