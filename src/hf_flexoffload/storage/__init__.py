"""Where the bytes live and how they move.

Deciding, pure: ``placement`` (which bytes of a layer go to which tier, the split realized) and
``weight_layout`` (a model's weights as segments on the tiers, in which dtype). Moving:
``transfer`` (threads, CUDA streams, pinned and page-aligned memory), ``disk_file`` (one raw
file: positional and O_DIRECT reads) and ``tier_store`` (the tiers as places for named tensors,
checkpoint files borrowed in place). A model's bytes on them: ``streamed`` (embedding and LM-head
matrices used where they are stored), ``weights`` (fetching a stage), ``kv_cache`` (the tiered
(layer, micro-batch) units), ``offload_cache`` (their ``transformers.Cache``) and
``activations`` (hidden states between stages).
"""
