"""Stage 1, supervised fine-tuning: the SFT policy from demonstrations (or the pretrained model)."""

from __future__ import annotations

import functools

from jaxppo.lora import merge
from jaxppo.models.heads import init_params
from jaxppo.optim import check_updates_applied, create_train_state, make_optimizer
from jaxppo.quant import quantize_params
from jaxppo.pipeline.context import RunContext, base_meta, fit, lora_dropout, new_adapters, save
from jaxppo.sft import make_sft_step
from jaxppo.sharding import init_sharded


def sft_stage(ctx: RunContext, base_params: dict | None) -> dict:
    """The SFT policy's params: ``sft.steps`` of masked NLL on the task's demonstrations, from
    ``base_params`` (pretrained) or a random init; the pretrained model itself when ``sft.steps == 0``.
    With ``lora.rank > 0`` only LoRA adapters on the frozen base train (and checkpoint), and the
    result is the base with the adapters merged in: the base of the later stages' roles, stored as
    ``lora.quantize_base`` says (QLoRA: :func:`jaxppo.quant.quantize_params`)."""
    c = ctx.config
    if c.sft.steps == 0:
        return quantize_params(c.model, base_params, kind=c.lora.quantize_base)
    params = base_params
    if params is None:
        params = init_sharded(functools.partial(init_params, c.model), ctx.mesh, ctx.key("init"))
    tx = make_optimizer(learning_rate=c.sft.learning_rate, warmup_steps=c.sft.warmup_steps)
    model, base, recorded = c.model, None, {}  # c.model has lora.scale as lora_scale (PipelineConfig.resolved)
    if c.lora.rank:  # train adapters on the frozen base (only they have optimizer state), merge them at the end
        base = params
        recorded = base_meta(ctx, base)
        params = new_adapters(ctx, "lora_init")
    state = init_sharded(lambda p: create_train_state(p, tx), ctx.mesh, params)
    sft_step = make_sft_step(model, micro_batches=c.sft.micro_batches)
    step = sft_step
    if base is not None:  # LoRA: the adapters on the frozen base (and LoRA dropout, when on)
        step = functools.partial(sft_step, base=base, **lora_dropout(ctx, "sft-dropout"))
    state, done, _ = fit(ctx, "sft", state, step, lambda i: ctx.task.demonstrations("sft", i, c.sft.batch_size),
                         c.sft.steps, recorded=recorded)
    if done is None:
        check_updates_applied(state, stage="sft", learning_rate_field="sft.learning_rate",
                              learning_rate=c.sft.learning_rate)
        save(ctx, "sft", c.sft.steps, {"state": state}, {"done": True, **recorded})
    policy = state.params if base is None else merge(model, {**base, **state.params})
    return quantize_params(c.model, policy, kind=c.lora.quantize_base)
