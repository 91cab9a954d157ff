"""Running a block: the zig-zag schedule and the engine that drives it.

``schedule`` (the loop over (stage, micro-batch) pairs, with prefetch and write-back), ``engine``
(placed weights and the forward passes) and ``stats`` (what a ``generate`` call did).
"""
