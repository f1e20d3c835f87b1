"""Main job: ``python -m experiments.run [--config configs/<x>.py] [--set KEY=VALUE ...] [--run-dir DIR]``.

Kept thin on purpose: parse the command line, load the config, call the library. ``--help`` (after
``--config``) lists every field of that config with its doc. Re-running with the same ``--run-dir``
resumes from the run's last complete checkpoint.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from jaxppo.cli import parse_args
from jaxppo.errors import InputError
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.tabular_ppo import TabularPPOConfig, train


def run_pipeline(config, run_dir: str | Path) -> dict:
    """SFT → reward model → PPO (``method="rl"``) or SFT → DPO (``method="dpo"``) in ``run_dir`` (resumed
    when it holds checkpoints of the same config); returns ``summary.json``'s content. Every process of a
    multi-process run calls it."""
    from jaxppo.pipeline import dpo_stage, evaluate, open_run, ppo_stage, reward_model_stage, sft_stage, write_summary

    start = time.perf_counter()
    with open_run(config, run_dir) as (ctx, pretrained):
        sft_params = sft_stage(ctx, pretrained)
        # RL without reward functions (a verifier replaces it), or online DPO labelled by a reward model
        reward = reward_model_stage(ctx, sft_params) if config.trains_reward_model else None
        sft_eval = evaluate(ctx, sft_params, reward and reward.params, samples_file="samples_sft.json")
        if config.method == "dpo":
            final_params, final_reward = dpo_stage(ctx, sft_params, reward), reward
        else:
            final_params, final_reward = ppo_stage(ctx, sft_params, reward)
        # proxy: the final reward model (every version is normalised on the same SFT samples)
        final_eval = evaluate(ctx, final_params, final_reward and final_reward.params, i=1,
                              samples_file="samples_final.json", reference=sft_params)
        return write_summary(ctx, sft_eval=sft_eval, final_eval=final_eval, reward_result=reward and reward.result,
                             final_params=final_params, start_time=start)


def main(argv=None) -> None:
    config, args = parse_args(argv, description=__doc__)
    try:
        _main(config, args)
    except (InputError, PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError) as e:  # bad input, an unusable run directory: one line (a full disk keeps its traceback)
        if args.debug:
            raise
        raise SystemExit(f"error: {e}") from None


def _main(config, args) -> None:
    if isinstance(config, TabularPPOConfig):
        history = train(config)
        print(f"gold score {history[0]['score']:.3f} -> {history[-1]['score']:.3f} (optimum 1.0)")
        return
    if not isinstance(config, PipelineConfig):
        raise SystemExit(f"{args.config}: get_config() returned {type(config).__name__}, which experiments.run cannot run")
    import jax

    from jaxppo.sharding import initialize_distributed, reserve_cpu_collective_threads

    reserve_cpu_collective_threads()  # before JAX starts its CPU backend
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # before any computation
    if jax.process_count() > 1 and not args.run_dir:
        raise SystemExit("a multi-process run needs --run-dir: every process must write to the same directory")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{stamp}")
    main_process = jax.process_index() == 0
    if main_process:
        if config.method == "dpo":
            stages = f"{config.dpo.loss.upper()}" + (" (online)" if config.dpo.online_every else "")
        else:
            reward = "reward functions " + "+".join(config.reward_functions) if config.reward_functions else "reward model"
            stages = f"{reward} -> " + ("PPO" if config.ppo.estimator == "gae" else config.ppo.estimator.upper())
        print(f"jaxppo: SFT -> {stages} ({args.config}) on {jax.process_count()} process(es), "
              f"{jax.device_count()} device(s); writing {run_dir}")
    summary = run_pipeline(config, run_dir)
    if not main_process:
        return
    print(json.dumps(summary, indent=2))
    print(f"gold reward: SFT {summary['sft_gold_reward']:.3f} -> {summary['estimator']} "
          f"{summary['final_gold_reward']:.3f} (best possible {summary['optimal_gold_reward']:.3f}; "
          f"{summary['gap_closed']:.0%} of the gap closed)")
    stage = "dpo" if config.method == "dpo" else "ppo,reward_model"
    print(f"metrics: {run_dir / 'metrics.jsonl'}   plots: {run_dir}/{{{stage},sft}}.png   "
          f"tensorboard: {run_dir / 'tensorboard'}   samples: {run_dir}/samples_{{sft,final}}.json   "
          f"summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
