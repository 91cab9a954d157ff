from __future__ import annotations

from dataclasses import asdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_flexoffload import Policy, QuantConfig, Split, Workload
from hf_flexoffload.config.policy import resolve_policy


def test_split_defaults_and_validation():
    assert Split(device=1.0).fractions == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"Split.*sum to 1"):
        Split(device=0.5, host=0.2)
    with pytest.raises(ValueError, match=r"Split.device=1.1.*between 0 and 1"):
        Split(device=1.1, host=-0.1)
    with pytest.raises(TypeError):
        Split(0.5, 0.5)  # keyword-only


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(num_micro_batches=2.5), "num_micro_batches"),
        (dict(weights={"device": 1.0}), "weights"),
        (dict(overlap="yes"), "overlap"),
        (dict(compress_cache=4), "compress_cache"),
        (dict(pin_weights=1), "pin_weights"),
    ],
    ids=["zero_micro_batch", "float_count", "dict_split", "str_flag", "int_quant", "int_pin"],
)
def test_policy_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"Policy\.{field}="):
        Policy(**kwargs)


def test_quant_config_validation():
    with pytest.raises(ValueError, match=r"QuantConfig\.bits"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match=r"QuantConfig\.group_size"):
        QuantConfig(group_size=63)
    with pytest.raises(
        ValueError,
        match=r"Invalid QuantConfig\.rounding='min-max': allowed values are None, 'minmax', "
        r"'search'",
    ):
        QuantConfig(rounding="min-max")


def test_quant_config_defaults_and_rounding():
    assert QuantConfig() == QuantConfig(bits=4, group_size=32, dim=None, rounding=None)
    assert QuantConfig().resolved("minmax").rounding == "minmax"
    assert QuantConfig(rounding="search").resolved("minmax").rounding == "search"


def test_quant_config_json_round_trip():
    policy = Policy(
        compress_weights=QuantConfig(bits=8, group_size=64, dim=0, rounding="minmax"),
        compress_cache=QuantConfig(rounding="search"),
    )
    data = policy.to_dict()
    assert data["compress_weights"] == dict(bits=8, group_size=64, dim=0, rounding="minmax")
    assert Policy.from_json(policy.to_json()) == policy
    # A policy saved before ``rounding`` existed loads with the default (None).
    old = {"compress_weights": {"bits": 4, "group_size": 64, "dim": None}}
    assert Policy.from_dict(old).compress_weights == QuantConfig(bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"QuantConfig\.rounding"):
        Policy.from_dict({"compress_weights": {"rounding": "nearest"}})


def test_json_round_trip(tmp_path):
    policy = Policy(
        micro_batch_size=8,
        num_micro_batches=4,
        weights=Split(device=0.2, host=0.5, disk=0.3),
        cache=Split(host=1.0),
        overlap=False,
        compress_weights=QuantConfig(bits=4, group_size=64),
        pin_weights=False,
    )
    assert Policy.from_json(policy.to_json()) == policy
    path = tmp_path / "policy.json"
    policy.save(path)
    assert Policy.load(path) == policy
    assert resolve_policy(str(path)) == policy
    assert resolve_policy(policy.to_dict()) == policy
    assert policy.block_size == 32


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="allowed keys"):
        Policy.from_dict({"micro_batch": 4})
    with pytest.raises(ValueError, match="offload_policy"):
        resolve_policy("no/such/file.json")


def test_from_flexgen():
    policy = Policy.from_flexgen(
        [20, 50, 0, 100, 100, 0],
        gpu_batch_size=16,
        num_gpu_batches=4,
        cpu_cache_compute=False,
        pin_weight=False,
    )
    assert policy.pin_weights is False
    assert policy.weights == Split(device=0.2, host=0.5, disk=0.3)
    assert policy.cache == Split(host=1.0)
    assert policy.activations == Split(device=1.0)
    assert (policy.micro_batch_size, policy.num_micro_batches) == (16, 4)
    assert policy.host_attention is False
    with pytest.raises(ValueError, match="6 numbers"):
        Policy.from_flexgen([100, 0], gpu_batch_size=1, num_gpu_batches=1)


def test_workload_round_trip_and_validation():
    w = Workload(prompt_len=128, gen_len=8, batch_size=4, allow_compression=True)
    assert Workload.from_dict(w.to_dict()) == w
    for field, value in [("prompt_len", 0), ("gen_len", 1.5), ("batch_size", 0)]:
        with pytest.raises(ValueError, match=f"Workload.{field}"):
            Workload(**{field: value})
    with pytest.raises(ValueError, match="bogus"):
        Workload.from_dict({"bogus": 1})


# -- fuzz: any input is either a clear error or a valid, round-tripping result -----------------

ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clear_or_valid(build, check):
    try:
        value = build()
    except ValueError as err:
        assert str(err).startswith("Invalid "), err  # names the field and what is allowed
        return
    check(value)


@FUZZ
@given(st.dictionaries(st.sampled_from(["device", "host", "disk", "gpu"]), ANYTHING) | ANYTHING)
def test_split_from_anything(data):
    def check(split):
        assert abs(sum(split.fractions) - 1) < 1e-6 and all(0 <= f <= 1 for f in split.fractions)
        assert Split.from_dict(asdict(split)) == split

    _clear_or_valid(lambda: Split.from_dict(data), check)


@FUZZ
@given(st.dictionaries(st.sampled_from(["bits", "group_size", "dim", "rounding", "x"]), ANYTHING))
def test_quant_config_from_anything(data):
    def check(config):
        assert config.bits in (4, 8) and type(config.bits) is int
        assert type(config.group_size) is int and config.group_size > 0
        assert QuantConfig.from_dict(asdict(config)) == config

    _clear_or_valid(lambda: QuantConfig.from_dict(data), check)


POLICY_KEYS = ["micro_batch_size", "num_micro_batches", "weights", "cache", "activations",
               "compress_weights", "compress_cache", "overlap", "int4_kernel_rows",
               "nope"]  # fmt: skip


@FUZZ
@given(st.dictionaries(st.sampled_from(POLICY_KEYS), ANYTHING) | ANYTHING)
def test_policy_from_anything(data):
    _clear_or_valid(lambda: Policy.from_dict(data), lambda p: Policy.from_json(p.to_json()) == p)
