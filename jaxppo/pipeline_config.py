"""Config of the three-stage pipeline (SFT → reward model → PPO): frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses

from jaxppo.config import require
from jaxppo.models.config import ModelConfig
from jaxppo.ppo_config import PPOConfig
from jaxppo.reward_model import OBJECTIVES
from jaxppo.toy_task import ToyTaskConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    micro_batches: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batches"):
            require(getattr(self, name) >= 1, f"sft.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.batch_size % self.micro_batches == 0, "sft.micro_batches",
                f"batch_size={self.batch_size} must be divisible by micro_batches={self.micro_batches}")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    objective: str = "bradley_terry"  # or "plackett_luce"
    list_size: int = 4  # K responses per prompt for Plackett–Luce
    num_prompts: int = 8192  # preference data: prompts with sampled responses from the SFT policy
    eval_fraction: float = 0.1
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    micro_batches: int = 1
    use_margin: bool = False
    drop_ties: bool = True  # pairs whose responses have equal gold reward are not labelled
    normalize: bool = True  # gain/bias so SFT samples score mean 0, std 1

    def __post_init__(self):
        require(self.objective in OBJECTIVES, "reward_model.objective", f"{self.objective!r} not in {OBJECTIVES}")
        require(self.list_size >= 2, "reward_model.list_size", f"must be >= 2, got {self.list_size}")
        require(0 < self.eval_fraction < 1, "reward_model.eval_fraction", "must be in (0, 1)")
        for name in ("num_prompts", "steps", "batch_size", "micro_batches"):
            require(getattr(self, name) >= 1, f"reward_model.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """SFT → reward model → PPO on the embedded toy task with a hidden gold reward."""

    model: ModelConfig
    task: ToyTaskConfig = ToyTaskConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PPOConfig = PPOConfig()
    seed: int = 0
    log_every: int = 1

    def __post_init__(self):
        require(self.model.vocab_size == self.task.vocab_size, "model.vocab_size",
                f"must equal the task's vocabulary size {self.task.vocab_size}, got {self.model.vocab_size}")
        require(self.ppo.max_new_tokens == self.task.max_response_tokens, "ppo.max_new_tokens",
                f"must equal task.max_response_tokens={self.task.max_response_tokens}")
        require(self.log_every >= 1, "log_every", "must be >= 1")
