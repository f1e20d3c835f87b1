"""Config validation at load / run start: every float of every section is finite and in its documented
range, meaningless ints are refused, each error names its field; ``config.json`` is strict JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxppo.cli import apply_overrides, config_fields, parse_args
from jaxppo.config import load_config, require_finite, require_range, to_json
from jaxppo.models.config import RopeScaling
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.rng import NUM_SEEDS, stream_seed
from jaxppo.sampling import SamplingParams
from jaxppo.sharding import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


def refused(config, *assignments: str) -> str:
    """The error message of ``--set assignments`` on ``config`` (fails the test if they are accepted)."""
    with pytest.raises(ValueError) as info:
        apply_overrides(config, list(assignments))
    return str(info.value)


# ------------------------------------------------------------------ the reported cases, one by one

@pytest.mark.parametrize("assignments, field", [
    (["ppo.learning_rate=inf"], "ppo.learning_rate"),
    (["ppo.learning_rate=1e30"], "ppo.learning_rate"),
    (["ppo.learning_rate=0"], "ppo.learning_rate"),
    (["ppo.critic_learning_rate=nan"], "ppo.critic_learning_rate"),
    (["ppo.max_grad_norm=-1"], "ppo.max_grad_norm"),
    (["ppo.vf_coef=-5"], "ppo.vf_coef"),
    (["ppo.entropy_coef=-0.01"], "ppo.entropy_coef"),
    (["ppo.ptx_coef=-1"], "ppo.ptx_coef"),
    (["sft.learning_rate=nan"], "sft.learning_rate"),
    (["reward_model.learning_rate=2"], "reward_model.learning_rate"),
    (["ppo.missing_eos_penalty=nan"], "ppo.missing_eos_penalty"),
    (["ppo.missing_eos_penalty=-1"], "ppo.missing_eos_penalty"),
    (["ppo.top_p=0"], "ppo.top_p"),
    (["ppo.top_p=1.5"], "ppo.top_p"),
    (["ppo.top_k=-3"], "ppo.top_k"),
    (["ppo.dual_clip=0.5"], "ppo.dual_clip"),
    (["ppo.dual_clip=1"], "ppo.dual_clip"),
    (["ppo.clip_eps_high=-1"], "ppo.clip_eps_high"),
    (["ppo.clip_eps=1"], "ppo.clip_eps"),
    (["ppo.value_clip_eps=0"], "ppo.value_clip_eps"),
    (["ppo.gamma=1.5"], "ppo.gamma"),
    (["ppo.lam=-0.1"], "ppo.lam"),
    (["ppo.temperature=inf"], "ppo.temperature"),
    (["ppo.kl_coef=-inf"], "ppo.kl_coef"),
    (["ppo.kl_target=0"], "ppo.kl_target"),
    (["ppo.kl_horizon=0"], "ppo.kl_horizon"),
    # adaptive β ← β (1 + e · 16 / 3), e = −0.2: β would turn negative
    (["ppo.kl_target=1", "ppo.kl_horizon=3"], "ppo.kl_horizon"),
    (["ppo.kl_target=1", "ppo.kl_coef=0"], "ppo.kl_coef"),  # β ← β (1 + …): a β of 0 never adapts
    (["ppo.pad_token_id=-1"], "ppo.pad_token_id"),
    (["ppo.stop_token_ids=-1"], "ppo.stop_token_ids"),
    (["ppo.stop_token_ids=2,22"], "ppo.stop_token_ids"),  # the tiny model's vocabulary is 22 tokens
    (["ppo.pad_token_id=22"], "ppo.pad_token_id"),
    (["reward_model.eval_fraction=inf"], "reward_model.eval_fraction"),
    (["sft.warmup_steps=-1"], "sft.warmup_steps"),
    (["reward_model.warmup_steps=-1"], "reward_model.warmup_steps"),
    (["task.preference_beta=-2"], "task.preference_beta"),
    (["task.demo_quality_concentration=inf"], "task.demo_quality_concentration"),
    (["model.rms_norm_eps=0"], "model.rms_norm_eps"),
    (["model.rope_theta=-1"], "model.rope_theta"),
    (["model.max_position_embeddings=0"], "model.max_position_embeddings"),
    (["model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor"),
    (["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=8", "model.rope_scaling.high_freq_factor=1"],
     "model.rope_scaling.high_freq_factor"),
    (["seed=4294967296"], "seed"),
    (["seed=-1"], "seed"),
    (["mesh.data=-1", "mesh.tensor=-1"], "mesh.tensor"),
    # the critic-free family (tiny: batch_size 16, reward model online every 2 iterations)
    (["ppo.estimator=grpo"], "ppo.group_size"),  # a group estimator with one response per prompt
    (["ppo.estimator=rloo", "ppo.group_size=3"], "ppo.group_size"),  # 16 responses are not groups of 3
    (["ppo.group_size=0"], "ppo.group_size"),
    (["ppo.dynamic_sampling=true"], "ppo.group_size"),
    (["ppo.oversample=2"], "ppo.oversample"),  # over-sampling needs dynamic sampling
    (["ppo.estimator=grpo", "ppo.group_size=4", "ppo.dynamic_sampling=true", "ppo.oversample=0"], "ppo.oversample"),
    (["ppo.estimator=grpo", "ppo.group_size=4"], "ppo.kl_in_reward"),  # group std would scale KL noise up
    (["ppo.policy_loss=gspo"], "ppo.policy_loss"),  # GSPO needs one advantage per response, GAE gives per token
    (["ppo.group_size=2", "ppo.dynamic_sampling=true"], "ppo.dynamic_sampling"),  # equal scores ≠ no signal for GAE
    (["ppo.reference_model=false"], "ppo.reference_model"),  # β = 0.05 needs the reference
    (["ppo.kl_coef=0", "ppo.ref_refresh_every=2"], "ppo.ref_refresh_every"),  # no reference to refresh
    (["reward_functions=exact_match"], "reward_functions"),  # not a function of the toy task
    (["reward_functions=gold", "reward_weights=1,2"], "reward_weights"),
    (["reward_functions=gold"], "reward_model.online_every"),  # online refreshes retrain a reward model
    (["reward_functions=gold", "reward_model.online_every=0"], "ppo.critic_init"),  # no reward model to start from
])
def test_meaningless_values_are_refused_naming_the_field(tiny, assignments, field):
    message = refused(tiny, *assignments)
    assert message.startswith(f"config field `{field}`: "), message


def test_the_reported_cli_cases_exit_2_naming_the_field(capsys):
    for assignment in ("ppo.learning_rate=inf", "ppo.learning_rate=1e30", "ppo.max_grad_norm=-1", "ppo.vf_coef=-5",
                       "sft.learning_rate=nan", "ppo.missing_eos_penalty=nan", "ppo.top_p=0", "ppo.top_k=-3",
                       "ppo.dual_clip=0.5", "ppo.clip_eps_high=-1", "seed=4294967296"):
        with pytest.raises(SystemExit) as info:
            parse_args(["--config", TINY, "--set", assignment])
        assert info.value.code == 2
        field = assignment.split("=")[0]
        assert f"config field `{field}`" in capsys.readouterr().err


def test_messages_state_the_range_and_the_value(tiny):
    assert refused(tiny, "ppo.learning_rate=inf") == "config field `ppo.learning_rate`: must be a finite number in (0, 1], got inf"
    assert refused(tiny, "ppo.learning_rate=1e30") == "config field `ppo.learning_rate`: must be in (0, 1], got 1e+30"
    assert refused(tiny, "ppo.max_grad_norm=-1") == "config field `ppo.max_grad_norm`: must be >= 0, got -1.0"
    assert refused(tiny, "ppo.top_p=0") == "config field `ppo.top_p`: must be in (0, 1], got 0.0"
    assert refused(tiny, "ppo.dual_clip=0.5") == "config field `ppo.dual_clip`: must be > 1, got 0.5"
    assert refused(tiny, "seed=4294967296") == "config field `seed`: must be in [0, 4294967296), got 4294967296"


def _float_keys(config) -> list[str]:
    """The dotted keys of every float-typed field of ``config`` (``float`` or ``float | None``)."""
    return [f.key for f in config_fields(config) if float in (typing.get_args(f.type) or (f.type,))]


def test_every_float_field_refuses_nan_and_inf_naming_itself(tiny):
    config = apply_overrides(tiny, ["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=8"])
    keys = _float_keys(config)
    # every section's floats are covered, the optional ones (None by default) and the nested ones too
    for key in ("ppo.learning_rate", "ppo.kl_target", "ppo.dual_clip", "sft.learning_rate", "reward_model.eval_fraction",
                "task.preference_beta", "model.rms_norm_eps", "model.rope_scaling.high_freq_factor"):
        assert key in keys
    for key in keys:
        for value in ("nan", "inf", "-inf"):
            message = refused(config, f"{key}={value}")
            # a tuple of floats names the element: `reward_weights[0]`
            assert message.startswith((f"config field `{key}`: ", f"config field `{key}[0]`: ")), message


def test_every_float_of_the_text_task_is_checked_too(tmp_path, tiny):
    from jaxppo.tasks import TextTaskConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    task = TextTaskConfig(prompts=str(prompts), max_prompt_tokens=8, max_response_tokens=6)
    config = dataclasses.replace(tiny, task=task, pretrained="smollm2", sft=dataclasses.replace(tiny.sft, steps=0))
    for value, word in ((math.nan, "finite"), (math.inf, "finite"), (-1.0, ">= 0")):
        with pytest.raises(ValueError, match=rf"^config field `task\.preference_beta`: .*{word}"):
            dataclasses.replace(config, task=dataclasses.replace(task, preference_beta=value))


# ------------------------------------------------------------------ legitimate edge values still pass

@pytest.mark.parametrize("assignments", [
    ["ppo.kl_coef=0"], ["ppo.entropy_coef=0"], ["ppo.vf_coef=0"], ["ppo.ptx_coef=0.5"], ["ppo.max_grad_norm=0"],
    ["ppo.missing_eos_penalty=0"], ["ppo.gamma=0", "ppo.lam=0"], ["ppo.gamma=1", "ppo.lam=1"],
    ["ppo.top_p=1"], ["ppo.top_p=0.01"], ["ppo.top_k=0"], ["ppo.top_k=1000"], ["ppo.learning_rate=1"],
    ["ppo.critic_learning_rate=1e-6"], ["ppo.clip_eps=0.999"], ["ppo.clip_eps_high=3"], ["ppo.dual_clip=1.001"],
    ["ppo.dual_clip=None"], ["ppo.value_clip_eps=None"], ["ppo.value_clip_eps=100"], ["ppo.kl_target=None"],
    ["ppo.kl_target=0.1", "ppo.kl_horizon=3.3"], ["ppo.temperature=1e-3"], ["ppo.temperature=50"],
    ["ppo.stop_token_ids=2,21"], ["ppo.stop_token_ids="], ["ppo.pad_token_id=21"],
    ["sft.warmup_steps=0"], ["reward_model.warmup_steps=0"], ["reward_model.eval_fraction=0.999"],
    ["task.preference_beta=0"], ["task.preference_beta=1e6"], ["seed=0"], ["seed=4294967295"],
    ["model.rope_theta=1"], ["model.rms_norm_eps=1e-12"],
    ["model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=1"],
    ["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=32", "model.rope_scaling.low_freq_factor=1",
     "model.rope_scaling.high_freq_factor=4", "model.rope_scaling.original_max_position_embeddings=8192"],
    ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"], ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2"],
])
def test_legitimate_edge_values_are_accepted(tiny, assignments):
    config = apply_overrides(tiny, assignments)
    json.dumps(to_json(config), allow_nan=False)


def test_sampling_params_ranges():
    assert SamplingParams(temperature=0.0).temperature == 0.0  # greedy
    assert SamplingParams(top_k=0, top_p=1.0).top_p == 1.0
    for kwargs, field in (({"temperature": math.inf}, "sampling.temperature"), ({"temperature": -1.0}, "sampling.temperature"),
                          ({"top_p": math.nan}, "sampling.top_p"), ({"top_k": -1}, "sampling.top_k"),
                          ({"pad_token_id": -1}, "sampling.pad_token_id")):
        with pytest.raises(ValueError, match=rf"^config field `{field}`"):
            SamplingParams(**kwargs)


def test_rope_scaling_on_its_own():
    RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    with pytest.raises(ValueError, match=r"^config field `model\.rope_scaling\.rope_type`"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match=r"^config field `model\.rope_scaling\.factor`: must be a finite"):
        RopeScaling("linear", math.nan)
    with pytest.raises(ValueError, match=r"`model\.rope_scaling\.high_freq_factor`: must be > low_freq_factor=4\.0"):
        RopeScaling("llama3", 8.0, 4.0, 4.0)


def test_every_shipped_config_validates_and_saves_as_strict_json():
    paths = sorted((ROOT / "configs").glob("*.py"))
    assert len(paths) >= 4
    for path in paths:
        config = load_config(path)
        if isinstance(config, PipelineConfig):
            require_finite(config)
            json.dumps(to_json(config), allow_nan=False)


# ------------------------------------------------------------------ the helpers and config.json

def test_require_range_bounds_and_types():
    require_range(0, "x", ge=0)
    require_range(1, "x", gt=0, le=1)
    for value, bounds, message in (
        (0, {"gt": 0}, "must be > 0, got 0"), (1.0, {"gt": 0, "lt": 1}, "must be in (0, 1), got 1.0"),
        (-1, {"ge": 0, "le": 1}, "must be in [0, 1], got -1"), (2, {"le": 1}, "must be <= 1, got 2"),
        (math.nan, {"ge": 0}, "must be a finite number >= 0, got nan"), ("1e-3", {"gt": 0}, "must be a finite number > 0, got '1e-3'"),
        (True, {"ge": 0}, "must be a finite number >= 0, got True"),
    ):
        with pytest.raises(ValueError) as info:
            require_range(value, "sec.x", **bounds)
        assert str(info.value) == f"config field `sec.x`: {message}"


def test_to_json_is_strict_and_names_a_non_finite_field(tiny):
    saved = to_json(tiny)
    assert json.loads(json.dumps(saved, allow_nan=False)) == saved
    ppo, broken = copy.copy(tiny.ppo), copy.copy(tiny)
    object.__setattr__(ppo, "learning_rate", math.nan)  # what validation keeps out, smuggled past it
    object.__setattr__(broken, "ppo", ppo)
    with pytest.raises(ValueError, match=r"^config field `ppo\.learning_rate`: must be a finite number, got nan"):
        to_json(broken)


# ------------------------------------------------------------------ seeds

def test_seeds_outside_the_range_keys_distinguish_are_refused(tiny):
    assert NUM_SEEDS == 2**32
    if not jax.config.jax_enable_x64:  # why: the root key keeps a seed's low 32 bits
        np.testing.assert_array_equal(jax.random.key_data(jax.random.key(NUM_SEEDS)),
                                      jax.random.key_data(jax.random.key(0)))
    assert not np.array_equal(jax.random.key_data(jax.random.key(NUM_SEEDS - 1)), jax.random.key_data(jax.random.key(0)))
    assert apply_overrides(tiny, [f"seed={NUM_SEEDS - 1}"]).seed == NUM_SEEDS - 1
    for seed in (NUM_SEEDS, NUM_SEEDS + 1, -1, 2**64):
        assert refused(tiny, f"seed={seed}").startswith("config field `seed`: must be in [0, 4294967296)")
    assert stream_seed(NUM_SEEDS - 1, "eval") != stream_seed(0, "eval")
    with pytest.raises(ValueError, match="seed"):
        stream_seed(NUM_SEEDS, "eval")


# ------------------------------------------------------------------ the mesh, once the device count is known

@pytest.mark.parametrize("mesh, devices, field", [
    (MeshConfig(data=3, fsdp=1, tensor=1), 8, "mesh.data"),
    (MeshConfig(data=-1, fsdp=1, tensor=3), 8, "mesh.tensor"),
    (MeshConfig(data=8, fsdp=2, tensor=1), 8, "mesh.fsdp"),  # 8 divides, 8 × 2 does not
    (MeshConfig(data=2, fsdp=2, tensor=1), 8, "mesh.data"),  # divides, but 4 of 8 devices: set one axis to -1
    (MeshConfig(data=-1, fsdp=2, tensor=2), 2, "mesh.tensor"),
])
def test_a_mesh_that_does_not_fit_the_devices_names_its_axis(mesh, devices, field):
    with pytest.raises(ValueError, match=rf"^config field `{field}`: axis sizes"):
        mesh.shape(devices)


def test_fitting_meshes_resolve():
    assert MeshConfig(data=-1, fsdp=2, tensor=1).shape(8) == (4, 2, 1)
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=1, tensor=-1).shape(1) == (1, 1, 1)


def test_a_bad_mesh_stops_the_run_before_anything_is_written(tiny, tmp_path):
    from jaxppo.pipeline.context import open_run

    config = dataclasses.replace(tiny, mesh=MeshConfig(data=3, fsdp=1, tensor=1))  # the suite has 8 CPU devices
    with pytest.raises(ValueError, match=r"^config field `mesh\.data`"), open_run(config, tmp_path / "run"):
        pass
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a subprocess (about 2 s: it stops at the config, before JAX starts)
def test_the_command_line_fails_fast_on_an_invalid_set(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config", TINY, "--run-dir", str(run_dir),
         "--set", "ppo.learning_rate=inf"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "config field `ppo.learning_rate`: must be a finite number" in result.stderr
    assert not run_dir.exists()
