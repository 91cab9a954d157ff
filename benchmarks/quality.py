"""Quality under compression on real weights: perplexity and a HELM-style score per configuration.

For each configuration (stock transformers as the reference; the offloaded model uncompressed;
4-bit weights in groups of 32, 64 and 128 input channels, min-max and searched rounding; FlexGen's
groups of 64 output channels; the default weights with the embeddings kept; 4-bit weights +
4-bit KV cache), on the same model:

* **perplexity** on a held-out English text (``data/devils_dictionary_a-e.txt``), with sliding
  windows of ``--window`` tokens moved by ``--stride``: each window scores only its last
  ``--stride`` tokens, the rest is context. The context goes in first and is kept in the KV
  cache; the scored tokens follow in chunks of ``--chunk``, so they attend to a *stored* (with
  ``compress_cache``, quantized) history as generated tokens do. A single forward would hide
  KV-cache compression: the tokens of one forward attend to each other at full precision.
  The negative log-likelihood is computed from the logits in fp32.
* **a HELM-style scenario score** through ``hf_flexoffload.eval.evaluate``: HELM's adaptation
  of a synthetic reasoning task (5 shots, greedy, stop at a newline), exact match, quasi-exact
  match and F1 over ``--instances`` test instances.

Results are written between markers in ``docs/quality.md``.

Usage::

    python benchmarks/quality.py          # SmolLM2-135M-Instruct, all configurations
    python benchmarks/quality.py --max-tokens 2048 --instances 16 --no-write   # a quick look
    python benchmarks/quality.py --toy --no-write   # tiny random OPT: checks the script runs
    python benchmarks/quality.py --device cuda      # every configuration's model on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import _device
import torch
from _common import write_between_markers
from _perplexity import perplexity, windows  # noqa: F401 (windows: used by the tests)
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

import hf_flexoffload
from hf_flexoffload import FlexOffloadOPTForCausalLM, Policy, QuantConfig
from hf_flexoffload.assets.smollm2 import PACKAGE, PACKAGE_VERSION, smollm2_checkpoint
from hf_flexoffload.assets.toy import build_random_checkpoint, char_tokenizer
from hf_flexoffload.eval import builtin_scenario, evaluate
from hf_flexoffload.formats.compression import dequantize, quantize
from hf_flexoffload.planning.hardware import default_cache_dir
from hf_flexoffload.planning.probes import device_name

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "devils_dictionary_a-e.txt")
DOC = os.path.join(HERE, "..", "docs", "quality.md")
START, END = "<!-- benchmark:quality:start -->", "<!-- benchmark:quality:end -->"
METRICS = {"exact_match": "exact match", "quasi_exact_match": "quasi-exact", "f1": "F1"}

# The offloaded model class: the architecture-dispatching Auto class where this version of
# hf_flexoffload has one (a Llama checkpoint such as SmolLM2 needs it), else the OPT class.
OFFLOADED = getattr(hf_flexoffload, "AutoFlexOffloadModelForCausalLM", FlexOffloadOPTForCausalLM)


@dataclass(frozen=True, kw_only=True)
class Config:
    """One compared configuration.

    Args:
        key: Short name for ``--only``.
        name: What the table calls it.
        weights: ``Policy.compress_weights``.
        cache: ``Policy.compress_cache``.
        embeddings: ``Policy.compress_embeddings`` (with ``weights``; False is the default).
        stock: Stock transformers instead of the offloaded model. With ``weights``, every 2-D
            parameter (the embeddings and LM head only with ``embeddings``) is quantized and
            dequantized in place by ``hf_flexoffload.formats.compression``, as the offloaded model
            does: a cross-check of the offloaded numbers that needs no offloaded model.
            ``cache`` must be None.
        extra: Run only when named in ``--only``.
    """

    key: str
    name: str
    weights: QuantConfig | None = None
    cache: QuantConfig | None = None
    embeddings: bool = Policy().compress_embeddings
    stock: bool = False
    extra: bool = False


def configurations(group_sizes: list[int]) -> list[Config]:
    default, cache = QuantConfig(), QuantConfig(bits=4, group_size=64, rounding="minmax")
    out = [
        Config(key="stock", name="stock transformers (reference)", stock=True),
        Config(key="plain", name="uncompressed"),
    ]
    for g in group_sizes:
        q = QuantConfig(bits=4, group_size=g, rounding="minmax")
        out.append(Config(key=f"w4g{g}-minmax", name=f"4-bit weights, g{g}, min-max", weights=q))
    for g in group_sizes:
        q = QuantConfig(bits=4, group_size=g)
        out.append(Config(key=f"w4g{g}", name=f"4-bit weights, g{g}, search", weights=q))
    # FlexGen's setting: output-channel groups of 64, min-max, embeddings and LM head too.
    q = QuantConfig(bits=4, group_size=64, dim=0, rounding="minmax")
    name = "4-bit weights and embeddings, FlexGen's g64"
    out.append(Config(key="w4g64-out", name=name, weights=q, embeddings=True))
    # What quantizing the embeddings (and the tied LM head) adds to the default.
    name = "4-bit weights and embeddings, g32, search"
    out.append(Config(key="w4g32-embeddings", name=name, weights=default, embeddings=True))
    out += [
        Config(key="w4kv4", name="4-bit weights + KV (defaults)", weights=default, cache=default),
        Config(key="w4kv4g64", name="4-bit weights + KV g64", weights=default, cache=cache),
    ]
    for g in group_sizes:
        name = f"stock, 4-bit weights in place, g{g}"
        q = QuantConfig(bits=4, group_size=g)
        out.append(Config(key=f"stock-w4g{g}", name=name, weights=q, stock=True, extra=True))
    return out


def load_model(path: str, config: Config, batch: int, device: torch.device):
    """The model of one configuration on ``device``, in fp32 (CPUs without AVX-512 BF16 are far
    slower in bf16). The offloaded model keeps everything on the device: this measures quality,
    not offloading."""
    if config.stock:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = model.to(device).eval()
        if config.weights is not None:
            with torch.no_grad():
                for name, weight in model.named_parameters():  # tied weights listed once
                    embedding = "embed" in name or name.startswith("lm_head.")
                    if weight.dim() == 2 and (config.embeddings or not embedding):
                        packed = quantize(weight, config.weights)
                        weight.copy_(dequantize(packed))
        return model
    policy = Policy(
        micro_batch_size=batch,
        compress_weights=config.weights,
        compress_cache=config.cache,
        compress_embeddings=config.embeddings,
    )
    return OFFLOADED.from_pretrained(
        path, offload_policy=policy, device=device, dtype=torch.float32
    )


# -- one configuration -------------------------------------------------------------------------


def measure(path: str, tokenizer, ids: torch.Tensor, config: Config, args) -> dict:
    model = load_model(path, config, args.batch, _device.resolve(args.device))
    try:
        began = time.perf_counter()
        ppl, scored = perplexity(
            model, ids, args.window, args.stride, args.chunk, args.batch, progress=True
        )
        ppl_seconds = time.perf_counter() - began
        spec = builtin_scenario(
            f"synthetic_reasoning:{args.scenario}",
            max_instances=args.instances,
            **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}),
        )
        began = time.perf_counter()
        result = evaluate(model, tokenizer, spec, block_size=args.batch)
        eval_seconds = time.perf_counter() - began
    finally:
        if hasattr(model, "close"):
            model.close()
    return {
        "perplexity": ppl,
        "scored_tokens": scored,
        "metrics": {m: result.metrics[m] for m in METRICS},
        "instances": result.stats["num_instances"],
        "perplexity_seconds": ppl_seconds,
        "scenario_seconds": eval_seconds,
        "seconds": ppl_seconds + eval_seconds,
    }


def table(configs: list[Config], results: dict[str, dict]) -> list[str]:
    def quant(q: QuantConfig | None, rounding: str, along: str) -> str:
        if q is None:
            return "fp32"
        along = {0: "outputs", -2: "outputs"}.get(q.dim, along)
        return f"{q.bits}-bit g{q.group_size} {along}, {q.rounding or rounding}"

    base = results.get("plain") or results.get("stock") or next(iter(results.values()))
    lines = [
        "| configuration | weights | KV cache | perplexity | vs uncompressed | "
        + " | ".join(METRICS.values())
        + " | seconds |",
        "|---|---|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for c in configs:
        r = results.get(c.key)
        if r is None:
            continue
        change = 100 * (r["perplexity"] / base["perplexity"] - 1)
        scores = " | ".join(f"{r['metrics'][m]:.3f}" for m in METRICS)
        lines.append(
            f"| {c.name} | {quant(c.weights, 'search', 'inputs')}"
            f"{' (embeddings too)' if c.embeddings and c.weights is not None else ''} | "
            f"{quant(c.cache, 'minmax', 'head dim')} | "
            f"{r['perplexity']:.3f} | {change:+.2f}% | {scores} | {r['seconds']:.0f} |"
        )
    return lines


def _settings(args, path: str) -> dict:
    """What a saved result depends on, besides its configuration."""
    keys = ("max_tokens", "window", "stride", "chunk", "batch", "scenario", "instances", "text")
    return {"model": path, **{k: getattr(args, k) for k in (*keys, "max_new_tokens", "device")}}


def _load_results(file: str | None, settings: dict) -> dict[str, dict]:
    """The results saved in ``file`` under the same settings, by configuration key."""
    if not file or not os.path.exists(file):
        return {}
    with open(file) as f:
        data = json.load(f)
    return data["results"] if data["settings"] == settings else {}


def _save_results(file: str | None, settings: dict, key: str, result: dict) -> None:
    if file:
        results = {**_load_results(file, settings), key: result}
        with open(f"{file}.tmp", "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=1)
        os.replace(f"{file}.tmp", file)


# -- the model and the text --------------------------------------------------------------------


def toy_checkpoint() -> str:
    """A tiny random OPT with the character tokenizer: noise, but it exercises every step."""
    tokenizer = char_tokenizer()
    config = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,  # head dim 32, so KV groups of 32 are not all padding
        ffn_dim=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        word_embed_proj_dim=64,
    )
    path = os.path.join(default_cache_dir(), "quality-toy-opt")
    return build_random_checkpoint(path, config, torch.float32, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: SmolLM2-135M, converted once)")
    parser.add_argument("--toy", action="store_true", help="a tiny random OPT instead")
    parser.add_argument("--text", default=TEXT, help="held-out text for perplexity")
    parser.add_argument("--max-tokens", type=int, help="use only the text's first N tokens")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32, help="scored tokens per forward")
    parser.add_argument("--batch", type=int, default=8, help="windows / prompts per forward")
    parser.add_argument(
        "--scenario",
        default="variable_substitution",
        choices=["pattern_match", "variable_substitution", "induction"],
    )
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, help="default: the scenario's (50)")
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument(
        "--only",
        help="comma-separated keys, e.g. stock,plain,w4g64,w4kv4g64; stock-w4g64 (not run by "
        "default) quantizes stock transformers' weights in place: a cross-check of w4g64",
    )
    parser.add_argument("--doc", default=DOC, help="where to write the table")
    parser.add_argument(
        "--results",
        help="JSON file that keeps each configuration's result as soon as it is measured; a "
        "rerun with the same settings reuses them (a long run that is interrupted resumes)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    _device.add_device_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.stride <= args.window - 1 or args.chunk < 1 or args.batch < 1:
        parser.error("need 0 < --stride < --window, --chunk >= 1 and --batch >= 1")

    if args.toy:
        path, source = toy_checkpoint(), "a tiny random OPT (toy; the numbers mean nothing)"
    elif args.model:
        path, source = args.model, args.model
    else:
        print(f"checkpoint: converting {PACKAGE} once if needed (~30 s)", flush=True)
        path = smollm2_checkpoint()
        source = (
            f"SmolLM2-135M-Instruct from {PACKAGE}=={PACKAGE_VERSION} (a Q4_1/Q8_0 GGUF, "
            "dequantized by transformers and saved in fp32)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read(), add_special_tokens=False)["input_ids"])
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    configs = configurations([int(g) for g in args.group_sizes.split(",")])
    if args.only:
        keys = args.only.split(",")
        unknown = set(keys) - {c.key for c in configs}
        if unknown:
            parser.error(f"unknown --only keys {sorted(unknown)}; have {[c.key for c in configs]}")
        configs = [c for c in configs if c.key in keys]
    else:
        configs = [c for c in configs if not c.extra]

    results: dict[str, dict] = {}
    settings = _settings(args, path)
    saved = _load_results(args.results, settings)
    for c in configs:
        r = saved.get(c.key)
        if r is None or r["config"] != repr(c):
            r = {"config": repr(c), **measure(path, tokenizer, ids, c, args)}
            _save_results(args.results, settings, c.key, r)
        results[c.key] = r
        scores = ", ".join(f"{METRICS[m]} {v:.3f}" for m, v in r["metrics"].items())
        print(
            f"{c.name:<32} perplexity {r['perplexity']:8.3f}  {scores}  "
            f"({r['perplexity_seconds']:.0f} s + {r['scenario_seconds']:.0f} s)",
            flush=True,
        )

    model_class = "stock" if all(c.stock for c in configs) else OFFLOADED.__name__
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {device_name(torch.device('cpu'))}, "
        f"torch {torch.__version__}; model: {source}, computed in fp32 "
        f"through `{model_class}` (all "
        f"{'in RAM' if args.device == 'cpu' else f'on {args.device}'}). Perplexity: "
        f"`{os.path.relpath(args.text, os.path.join(HERE, '..'))}`, {len(ids)} tokens, "
        f"{next(iter(results.values()))['scored_tokens']} scored, windows of {args.window} "
        f"tokens moved by {args.stride}, scored tokens in chunks of {args.chunk}. Scenario: "
        f"`synthetic_reasoning:{args.scenario}` (HELM's adaptation: 5 shots, greedy, stop at a "
        f"newline), first {next(iter(results.values()))['instances']} test instances. "
        "Seconds: perplexity and scenario together.",
        "",
        *table(configs, results),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_between_markers(args.doc, START, END, text)
        print(f"wrote {os.path.normpath(args.doc)}")
    return results


if __name__ == "__main__":
    main()
