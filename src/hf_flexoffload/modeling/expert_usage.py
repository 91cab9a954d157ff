"""What a mixture-of-experts model class adds: the routing it counted, for a calibration.

Example:
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1")
    >>> model.generate(**calibration_batch, max_new_tokens=32)
    >>> model.expert_usage().save("mixtral-usage.json")
    >>> model = AutoFlexOffloadModelForCausalLM.from_pretrained(
    ...     "mistralai/Mixtral-8x7B-v0.1", offload_policy="auto", expert_usage="mixtral-usage.json")
"""

from __future__ import annotations

from ..config.expert_usage import ExpertUsage


class ExpertUsageMixin:
    """Counts of routed tokens per expert, kept since load; put it before
    ``FlexOffloadCausalLMMixin`` among a mixture-of-experts class's bases."""

    def expert_usage(self) -> ExpertUsage:
        """Per sparse layer, the (token, slot) pairs routed to each expert by every forward
        since load (or ``reset_expert_usage``), prompts and generated tokens alike.

        Raises:
            ValueError: Nothing was routed yet.
        """
        arch, counted = self.engine.arch, self.engine.counters.expert_tokens
        counts = tuple(
            tuple(counted.get(layer, {}).get(e, 0) for e in range(arch.num_experts))
            if arch.is_sparse(layer)
            else ()
            for layer in range(arch.layers)
        )
        return ExpertUsage(counts=counts)

    def reset_expert_usage(self) -> None:
        """Start counting afresh (e.g. after a warm-up that is not representative)."""
        self.engine.counters.reset_expert_tokens()
