#!/usr/bin/env bash
# The compatibility check (`make test-compat`): the golden and contract tests (marker `compat`)
# against the lowest and the newest transformers and accelerate that pyproject.toml allows, each
# in a throwaway environment under .cache/compat/, with deprecation warnings as errors.
#
# lowest: transformers, accelerate and huggingface-hub at their lower bounds in pyproject.toml;
#         everything else resolved to what those releases accept (older tokenizers, ...).
# newest: everything resolved afresh to the newest releases pyproject.toml allows, as a user's
#         `pip install hf_flexoffload` would get today: this is where the next break shows.
# device: the GPU machine's image (docs/gpu.md): transformers 5.17, accelerate 1.15,
#         huggingface-hub 1.33, so the golden tests run on them before the device does. Its
#         torch (2.11, CUDA 13) and Python (3.12) are not installable here: the lock's CPU torch
#         and PYTHON stand in for them (DEVICE_PYTHON=python3.12 where that exists).
#
# Environment: UV (the uv binary), PYTHON (the interpreter), FIND_LINKS (where the CPU torch
# wheel lies, as uv options), COMPAT_ENVS (default "lowest newest device"; a pin such as
# transformers==5.23.0 checks that release too), DEVICE_PYTHON (default PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-uv}
PYTHON=${PYTHON:-python3.11}
FIND_LINKS=${FIND_LINKS:-}
ROOT=.cache/compat
# The device image's releases (docs/gpu.md).
DEVICE_PINS=(transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0)
read -r -a find_links <<<"$FIND_LINKS"

# The lower bound of a dependency in pyproject.toml, e.g. "transformers>=5.0,<5.25" -> 5.0.
lower_bound() {
    grep -oE "\"$1>=[0-9.]+" pyproject.toml | head -n1 | sed -E 's/.*>=//'
}

build_env() {  # name, then pins (e.g. transformers==5.0) that constrain the resolution
    local name=$1 dir=$ROOT/$1 python=${ENV_PYTHON:-$PYTHON}
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    # torch stays the one CPU build the lock pins: a range would pull a CUDA build.
    grep -E '^torch==' requirements.lock >"$dir/constraints.txt"
    for pin in "$@"; do echo "$pin" >>"$dir/constraints.txt"; done
    "$UV" pip compile --quiet pyproject.toml --extra dev "${find_links[@]}" --no-emit-find-links \
        --python-version "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
        --constraint "$dir/constraints.txt" -o "$dir/requirements.txt"
    "$UV" venv --quiet --python "$python" "$dir/venv"
    "$UV" pip install --quiet --python "$dir/venv/bin/python" "${find_links[@]}" \
        -r "$dir/requirements.txt"
    "$UV" pip install --quiet --python "$dir/venv/bin/python" --no-deps --no-build-isolation -e .
}

run_env() {
    local name=$1 dir=$ROOT/$1
    echo "== $name environment:"
    "$UV" pip list --python "$dir/venv/bin/python" 2>/dev/null |
        grep -E '^(transformers|accelerate|huggingface-hub|tokenizers|torch) '
    # -p no:cacheprovider: the throwaway runs leave no .pytest_cache behind.
    "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider -m compat \
        -W error::FutureWarning -W error::DeprecationWarning
}

for env in ${COMPAT_ENVS:-lowest newest device}; do
    case $env in
    lowest)
        build_env lowest "transformers==$(lower_bound transformers)" \
            "accelerate==$(lower_bound accelerate)" \
            "huggingface-hub==$(lower_bound huggingface-hub)"
        ;;
    newest) build_env newest ;;
    device) ENV_PYTHON=${DEVICE_PYTHON:-$PYTHON} build_env device "${DEVICE_PINS[@]}" ;;
    # Any other release, e.g. COMPAT_ENVS="transformers==5.23.0".
    *==*) build_env "${env//[^A-Za-z0-9.]/-}" "$env" ;;
    *) echo "unknown environment $env (lowest, newest, device, or a pin such as transformers==5.23.0)" >&2 && exit 2 ;;
    esac
    run_env "${env//[^A-Za-z0-9.]/-}"
done
