from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_generate_example_gives_stock_tokens(capsys):
    example = runpy.run_path(str(EXAMPLES / "generate.py"))
    example["main"]()
    assert "same tokens as transformers: True" in capsys.readouterr().out


def test_batch_eval_example_scores_every_metric(capsys, tmp_path):
    example = runpy.run_path(str(EXAMPLES / "batch_eval.py"))
    scores = example["main"](None, str(tmp_path))
    assert set(scores) == {"exact_match", "quasi_exact_match", "prefix_exact_match", "f1"}
    assert "pattern_match: 16 instances" in capsys.readouterr().out
    assert example["main"](None, str(tmp_path)) == scores  # resumed: nothing left to do
