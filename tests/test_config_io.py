"""Typed config trees: YAML + overrides, and errors that name the file and the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megatron_papo.config_io import ConfigError, check_choices, load_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    steps: int = 3
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  lr: 2\n  sizes: [3, 4]\n")
    cfg = load_config(Outer, str(path), ["inner.kind=b", "flag=true", "inner.path=/x"])
    assert cfg == Outer(steps=5, flag=True, inner=Inner(lr=2.0, kind="b", sizes=(3, 4), path="/x"))
    assert isinstance(cfg.inner.lr, float)
    assert to_dict(cfg)["inner"]["sizes"] == [3, 4]
    assert load_config(Outer, None, []) == Outer()
    # YAML 1.1 leaves exponents without a dot as strings: a float field still takes them
    assert load_config(Outer, None, ["inner.lr=1e30"]).inner.lr == 1e30


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.lrr=1"], r"unknown config key\(s\) \['inner.lrr'\]; valid keys of inner: \['kind', 'lr'"),
        (["steps=1.5"], "steps: expected an integer, got 1.5"),
        (["flag=1"], "flag: expected true/false"),
        (["inner.lr=fast"], "inner.lr: expected a number, got 'fast'"),
        (["inner.kind=c"], r"inner.kind must be one of \['a', 'b'\], got 'c'"),
        (["inner.lr=-1"], "inner: lr must be > 0, got -1.0"),
        (["inner=3"], "expected a mapping for section Inner"),
        (["steps"], "not of the form key.sub=value"),
        (["steps.x=1"], "steps: expected an integer, got {'x': 1}"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML"):
        load_config(Outer, str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, str(bad))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["rollout.backend=vllm", "rollout.vllm_urls=[http://127.0.0.1:1]", "eval.interval=2",
             "masking.strategy=noise"],
            "masking.strategy='noise' has none",
        ),
        (["algorithm.overlong_buffer=25"], "overlong_buffer (25) must be <= rollout.max_new_tokens (24)"),
        (["algorithm.ref_kl_in_reward=true", "algorithm.ref_kl_coef=0"], "needs ref_kl_coef > 0"),
    ],
)  # fmt: skip
def test_the_run_config_refuses_settings_that_span_sections(overrides, message):
    """Caught when the config loads, before any process group, model or rollout."""
    import os

    from megatron_papo.config import load_train_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(os.path.join(root, "examples", "configs", "tiny_cpu.yaml"), overrides)


@dataclass
class WithChoices:
    mode: Literal["x", "y"] = "x"
    backend: Literal["gloo", "nccl"] | None = None

    def __post_init__(self) -> None:
        check_choices(self, "sec")


def test_literal_fields_are_checked_in_one_place():
    """A section built directly refuses what a file or override would (the same message), optional
    Literals included; every config section with Literal fields does this."""
    from megatron_papo.rollout.config import RolloutConfig
    from megatron_papo.training.hacking import HackingDetectorConfig
    from megatron_papo.training.optimizer import OptimizerConfig

    assert WithChoices(backend="nccl").backend == "nccl"
    optional = r"backend must be one of \['gloo', 'nccl', None\], got 'mpi'"
    with pytest.raises(ConfigError, match=r"sec.mode must be one of \['x', 'y'\], got 'z'"):
        WithChoices(mode="z")
    with pytest.raises(ConfigError, match="sec." + optional):
        WithChoices(backend="mpi")
    with pytest.raises(ConfigError, match="config: " + optional):
        load_config(WithChoices, None, ["backend=mpi"])
    for build, message in (
        (lambda: RolloutConfig(backend="sglang"), "rollout.backend must be one of"),
        (lambda: OptimizerConfig(lr_schedule="step"), "optimizer.lr_schedule must be one of"),
        (lambda: HackingDetectorConfig(action="abort"), "logging.hacking_detector.action must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            build()
