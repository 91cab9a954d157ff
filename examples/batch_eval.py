"""HELM-style batch evaluation through an offloaded model, resumable.

    python examples/batch_eval.py [CHECKPOINT_DIR [OUTPUT_DIR]]

Without a checkpoint it builds a small random OPT with a character tokenizer (so its answers
are noise; point it at a real checkpoint with a tokenizer for real scores). Runs go to
OUTPUT_DIR/runs (a temporary directory by default). Run it twice with the same OUTPUT_DIR: the
second run resumes and finds nothing left to do.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoTokenizer, OPTConfig

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
from hf_flexoffload.assets.toy import build_random_checkpoint, char_tokenizer
from hf_flexoffload.eval import builtin_scenario, evaluate


def main(path: str | None = None, output: str | None = None) -> dict:
    tmp = tempfile.TemporaryDirectory()
    output = output or tmp.name
    if path is None:
        path = f"{output}/random-opt"  # built once, so a second run can resume
        tokenizer = char_tokenizer()
        config = OPTConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=512,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            word_embed_proj_dim=128,
        )
        build_random_checkpoint(path, config, torch.bfloat16, tokenizer=tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(path)

    # HELM's adaptation (instructions, 5 shots, stop at a newline), on 16 test instances.
    scenario = builtin_scenario("synthetic_reasoning:pattern_match", max_instances=16)
    policy = Policy(micro_batch_size=4, num_micro_batches=2, weights=Split(device=0.5, disk=0.5))
    with FlexOffloadOPTForCausalLM.from_pretrained(
        path, offload_policy=policy, dtype=torch.float32
    ) as model:
        result = evaluate(model, tokenizer, scenario, output_dir=f"{output}/runs", resume=True)
    print(f"{scenario.name}: {result.stats['num_instances']} instances")
    for name, value in result.metrics.items():
        print(f"  {name:<20} {value:.3f}")
    first = result.records[0]
    print(f"first completion: {first['completion']!r} (reference {first['references'][0]!r})")
    print(f"files: {result.run_dir}/{{run_spec.json,instances.jsonl,stats.json}}")
    tmp.cleanup()
    return result.metrics


if __name__ == "__main__":
    main(*sys.argv[1:3])
