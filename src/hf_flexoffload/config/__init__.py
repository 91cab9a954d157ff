"""What the user asks for and how bytes are counted: the leaves every other layer builds on.

``policy``: the policy (block shape, splits over the tiers, overlap, compression) and the tiers;
``workload``: what ``"auto"`` optimizes for; ``validation``: the field checks both share;
``counters``: bytes moved per link and held per tier, and byte counts for people.
"""
