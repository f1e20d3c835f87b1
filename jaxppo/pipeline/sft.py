"""Stage 1, supervised fine-tuning: the SFT policy from demonstrations (or the pretrained model)."""

from __future__ import annotations

import functools

from jaxppo.models.heads import init_params
from jaxppo.optim import check_updates_applied, create_train_state, make_optimizer
from jaxppo.pipeline.context import RunContext, fit, save
from jaxppo.sft import make_sft_step
from jaxppo.sharding import init_sharded


def sft_stage(ctx: RunContext, base_params: dict | None) -> dict:
    """The SFT policy's params: ``sft.steps`` of masked NLL on the task's demonstrations, from
    ``base_params`` (pretrained) or a random init; the pretrained model itself when ``sft.steps == 0``."""
    c = ctx.config
    if c.sft.steps == 0:
        return base_params
    params = base_params
    if params is None:
        params = init_sharded(functools.partial(init_params, c.model), ctx.mesh, ctx.key("init"))
    tx = make_optimizer(learning_rate=c.sft.learning_rate, warmup_steps=c.sft.warmup_steps)
    state = init_sharded(lambda p: create_train_state(p, tx), ctx.mesh, params)
    step = make_sft_step(c.model, micro_batches=c.sft.micro_batches)
    state, done, _ = fit(ctx, "sft", state, step, lambda i: ctx.task.demonstrations("sft", i, c.sft.batch_size),
                         c.sft.steps)
    if done is None:
        check_updates_applied(state, stage="sft", learning_rate_field="sft.learning_rate",
                              learning_rate=c.sft.learning_rate)
        save(ctx, "sft", c.sft.steps, {"state": state}, {"done": True})
    return state.params
