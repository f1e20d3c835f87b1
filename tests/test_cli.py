"""``--set KEY=VALUE`` overrides and ``--help`` of real configs: values parsed by tyro, configs rebuilt and
validated by their own ``__post_init__``, errors that name the field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from jaxppo.cli import apply_overrides, config_fields, config_help, parse_args
from jaxppo.config import load_config
from jaxppo.models.config import ModelConfig, RopeScaling
from jaxppo.ppo_config import PPOConfig
from jaxppo.tabular_ppo import TabularPPOConfig
from jaxppo.toy_task import ToyTaskConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")
TABULAR = str(ROOT / "configs" / "tabular.py")


@pytest.fixture(scope="module")
def pipeline():
    config = load_config(DEFAULT)
    # the loaded values differ from the class defaults, so "keeps the other fields" is tested
    assert config.ppo.kl_coef != PPOConfig().kl_coef and config.ppo.learning_rate != PPOConfig().learning_rate
    assert config.model.hidden_size == 64 and config.model.tie_word_embeddings
    return config


@pytest.fixture(scope="module")
def tabular():
    return load_config(TABULAR)


def test_nested_overrides_equal_replace_by_hand_and_keep_loaded_values(pipeline):
    out = apply_overrides(pipeline, ["ppo.kl_coef=0.2", "model.dtype=bfloat16", "ppo.stop_token_ids=2,5",
                                     "ppo.kl_target=0.5", "sft.learning_rate=1e-4", "seed=7"])
    expected = dataclasses.replace(
        pipeline, seed=7,
        ppo=dataclasses.replace(pipeline.ppo, kl_coef=0.2, stop_token_ids=(2, 5), kl_target=0.5),
        model=dataclasses.replace(pipeline.model, dtype="bfloat16"),
        sft=dataclasses.replace(pipeline.sft, learning_rate=1e-4))
    assert out == expected and type(out) is type(pipeline)
    assert out.ppo.learning_rate == 1e-3 and out.ppo.iterations == 400  # loaded, not class defaults
    assert out.model.hidden_size == 64 and out.task == pipeline.task
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.seed = 1  # type: ignore[misc]
    assert pipeline.ppo.kl_coef == 0.1  # the loaded config is untouched
    assert apply_overrides(pipeline, []) == pipeline


def test_values_bools_none_tuples_and_exponents(pipeline):
    out = apply_overrides(pipeline, [
        "ppo.kl_in_reward=false", "ppo.whiten_rewards=true", "model.remat=True",
        "reward_model.drop_ties=False",
        "ppo.value_clip_eps=None", "ppo.critic_learning_rate=None", "model.eos_token_id=2,5",
        "ppo.learning_rate=1e-4", "ppo.kl_horizon=2.5E3", "ppo.missing_eos_penalty=0.5",
    ])
    assert out.ppo.kl_in_reward is False and out.ppo.whiten_rewards is True and out.model.remat is True
    assert out.reward_model.drop_ties is False
    assert out.ppo.value_clip_eps is None and out.ppo.critic_learning_rate is None
    assert out.model.eos_token_id == (2, 5)
    assert out.ppo.learning_rate == 1e-4 and out.ppo.kl_horizon == 2500.0 and out.ppo.missing_eos_penalty == 0.5
    assert apply_overrides(pipeline, ["model.eos_token_id=2"]).model.eos_token_id == 2  # int | tuple: the int
    assert apply_overrides(pipeline, ["ppo.stop_token_ids="]).ppo.stop_token_ids == ()
    assert apply_overrides(pipeline, ["ppo.stop_token_ids=7"]).ppo.stop_token_ids == (7,)
    assert apply_overrides(pipeline, ["ppo.kl_coef=0.3", "ppo.kl_coef=0.4"]).ppo.kl_coef == 0.4  # last wins


def test_nested_config_that_is_none_is_created_and_reset(pipeline):
    assert pipeline.model.rope_scaling is None
    out = apply_overrides(pipeline, ["model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=2"])
    assert out.model.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    assert apply_overrides(out, ["model.rope_scaling.factor=4"]).model.rope_scaling.factor == 4.0
    assert apply_overrides(out, ["model.rope_scaling=None"]) == pipeline
    with pytest.raises(ValueError, match=r"`model\.rope_scaling` is None.*model\.rope_scaling\.rope_type"):
        apply_overrides(pipeline, ["model.rope_scaling.factor=2"])
    with pytest.raises(ValueError, match=r"`model\.rope_scaling` is a nested config \(RopeScaling \| None\)"):
        apply_overrides(pipeline, ["model.rope_scaling=linear"])
    with pytest.raises(ValueError, match=r"`model\.rope_scaling` is also set as a whole"):
        apply_overrides(pipeline, ["model.rope_scaling=None", "model.rope_scaling.factor=2"])


def test_unknown_or_malformed_keys(pipeline, tabular):
    with pytest.raises(ValueError, match=r"unknown config key `ppo\.kl_cofe` in --set ppo\.kl_cofe=1; "
                                         r"did you mean `ppo\.kl_coef`"):
        apply_overrides(pipeline, ["ppo.kl_cofe=1"])
    with pytest.raises(ValueError, match=r"`kl_coef`.*did you mean `ppo\.kl_coef`"):
        apply_overrides(pipeline, ["kl_coef=1"])
    with pytest.raises(ValueError, match=r"unknown config key `kl_cofe` in cli\.yaml kl_cofe=1; did you mean `kl_coef`"):
        apply_overrides(tabular, ["kl_cofe=1"], source="cli.yaml")
    with pytest.raises(ValueError, match=r"`ppo\.kl_coef` \(float\) has no field `x`"):
        apply_overrides(pipeline, ["ppo.kl_coef.x=1"])
    for bad in ("ppo.kl_coef", "=1", "ppo..kl_coef=1"):
        with pytest.raises(ValueError, match=re.escape(f"--set {bad!r}: expected KEY=VALUE")):
            apply_overrides(pipeline, [bad])


@pytest.mark.parametrize("assignment, expected", [
    ("ppo.kl_coef=abc", r"`ppo\.kl_coef`: expected float, got 'abc'.*could not convert"),
    ("ppo.epochs=1.5", r"`ppo\.epochs`: expected int, got '1\.5'"),
    ("ppo.kl_in_reward=maybe", r"`ppo\.kl_in_reward`: expected bool, got 'maybe'.*'true', 'false'"),
    ("ppo.kl_target=none", r"`ppo\.kl_target`: expected float \| None, got 'none'"),
    ("ppo.stop_token_ids=a,b", r"`ppo\.stop_token_ids`: expected tuple\[int, \.\.\.\], got 'a,b'"),
    ("ppo=1", r"`ppo` is a nested config \(PPOConfig\)"),
])
def test_bad_values_name_the_field_and_type(pipeline, assignment, expected):
    with pytest.raises(ValueError, match=expected):
        apply_overrides(pipeline, [assignment])


@pytest.mark.parametrize("assignment, message", [
    ("ppo.kl_coef=-1", "config field `ppo.kl_coef`: must be >= 0, got -1.0"),
    ("ppo.minibatches=3", "config field `ppo.minibatches`: batch_size=64 must be divisible by minibatches=3"),
    ("model.head_dim=15", "config field `model.head_dim`: must be even for RoPE, got 15"),
    ("task.demo_liked_prob=1.5", "config field `task.demo_liked_prob`: must be in (0, 1), got 1.5"),
    ("reward_model.init=pretrained", "config field `reward_model.init`: 'pretrained' not in ('sft', 'scratch')"),
])
def test_out_of_range_values_raise_the_configs_own_error_verbatim(pipeline, assignment, message):
    with pytest.raises(ValueError) as info:
        apply_overrides(pipeline, [assignment])
    assert str(info.value) == message


def test_cross_field_check_of_the_outer_config_runs(pipeline):
    with pytest.raises(ValueError, match=r"^config field `ppo\.max_new_tokens`: must equal task\.max_response_tokens"):
        apply_overrides(pipeline, ["ppo.max_new_tokens=9"])


def test_tabular_config(tabular):
    out = apply_overrides(tabular, ["kl_target=None", "epochs=2", "learning_rate=1e-2", "kl_estimator=k3"])
    assert out == dataclasses.replace(tabular, kl_target=None, epochs=2, learning_rate=1e-2, kl_estimator="k3")
    with pytest.raises(ValueError) as info:
        apply_overrides(tabular, ["lam=2"])
    assert str(info.value) == "config field `lam`: must be in [0, 1], got 2.0"


def _docs(config) -> dict[str, str]:
    return {field.key: field.doc for field in config_fields(config)}


def test_every_field_of_the_documented_configs_has_its_own_doc(pipeline, tabular):
    docs = {**_docs(pipeline), **{f"tabular.{k}": v for k, v in _docs(tabular).items()}}
    for prefix, cls in [("ppo", PPOConfig), ("model", ModelConfig), ("model.rope_scaling", RopeScaling),
                        ("task", ToyTaskConfig), ("tabular", TabularPPOConfig)]:
        for field in dataclasses.fields(cls):
            assert docs[f"{prefix}.{field.name}"], f"{cls.__name__}.{field.name} has no doc"
    # tyro attaches a section comment ("# update") to the next field without a comment of its own
    assert docs["ppo.epochs"] == "passes over each rollout batch"
    assert docs["ppo.kl_coef"].startswith("β >= 0")


def test_help_lists_nested_fields_with_type_loaded_value_and_doc(pipeline, tabular):
    text = config_help(pipeline, prog="run --config configs/default.py")
    assert "config fields of PipelineConfig" in text
    assert "run --config configs/default.py --set KEY=VALUE" in text
    assert re.search(r"ppo\.kl_coef: float = 0\.1\n +β >= 0: weight of the KL", text)
    assert re.search(r"ppo\.kl_target: float \| None = None\n +None: fixed β", text)
    assert re.search(r"ppo\.stop_token_ids: tuple\[int, \.\.\.\] = 2\n", text)
    assert re.search(r"model\.dtype: str = float32\n +matmul compute dtype", text)
    assert re.search(r"model\.tie_word_embeddings: bool = true\n", text)
    assert re.search(r"task\.demo_liked_prob: float = 0\.3\n +demonstrations:", text)
    assert "model.rope_scaling (RopeScaling | None, None: set its required fields to create one)" in text
    assert re.search(r"model\.rope_scaling\.factor: float = required\n +context extension", text)
    for field in config_fields(pipeline):  # every field is listed
        assert f"{field.key}:" in text or f"\n{field.key} (" in text
    text = config_help(tabular, prog="run")
    assert re.search(r"\n  kl_target: float \| None = 1\.0\n +None: fixed β", text)


def test_parse_args_loads_and_overrides(tmp_path):
    config, args = parse_args(["--config", DEFAULT, "--set", "ppo.kl_coef=0.2", "model.dtype=bfloat16",
                               "--run-dir", str(tmp_path), "--set", "seed=3"])
    assert config == apply_overrides(load_config(DEFAULT), ["ppo.kl_coef=0.2", "model.dtype=bfloat16", "seed=3"])
    assert args.run_dir == str(tmp_path) and args.config == DEFAULT


def test_parse_args_default_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    config, args = parse_args([])
    assert args.config == "configs/default.py" and args.set == [] and args.run_dir is None
    assert config == load_config(DEFAULT)


def test_parse_args_help_prints_flags_then_config_fields(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", TABULAR, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.index("--run-dir") < out.index("config fields of TabularPPOConfig")
    assert re.search(r"kl_target: float \| None = 1\.0\n +None: fixed β", out)
    with pytest.raises(SystemExit) as info:
        parse_args(["-h", "--config", DEFAULT])
    assert info.value.code == 0
    assert "ppo.kl_coef: float = 0.1" in capsys.readouterr().out


def test_parse_args_errors_exit_2_with_the_message(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", TABULAR, "--set", "kl_coef=-1"])
    assert info.value.code == 2
    assert "config field `kl_coef`: must be >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", TABULAR, "--set", "kl_cofe=1"])
    assert info.value.code == 2
    assert "did you mean `kl_coef`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", "configs/missing.py"])
    assert info.value.code == 2
    assert "config file not found" in capsys.readouterr().err


# --- generic over dataclasses: str paths, Literal choices, a union of nested configs, an optional one ---


@dataclasses.dataclass(frozen=True)
class Files:
    path: str = "data/a.jsonl"  # where the data is
    mode: Literal["fast", "exact"] = "fast"  # speed or precision


@dataclasses.dataclass(frozen=True)
class Synthetic:
    scale: float = 1.0  # a scale


@dataclasses.dataclass(frozen=True)
class Experiment:
    source: Files | Synthetic = Files()  # one of two nested configs
    extra: Synthetic | None = None  # optional nested config
    names: tuple[str, ...] = ("a",)  # names


def test_generic_dataclasses():
    config = Experiment(source=Files(path="b.jsonl"))
    out = apply_overrides(config, ["source.mode=exact", "names=x, y", "extra.scale=2"])
    assert out == Experiment(source=Files(path="b.jsonl", mode="exact"), extra=Synthetic(2.0), names=("x", "y"))
    assert apply_overrides(config, ["source.path="]).source.path == ""
    assert apply_overrides(config, ["source.path=-x/y.jsonl"]).source.path == "-x/y.jsonl"
    assert apply_overrides(config, ["source.path=a=b"]).source.path == "a=b"
    with pytest.raises(ValueError, match=r"`source\.mode`: expected Literal\['fast', 'exact'\], got 'slow'"):
        apply_overrides(config, ["source.mode=slow"])
    with pytest.raises(ValueError, match=r"unknown config key `source\.scale`"):  # the loaded variant is Files
        apply_overrides(config, ["source.scale=2"])
    assert apply_overrides(Experiment(source=Synthetic()), ["source.scale=2"]).source == Synthetic(2.0)
    text = config_help(config, prog="run")
    assert "source (Files | Synthetic, loaded: Files)" in text
    assert re.search(r"source\.path: str = b\.jsonl\n +where the data is", text)
    assert re.search(r"extra\.scale: float = 1\.0\n +a scale", text)
