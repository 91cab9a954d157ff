"""The transformers face of an offloaded model: ``FlexOffloadOPTForCausalLM`` and
``FlexOffloadLlamaForCausalLM``, which behave like transformers' own classes.

transformers' ``generate`` drives the token loop; every ``forward`` is one FlexGen column: the
whole batch (the block) for one token step, run layer by layer and micro-batch by micro-batch by
the engine. So sampling, logits processors, stopping criteria, streamers and pipelines work as
they do for ``OPTForCausalLM`` and ``LlamaForCausalLM``. Everything is in
``FlexOffloadCausalLMMixin``; a model class only names its base class and ``model_type``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.opt.modeling_opt import OPTPreTrainedModel

from ..architectures.layers import positions_from_mask
from ..checkpoints.hub import resolve_pretrained
from ..config.expert_usage import ExpertUsage, resolve_usage
from ..config.policy import Policy, resolve_policy
from ..config.workload import Workload
from ..planning.cost_model import Estimate
from ..runtime.engine import OffloadEngine
from ..runtime.loading import load_engine
from ..runtime.stats import GenerationStats
from ..storage.offload_cache import FlexOffloadCache
from ..storage.placement import PlacementReport
from ..storage.transfer import resolve_device
from .cache_keyword import CACHE_KEYWORD, cache_argument, output_with_cache
from .generation_options import check_generate_options
from .prompt_inputs import check_token_ids, prompt_ids

logger = logging.getLogger(__name__)

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
_FROM_PRETRAINED_KWARGS = ("config", "trust_remote_code", "use_safetensors", *HUB_KWARGS)


class FlexOffloadCausalLMMixin:
    """Everything an offloaded causal LM class does; put it first among the bases, before the
    architecture's transformers ``PreTrainedModel`` and ``GenerationMixin``.

    Attributes:
        supported_model_type: The ``config.model_type`` the class loads.
    """

    supported_model_type: str

    def __init__(self, config, engine: OffloadEngine | None = None) -> None:
        super().__init__(config)
        self._engine = engine
        self.generation_stats: GenerationStats | None = None

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        offload_policy: Policy | dict | str | os.PathLike = "auto",
        offload_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_memory: dict[str, int | str] | None = None,
        workload: Workload | None = None,
        expert_usage: ExpertUsage | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> FlexOffloadCausalLMMixin:
        """Load a checkpoint and place its weights by ``offload_policy``.

        Args:
            pretrained_model_name_or_path: A Hugging Face Hub repo id (``"facebook/opt-1.3b"``,
                resolved through the local hub cache and downloaded if missing: only the
                config, generation config and weights) or a local directory, holding
                ``config.json`` and safetensors or PyTorch ``.bin`` weights, single or sharded.
            offload_policy: A ``Policy``, its dict, a path to its JSON, or ``"auto"``.
            offload_dir: Directory for the disk tier, shareable by models and processes (each
                model's files go to a directory of their own). Files there are reused by a
                later load of the same checkpoint and policy. Default: a temporary directory
                removed on ``close()`` or exit.
            device: Compute device; default ``cuda:0`` when available, else CPU.
            dtype: Compute dtype, a ``torch.dtype`` or its name. ``None`` (default): the
                checkpoint's (fp16 becomes bf16 on CPU). ``"auto"`` *measures* this machine:
                fp32 and bf16 on CPU (fp32, fp16 and, where native, bf16 on CUDA), each priced
                by the cost model on its own profile; the fastest predicted wins. transformers'
                ``torch_dtype="auto"`` means the checkpoint's dtype instead: ``None`` here.
                Weights stay stored in the checkpoint's dtype when it is the narrower.
            max_memory: Caps per tier, e.g. ``{"device": "12GiB", "host": "48GiB"}``. On a
                CPU-only machine device and host are the same RAM: either key caps it.
            workload: What ``offload_policy="auto"`` optimizes for (prompt and generation
                lengths, block size, whether compression is allowed); default
                ``Workload()``: prompts of 512 tokens, 32 new tokens, no compression.
            expert_usage: Mixture of experts: a calibration's ``model.expert_usage()`` (or the
                path of its saved JSON); each layer's experts are then placed most used first.
            kwargs: transformers' ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
                ``force_download`` (hub ids; ``HF_HUB_OFFLINE=1`` too), ``use_safetensors``
                (None prefers safetensors), ``config``, ``torch_dtype`` (alias of ``dtype``).

        Returns:
            The model, ready for ``generate``.

        Example:
            >>> model = FlexOffloadOPTForCausalLM.from_pretrained(
            ...     "path/to/opt", offload_policy="auto", max_memory={"host": "8GiB"},
            ...     workload=Workload(prompt_len=128, gen_len=32))
            >>> model.offload_policy, model.policy_estimate.tokens_per_second
        """
        if workload is not None and not isinstance(workload, Workload):
            raise TypeError(
                f"workload must be a Workload (e.g. Workload(prompt_len=512, gen_len=32)), not "
                f"{type(workload).__name__}."
            )
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
        if "device_map" in kwargs:
            raise ValueError(
                "device_map is not supported: placement is decided by offload_policy (pass a "
                "Policy with weights=Split(device=..., host=..., disk=...)), and device= picks "
                "the compute device."
            )
        unknown = set(kwargs) - set(_FROM_PRETRAINED_KWARGS)
        if unknown:
            raise TypeError(
                f"from_pretrained got unsupported arguments {sorted(unknown)}; supported: "
                "offload_policy, offload_dir, device, dtype, max_memory, workload, expert_usage, "
                + ", ".join(_FROM_PRETRAINED_KWARGS)
            )
        path = resolve_pretrained(
            pretrained_model_name_or_path,
            use_safetensors=kwargs.get("use_safetensors"),
            **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs},
        )
        config = kwargs.get("config") or AutoConfig.from_pretrained(path)
        if config.model_type != cls.supported_model_type:
            raise ValueError(
                f"{path!r} holds a {config.model_type!r} model; {cls.__name__} supports "
                f"model_type {cls.supported_model_type!r}. AutoFlexOffloadModelForCausalLM picks "
                "the class from the checkpoint's config."
            )
        engine = load_engine(
            path,
            config=config,
            policy=resolve_policy(offload_policy),
            device=resolve_device(device),
            dtype=dtype,
            offload_dir=os.fspath(offload_dir) if offload_dir is not None else None,
            max_memory=max_memory,
            workload=workload,
            use_safetensors=kwargs.get("use_safetensors"),
            expert_usage=resolve_usage(expert_usage),
        )
        config.dtype = engine.dtype
        model = cls(config, engine)
        if os.path.exists(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        else:
            model.generation_config = GenerationConfig.from_model_config(config)
        model.eval()
        return model

    # -- what transformers and users look at ---------------------------------------------------

    @property
    def engine(self) -> OffloadEngine:
        if self._engine is None:
            raise RuntimeError("This model is closed (or was not built with from_pretrained).")
        return self._engine

    @property
    def device(self) -> torch.device:
        """The compute device (weights may live elsewhere)."""
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def offload_policy(self) -> Policy:
        """The policy in use (the chosen one when loaded with ``"auto"``)."""
        return self.engine.policy

    @property
    def policy_estimate(self) -> Estimate:
        """What the cost model predicts for ``offload_policy`` on the load-time workload:
        throughput, prefill and decode time, peak bytes per tier (measures this machine's
        profile on first use unless it is cached)."""
        return self.engine.estimate

    @property
    def placement_report(self) -> PlacementReport:
        """Weight bytes per tier, requested vs realized."""
        return self.engine.report

    def to(self, *args: Any, **kwargs: Any) -> FlexOffloadCausalLMMixin:
        """A no-op for the compute device and dtype; anything else says how to do it."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and resolve_device(device) != self.device:
            raise ValueError(
                f"Cannot move an offloaded model to {device}: its storage is placed for "
                f"{self.device}. Load it again with from_pretrained(..., device={str(device)!r})."
            )
        if dtype is not None and dtype != self.dtype:
            raise ValueError(
                f"Cannot convert an offloaded model to {dtype}; load it again with "
                f"from_pretrained(..., dtype={dtype})."
            )
        return self

    def save_compressed(self, save_directory: str | os.PathLike) -> None:
        """Save the compressed weights, config and generation config as a checkpoint that loads
        without quantizing again (with the same ``compress_weights``, or ``"auto"``).

        The directory must not already hold a checkpoint. The file is hf_flexoffload's own
        format (quantized bytes in safetensors); stock transformers cannot load it.

        Args:
            save_directory: Where to write ``config.json``, ``generation_config.json`` and
                ``model.safetensors``.

        Example:
            >>> policy = Policy(compress_weights=QuantConfig())  # 4 bits, groups of 32
            >>> model = FlexOffloadOPTForCausalLM.from_pretrained("opt", offload_policy=policy)
            >>> model.save_compressed("opt-4bit")
            >>> FlexOffloadOPTForCausalLM.from_pretrained("opt-4bit", offload_policy=policy)
        """
        directory = os.fspath(save_directory)
        self.engine.save_compressed(directory)
        self.config.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)

    def get_input_embeddings(self):
        return None

    def close(self) -> None:
        """Release memory, background threads and temporary offload files."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> FlexOffloadCausalLMMixin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: FlexOffloadCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache: FlexOffloadCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """One forward pass of the whole batch (the block), as transformers' ``forward``.

        The KV cache comes as ``cache`` (transformers 5.24 on) or ``past_key_values`` (before;
        kept as an alias) and goes back under this release's name (``cache_from_output`` reads
        it). Without one, a new cache is started.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("Pass input_ids: inputs_embeds is not supported by offloaded models.")
        for flag in ("output_attentions", "output_hidden_states", "output_router_logits"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported by offloaded models.")
        if not isinstance(logits_to_keep, int):
            raise ValueError("logits_to_keep must be an int for offloaded models.")
        use_cache = True if use_cache is None else use_cache
        cache = cache_argument(cache, past_key_values)
        if cache is None:
            cache = self.engine.new_cache()
        elif not isinstance(cache, FlexOffloadCache):
            raise TypeError(
                f"The KV cache must be the FlexOffloadCache this model returned, not "
                f"{type(cache).__name__}."
            )
        check_token_ids(input_ids, self.config.vocab_size)
        batch, new = input_ids.shape
        past = cache.get_seq_length()
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                f"{(batch, past + new)} (batch, cached + new tokens)."
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, new, batch)
        try:
            logits = self.engine.forward(
                input_ids, position_ids, attention_mask, cache, logits_to_keep
            )
        finally:
            if not use_cache:
                cache.close()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return output_with_cache(loss=loss, logits=logits, cache=cache if use_cache else None)

    # -- generate ------------------------------------------------------------------------------

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ):
        """transformers' ``generate``, with the offloaded KV cache and ``generation_stats``.

        Greedy and sampling decoding with everything around them (logits processors, stopping
        criteria, streamers, ``num_return_sequences``, ``return_dict_in_generate``) work as in
        transformers. Options that need a different loop or cache, an empty batch and token
        ids outside the vocabulary raise ``ValueError``; no prompt starts from bos."""
        effective = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = effective.update(**kwargs)
        check_generate_options(effective, model_kwargs, kwargs)
        given = inputs if inputs is not None else model_kwargs.get("input_ids")
        input_ids = prompt_ids(given, effective.bos_token_id, self.config.vocab_size)
        if input_ids is not given:  # no prompt: bos, as stock generate starts without one
            inputs = input_ids
            kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        batch = input_ids.shape[0] * (effective.num_return_sequences or 1)
        prompt = input_ids.shape[1]
        if effective.max_new_tokens is not None:
            length = prompt + effective.max_new_tokens
        else:
            length = max(effective.max_length or 0, prompt + 1)
        policy = self.engine.plan_run(batch, prompt, length - prompt)
        memory = self.engine.check_fits(batch, prompt, length - prompt, policy)
        cache = self.engine.new_cache(capacity=length, policy=policy)
        self.engine.begin_run(policy, memory)
        try:
            # Under this transformers' keyword (the other warns, or never reaches forward).
            return super().generate(
                inputs, generation_config=generation_config, **{CACHE_KEYWORD: cache}, **kwargs
            )
        finally:
            cache.close()
            self.generation_stats = self.engine.end_run(batch)


class FlexOffloadOPTForCausalLM(FlexOffloadCausalLMMixin, OPTPreTrainedModel, GenerationMixin):
    """OPT for causal LM with weights, KV cache and activations spread over device, host and disk.

    Build it with ``from_pretrained``; then use it as ``OPTForCausalLM``: ``generate``,
    ``forward``, ``transformers.pipeline``. After each ``generate``, ``generation_stats`` tells
    what it did.

    Example:
        >>> from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, Split
        >>> policy = Policy(micro_batch_size=8, num_micro_batches=4,
        ...                 weights=Split(device=0.2, host=0.5, disk=0.3), cache=Split(host=1.0))
        >>> model = FlexOffloadOPTForCausalLM.from_pretrained("path/to/opt", offload_policy=policy)
        >>> out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    """

    supported_model_type = "opt"


class FlexOffloadLlamaForCausalLM(FlexOffloadCausalLMMixin, LlamaPreTrainedModel, GenerationMixin):
    """Llama for causal LM (RMS norm, rotary embeddings, grouped-query attention, SwiGLU, tied or
    untied embeddings) with weights, KV cache and activations spread over device, host and disk.

    The KV cache holds ``num_key_value_heads`` heads per token, so grouped-query models store
    (and move) only their own, smaller cache. Use it as ``LlamaForCausalLM``: ``generate``,
    ``forward``, ``transformers.pipeline``.

    Example:
        >>> from hf_flexoffload import FlexOffloadLlamaForCausalLM, Policy, Split
        >>> policy = Policy(micro_batch_size=16, weights=Split(host=0.5, disk=0.5))
        >>> model = FlexOffloadLlamaForCausalLM.from_pretrained("path/to/llama",
        ...                                                     offload_policy=policy)
        >>> out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    """

    supported_model_type = "llama"
