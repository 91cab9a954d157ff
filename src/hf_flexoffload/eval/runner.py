"""``evaluate``: run a scenario through a model block by block, durably, and score it.

Instances are sorted by prompt length (longest first, so a block that does not fit fails at
once rather than days in) and cut into blocks of the offload policy's block size, so every
weight load serves a full block of similar-length, left-padded prompts. Each finished block's
records are appended and fsynced before the next starts: an interrupted run loses at most the
block in flight, and ``resume=True`` skips what is done. Aggregates are always computed from
the records on disk, so a resumed run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .distributed import Ranks
from .generation import choice_logprobs, generate_block
from .identity import make_run_spec
from .metrics import accuracy, score_completion
from .rundir import RecordWriter, RunDirectory
from .scenario import Instance, ScenarioSpec, build_instances, builtin_scenario

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8  # for models without an offload policy (stock transformers)


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation produced.

    Attributes:
        scenario: The spec that was run.
        metrics: Each metric's mean over all finished instances.
        records: Per-instance records (prompt, completion or choice log-probs, scores), in
            scenario order.
        stats: Everything in ``stats.json``: counts, tokens, time, throughput, policy, hardware.
        run_dir: Where the files are, or None when nothing was written.
    """

    scenario: ScenarioSpec
    metrics: dict[str, float]
    records: list[dict] = field(repr=False)
    stats: dict[str, Any] = field(repr=False)
    run_dir: str | None = None


def evaluate(
    model,
    tokenizer,
    scenario: ScenarioSpec | str,
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    block_size: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> EvalResult:
    """Evaluate ``model`` on a scenario.

    Args:
        model: A causal LM: an offloaded model (blocks follow its policy) or a stock one.
        tokenizer: Its tokenizer.
        scenario: A ``ScenarioSpec`` or a built-in name such as
            ``"synthetic_reasoning:pattern_match"``.
        output_dir: Write ``<output_dir>/<scenario.name>/`` (see ``rundir``); None keeps
            everything in memory.
        resume: Continue a run in ``output_dir``, skipping finished instances.
        block_size: Prompts per ``generate`` call; default: the offload policy's block size.
        model_name: Recorded in ``run_spec.json`` (default: the model's ``name_or_path``).
        progress: Show a progress bar (instances, tokens/s, ETA).
        ranks: This process's place among data-parallel processes (default: from the
            launcher's environment; a plain run is rank 0 of 1).

    Returns:
        An ``EvalResult`` with the aggregate metrics over every finished instance.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: Bad scenario, data or output directory,
            raised before any generation.

    Example:
        >>> result = evaluate(model, tok, "synthetic_reasoning:induction", output_dir="runs")
        >>> result.metrics["exact_match"]
    """
    start = time.perf_counter()
    spec = scenario if isinstance(scenario, ScenarioSpec) else builtin_scenario(scenario)
    ranks = ranks or Ranks.from_env()
    skipped: list[int] = []
    instances = build_instances(spec, skipped=skipped)
    if skipped:
        logger.warning("%s: skipped %d row(s) with missing data: %s", spec.name, len(skipped),
                       skipped[:20])  # fmt: skip
    block = block_size or _policy_block_size(model) or DEFAULT_BLOCK_SIZE
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}.")
    if output_dir is None and ranks.world_size > 1:
        raise ValueError("Data-parallel evaluation needs output_dir: the ranks merge through it.")
    path = getattr(model.config, "name_or_path", "")
    run_spec = make_run_spec(
        spec, model_name or path, instances=instances, config=model.config, model_path=path,
        tokenizer=tokenizer, model=model,
    )  # fmt: skip
    if output_dir is None:
        return _evaluate(model, tokenizer, spec, instances, skipped, None, block, resume,
                         progress, ranks, start, run_spec)  # fmt: skip
    run = run_directory(output_dir, spec)
    if ranks.is_main:
        run.lock()  # a second run into the directory is refused while this one runs
    try:
        return _evaluate(model, tokenizer, spec, instances, skipped, run, block, resume,
                         progress, ranks, start, run_spec)  # fmt: skip
    finally:
        if ranks.is_main:
            run.unlock()


def _evaluate(
    model, tokenizer, spec: ScenarioSpec, instances: list[Instance], skipped: list[int],
    run: RunDirectory | None, block: int, resume: bool, progress: bool, ranks: Ranks,
    start: float, run_spec: dict[str, Any],
) -> EvalResult:  # fmt: skip
    done: set[str] = set()
    if run is not None:
        if ranks.is_main:
            run.prepare(run_spec, resume)
        ranks.barrier()  # the spec is checked before any rank starts
        done = {r["id"] for r in run.records()}
    todo = ranks.shard([inst for inst in instances if inst.id not in done])
    logger.info(
        "%s: %d instances, %d finished, %d for rank %d, blocks of %d",
        spec.name, len(instances), len(done), len(todo), ranks.rank, block,
    )  # fmt: skip

    fresh = _run_blocks(model, tokenizer, spec, todo, block, run, ranks, progress, len(done))
    order = [inst.id for inst in instances]
    ranks.barrier()  # every shard is finished
    if run is not None and ranks.is_main:
        run.merge(order)  # every rank's records, in scenario order
    ranks.barrier()  # the merge is done before any rank reads
    records = _in_order(fresh if run is None else run.records(), order)
    stats = _stats(spec, records, model, time.perf_counter() - start, ranks)
    stats["skipped_invalid_rows"] = len(skipped)
    if run is not None and ranks.is_main:
        run.write_stats(stats)
    return EvalResult(
        scenario=spec,
        metrics=stats["metrics"],
        records=records,
        stats=stats,
        run_dir=run.path if run else None,
    )


def run_directory(output_dir: str | os.PathLike, spec: ScenarioSpec) -> RunDirectory:
    return RunDirectory(os.path.join(os.fspath(output_dir), spec.name))


def _policy_block_size(model) -> int | None:
    policy = getattr(model, "offload_policy", None)
    return policy.block_size if policy is not None else None


def _run_blocks(
    model,
    tokenizer,
    spec: ScenarioSpec,
    todo: list[Instance],
    block: int,
    run: RunDirectory | None,
    ranks: Ranks,
    progress: bool,
    finished: int,
) -> list[dict]:
    if spec.temperature > 0:
        torch.manual_seed(spec.seed + ranks.rank)
    lengths = {inst.id: len(tokenizer(inst.prompt)["input_ids"]) for inst in todo}
    todo = sorted(todo, key=lambda inst: -lengths[inst.id])  # stable: ties keep scenario order
    writer = RecordWriter(run.shard_path(ranks.rank, ranks.world_size)) if run else None
    bar = tqdm(
        total=finished + len(todo) * ranks.world_size,
        initial=finished,
        unit="inst",
        desc=spec.name,
        disable=not progress or not ranks.is_main,
        dynamic_ncols=True,
    )
    out: list[dict] = []
    tokens, seconds = 0, 0.0
    try:
        for i in range(0, len(todo), block):
            chunk = todo[i : i + block]
            began = time.perf_counter()
            records = _score_block(model, tokenizer, spec, chunk)
            elapsed = time.perf_counter() - began
            for r in records:
                r["seconds"] = elapsed / len(records)
            if writer is not None:
                writer.append(records)
            out.extend(records)
            tokens += sum(r["generated_tokens"] for r in records)
            seconds += elapsed
            bar.update(len(chunk) * ranks.world_size)  # rank 0 speaks for all ranks
            if spec.multiple_choice:
                bar.set_postfix(inst_s=f"{len(out) / seconds:.2f}")
            else:
                bar.set_postfix(tok_s=f"{tokens / seconds:.1f}")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return out


def _score_block(model, tokenizer, spec: ScenarioSpec, chunk: list[Instance]) -> list[dict]:
    prompts = [inst.prompt for inst in chunk]
    if spec.multiple_choice:
        logprobs = choice_logprobs(model, tokenizer, prompts, [inst.choices for inst in chunk])
        records = []
        for inst, lp in zip(chunk, logprobs, strict=True):
            predicted = max(range(len(lp)), key=lambda j: lp[j])
            records.append(
                {
                    "id": inst.id,
                    "prompt": inst.prompt,
                    "choices": list(inst.choices),
                    "answer": inst.answer,
                    "logprobs": lp,
                    "predicted": predicted,
                    "scores": {"accuracy": accuracy(lp, inst.answer)},
                    "prompt_tokens": len(tokenizer(inst.prompt)["input_ids"]),
                    "generated_tokens": 0,
                }
            )
        return records
    completions, prompt_tokens, generated = generate_block(model, tokenizer, prompts, spec)
    return [
        {
            "id": inst.id,
            "prompt": inst.prompt,
            "completion": completion,
            "references": list(inst.references),
            "scores": score_completion(spec.metrics, completion, inst.references),
            "prompt_tokens": n_prompt,
            "generated_tokens": n_generated,
        }
        for inst, completion, n_prompt, n_generated in zip(
            chunk, completions, prompt_tokens, generated, strict=True
        )
    ]


def _in_order(records: list[dict], order: list[str]) -> list[dict]:
    rank = {ident: i for i, ident in enumerate(order)}
    return sorted(records, key=lambda r: rank.get(r["id"], len(rank)))


def _stats(
    spec: ScenarioSpec, records: list[dict], model, wall: float, ranks: Ranks
) -> dict[str, Any]:
    metrics = {m: statistics.fmean(r["scores"][m] for r in records) for m in spec.metrics}
    generated = sum(r["generated_tokens"] for r in records)
    prompt = sum(r["prompt_tokens"] for r in records)
    # Summed over blocks of every session and rank: the model's time, not waiting or loading.
    seconds = sum(r["seconds"] for r in records)
    policy = getattr(model, "offload_policy", None)
    return {
        "scenario": spec.name,
        "num_instances": len(records),
        "metrics": metrics,
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "model_seconds": seconds,
        "generated_tokens_per_second": generated / seconds if seconds else 0.0,
        "instances_per_second": len(records) / seconds if seconds else 0.0,
        "wall_seconds_this_session": wall,
        "processes": ranks.world_size,
        "policy": policy.to_dict() if policy is not None else None,
        "hardware": _hardware(model),
    }


def _hardware(model) -> dict[str, Any]:
    """The measured profile of an offloaded model's machine; the basics for a stock model."""
    engine = getattr(model, "engine", None)
    if engine is not None:
        return engine.profile().to_dict()
    return {
        "device": str(model.device),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
