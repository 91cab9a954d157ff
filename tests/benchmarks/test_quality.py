"""The benchmark scripts run, on a tiny model (the real measurements take minutes to hours)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ..conftest import build_model, tiny_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/quality.py` sees it
    return importlib.import_module("quality")


@pytest.mark.parametrize(
    ("n", "window", "stride"),
    [(100, 16, 8), (17, 16, 8), (5, 16, 8), (64, 16, 15), (40, 10, 3)],
    ids=["many-windows", "one-token-past-a-window", "shorter-than-a-window", "stride-near-window",
         "small-stride"],
)  # fmt: skip
def test_windows_score_every_token_once_with_context(quality, n, window, stride):
    scored = []
    for begin, first, end in quality.windows(n, window, stride):
        assert begin < first < end <= n
        assert end - begin <= window  # the inputs [begin, end - 1) fit a window
        assert first - begin >= min(window - stride, first)  # context, as far as the text allows
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


@torch.no_grad()
def test_chunked_perplexity_matches_whole_window_forwards(quality):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    ids = torch.randint(3, 96, (50,))
    ppl, count = quality.perplexity(model, ids, window=16, stride=6, chunk=4, batch=3)
    nll = 0.0
    for begin, first, end in quality.windows(len(ids), 16, 6):
        logits = model(input_ids=ids[None, begin : end - 1]).logits[0]
        nll += float(F.cross_entropy(logits[first - 1 - begin :], ids[first:end], reduction="sum"))
    assert count == len(ids) - 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_quality_benchmark_runs_end_to_end(quality, tmp_path):
    doc = tmp_path / "quality.md"
    doc.write_text(f"# Quality\n\nbefore\n{quality.START}\nold table\n{quality.END}\nafter\n")
    text = tmp_path / "tiny.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    results = quality.main(
        ["--toy", "--text", str(text), "--window", "48", "--stride", "24", "--chunk", "8",
         "--batch", "2", "--instances", "2", "--max-new-tokens", "3", "--group-sizes", "32",
         "--only", "stock,plain,w4g32,w4kv4,stock-w4g32", "--doc", str(doc)]
    )  # fmt: skip
    assert list(results) == ["stock", "plain", "w4g32", "w4kv4", "stock-w4g32"]
    # Offloading alone changes nothing; compressing the KV cache changes the scored tokens'
    # history (the perplexity path must exercise the stored cache, not just one forward).
    assert results["plain"]["perplexity"] == pytest.approx(results["stock"]["perplexity"], 1e-5)
    assert results["w4kv4"]["perplexity"] != results["w4g32"]["perplexity"]
    # The in-place cross-check on stock transformers agrees with the offloaded 4-bit weights (to
    # bf16 precision: the int4 kernel, where it runs, takes bf16 activations).
    stock_w4 = results["stock-w4g32"]["perplexity"]
    assert stock_w4 == pytest.approx(results["w4g32"]["perplexity"], rel=1e-3)
    assert results["w4g32"]["perplexity"] != pytest.approx(results["plain"]["perplexity"])
    assert all(r["instances"] == 2 and r["scored_tokens"] == 359 for r in results.values())
    written = doc.read_text()
    assert "old table" not in written and written.startswith("# Quality\n\nbefore\n")
    assert written.endswith(f"{quality.END}\nafter\n")
    weights = "4-bit g32 inputs, search"
    assert f"| 4-bit weights + KV (defaults) | {weights} | 4-bit g32 head dim, minmax |" in written
    assert f"| stock, 4-bit weights in place, g32 | {weights} | fp32 |" in written


def test_results_file_resumes_an_interrupted_run(quality, tmp_path, monkeypatch):
    text = tmp_path / "tiny.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    saved = tmp_path / "results.json"
    argv = ["--toy", "--text", str(text), "--window", "24", "--stride", "12", "--chunk", "8",
            "--batch", "2", "--instances", "1", "--max-new-tokens", "2", "--group-sizes", "32",
            "--no-write", "--results", str(saved)]  # fmt: skip
    first = quality.main([*argv, "--only", "plain"])
    measured = []
    real = quality.measure

    def counted(path, tokenizer, ids, config, args):
        measured.append(config.key)
        return real(path, tokenizer, ids, config, args)

    monkeypatch.setattr(quality, "measure", counted)
    second = quality.main([*argv, "--only", "plain,w4g32"])
    assert measured == ["w4g32"]  # plain came from the file
    assert second["plain"] == first["plain"]
    third = quality.main([*argv, "--only", "plain,w4g32", "--stride", "6"])  # other settings
    assert measured == ["w4g32", "plain", "w4g32"] and third["plain"] != first["plain"]
