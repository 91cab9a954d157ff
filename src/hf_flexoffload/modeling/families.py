"""The offloaded model classes of the rotary decoder families beyond Llama.

Each behaves like transformers' own ``<Family>ForCausalLM`` (``generate``, ``forward``,
``transformers.pipeline``); everything is in ``FlexOffloadCausalLMMixin``, so a class only names
its transformers base class and ``model_type``. ``AutoFlexOffloadModelForCausalLM`` picks the
class from the checkpoint's ``config.model_type``.

Example:
    >>> from hf_flexoffload import AutoFlexOffloadModelForCausalLM
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
    >>> type(model).__name__
    'FlexOffloadQwen2ForCausalLM'
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3PreTrainedModel
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel
from transformers.models.mixtral.modeling_mixtral import MixtralPreTrainedModel
from transformers.models.olmo2.modeling_olmo2 import Olmo2PreTrainedModel
from transformers.models.olmoe.modeling_olmoe import OlmoePreTrainedModel
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoePreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3PreTrainedModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoePreTrainedModel

from ..storage.offload_cache import FlexOffloadCache
from .cache_keyword import CACHE_KEYWORD
from .causal_lm import FlexOffloadCausalLMMixin
from .expert_usage import ExpertUsageMixin


class FlexOffloadQwen2ForCausalLM(FlexOffloadCausalLMMixin, Qwen2PreTrainedModel, GenerationMixin):
    """Qwen2 / Qwen2.5 (q/k/v biases, optional sliding windows), offloaded."""

    supported_model_type = "qwen2"


class FlexOffloadQwen3ForCausalLM(FlexOffloadCausalLMMixin, Qwen3PreTrainedModel, GenerationMixin):
    """Qwen3 (per-head q/k norms), offloaded."""

    supported_model_type = "qwen3"


class FlexOffloadMistralForCausalLM(
    FlexOffloadCausalLMMixin, MistralPreTrainedModel, GenerationMixin
):
    """Mistral (sliding-window attention; its KV cache keeps only the window), offloaded."""

    supported_model_type = "mistral"


class FlexOffloadGemma2ForCausalLM(
    FlexOffloadCausalLMMixin, Gemma2PreTrainedModel, GenerationMixin
):
    """Gemma 2 (four norms per layer, soft-capping, alternating local/global layers),
    offloaded."""

    supported_model_type = "gemma2"


class FlexOffloadGemma3ForCausalLM(
    FlexOffloadCausalLMMixin, Gemma3PreTrainedModel, GenerationMixin
):
    """Gemma 3's text model (``gemma3_text``: q/k norms, five local layers to one global),
    offloaded."""

    supported_model_type = "gemma3_text"
    config_class = Gemma3TextConfig


class FlexOffloadPhi3ForCausalLM(FlexOffloadCausalLMMixin, Phi3PreTrainedModel, GenerationMixin):
    """Phi-3 / Phi-3.5 / Phi-4-mini (fused projections, LongRoPE), offloaded."""

    supported_model_type = "phi3"

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args, **kwargs):
        """As transformers' Phi-3: the first time the sequence grows past
        ``original_max_position_embeddings`` (where LongRoPE switches to its long factors), the
        KV cache is dropped and the whole sequence recomputed, so every key is rotated alike."""
        limit = getattr(self.config, "original_max_position_embeddings", None)
        cache = kwargs.get(CACHE_KEYWORD)
        length = input_ids.shape[1]
        if (
            limit
            and isinstance(cache, FlexOffloadCache)
            and length >= limit + 1
            and 0 < cache.get_seq_length() <= limit
        ):
            cache.reset()
            # Feed the whole sequence: transformers slices the inputs by one of these.
            if "next_sequence_length" in kwargs:
                kwargs["next_sequence_length"] = None
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = torch.arange(length, device=input_ids.device)
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)


class FlexOffloadOlmo2ForCausalLM(FlexOffloadCausalLMMixin, Olmo2PreTrainedModel, GenerationMixin):
    """OLMo 2 (post-norm, q/k norms over the projection), offloaded."""

    supported_model_type = "olmo2"


class FlexOffloadGPTNeoXForCausalLM(
    FlexOffloadCausalLMMixin, GPTNeoXPreTrainedModel, GenerationMixin
):
    """GPT-NeoX / Pythia (LayerNorm, parallel residual, partial rotary), offloaded."""

    supported_model_type = "gpt_neox"


class FlexOffloadMixtralForCausalLM(
    ExpertUsageMixin, FlexOffloadCausalLMMixin, MixtralPreTrainedModel, GenerationMixin
):
    """Mixtral (8 experts, top-2), offloaded and fetched by the expert."""

    supported_model_type = "mixtral"


class FlexOffloadQwen2MoeForCausalLM(
    ExpertUsageMixin, FlexOffloadCausalLMMixin, Qwen2MoePreTrainedModel, GenerationMixin
):
    """Qwen2-MoE / Qwen1.5-MoE (routed experts plus a gated shared expert), offloaded."""

    supported_model_type = "qwen2_moe"


class FlexOffloadQwen3MoeForCausalLM(
    ExpertUsageMixin, FlexOffloadCausalLMMixin, Qwen3MoePreTrainedModel, GenerationMixin
):
    """Qwen3-MoE (per-head q/k norms, 128 experts, top-8), offloaded."""

    supported_model_type = "qwen3_moe"


class FlexOffloadOlmoeForCausalLM(
    ExpertUsageMixin, FlexOffloadCausalLMMixin, OlmoePreTrainedModel, GenerationMixin
):
    """OLMoE (64 experts, top-8, q/k norms over the projection), offloaded."""

    supported_model_type = "olmoe"


FAMILY_CLASSES: tuple[type[FlexOffloadCausalLMMixin], ...] = (
    FlexOffloadQwen2ForCausalLM,
    FlexOffloadQwen3ForCausalLM,
    FlexOffloadMistralForCausalLM,
    FlexOffloadGemma2ForCausalLM,
    FlexOffloadGemma3ForCausalLM,
    FlexOffloadPhi3ForCausalLM,
    FlexOffloadOlmo2ForCausalLM,
    FlexOffloadGPTNeoXForCausalLM,
    FlexOffloadMixtralForCausalLM,
    FlexOffloadQwen2MoeForCausalLM,
    FlexOffloadQwen3MoeForCausalLM,
    FlexOffloadOlmoeForCausalLM,
)
