from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_generate_example_gives_stock_tokens(capsys):
    example = runpy.run_path(str(EXAMPLES / "generate.py"))
    example["main"]()
    assert "same tokens as transformers: True" in capsys.readouterr().out
