"""How weights and KV cache are encoded, knowing no tier: pure functions of tensors.

``compression`` (group-wise quantization to 4 or 8 bits, its byte form), ``rounding`` (the
error-minimizing rounding search), ``int4_tiled`` (4-bit weights in the operand layout of
PyTorch's int4 matmul kernel), ``quantized_matrix`` (quantized matrices used as they are stored:
row lookups, chunked matmuls, quantizing a block of rows at a time).
"""
