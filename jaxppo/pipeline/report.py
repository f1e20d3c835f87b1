"""The end of a run: summary.json, the exported actor and the plots."""

from __future__ import annotations

import logging
import time

import jax

from jaxppo.pipeline.context import RunContext
from jaxppo.sharding import to_host
from jaxppo.tasks import TextTask

_log = logging.getLogger(__name__)


def _plot(logger, stage: str, keys: list[str], **kwargs) -> None:
    """A plot never fails a run: a figure that cannot be drawn (no rows of the stage after a resume
    that lost ``metrics.jsonl``, a matplotlib error) is a one-line warning; the metrics stay in
    ``metrics.jsonl`` and TensorBoard."""
    try:
        logger.plot(stage, keys, **kwargs)
    except Exception as e:  # noqa: BLE001  (any plotting failure)
        _log.warning(f"{kwargs['filename']}: not drawn ({type(e).__name__}: {e})")


def write_summary(ctx: RunContext, *, sft_eval: dict, final_eval: dict, reward_result: dict, final_params: dict,
                  start_time: float) -> dict:
    """Logs both evaluations, exports the actor (``export_hf``), draws the plots and writes
    ``summary.json``; returns its content. A collective (the export gathers the params): every
    process calls it; only process 0 writes."""
    c, logger = ctx.config, ctx.logger
    for name, result in (("sft", sft_eval), ("final", final_eval)):
        logger.log("eval", 0 if name == "sft" else c.ppo.iterations, result)
    gap = c.task.optimal_gold - sft_eval["gold_reward"]
    summary = {
        "sft_gold_reward": sft_eval["gold_reward"],
        "sft_proxy_reward": sft_eval.get("proxy_reward"),  # None without a reward model (reward functions)
        "final_gold_reward": final_eval["gold_reward"],
        "final_proxy_reward": final_eval.get("proxy_reward"),
        "optimal_gold_reward": c.task.optimal_gold,
        "gap_closed": (final_eval["gold_reward"] - sft_eval["gold_reward"]) / max(gap, 1e-9),
        "estimator": c.ppo.estimator,
        "reward": list(c.reward_functions) or "reward_model",
        "reward_model": reward_result,
        "num_processes": jax.process_count(),
        "mesh": dict(ctx.mesh.shape),
    }
    if ctx.task.gold_is_accuracy:  # held-out accuracy: sampled at PPO's temperature, and greedy
        for name in ("accuracy", "greedy_accuracy"):
            summary[f"sft_{name}"], summary[f"final_{name}"] = sft_eval[name], final_eval[name]
    if isinstance(ctx.task, TextTask):
        summary["prompts_truncated"] = ctx.task.num_truncated_prompts
    if c.export_hf:
        from jaxppo.weights.hf import save_pretrained

        host_params = jax.tree.map(to_host, final_params)  # a collective: every process takes part
        if jax.process_index() == 0:
            summary["actor_hf"] = str(save_pretrained(logger.run_dir / "actor_hf", c.model, host_params,
                                                      ctx.task.tokenizer))
    _plot(logger, "ppo", ["gold_reward", "proxy_reward", "kl"], filename="ppo.png",
          title=f"RL ({c.ppo.estimator}): gold vs proxy reward and KL to the reference")
    if c.sft.steps:
        _plot(logger, "sft", ["loss"], filename="sft.png", title="SFT: NLL of demonstration tokens")
    if not c.reward_functions:
        _plot(logger, "reward_model", ["loss", "accuracy"], filename="reward_model.png",
              title="Reward model: training loss and pairwise accuracy")
    summary["wall_seconds"] = time.perf_counter() - start_time
    logger.write_json("summary.json", summary)
    return summary
