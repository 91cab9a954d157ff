"""Checkpoints as users have them, and into the tiers.

``hub`` (a repo id or a directory to local files), ``safetensors_format`` (the header),
``checkpoint`` (safetensors and ``.bin`` checkpoints read a row range at a time),
``compressed_checkpoint`` (saving and recognizing compressed weights), ``checkpoint_store`` (a
checkpoint into the tiers, disk rows read in place where they can be).
"""
