"""Random-weight checkpoints of public OPT shapes and a character tokenizer.

No model hub is reachable from where this project is built and tested, so the demo, the
benchmarks and the tests make their own models: the shapes (and so the speed and memory) of
real OPT checkpoints, with random weights (so the text they write is noise).
"""

from __future__ import annotations

import os
import string

import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

# The public facebook/opt-125m shape.
OPT_125M = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    ffn_dim=3072,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=768,
    do_layer_norm_before=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
# The public facebook/opt-1.3b shape (benchmarks).
OPT_1_3B = {**OPT_125M, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32}
OPT_1_3B.update(ffn_dim=8192, word_embed_proj_dim=2048)

# Ids 0-2 are OPT's conventional specials (pad is 1, bos = eos is 2).
CHAR_SPECIALS = ("<unk>", "<pad>", "</s>")
CHARS = " \n" + string.ascii_letters + string.digits + string.punctuation


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``chars`` (default: printable ASCII and
    newline), 3 specials first: ``len(char_tokenizer())`` is 99, and a model with that
    ``vocab_size`` can read and write any ASCII text."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate((*CHAR_SPECIALS, *chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="</s>",
    )
    out.padding_side = "left"
    return out


def build_random_checkpoint(
    path: str,
    config: OPTConfig,
    dtype: torch.dtype,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> str:
    """Save a random-weight OPT checkpoint (and ``tokenizer``, if given) at ``path`` once;
    later calls reuse it.

    Written to a temporary directory first and renamed, so an interrupted build is never reused.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).to(dtype).eval()
    tmp = f"{path}.partial-{os.getpid()}"
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.replace(tmp, path)
    return path
