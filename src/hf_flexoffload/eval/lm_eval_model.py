"""``flexoffload``: an offloaded model as an lm-evaluation-harness model type.

``lm_eval --model flexoffload --model_args pretrained=PATH,offload_policy=auto,...`` loads the
checkpoint with ``AutoFlexOffloadModelForCausalLM`` and evaluates it through lm-eval's own
``HFLM`` (its batching, tokenization, log-likelihood and generation code), so every request goes
through our offloaded forward and the results are ``--model hf``'s on the same checkpoint.

lm-eval finds the type by the ``lm_eval.models`` entry point (releases with plugin loading) or
by importing this module (``register_model``); ``hf-flexoffload lm-eval ...`` does the latter for
releases without plugins (0.4.13). Needs ``pip install hf_flexoffload[lm-eval]``.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..checkpoints.hub import resolve_pretrained
from ..modeling.auto import AutoFlexOffloadModelForCausalLM

logger = logging.getLogger(__name__)

MODEL_TYPE = "flexoffload"


def parse_max_memory(text: str | dict | None) -> dict[str, str] | None:
    """``host=8GiB;disk=1TB`` (lm-eval's ``model_args`` split on commas) as a dict.

    Raises:
        ValueError: An item that is not ``TIER=SIZE``.
    """
    if text is None or isinstance(text, dict):
        return text
    out = {}
    for item in str(text).split(";"):
        tier, sep, size = item.partition("=")
        if not sep or not tier.strip() or not size.strip():
            raise ValueError(
                f"max_memory item {item!r}: use TIER=SIZE, several joined by ';' "
                "(max_memory=host=8GiB;disk=1TB)."
            )
        out[tier.strip()] = size.strip()
    return out


@register_model(MODEL_TYPE)
class FlexOffloadLM(HFLM):
    """lm-eval's ``HFLM`` over an offloaded model.

    Args:
        pretrained: A hub repo id or a checkpoint directory.
        offload_policy: ``auto`` (planned for this machine) or a policy JSON file.
        max_memory: Caps per tier, ``host=8GiB;disk=1TB``.
        offload_dir: Where the disk tier goes.
        dtype: The compute dtype (``float32``, ``bfloat16``, ``float16``, or ``auto``: measured);
            default: the checkpoint's, as ``--model hf``'s ``dtype=auto``.
        revision: The hub revision.
        tokenizer: A tokenizer directory or id (default: the checkpoint's).
        batch_size: Requests per forward pass; default: the policy's block size (also when
            lm-eval's CLI passes its default ``--batch_size 1``; ``batch_size=1`` in
            ``model_args`` for one at a time).
        device: The compute device (default: cuda:0 where there is one, else the CPU).
        **kwargs: Passed to ``HFLM`` (``max_length``, ``add_bos_token``, ...).
    """

    def __init__(
        self,
        pretrained: str,
        offload_policy: str = "auto",
        max_memory: str | dict | None = None,
        offload_dir: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        path = resolve_pretrained(pretrained, revision=revision, tokenizer=tokenizer is None)
        model = AutoFlexOffloadModelForCausalLM.from_pretrained(
            path,
            offload_policy=offload_policy,
            max_memory=parse_max_memory(max_memory),
            offload_dir=offload_dir,
            dtype=dtype,
            device=device,
        )
        if batch_size is None:
            batch_size = model.offload_policy.block_size
        logger.info("flexoffload: %s, batches of %s, policy %s", pretrained, batch_size,
                    model.offload_policy.to_json(indent=None))  # fmt: skip
        super().__init__(
            pretrained=model, tokenizer=tokenizer or path, batch_size=batch_size, **kwargs
        )
        self.pretrained_name = pretrained

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """From ``--model_args`` and the CLI's options (see ``create_from_arg_obj``)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's CLI always passes ``batch_size`` (1 unless ``--batch_size`` is given):
        here its 1 means the policy's block; ``batch_size=`` in ``model_args`` wins over
        ``--batch_size``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in arg_dict or str(extra.get("batch_size")) == "1":
            extra.pop("batch_size", None)
        return cls(**arg_dict, **extra)
