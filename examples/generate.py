"""Offloaded generation with a hand-written policy, next to stock transformers.

    python examples/generate.py [CHECKPOINT_DIR]

Without an argument it builds a small random OPT checkpoint in a temporary directory.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import OPTConfig, OPTForCausalLM

from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split


def main(path: str | None = None) -> None:
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        config = OPTConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=1024,
            vocab_size=1000,
            word_embed_proj_dim=256,
        )
        OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp.name)
        path = tmp.name

    policy = Policy(
        micro_batch_size=4,
        num_micro_batches=2,
        weights=Split(device=0.2, host=0.5, disk=0.3),  # 30% of every layer read from disk
        cache=Split(host=1.0),
        activations=Split(device=1.0),
        overlap=True,
        host_attention=True,
    )
    input_ids = torch.randint(3, 1000, (8, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, :4] = 0  # left padding, as a tokenizer with padding_side="left" makes

    with FlexOffloadOPTForCausalLM.from_pretrained(path, offload_policy=policy) as model:
        print(model.placement_report)
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16)
        print(model.generation_stats)

    stock = OPTForCausalLM.from_pretrained(path)
    expected = stock.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16)
    print("same tokens as transformers:", torch.equal(out, expected))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
