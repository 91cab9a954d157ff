"""When a step fetches only the experts its tokens route to.

Fetching only routed experts saves the bytes of the experts no token uses, but those reads can
start only once the router has run, so they no longer overlap the previous layer's compute (the
rest of the layer is still prefetched). Under uniform routing a step over ``T`` tokens hits
``E (1 - (1 - k/E)^T)`` of a layer's ``E`` experts: a decode step of a small block hits few of
them, a prefill or a large block nearly all. ``expert_fetch="auto"`` fetches only routed experts
where the expected hit fraction is below ``ROUTED_BELOW`` (the saving outweighs the lost
overlap), else prefetches every expert with its layer; ``"routed"`` and ``"all"`` force one.
Where a calibration measured how often each expert is routed to (``ExpertUsage``), the expected
hits come from those shares instead.
"""

from __future__ import annotations

# Expected share of a layer's experts hit below which "auto" fetches only routed experts.
ROUTED_BELOW = 0.75


def experts_hit(
    experts: int, top_k: int, tokens: float, probs: tuple[tuple[float, ...], ...] = ()
) -> float:
    """Expected experts of a layer that at least one of ``tokens`` routes to: uniform routing,
    or the mean over layers of ``sum_e 1 - (1 - p_e)^T`` where a calibration measured each
    expert's probability ``p_e`` (``probs``, per sparse layer)."""
    if not experts:
        return 0.0
    if probs:
        return sum(sum(1 - (1 - p) ** tokens for p in layer) for layer in probs) / len(probs)
    return experts * (1 - (1 - top_k / experts) ** tokens)


def fetches_routed(
    mode: str,
    experts: int,
    top_k: int,
    tokens: float,
    probs: tuple[tuple[float, ...], ...] = (),
) -> bool:
    """Whether a step over ``tokens`` tokens fetches a sparse layer's experts only once routed.

    Example:
        >>> fetches_routed("auto", 8, 2, 1), fetches_routed("auto", 8, 2, 64)
        (True, False)
    """
    if not experts or mode == "all":
        return False
    if mode == "routed":
        return True
    return experts_hit(experts, top_k, tokens, probs) < ROUTED_BELOW * experts
