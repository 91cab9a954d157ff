"""The transformers face: model classes that behave like transformers' own.

``cache_keyword`` (the name this transformers release gives the KV cache), ``generation_options``
(what ``generate`` accepts), ``causal_lm`` (``FlexOffloadOPTForCausalLM``,
``FlexOffloadLlamaForCausalLM`` and the mixin), ``families`` (the other rotary decoder families'
classes) and ``auto`` (the class by ``config.model_type``).
"""
