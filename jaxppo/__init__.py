"""jaxppo: functional RLHF (SFT, reward modelling, PPO) for language models in JAX/Flax.

The RL math is pure functions of arrays, importable on its own:

* :mod:`jaxppo.advantages` — ``gae``, ``whiten``, ``kl_shaped_rewards``, ``explained_variance``
* :mod:`jaxppo.losses` — ``policy_loss``, ``value_loss``, ``kl_penalty``, ``entropy``,
  ``sft_loss``, ``bradley_terry_loss``, ``plackett_luce_loss``
* :mod:`jaxppo.kl_control` — fixed / adaptive KL coefficient as a pure state update
"""

__version__ = "0.1.0"
