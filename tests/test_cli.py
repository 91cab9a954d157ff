from __future__ import annotations

import os

import pytest

from hf_flexoffload import HardwareProfile, Policy, cli, demo


def run_demo(cache_dir, new_tokens: int, eval_instances: int = 0) -> int:
    args = f"demo --toy --batch-size 4 --prompt-len 8 --new-tokens {new_tokens}"
    args += f" --cache-dir {cache_dir}"
    return cli.main([*args.split(), "--eval-instances", str(eval_instances)])


def test_demo_runs_and_reports(tmp_path, monkeypatch, capsys):
    tiny = dict(
        demo.OPT_125M,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=512,
        max_position_embeddings=512,  # the evaluation's one-shot prompts are ~300 characters
        word_embed_proj_dim=64,
    )
    monkeypatch.setattr(demo, "OPT_125M", tiny)
    assert run_demo(tmp_path, 3, eval_instances=2) == 0
    out = capsys.readouterr().out
    assert "Same tokens as transformers: yes" in out
    assert "disk" in out and "tok/s" in out
    assert "synthetic_reasoning-pattern_match: 2 instances" in out and "exact_match" in out
    run = tmp_path / "demo-runs" / "synthetic_reasoning-pattern_match"
    assert (run / "stats.json").exists()
    checkpoint = tmp_path / "demo-opt-125m-bf16" / "model.safetensors"
    built = os.stat(checkpoint).st_mtime_ns
    assert run_demo(tmp_path, 2) == 0
    assert os.stat(checkpoint).st_mtime_ns == built, "the checkpoint is built once and reused"


@pytest.mark.real_weights
def test_demo_with_real_weights_writes_text_and_matches_stock(
    smollm2_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(demo, "smollm2_checkpoint", lambda cache_dir=None: smollm2_path)
    args = ["demo", "--new-tokens", "12", "--eval-instances", "2", "--cache-dir", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out
    assert "Same tokens as transformers: yes" in out
    assert "> What is the capital of France?" in out and "Paris" in out
    assert "synthetic_reasoning-variable_substitution: 2 instances" in out


def test_demo_rejects_tiny_batch():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--batch-size", "1"])


def plan(*args: str) -> int:
    return cli.main(["plan", *args])


def test_plan_prints_the_policy_and_writes_it(pre_ln_checkpoint, tmp_path, capsys):
    path, _ = pre_ln_checkpoint
    out_file = tmp_path / "policy.json"
    code = plan(
        "--model",
        path,
        "--prompt-len",
        "16",
        "--gen-len",
        "8",
        "--max-memory",
        "host=2MiB",
        "--output",
        str(out_file),
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Predicted:" in out and "tok/s" in out and "bottleneck" in out
    assert all(tier in out for tier in ("device", "host", "disk"))
    policy = Policy.load(out_file)  # loadable as offload_policy=
    assert policy.block_size >= 1


def test_plan_with_dtype_auto_shows_the_measured_candidates(
    pre_ln_checkpoint, tmp_path, monkeypatch, capsys
):
    import tempfile

    import torch

    from .planning.test_hardware import seed_profile

    monkeypatch.setenv("HF_FLEXOFFLOAD_CACHE", str(tmp_path))
    slow = {1: 1e9, 16: 5e9, 256: 10e9}
    for dtype, scale in ((torch.float32, 1), (torch.bfloat16, 20)):  # bf16 20x faster here
        rates = {rows: scale * rate for rows, rate in slow.items()}
        seed_profile(tmp_path, tempfile.gettempdir(), (64, 128), dtype, matmul_flops=rates)
    path, _ = pre_ln_checkpoint
    assert plan("--model", path, "--prompt-len", "16", "--gen-len", "8", "--dtype", "auto") == 0
    out = capsys.readouterr().out
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"Compute dtype: bfloat16 (measured; CPU capability {capability})" in out
    assert "  float32 " in out and "GFLOP/s" in out
    assert [line for line in out.splitlines() if line.endswith("<- chosen")] == [
        next(line for line in out.splitlines() if line.startswith("  bfloat16 "))
    ]
    assert plan("--model", path, "--prompt-len", "16", "--gen-len", "8") == 0
    assert "Compute dtype: float32 (the checkpoint's;" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, code",
    [
        (["--max-memory", "host=1KB"], cli.EXIT_INFEASIBLE),
        (["--max-memory", "gpu=1GiB"], cli.EXIT_USAGE),
        (["--max-memory", "host=lots"], cli.EXIT_USAGE),
        (["--prompt-len", "0"], cli.EXIT_USAGE),
    ],
    ids=["infeasible", "unknown-tier", "bad-size", "bad-length"],
)
def test_plan_exit_codes(pre_ln_checkpoint, capsys, extra, code):
    path, _ = pre_ln_checkpoint
    assert plan("--model", path, "--prompt-len", "16", "--gen-len", "8", *extra) == code
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    if code == cli.EXIT_INFEASIBLE:
        assert "at least" in err


def test_plan_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    assert plan("--model", str(tmp_path / "missing")) == cli.EXIT_USAGE
    assert "is not a directory: no checkpoint there" in capsys.readouterr().err
    assert plan("--model", str(tmp_path)) == cli.EXIT_USAGE  # a directory without a config
    assert "config.json" in capsys.readouterr().err


def test_profile_prints_and_writes_json(tmp_path, pre_ln_checkpoint, capsys):
    path, _ = pre_ln_checkpoint
    out_file = tmp_path / "profile.json"
    code = cli.main(
        ["profile", "--model", path, "--offload-dir", str(tmp_path), "--output", str(out_file)]
    )
    assert code == 0
    assert "matmul" in capsys.readouterr().out
    assert HardwareProfile.from_json(out_file.read_text()).matrix == (64, 128)


def test_plan_a_llama_checkpoint_and_refuse_other_types(gqa_checkpoint, tmp_path, capsys):
    path, _ = gqa_checkpoint
    assert plan("--model", path, "--prompt-len", "16", "--gen-len", "8") == 0
    assert "Predicted:" in capsys.readouterr().out
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path)
    assert plan("--model", str(tmp_path)) == cli.EXIT_USAGE
    assert "'gpt2' model; supported model types: opt, llama" in capsys.readouterr().err


# -- the CLI keeps its word: exit codes, no tracebacks -----------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--model", "m", "--dtype", "float8"],
        ["eval", "--model", "m", "--scenario", "x", "--dtype", "float8"],
        ["eval", "--model", "m", "--scenario", "x", "--block-size", "0"],
        ["plan", "--model", "m", "--gen-len", "-3"],
    ],
    ids=["plan-dtype", "eval-dtype", "block-size-0", "negative-gen-len"],
)
def test_bad_option_values_exit_2_without_traceback(argv, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("float8" in err or "at least 1" in err)


def test_plan_beyond_the_models_positions_is_refused(pre_ln_checkpoint, capsys):
    path, _ = pre_ln_checkpoint  # 64 positions
    assert plan("--model", path, "--prompt-len", "60", "--gen-len", "8") == cli.EXIT_USAGE
    assert "60 + --gen-len 8 = 68 tokens, but the model has 64 positions" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["-5", "nan", "0", "inf", "5XB", "-1GiB"])
def test_max_memory_is_validated_alike_in_python_and_cli(pre_ln_checkpoint, size, capsys):
    from hf_flexoffload import FlexOffloadOPTForCausalLM

    path, _ = pre_ln_checkpoint
    args = ("--model", path, "--prompt-len", "16", "--gen-len", "8")
    assert plan(*args, "--max-memory", f"host={size}") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    with pytest.raises(ValueError) as python:
        FlexOffloadOPTForCausalLM.from_pretrained(path, max_memory={"host": size})
    assert str(python.value) in err
    if size.lstrip("-").isdigit():  # the same number given as a number
        with pytest.raises(ValueError, match="Invalid max_memory"):
            FlexOffloadOPTForCausalLM.from_pretrained(path, max_memory={"host": int(size)})
    with pytest.raises(ValueError, match="finite"):
        FlexOffloadOPTForCausalLM.from_pretrained(path, max_memory={"disk": float("nan")})


def test_compute_dtype_names_are_checked_in_python(pre_ln_checkpoint):
    from hf_flexoffload import FlexOffloadOPTForCausalLM

    path, _ = pre_ln_checkpoint
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        FlexOffloadOPTForCausalLM.from_pretrained(path, dtype="float8")


def test_help_imports_nothing_heavy():
    """``hf-flexoffload --help`` (and every subcommand's) answers without importing torch,
    transformers or datasets (8 s before; well under a second now)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hf_flexoffload import cli\n"
        "for argv in (['--help'], ['eval', '--help'], ['plan', '--help']):\n"
        "    assert cli.main(argv) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "heavy: []" in done.stderr
    assert "--skip-invalid" in done.stdout and "--resume" in done.stdout


def test_first_measurement_is_announced_on_stderr(tmp_path, pre_ln_checkpoint, capsys,
                                                  monkeypatch):  # fmt: skip
    from hf_flexoffload.planning import hardware

    path, _ = pre_ln_checkpoint
    HardwareProfile.measure("cpu", matrix=(64, 128), offload_dir=str(tmp_path))  # cached now
    real_read, rates = hardware._read_cached, {}

    def as_if_new(cache_path):  # the cache is missed, and its rates are what "measuring" gives
        rates.update(real_read(cache_path))

    monkeypatch.setattr(hardware, "_read_cached", as_if_new)
    monkeypatch.setattr(hardware, "measure_rates", lambda *args: dict(rates))
    monkeypatch.setattr(hardware, "_write_cached", lambda *args: None)
    assert cli.main(["profile", "--model", path, "--offload-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("Measuring this machine once for cpu float32") and "2 min" in err


DISK_RATES = (
    "disk_read",
    "disk_write",
    "cached_disk_read",
    "overlap_penalty",
    "direct_overlap_penalty",
)


def test_measuring_shows_each_probe_as_it_starts(tmp_path, pre_ln_checkpoint, capsys, monkeypatch):
    from hf_flexoffload.planning import hardware, probes

    path, _ = pre_ln_checkpoint
    rates = HardwareProfile.measure("cpu", matrix=(64, 128), offload_dir=str(tmp_path)).to_dict()
    monkeypatch.setattr(hardware, "_read_cached", lambda cache_path: None)  # a first run
    monkeypatch.setattr(hardware, "_write_cached", lambda *args: None)
    fast = {  # each probe answers at once with the cached profile's rates
        "_matmul": lambda *a: {int(k): v for k, v in rates["matmul_flops"].items()},
        "_copy_bandwidth": lambda *a: {k: rates[k] for k in ("host_to_device", "device_to_host")},
        "_attention": lambda *a: rates["attention_bytes"],
        "_dequantize": lambda *a: rates["dequantize_bytes"],
        "kernel_rates": lambda *a: ({}, {}),
        "_op_overhead": lambda *a: rates["op_seconds"],
        "_disk": lambda *a: {k: rates[k] for k in DISK_RATES},
    }
    for name, stub in fast.items():
        monkeypatch.setattr(probes, name, stub)
    assert cli.main(["profile", "--model", path, "--offload-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    steps = [line for line in lines if line.startswith("measuring ")]
    assert steps[0] == "measuring 1/7: matmul rates" and steps[-1].startswith("measuring 7/7")
    assert len(steps) == 7
