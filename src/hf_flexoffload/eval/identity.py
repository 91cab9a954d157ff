"""What a run ran: the identity ``run_spec.json`` records and ``--resume`` compares.

A run's records are only worth merging with the same model, tokenizer, data and options. The
identity holds, each as a section compared on resume:

* ``scenario``: the ``ScenarioSpec`` (template, stop, lengths, metrics, seed, ...), without a
  local dataset's path (its content is ``dataset``);
* ``dataset``: a digest of every instance as built (id, prompt with shots and instructions,
  references, choices, answer), so an edited answer or row is noticed wherever the file is;
* ``model``: the config (without where it was read from) and each weight file's name, size and
  sampled content digest (``storage.file_identity``), plus the hub revision for a hub id, so
  the same model by another path (relative, absolute, a copy) is the same model and new
  weights at the same path are not;
* ``tokenizer``: a digest of its class, vocabulary and special tokens;
* ``options``: what else changes a record: the compute dtype and the weight and cache
  compression of an offloaded model.

``model_name`` is recorded for people and not compared. A batch job (``batch_job``) has a
``job`` section (its command and seed) where an evaluation has ``scenario``, and its requests as
read (token ids and resolved options) as ``dataset``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

from ..storage.file_identity import content_identity
from .scenario import BUILTIN_PREFIX, Instance, ScenarioSpec

COMPARED = ("scenario", "job", "dataset", "model", "tokenizer", "options")
_CONFIG_SKIP = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")
_WEIGHT_FILES = ("*.safetensors", "*.bin")


def _digest(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def scenario_identity(spec: ScenarioSpec) -> dict[str, Any]:
    out = spec.to_dict()
    if not spec.source.startswith(BUILTIN_PREFIX):
        out.pop("source")  # the dataset's content is compared instead
    return out


def dataset_identity(instances: list[Instance]) -> str:
    return _digest([[i.id, i.prompt, i.references, i.choices, i.answer] for i in instances])


def model_identity(config, path: str | None) -> dict[str, Any]:
    """The config and, when ``path`` is a local checkpoint directory, its weight files."""
    kept = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_SKIP}
    out: dict[str, Any] = {"config": _digest(kept)}
    if path and os.path.isdir(path):
        files = sorted(
            {f for pattern in _WEIGHT_FILES for f in glob.glob(os.path.join(path, pattern))}
        )
        out["weights"] = {os.path.basename(f): content_identity(f) for f in files}
        parts = os.path.normpath(os.path.realpath(path)).split(os.sep)
        if len(parts) > 2 and parts[-2] == "snapshots":  # a hub cache snapshot: its commit
            out["revision"] = parts[-1]
    return out


def tokenizer_identity(tokenizer) -> str:
    return _digest(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": getattr(tokenizer, "special_tokens_map", {}),
        }
    )


def options_identity(model) -> dict[str, Any]:
    policy = getattr(model, "offload_policy", None)
    out: dict[str, Any] = {"dtype": str(getattr(model, "dtype", ""))}
    if policy is not None:
        data = policy.to_dict()
        out["compress_weights"] = data.get("compress_weights")
        out["compress_cache"] = data.get("compress_cache")
        out["compress_embeddings"] = data.get("compress_embeddings")
    return out


def make_run_spec(
    spec: ScenarioSpec,
    model_name: str,
    *,
    instances: list[Instance] | None = None,
    config=None,
    model_path: str | None = None,
    tokenizer=None,
    model=None,
) -> dict[str, Any]:
    """The run's identity; sections whose inputs are not given are left out (and not
    compared: the command line checks what it knows before loading the model)."""
    out: dict[str, Any] = {"model_name": model_name, "scenario": scenario_identity(spec)}
    if instances is not None:
        out["dataset"] = dataset_identity(instances)
    return {**out, **model_sections(config, model_path, tokenizer, model)}


def model_sections(config, model_path, tokenizer, model) -> dict[str, Any]:
    """The identity sections of what runs the requests (model, tokenizer, options that change
    a record), each where its input is given; shared by ``eval`` and ``generate``."""
    out: dict[str, Any] = {}
    if config is not None:
        out["model"] = model_identity(config, model_path)
    if tokenizer is not None:
        out["tokenizer"] = tokenizer_identity(tokenizer)
    if model is not None:
        out["options"] = options_identity(model)
    return out


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two identities, as readable names (``model.weights``), comparing
    only the sections ``current`` has."""
    changed = []
    for section in COMPARED:
        if section not in current:
            continue
        old, new = recorded.get(section), current[section]
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changed += [f"{section}.{k}" for k in keys]
        else:
            changed.append(section)
    return changed
