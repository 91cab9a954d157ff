"""Min-max vs searched rounding: what the search costs at load time and what it saves in error.

* **Seconds** to quantize one 2048 x 8192 fp32 matrix (random normal) to 4 bits in groups of 32
  along its rows (``QuantConfig()``'s format), with each rounding: medians of ``--repeats``
  alternating runs, in this process, on the CPU.
* **Relative RMS error**, ``||dequantize(quantize(W)) - W|| / ||W||``, over all of SmolLM2-135M's
  decoder matrices together and over its token embeddings (also its LM head), for groups of 32,
  64 and 128 input channels with each rounding, and FlexGen's groups of 64 output channels.

Results are written between markers in ``docs/compression.md``.

Usage::

    python benchmarks/rounding.py              # a few minutes on 2 cores
    python benchmarks/rounding.py --no-write   # print only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import write_between_markers
from safetensors import safe_open

from hf_flexoffload import QuantConfig
from hf_flexoffload.assets.smollm2 import PACKAGE, PACKAGE_VERSION, smollm2_checkpoint
from hf_flexoffload.formats.compression import dequantize, quantize
from hf_flexoffload.planning.probes import device_name

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "compression.md")
START, END = "<!-- benchmark:rounding:start -->", "<!-- benchmark:rounding:end -->"
ROUNDINGS = ("minmax", "search")


def quantize_seconds(repeats: int) -> dict[str, float]:
    """Median seconds to quantize one 2048 x 8192 fp32 matrix, per rounding, alternating."""
    matrix = torch.randn(2048, 8192, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {r: [] for r in ROUNDINGS}
    for r in ROUNDINGS:  # a warm-up each: first calls allocate
        quantize(matrix, QuantConfig(rounding=r))
    for _ in range(repeats):
        for r in ROUNDINGS:
            start = time.perf_counter()
            quantize(matrix, QuantConfig(rounding=r))
            times[r].append(time.perf_counter() - start)
    return {r: statistics.median(t) for r, t in times.items()}


def relative_error(matrices: list[torch.Tensor], config: QuantConfig) -> float:
    """``||Q(W) - W|| / ||W||`` over all ``matrices`` together."""
    error = norm = 0.0
    for w in matrices:
        error += float((dequantize(quantize(w, config)) - w).double().square().sum())
        norm += float(w.double().square().sum())
    return (error / norm) ** 0.5


def smollm2_matrices() -> dict[str, list[torch.Tensor]]:
    path = os.path.join(smollm2_checkpoint(), "model.safetensors")
    out: dict[str, list[torch.Tensor]] = {"decoder matrices": [], "token embeddings": []}
    with safe_open(path, "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if name == "model.embed_tokens.weight":
                out["token embeddings"].append(f.get_tensor(name))
            elif ".layers." in name and len(f.get_slice(name).get_shape()) == 2:
                out["decoder matrices"].append(f.get_tensor(name))
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--doc", default=DOC, help="where to write the tables")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    seconds = quantize_seconds(args.repeats)
    groupings = [(f"g{g} inputs", dict(group_size=g)) for g in (32, 64, 128)]
    groupings.append(("g64 outputs (FlexGen's)", dict(group_size=64, dim=0)))
    rows = []
    for what, matrices in smollm2_matrices().items():
        for label, kw in groupings:
            errors = {r: relative_error(matrices, QuantConfig(**kw, rounding=r)) for r in ROUNDINGS}
            rows.append((f"{what} ({len(matrices)})", label, errors))
            print(what, label, errors, flush=True)

    minmax, search = seconds["minmax"], seconds["search"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {device_name(torch.device('cpu'))}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
        f"{args.repeats} alternating runs. Errors: SmolLM2-135M-Instruct from "
        f"{PACKAGE}=={PACKAGE_VERSION} (fp32; its decoder matrices were Q4_1 in blocks of 32 "
        "input channels, its embeddings Q8_0), 4 bits.",
        "",
        "| rounding | seconds to quantize 2048 x 8192 fp32, 4-bit g32 | ns per element | "
        "vs min-max |",
        "|---|---|---|---|",
        f"| min-max | {minmax:.2f} | {1e9 * minmax / 2048 / 8192:.1f} | 1.0x |",
        f"| search | {search:.2f} | {1e9 * search / 2048 / 8192:.1f} | {search / minmax:.1f}x |",
        "",
        "| SmolLM2-135M | groups | relative RMS error, min-max | search | search vs min-max |",
        "|---|---|---|---|---|",
    ]
    for what, label, e in rows:
        change = f"{100 * (e['search'] / e['minmax'] - 1):+.1f}%" if e["minmax"] > 1e-6 else "="
        lines.append(
            f"| {what} | {label} | {100 * e['minmax']:.2f}% | {100 * e['search']:.2f}% | {change} |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_between_markers(args.doc, START, END, text)
        print(f"wrote {os.path.normpath(args.doc)}")
    return text


if __name__ == "__main__":
    main()
