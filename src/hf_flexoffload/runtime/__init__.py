"""Running a block: the zig-zag schedule and the engine that drives it.

``schedule`` (the loop over (stage, micro-batch) pairs, with prefetch and write-back), ``engine``
(placed weights and the forward passes), ``loading`` (a checkpoint into an engine, everything
checked before a byte is written), ``run_planning`` (what a ``generate`` call may use and the
policy it runs under) and ``stats`` (what a call did).
"""
