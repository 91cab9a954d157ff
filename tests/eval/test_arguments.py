import sys

from hf_flexoffload import cli


def test_lm_eval_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lm_eval.__main__", raising=False)
    assert cli.main(["lm-eval", "--model", "flexoffload", "--tasks", "x"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "pip install 'hf_flexoffload[lm-eval]'" in err and "Traceback" not in err


def test_generate_and_lm_eval_are_listed(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "lm-eval" in out
    assert cli.main(["generate", "--help"]) == 0
    assert "--max-tokens" in capsys.readouterr().out
