"""jaxppo: functional RLHF (SFT, reward modelling, PPO) for language models in JAX/Flax.

The RL math is pure functions of arrays, importable on its own:

* :mod:`jaxppo.advantages` — ``gae``, ``whiten``, ``kl_shaped_rewards``, ``explained_variance``,
  and ``ESTIMATORS``, the advantage estimators a run chooses by ``ppo.estimator``
* :mod:`jaxppo.losses` — ``policy_loss``, ``value_loss``, ``kl_penalty``, ``entropy``,
  ``sft_loss``, ``bradley_terry_loss``, ``plackett_luce_loss``, and ``POLICY_LOSSES``
  (chosen by ``ppo.policy_loss``)
* :mod:`jaxppo.kl_control` — fixed / adaptive KL coefficient as a pure state update

The stages (SFT, reward model, PPO) are functions in :mod:`jaxppo.pipeline`;
``experiments/run.py`` composes them.
"""

__version__ = "0.1.0"
