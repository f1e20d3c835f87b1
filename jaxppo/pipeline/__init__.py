"""The pipeline's stages, each a function of a frozen :class:`RunContext` and the previous stage's
output; ``experiments/run.py`` composes them:

* :func:`open_run` (context.py): the run directory, config resolution, resume bookkeeping;
* :func:`sft_stage` (sft.py) → SFT params;
* :func:`reward_model_stage` (reward.py) → :class:`RewardModel` (and its online refreshes);
* :func:`ppo_stage` (ppo.py) → final actor params (``method="rl"``), or
  :func:`dpo_stage` (dpo.py) → the policy trained by the DPO family (``method="dpo"``);
* :func:`evaluate` (context.py), :func:`write_summary` (report.py).
"""

from jaxppo.pipeline.context import RunContext, evaluate, open_run
from jaxppo.pipeline.dpo import dpo_stage
from jaxppo.pipeline.ppo import ppo_stage
from jaxppo.pipeline.report import write_summary
from jaxppo.pipeline.reward import RewardModel, reward_model_stage
from jaxppo.pipeline.sft import sft_stage

__all__ = ["RewardModel", "RunContext", "dpo_stage", "evaluate", "open_run", "ppo_stage", "reward_model_stage", "sft_stage",
           "write_summary"]
