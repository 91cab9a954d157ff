"""``hf-flexoffload eval``: the command-line face of ``evaluate``.

Everything that can be wrong with the input (scenario, dataset, columns, template, output
directory) is checked before the model is loaded; such errors exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoConfig, AutoTokenizer

from ..checkpoints.hub import resolve_pretrained
from ..config.workload import Workload
from ..modeling.auto import AutoFlexOffloadModelForCausalLM
from ..planning.budget import available_ram
from ..storage.transfer import resolve_device
from .distributed import Ranks
from .identity import make_run_spec
from .runner import evaluate, run_directory
from .scenario import (
    Instance,
    ScenarioSpec,
    build_instances,
    builtin_scenario,
    continuation,
)

_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def scenario_from_args(args: argparse.Namespace) -> ScenarioSpec:
    """The spec the options describe: a built-in with overrides, or a local dataset."""
    overrides = {
        "name": args.run_name,
        "split": args.split,
        "train_split": args.train_split,
        "prompt_template": _unescape(args.prompt_template),
        "instructions": _unescape(args.instructions),
        "reference_column": args.reference_column,
        "choices_column": args.choices_column,
        "answer_column": args.answer_column,
        "id_column": args.id_column,
        "num_shots": args.num_shots,
        "seed": args.seed,
        "stop": tuple(_unescape(s) for s in args.stop) if args.stop is not None else None,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "metrics": tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else None,
        "max_instances": args.max_instances,
        "skip_invalid": args.skip_invalid,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.scenario:
        return builtin_scenario(args.scenario, **given)
    if args.choices_column and "metrics" not in given:
        given["metrics"] = ("accuracy",)
    return ScenarioSpec(source=args.dataset, **given)


def run(args: argparse.Namespace) -> int:
    spec = scenario_from_args(args)
    instances = build_instances(spec)  # bad data fails here, before the model is loaded
    ranks = Ranks.from_env()
    run_dir = run_directory(args.output, spec)
    run_dir.check(make_run_spec(spec, args.model, instances=instances), args.resume)
    # A hub id is fetched once (weights and tokenizer files) and read from the cache after.
    path = resolve_pretrained(args.model, revision=args.revision, tokenizer=not args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or path)
    config = AutoConfig.from_pretrained(path)
    # The model and tokenizer are checked too, before the model loads (options after).
    identity = make_run_spec(spec, args.model, instances=instances, config=config,
                             model_path=path, tokenizer=tokenizer)  # fmt: skip
    run_dir.check(identity, args.resume)
    if ranks.is_main:
        run_dir.lock()
    try:
        return _load_and_evaluate(args, spec, instances, ranks, path, tokenizer, config)
    finally:
        if ranks.is_main:
            run_dir.unlock()


def _load_and_evaluate(args, spec, instances, ranks, path, tokenizer, config) -> int:
    workload = _workload(spec, instances, tokenizer, config)
    max_memory = args.parse_max_memory(args.max_memory) or None
    device = resolve_device(args.device)
    offload_dir = args.offload_dir
    if ranks.world_size > 1:
        # One model per rank: its own device, its own offload files and a share of the RAM.
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
        if offload_dir is not None:
            offload_dir = os.path.join(offload_dir, f"rank-{ranks.rank}")
        if max_memory is None and ranks.local_world_size > 1:
            max_memory = {"host": available_ram() // ranks.local_world_size}
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        path,
        offload_policy=args.offload_policy,
        offload_dir=offload_dir,
        device=device,
        dtype=args.dtype,
        max_memory=max_memory,
        workload=workload,
    ) as model:
        result = evaluate(
            model,
            tokenizer,
            spec,
            output_dir=args.output,
            resume=args.resume,
            block_size=args.block_size,
            model_name=args.model,
            progress=not args.no_progress,
            ranks=ranks,
        )
    if ranks.is_main:
        print(summary(result.stats, result.run_dir))
    return 0


def _workload(spec: ScenarioSpec, instances: list[Instance], tokenizer, config) -> Workload:
    """What "auto" places the weights for: the longest prompt (blocks run longest first) and
    the generation length; every block is then re-planned for its real lengths.

    Raises ``ValueError`` (before the model loads) when the tokenizer gives ids the model has
    no embedding for, or the longest prompt and the generation exceed the model's positions.
    """
    if spec.multiple_choice:
        texts = [i.prompt + continuation(i.prompt, c) for i in instances for c in i.choices]
        gen_len = 1
    else:
        texts, gen_len = [i.prompt for i in instances], spec.max_new_tokens
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    top = max((max(ids) for ids in encoded if ids), default=0)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and top >= vocab:
        raise ValueError(
            f"The tokenizer gives token id {top} but the model's vocabulary has {vocab} "
            f"entries (the tokenizer has {len(tokenizer)}): pass the model's own --tokenizer."
        )
    longest = max(len(ids) for ids in encoded)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and longest + gen_len > positions:
        raise ValueError(
            f"The longest prompt has {longest} tokens; with {gen_len} new tokens that exceeds "
            f"the model's {positions} positions. Shorten the prompts (fewer --num-shots, "
            "--max-instances) or --max-new-tokens."
        )
    return Workload(prompt_len=longest, gen_len=gen_len)


def summary(stats: dict, run_dir: str | None) -> str:
    """A few lines of what ``stats.json`` holds."""
    lines = [f"{stats['scenario']}: {stats['num_instances']} instances"]
    if stats.get("skipped_invalid_rows"):
        lines[0] += f" ({stats['skipped_invalid_rows']} rows skipped for missing data)"
    lines += [f"  {name:<20} {value:.4f}" for name, value in stats["metrics"].items()]
    lines.append(
        f"  {stats['generated_tokens']} tokens generated in {stats['model_seconds']:.1f}s of "
        f"model time ({stats['generated_tokens_per_second']:.1f} tok/s, "
        f"{stats['instances_per_second']:.2f} instances/s), {stats['processes']} process(es)"
    )
    if stats.get("policy"):
        policy = {k: v for k, v in stats["policy"].items() if k in _POLICY_SUMMARY}
        lines.append(f"  policy {json.dumps(policy)}")
    if run_dir:
        lines.append(f"  wrote {run_dir}/")
    return "\n".join(lines)


_POLICY_SUMMARY = ("micro_batch_size", "num_micro_batches", "weights", "cache", "overlap")


def _unescape(text: str | None) -> str | None:
    """Shell-friendly ``\\n`` and ``\\t`` in stop sequences and templates."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in _ESCAPES:
            out.append(_ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
