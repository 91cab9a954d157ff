"""Where a pretrained checkpoint's files come from: a local directory or the Hugging Face Hub.

[`resolve_pretrained`] turns a ``name_or_path`` into a local directory holding ``config.json``,
the weights and (optionally) the tokenizer files. A local directory is used as is; anything
else is a Hub model repo id, fetched file by file through ``huggingface_hub.hf_hub_download``
into the Hub cache, so only the files a model needs are downloaded and everything already cached
is reused offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).

Example:
    >>> from hf_flexoffload.checkpoints.hub import resolve_pretrained
    >>> path = resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer=True)
    >>> sorted(os.listdir(path))  # doctest: +SKIP
    ['config.json', 'generation_config.json', 'merges.txt', 'model.safetensors', ...]
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")
PYTORCH_WEIGHTS = ("pytorch_model.bin.index.json", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_COMMIT = re.compile(r"[0-9a-f]{40}")


@functools.cache
def _errors() -> Any:
    """The huggingface_hub error classes this module tells apart, across hub 1.x and 2.x."""
    from huggingface_hub import errors

    class Errors:
        validation = errors.HFValidationError
        local_entry = errors.LocalEntryNotFoundError
        # Hub >=1.0 splits "file absent on the Hub" from the base class that LocalEntryNotFoundError
        # also derives from; older hubs raise the base class itself for a remote 404.
        remote_entry = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
        repository = errors.RepositoryNotFoundError
        gated = getattr(errors, "GatedRepoError", errors.RepositoryNotFoundError)
        revision = errors.RevisionNotFoundError

    return Errors


def _fetch(
    repo_id: str, filename: str, revision: str | None, options: dict[str, Any]
) -> str | None:
    """Path of ``filename`` in the local cache (downloading it if needed), or None when the repo is
    known not to have it. Raises ``LocalEntryNotFoundError`` when that cannot be known offline."""
    import huggingface_hub

    err = _errors()
    no_exist = getattr(huggingface_hub, "_CACHED_NO_EXIST", None)

    def known_absent() -> bool:
        # The `.no_exist/<commit>/<file>` markers the hub writes after a 404. hf_hub_download does
        # not read them itself: offline, a recorded absence raises LocalEntryNotFoundError exactly
        # like a file that simply was not downloaded yet.
        if no_exist is None:
            return False
        cached = huggingface_hub.try_to_load_from_cache(
            repo_id, filename, cache_dir=options["cache_dir"], revision=revision
        )
        return cached is no_exist

    # A commit is immutable, so its marker is final and saves one request to the Hub per absent
    # file; a branch may have gained the file since, so its marker only counts when offline.
    if (
        revision
        and _COMMIT.fullmatch(revision)
        and not options["force_download"]
        and known_absent()
    ):
        return None
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, **options)
    except err.local_entry:  # first: a subclass of the base EntryNotFoundError as well
        if known_absent():
            return None
        raise
    except err.remote_entry:
        return None


def _weights(
    repo_id: str, revision: str | None, options: dict[str, Any], use_safetensors: bool | None
) -> str:
    """Fetch the first weights form the repo has (and an index's shards); returns its file name."""
    err = _errors()
    if use_safetensors is None:
        candidates = SAFETENSORS_WEIGHTS + PYTORCH_WEIGHTS
    else:
        candidates = SAFETENSORS_WEIGHTS if use_safetensors else PYTORCH_WEIGHTS
    not_cached: list[str] = []
    for name in candidates:
        try:
            path = _fetch(repo_id, name, revision, options)
        except err.local_entry:
            # Offline and not cached: the repo may have it, but a later form that is cached still
            # gives a usable checkpoint, so keep looking and only report it if nothing is found.
            not_cached.append(name)
            continue
        if path is None:
            continue
        if name.endswith(".index.json"):
            _shards(repo_id, revision, options, path)
        logger.info("%s: using weights %s", repo_id, name)
        return name

    restricted = ""
    if use_safetensors is not None:
        restricted = (
            f" (use_safetensors={use_safetensors} restricted the search; pass "
            "use_safetensors=None to accept both safetensors and pytorch .bin weights)"
        )
    if not_cached:
        absent = [name for name in candidates if name not in not_cached]
        raise FileNotFoundError(
            f"No weights of {repo_id!r} (revision {revision}) are in the local cache "
            f"{_cache_dir(options)} and {_offline_reason(options)}: not cached "
            f"{', '.join(not_cached)}{'; known absent ' + ', '.join(absent) if absent else ''}"
            f"{restricted}. {_fix(repo_id, revision, options)}"
        )
    raise FileNotFoundError(
        f"{repo_id!r} (revision {revision}) has a config.json but no weights file: looked for "
        f"{', '.join(candidates)}{restricted}."
    )


def _shards(repo_id: str, revision: str | None, options: dict[str, Any], index_path: str) -> None:
    """Fetch every shard named in the ``weight_map`` of the index file at ``index_path``."""
    err = _errors()
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map': the checkpoint index is corrupt.")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        try:
            found = _fetch(repo_id, shard, revision, options)
        except err.local_entry as e:
            raise FileNotFoundError(
                f"Shard {shard!r} of {repo_id!r} (revision {revision}), named by "
                f"{os.path.basename(index_path)}, is not in the local cache {_cache_dir(options)} "
                f"and {_offline_reason(options)}. {_fix(repo_id, revision, options)}"
            ) from e
        if found is None:
            raise FileNotFoundError(
                f"{os.path.basename(index_path)} of {repo_id!r} (revision {revision}) names shard "
                f"{shard!r}, which the repo does not have: the checkpoint is incomplete."
            )
    logger.info("%s: %d weight shards ready", repo_id, len(shards))


def _cache_dir(options: dict[str, Any]) -> str:
    from huggingface_hub import constants

    # Read at call time: tests and callers may point the hub at another cache after import.
    return os.fspath(options["cache_dir"] or constants.HF_HUB_CACHE)


def _offline_reason(options: dict[str, Any]) -> str:
    from huggingface_hub import constants

    if options["local_files_only"]:
        return "local_files_only=True forbids downloads"
    if constants.HF_HUB_OFFLINE:
        return "offline mode (HF_HUB_OFFLINE=1) forbids downloads"
    return "the Hub could not be reached"


def _fix(repo_id: str, revision: str | None, options: dict[str, Any]) -> str:
    command = f"hf download {repo_id}"
    if revision:
        command += f" --revision {revision}"
    command += f" --cache-dir {_cache_dir(options)}"
    return (
        f"To fix: on a machine with network access run `{command}` (then copy that cache here if "
        "it is another machine), or pass the path of a local checkpoint directory instead."
    )


def _looks_like_a_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a local path: it starts like one (``/``, ``.``,
    ``~``), has more parts than a repo id's ``org/name``, or starts with a directory that
    exists here."""
    if name.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    use_safetensors: bool | None = None,
    tokenizer: bool = False,
) -> str:
    """Local directory holding the checkpoint ``name_or_path``.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A local checkpoint directory (returned as is, the other arguments are ignored) or a
            Hugging Face Hub model repo id such as ``"org/name"``.
        revision (`str`, *optional*):
            Branch, tag or commit hash of the repo; the Hub's default branch when None.
        token (`str` or `bool`, *optional*):
            Hub token for gated or private repos (True: the one saved by ``hf auth login``).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Hub cache directory; ``HF_HUB_CACHE`` when None.
        local_files_only (`bool`, *optional*, defaults to `False`):
            Use only the local cache, as ``HF_HUB_OFFLINE=1`` does.
        force_download (`bool`, *optional*, defaults to `False`):
            Download the files again even if cached.
        use_safetensors (`bool`, *optional*):
            None: prefer safetensors, else accept pytorch ``.bin``; True/False: only that form.
        tokenizer (`bool`, *optional*, defaults to `False`):
            Also fetch the tokenizer files the repo has (`TOKENIZER_FILES`).

    Returns:
        `str`: a directory with ``config.json``, ``generation_config.json`` if the repo has one,
        the weights (a single file, or an index and all its shards) and the tokenizer files.

    Raises:
        `FileNotFoundError`: not a directory nor a valid repo id; unknown repo or revision; the
            files are not cached while offline; no weights; a shard missing.
        `PermissionError`: a gated repo without a token that has access.
        `ValueError`: force_download=True while offline (raised by huggingface_hub).
    """
    if os.path.isdir(name_or_path):
        return os.fspath(name_or_path)
    repo_id = os.fspath(name_or_path)
    if os.path.isfile(repo_id):
        raise NotADirectoryError(
            f"{repo_id!r} is a file: pass the checkpoint directory that holds it."
        )
    if _looks_like_a_path(repo_id):
        # A mistyped local path: say so now, rather than after the hub's retries (~30 s
        # without a network) end in "not a repo".
        raise FileNotFoundError(
            f"{repo_id!r} is not a directory: no checkpoint there. Check the path (a Hugging "
            "Face Hub repo id is 'org/name')."
        )
    err = _errors()
    options: dict[str, Any] = dict(
        token=token,
        cache_dir=os.path.expanduser(os.fspath(cache_dir)) if cache_dir is not None else None,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    label = f"{repo_id!r} (revision {revision or 'main'})"
    try:
        try:
            config = _fetch(repo_id, "config.json", revision, options)
        except err.local_entry as e:
            raise FileNotFoundError(
                f"{label} is not a local directory and is not in the local Hub cache "
                f"{_cache_dir(options)}, and {_offline_reason(options)}. "
                f"{_fix(repo_id, revision, options)}"
            ) from e
        if config is None:
            raise FileNotFoundError(f"{label} has no config.json: it is not a transformers model.")
        snapshot = os.path.dirname(config)
        # Pin the other files to the commit config.json came from: a branch moving between two
        # requests cannot mix revisions, and cached files are then found without a request.
        commit = os.path.basename(snapshot)
        pinned = commit if _COMMIT.fullmatch(commit) else revision
        optional = ["generation_config.json", *(TOKENIZER_FILES if tokenizer else ())]
        for name in optional:
            try:
                if _fetch(repo_id, name, pinned, options) is None:
                    logger.debug("%s: no %s in the repo", repo_id, name)
            except err.local_entry:
                logger.info("%s: %s not in the cache (offline); skipped", repo_id, name)
        _weights(repo_id, pinned, options, use_safetensors)
    except err.validation as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local checkpoint directory nor a Hugging Face Hub repo id "
            f"('org/name'): {str(e).rstrip('.')}. Check the path, or the spelling of the repo id."
        ) from e
    except err.gated as e:
        raise PermissionError(
            f"{label} is gated: request access on its Hub page, then pass token= (or run "
            f"`hf auth login`) with an account that has been granted access."
        ) from e
    except err.repository as e:
        raise FileNotFoundError(
            f"{label} is neither a local directory nor a repo found on the Hub. Check the repo "
            "id; for a private repo pass token= (or run `hf auth login`)."
        ) from e
    except err.revision as e:
        raise FileNotFoundError(
            f"Revision {revision!r} of {repo_id!r} was not found: check the branch, tag or commit."
        ) from e
    return snapshot
