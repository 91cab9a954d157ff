"""What this machine can do, what a policy costs there, and the best policy for it.

The machine: ``budget`` (the memory each tier has: RAM, cgroup limits, disk, ``max_memory``),
``probe_timing``, ``overlap_probe``, ``int4_kernel_choice`` and ``probes`` (measurements),
``hardware`` (the measured profile, cached). The model of a policy: ``model_sizes`` (byte and
FLOP counts, affine in the placement), ``memory_model`` (where the memory goes, by item),
``cost_model`` (time estimates). The choice: ``optimizer`` (the LP over placements),
``dtype_choice`` (which compute dtypes compete, which wins) and ``load_plan`` (dtype, workload and
policy before anything is loaded).
"""
