"""Config of the three-stage pipeline (SFT → reward model → PPO): frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses

from jaxppo.config import MAX_LEARNING_RATE, require, require_finite, require_range
from jaxppo.losses import OBJECTIVES, PREFERENCE_LOSSES
from jaxppo.models.config import ModelConfig
from jaxppo.ppo_config import PPOConfig
from jaxppo.rng import NUM_SEEDS
from jaxppo.sharding import MeshConfig
from jaxppo.tasks import TextTaskConfig
from jaxppo.toy_task import ToyTaskConfig
from jaxppo.addition_task import AdditionTaskConfig
from jaxppo.quant import KINDS as QUANTIZE_BASE


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations (masked NLL of response tokens)."""

    steps: int = 600  # 0: no SFT (a pretrained instruct model is the SFT policy)
    batch_size: int = 64  # demonstrations per step
    learning_rate: float = 3e-3  # AdamW peak learning rate, in (0, 1]
    warmup_steps: int = 50  # linear warm-up from 0; 0: none
    micro_batches: int = 1  # gradient accumulation: batch_size / micro_batches rows per forward pass

    def __post_init__(self):
        require(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        for name in ("batch_size", "micro_batches"):
            require(getattr(self, name) >= 1, f"sft.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.batch_size % self.micro_batches == 0, "sft.micro_batches",
                f"batch_size={self.batch_size} must be divisible by micro_batches={self.micro_batches}")
        require_range(self.learning_rate, "sft.learning_rate", gt=0, le=MAX_LEARNING_RATE)
        require_range(self.warmup_steps, "sft.warmup_steps", ge=0)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (jaxppo.lora) instead of full fine-tuning, for every trained role on one frozen base.

    SFT trains adapters on the pretrained (or initial) model and merges them at its end: the SFT
    policy is the base of the later stages. The reward model is that base + its adapters + its head;
    in PPO the actor is base + adapters, a separate critic base + its adapters + value head, and the
    reference is the base without adapters (in DPO too: the policy is base + adapters). Only adapters and heads have optimizer state and
    checkpoints; the base exists once in memory (optionally quantised: ``quantize_base``)."""

    rank: int = 0  # r of every adapter; 0: off (full fine-tuning)
    alpha: float = 16.0  # the output scale is α / r (α / √r with rslora)
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # projections with adapters
    rslora: bool = False  # rank-stabilised scale α / √r
    # dropout on the adapters' inputs (PEFT's lora_dropout) in SFT, reward-model and DPO training steps; never in
    # RL, whose ratio π_θ / π_old needs a deterministic policy, nor in evaluation and sampling
    dropout: float = 0.0
    # the frozen base of the reward-model, PPO and DPO stages stored as "none" (the model's dtype), "int8" (per channel)
    # or "nf4" (QLoRA), dequantised layer by layer in the forward pass (jaxppo.quant)
    quantize_base: str = "none"

    def __post_init__(self):
        from jaxppo.lora import TARGETS

        require(self.rank >= 0, "lora.rank", f"must be >= 0, got {self.rank}")
        require_range(self.alpha, "lora.alpha", gt=0)
        require(not isinstance(self.targets, str) and len(self.targets) > 0 and set(self.targets) <= set(TARGETS),
                "lora.targets", f"must be a non-empty tuple of names from {TARGETS}, got {self.targets!r}")
        require(self.quantize_base in QUANTIZE_BASE, "lora.quantize_base",
                f"{self.quantize_base!r} not in {QUANTIZE_BASE}")
        require(self.quantize_base == "none" or self.rank > 0, "lora.quantize_base",
                "a quantised base is frozen: it needs LoRA adapters to train (lora.rank > 0)")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.dropout == 0.0 or self.rank > 0, "lora.dropout", "drops the adapters' inputs: it needs "
                "LoRA adapters (lora.rank > 0)")

    @property
    def scale(self) -> float:
        from jaxppo.lora import scaling

        return scaling(rank=self.rank, alpha=self.alpha, rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Reward model: trunk of the SFT model + scalar head, trained on preference pairs or ranked lists."""

    objective: str = "bradley_terry"  # "bradley_terry" (pairs) or "plackett_luce" (ranked lists)
    list_size: int = 4  # K responses per prompt for Plackett–Luce
    num_prompts: int = 8192  # preference data: prompts with sampled responses from the SFT policy
    eval_fraction: float = 0.1  # share of the preference data held out for eval accuracy
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # pairs (or lists) per step
    learning_rate: float = 1e-3  # AdamW peak learning rate, in (0, 1]
    warmup_steps: int = 50  # linear warm-up from 0; 0: none
    micro_batches: int = 1  # gradient accumulation
    use_margin: bool = False  # Bradley–Terry with the pair's margin (Llama 2)
    drop_ties: bool = True  # pairs whose responses have equal gold reward are not labelled
    normalize: bool = True  # gain/bias so SFT samples score mean 0, std 1
    init: str = "sft"  # trunk: "sft" (the SFT model's, as InstructGPT) or "scratch" (fresh, same architecture)
    train_trunk: bool = True  # False: only the scalar head trains (a linear probe on the trunk; ~forward-pass cost)
    pooling: str = "last"  # score from the head at the last token ("last") or its mean over the response ("mean")
    # Iterated online RLHF (Bai et al. 2022 §4.5): every `online_every` PPO iterations, label fresh samples of
    # the current policy on `online_prompts` prompts, add them to the data, train `online_steps` more steps.
    online_every: int = 0  # 0: off (the reward model stays as trained on SFT samples)
    online_prompts: int = 2048  # prompts (pairs or lists) labelled per refresh
    online_steps: int = 300  # reward-model steps per refresh, on all the data so far

    def __post_init__(self):
        require(self.objective in OBJECTIVES, "reward_model.objective", f"{self.objective!r} not in {OBJECTIVES}")
        require(self.list_size >= 2, "reward_model.list_size", f"must be >= 2, got {self.list_size}")
        require_range(self.eval_fraction, "reward_model.eval_fraction", gt=0, lt=1)
        require_range(self.learning_rate, "reward_model.learning_rate", gt=0, le=MAX_LEARNING_RATE)
        require_range(self.warmup_steps, "reward_model.warmup_steps", ge=0)
        for name in ("num_prompts", "steps", "batch_size", "micro_batches", "online_prompts", "online_steps"):
            require(getattr(self, name) >= 1, f"reward_model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.pooling in ("last", "mean"), "reward_model.pooling", f"{self.pooling!r} not in ('last', 'mean')")
        require(self.init in ("sft", "scratch"), "reward_model.init", f"{self.init!r} not in ('sft', 'scratch')")
        require(self.train_trunk or self.init == "sft", "reward_model.train_trunk",
                "a frozen trunk must come from the SFT model (init='sft'); a scratch trunk has to train")
        require(self.online_every >= 0, "reward_model.online_every", f"must be >= 0, got {self.online_every}")


METHODS = ("rl", "dpo")  # after SFT: a reward model and RL (PPO or a critic-free estimator), or the DPO family
ONLINE_LABELS = ("gold", "reward_model")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The DPO family (``method="dpo"``): the SFT policy trained directly on preference pairs, the SFT policy
    as the frozen reference (with LoRA: the base without adapters).

    The pairs are the reward model's preference data (``reward_model.num_prompts``, ``eval_fraction`` and
    ``drop_ties``: the same labelled samples of the SFT policy an RL run's reward model trains on, or the
    task's preferences file). Online DPO (Guo et al. 2024): every ``online_every`` steps, two responses of
    the current policy to each of ``online_prompts`` fresh prompts are labelled (by the hidden gold reward
    with the task's Bradley–Terry noise, an *oracle* setting, or by a reward model trained on the offline
    pairs) and the following steps train on those new pairs."""

    loss: str = "dpo"  # one of jaxppo.losses.PREFERENCE_LOSSES: dpo, cdpo, ipo, simpo, orpo
    beta: float = 0.1  # DPO/cDPO: β of the implicit reward β log π/π_ref; SimPO: β of the length-normalised reward
    label_smoothing: float = 0.1  # cDPO: ε, the probability that a label is flipped, in [0, 0.5] (0: DPO)
    tau: float = 0.1  # IPO: τ, the target margin is 1/(2τ) (length-averaged log-ratios)
    gamma: float = 0.5  # SimPO: the target reward margin γ
    lam: float = 0.1  # ORPO: λ, the weight of the odds-ratio term beside the chosen responses' NLL
    steps: int = 300  # optimizer steps
    batch_size: int = 64  # pairs per step
    learning_rate: float = 1e-4  # AdamW peak learning rate, in (0, 1]
    warmup_steps: int = 10  # linear warm-up from 0; 0: none
    micro_batches: int = 1  # gradient accumulation: batch_size / micro_batches pairs per forward pass
    online_every: int = 0  # online DPO: steps between labelled batches of the current policy's samples; 0: off
    online_prompts: int = 512  # prompts (pairs) sampled and labelled per online round
    online_label: str = "gold"  # who labels online pairs: "gold" (the hidden gold reward: oracle) or "reward_model"

    def __post_init__(self):
        require(self.loss in PREFERENCE_LOSSES, "dpo.loss", f"{self.loss!r} not in {tuple(PREFERENCE_LOSSES)}")
        for name in ("beta", "tau"):
            require_range(getattr(self, name), f"dpo.{name}", gt=0)
        require_range(self.label_smoothing, "dpo.label_smoothing", ge=0, le=0.5)
        require_range(self.lam, "dpo.lam", ge=0)
        require_range(self.learning_rate, "dpo.learning_rate", gt=0, le=MAX_LEARNING_RATE)
        require_range(self.warmup_steps, "dpo.warmup_steps", ge=0)
        for name in ("steps", "batch_size", "micro_batches", "online_prompts"):
            require(getattr(self, name) >= 1, f"dpo.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.batch_size % self.micro_batches == 0, "dpo.micro_batches",
                f"batch_size={self.batch_size} must be divisible by micro_batches={self.micro_batches}")
        require(self.online_every >= 0, "dpo.online_every", f"must be >= 0, got {self.online_every}")
        require(self.online_label in ONLINE_LABELS, "dpo.online_label", f"{self.online_label!r} not in {ONLINE_LABELS}")
        require(not self.online_every or self.online_prompts >= self.batch_size, "dpo.online_prompts",
                f"an online round's pairs fill the batches of its steps: needs >= batch_size={self.batch_size}, "
                f"got {self.online_prompts}")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads the reference's log-probs (SimPO and ORPO are reference-free)."""
        return "ref_chosen" in PREFERENCE_LOSSES[self.loss].inputs


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``run_dir/checkpoints``; re-running with the same ``--run-dir`` resumes."""

    enabled: bool = True  # save and resume
    every_steps: int = 200  # SFT / reward-model steps between saves (and always at a stage's end)
    every_iterations: int = 10  # PPO iterations between saves (and always at the end)
    keep: int = 2  # newest checkpoints kept per stage

    def __post_init__(self):
        for name in ("every_steps", "every_iterations", "keep"):
            require(getattr(self, name) >= 1, f"checkpoint.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """SFT → reward model → PPO: on the embedded toy task, or on a pretrained model with a text task."""

    model: ModelConfig  # architecture and dtypes (for a pretrained model: its own, from read_model_config)
    # where prompts, data and the gold reward come from: the embedded RLHF task, the embedded verifiable
    # (addition) task, or a text task of local files
    task: ToyTaskConfig | AdditionTaskConfig | TextTaskConfig = ToyTaskConfig()
    sft: SFTConfig = SFTConfig()
    lora: LoraConfig = LoraConfig()  # LoRA adapters on one frozen base for every trained role (rank 0: off)
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PPOConfig = PPOConfig()
    # after SFT: "rl" (a reward model, then PPO or a critic-free estimator) or "dpo" (the DPO family on the
    # preference pairs: `dpo`; no reward model unless online DPO labels with one)
    method: str = "rl"
    dpo: DPOConfig = DPOConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=1, tensor=1)  # device mesh: data × fsdp × tensor (-1: the rest)
    pretrained: str = ""  # HF directory, .gguf file or "smollm2"; "" = random init
    seed: int = 0  # in [0, 2**32) (the seeds jax.random.key tells apart); every random draw derives from it by fold_in
    log_every: int = 1  # PPO iterations between metric rows
    eval_batch_size: int = 512  # sampler batch for evaluation and preference data
    num_samples: int = 8  # responses written to samples_{sft,final}.json before and after PPO
    export_hf: bool = True  # write the final actor as a Hugging Face directory (run_dir/actor_hf)
    wandb_project: str = ""  # also log to Weights & Biases (needs `pip install wandb`); "" = off
    # score responses with the task's reward functions (jaxppo.rewards; e.g. a verifier) instead of a learned reward
    # model: then no reward model is trained. (): the reward model
    reward_functions: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] = ()  # one weight per reward function; (): all 1

    def __post_init__(self):
        require_finite(self)  # every float of every section, the task's included
        require(self.method in METHODS, "method", f"{self.method!r} not in {METHODS}")
        text = isinstance(self.task, TextTaskConfig)
        if self.method == "dpo":
            require(not self.reward_functions, "reward_functions", "DPO learns from preference pairs; reward "
                    "functions are for method='rl' (set it to ())")
            require(self.reward_model.objective == "bradley_terry", "reward_model.objective",
                    "DPO trains on pairs: the preference data must be 'bradley_terry' pairs")
            require(self.reward_model.online_every == 0, "reward_model.online_every",
                    "refreshes the reward model between PPO iterations; with DPO use dpo.online_every")
            require(not (self.dpo.online_every and self.dpo.online_label == "gold" and text
                         and (self.task.preferences or self.task.rankings)), "dpo.online_label",
                    "'gold' labels online pairs with the task's gold reward; with a preferences file there is "
                    "none (use 'reward_model')")
        require_range(self.seed, "seed", ge=0, lt=NUM_SEEDS)  # seed + 2**32 would give seed's keys
        # Bradley–Terry labels P(a ≻ b) = σ(β (gold_a − gold_b)): β < 0 prefers the worse response (0: coin flips)
        require_range(self.task.preference_beta, "task.preference_beta", ge=0)
        for name in self.reward_functions:
            require(name in self.task.reward_function_names, "reward_functions",
                    f"{name!r} is not a reward function of the task; it has {self.task.reward_function_names}")
        require(not self.reward_weights or len(self.reward_weights) == len(self.reward_functions), "reward_weights",
                f"{len(self.reward_weights)} weights for {len(self.reward_functions)} reward functions")
        if self.reward_functions:
            require(self.reward_model.online_every == 0, "reward_model.online_every",
                    "online refreshes retrain the reward model; reward functions replace it (set it to 0)")
            require(self.ppo.critic_role != "separate" or self.ppo.critic_init == "sft", "ppo.critic_init",
                    "'reward_model' initialises the critic from the reward model; with reward functions there is "
                    "none (use 'sft')")
        if self.lora.rank:  # every role sits on the one frozen base (the SFT policy)
            require(self.reward_model.init == "sft" or not self.trains_reward_model, "reward_model.init",
                    "with LoRA the reward model is adapters + a head on the SFT model (init='sft'); "
                    "a scratch trunk would be a second base")
            require(self.ppo.frozen_dtype is None, "ppo.frozen_dtype",
                    "with LoRA the frozen roles share the trained roles' base; shrink it with "
                    "lora.quantize_base instead")
        require(not text or bool(self.pretrained), "pretrained", "a text task needs a pretrained model (its tokenizer)")
        require(bool(self.pretrained) or self.sft.steps >= 1, "sft.steps",
                "a randomly initialised model needs SFT (steps >= 1)")
        if not text:
            require(self.model.vocab_size == self.task.vocab_size, "model.vocab_size",
                    f"must equal the task's vocabulary size {self.task.vocab_size}, got {self.model.vocab_size}")
        else:
            require(self.sft.steps == 0 or bool(self.task.demonstrations), "task.demonstrations",
                    "SFT steps > 0 need a demonstrations file")
            require(not self.reward_model.online_every or not (self.task.preferences or self.task.rankings),
                    "reward_model.online_every", "online refreshes label policy samples with the task's gold "
                    "reward; with a preferences/rankings file there is none (set it to 0)")
        require(self.ppo.max_new_tokens == self.task.max_response_tokens, "ppo.max_new_tokens",
                f"must equal task.max_response_tokens={self.task.max_response_tokens}")
        prompt_len = self.task.max_prompt_tokens if text else self.task.prompt_length
        require(prompt_len + self.task.max_response_tokens <= self.model.max_position_embeddings,
                "task.max_response_tokens", f"prompt ({prompt_len}) + response ({self.task.max_response_tokens}) "
                f"tokens exceed the model's context of {self.model.max_position_embeddings}")
        vocab = self.model.vocab_size  # a stop token outside it never ends a response; a pad token is embedded
        for token in self.ppo.stop_token_ids:
            require(token < vocab, "ppo.stop_token_ids", f"token id {token} is not in the model's vocabulary of {vocab}")
        require(self.ppo.pad_token_id < vocab, "ppo.pad_token_id",
                f"token id {self.ppo.pad_token_id} is not in the model's vocabulary of {vocab}")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.num_samples >= 0, "num_samples", "must be >= 0")
        require(self.ppo.ptx_coef == 0 or not text or bool(self.task.demonstrations), "ppo.ptx_coef",
                "PPO-ptx mixes in an SFT loss on demonstrations; the task has none (set task.demonstrations "
                "or ppo.ptx_coef=0)")

    @property
    def trains_reward_model(self) -> bool:
        """Whether the run trains a reward model: RL without reward functions, or online DPO labelled by one."""
        if self.method == "dpo":
            return self.dpo.online_every > 0 and self.dpo.online_label == "reward_model"
        return not self.reward_functions

    def resolved(self, *, stop_token_ids: tuple[int, ...], pad_token_id: int) -> PipelineConfig:
        """The config as it runs, resolved once before a run starts and saved so: the task's stop and
        pad tokens in ``ppo`` when ``ppo.stop_token_ids`` is empty (a response ends at the task's EOS,
        in PPO as in evaluation and preference data), and the defaults that depend on other fields
        made explicit: the KL estimator, advantage whitening and whether a reference is built."""
        ppo = dataclasses.replace(self.ppo, kl_estimator=self.ppo.kl_penalty_estimator,
                                  whiten_advantages=self.ppo.whiten, reference_model=self.ppo.builds_reference)
        if not ppo.stop_token_ids:
            ppo = dataclasses.replace(ppo, stop_token_ids=tuple(stop_token_ids), pad_token_id=int(pad_token_id))
        model = self.model
        if self.lora.rank:
            model = dataclasses.replace(model, lora_scale=self.lora.scale, lora_dropout=self.lora.dropout)
        return dataclasses.replace(self, ppo=ppo, model=model)
