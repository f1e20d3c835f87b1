"""The end of a run: summary.json, the exported actor and the plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path

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


def export_actor(ctx: RunContext, final_params: dict) -> dict:
    """Writes the final actor as a Hugging Face directory ``actor_hf/``; with LoRA also its adapters
    as a PEFT adapter ``actor_adapter/`` and, unless the base is an HF directory the user gave
    (``pretrained`` with ``sft.steps=0``), that base as ``base_hf/``: ``peft`` puts
    ``actor_adapter/`` on ``base_hf/`` and gets ``actor_hf/``'s model. Returns the paths written. A
    collective (the params are gathered): every process calls it; only process 0 writes."""
    from jaxppo.lora import merge
    from jaxppo.quant import dequantize_params
    from jaxppo.weights.hf import save_pretrained
    from jaxppo.weights.peft import save_adapter

    c, run_dir, tokenizer = ctx.config, ctx.logger.run_dir, ctx.task.tokenizer
    host_params = jax.tree.map(to_host, final_params)  # a collective: every process takes part
    if jax.process_index() != 0:
        return {}
    if "lora" not in host_params:
        return {"actor_hf": str(save_pretrained(run_dir / "actor_hf", c.model, host_params, tokenizer))}
    host_params = dequantize_params(c.model, host_params)  # QLoRA: the float base the adapters were trained on
    base = {k: v for k, v in host_params.items() if k != "lora"}
    user_base = bool(c.pretrained) and c.sft.steps == 0 and Path(c.pretrained).is_dir()
    base_dir = Path(c.pretrained) if user_base else save_pretrained(run_dir / "base_hf", c.model, base, tokenizer)
    paths = {"actor_hf": str(save_pretrained(run_dir / "actor_hf", c.model, merge(c.model, host_params), tokenizer)),
             "actor_adapter": str(save_adapter(run_dir / "actor_adapter", c.model, host_params["lora"],
                                               alpha=c.lora.alpha, rslora=c.lora.rslora, base_model=str(base_dir)))}
    return {**paths, "base_hf": str(base_dir)}


def write_summary(ctx: RunContext, *, sft_eval: dict, final_eval: dict, reward_result: dict, final_params: dict,
                  start_time: float) -> dict:
    """Logs both evaluations, exports the actor (``export_hf``), draws the plots and writes
    ``summary.json``; returns its content. A collective (the export gathers the params): every
    process calls it; only process 0 writes."""
    c, logger = ctx.config, ctx.logger
    dpo = c.method == "dpo"
    for name, result in (("sft", sft_eval), ("final", final_eval)):
        logger.log("eval", 0 if name == "sft" else c.dpo.steps if dpo else c.ppo.iterations, result)
    gap = c.task.optimal_gold - sft_eval["gold_reward"]
    summary = {
        "sft_gold_reward": sft_eval["gold_reward"],
        "sft_proxy_reward": sft_eval.get("proxy_reward"),  # None without a reward model (reward functions)
        "final_gold_reward": final_eval["gold_reward"],
        "final_proxy_reward": final_eval.get("proxy_reward"),
        "optimal_gold_reward": c.task.optimal_gold,
        "gap_closed": (final_eval["gold_reward"] - sft_eval["gold_reward"]) / max(gap, 1e-9),
        "final_kl_to_sft": final_eval.get("kl_to_sft"),  # KL(final ‖ SFT) per response, on its own samples
        "method": c.method,
        # what trained the policy after SFT: the RL estimator, or the DPO-family loss
        "estimator": c.dpo.loss + ("-online" if c.dpo.online_every else "") if dpo else c.ppo.estimator,
        "reward": "preference_pairs" if dpo else list(c.reward_functions) or "reward_model",
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
        summary.update(export_actor(ctx, final_params))
    if dpo:
        _plot(logger, "dpo", ["loss", "accuracy", "margin"], filename="dpo.png",
              title=f"{c.dpo.loss}: training loss, preference accuracy and implicit reward margin")
    else:
        _plot(logger, "ppo", ["gold_reward", "proxy_reward", "kl"], filename="ppo.png",
              title=f"RL ({c.ppo.estimator}): gold vs proxy reward and KL to the reference")
    if c.sft.steps:
        _plot(logger, "sft", ["loss"], filename="sft.png", title="SFT: NLL of demonstration tokens")
    if c.trains_reward_model:
        _plot(logger, "reward_model", ["loss", "accuracy"], filename="reward_model.png",
              title="Reward model: training loss and pairwise accuracy")
    summary["wall_seconds"] = time.perf_counter() - start_time
    logger.write_json("summary.json", summary)
    return summary
