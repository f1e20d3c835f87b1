"""NF4 and int8 weight quantisation (jaxppo.quant) against a hand-worked block and a float64 argmin, and a
quantised LoRA base in the model: the same function as its dequantised tree (forward, adapter gradients,
samplers), a backward pass that keeps no float kernel, its stored bytes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.engine import make_generator
from jaxppo.lora import init_adapters
from jaxppo.models import ModelConfig, decoder_hidden
from jaxppo.models.heads import init_params, init_scalar_head, lm_logits
from jaxppo.quant import (NF4_LEVELS, dequantize_int8, dequantize_nf4, dequantize_params, quantize_int8, quantize_nf4,
                          quantize_params)
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.sft import sft_nll
from tiny import SAMPLER_MODEL, peaky_params


def test_nf4_levels_are_qloras():
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[0] == -1 and NF4_LEVELS[7] == 0 and NF4_LEVELS[15] == 1
    assert np.all(np.diff(NF4_LEVELS) > 0)


def test_nf4_by_hand():
    """One block of 4 input features for each of 2 outputs, kernel [in=4, out=2].
    Output 0: w = (0.5, −1, 0, 0.25), absmax 1: 0.5 is nearer 0.4407 (code 12) than 0.5626 (13);
    −1 → 0; 0 → 7; 0.25 → 0.2461 (10). Packed along the input axis, first code high:
    (12 << 4) | 0 = 192, (7 << 4) | 10 = 122. Output 1: w = (0, 0, 0, −2), absmax 2: 0 → 7, −1 → 0."""
    w = np.array([[0.5, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.25, -2.0]], np.float32)
    codes, absmax = quantize_nf4(w, block=4)
    np.testing.assert_array_equal(codes, [[192, 7 * 16 + 7], [122, 7 * 16 + 0]])
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 2)
    np.testing.assert_array_equal(absmax, [[1.0, 2.0]])
    np.testing.assert_allclose(dequantize_nf4(codes, absmax, block=4),
                               [[NF4_LEVELS[12], 0], [-1, 0], [0, 0], [NF4_LEVELS[10], -2]])


def test_nf4_equals_a_float64_argmin_on_stacked_kernels():
    """A stacked [L, in, H, n] kernel (input axis 1), blocks of 64: codes are the argmin over the
    levels (float64, first on ties), scales the blocks' absmax, and the error at most half the widest
    gap between levels times the absmax."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 128, 3, 5)).astype(np.float32)
    w[1, :64, 0, 0] = 0.0  # an all-zero block
    codes, absmax = quantize_nf4(w, block=64, in_axis=1)
    assert codes.shape == (2, 64, 3, 5) and absmax.shape == (2, 2, 3, 5)
    blocks = w.astype(np.float64).reshape(2, 2, 64, 3, 5)
    m = np.abs(blocks).max(axis=2, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    expected = np.abs(blocks[..., None] / m[..., None] - NF4_LEVELS.astype(np.float64)).argmin(-1).reshape(w.shape)
    unpacked = np.stack([np.asarray(codes) >> 4, np.asarray(codes) & 15], axis=2).reshape(w.shape)
    np.testing.assert_array_equal(unpacked, expected)
    np.testing.assert_allclose(absmax, m[:, :, 0], rtol=1e-7)
    deq = np.asarray(dequantize_nf4(codes, absmax, block=64, in_axis=1))
    half_gap = np.max(np.diff(NF4_LEVELS)) / 2
    assert np.all(np.abs(deq - w).reshape(2, 2, 64, 3, 5) <= half_gap * m + 1e-6)
    assert np.all(deq[1, :64, 0, 0] == 0)
    with pytest.raises(ValueError, match="block size"):
        quantize_nf4(w, block=48, in_axis=1)  # 48 does not divide 128


def test_int8_per_output_channel():
    w = np.array([[1.0, -0.5], [-2.0, 0.25], [0.5, 0.0]], np.float32)  # [in=3, out=2]
    codes, scale = quantize_int8(w)
    np.testing.assert_allclose(scale, [[2 / 127, 0.5 / 127]], rtol=1e-7)
    np.testing.assert_array_equal(codes, [[64, -127], [-127, 64], [32, 0]])  # 63.5 → 64 (round half to even: 64)
    assert codes.dtype == jnp.int8
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 7)).astype(np.float32)
    codes, scale = quantize_int8(w)
    assert np.all(np.abs(np.asarray(dequantize_int8(codes, scale)) - w) <= np.asarray(scale) / 2 + 1e-7)


# ------------------------------------------------------------------------------------------------
# A quantised LoRA base (QLoRA): quantize_params, and the model dequantising inside its layer scan
# ------------------------------------------------------------------------------------------------

# every projection's input dimension (64, H·Dh = 64, 128) a multiple of NF4's blocks of 64; GQA, Qwen2's biases
QUANT_MODEL = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, attention_bias=True, lora_scale=0.5)
KERNELS = [("attn", "qkv_proj"), ("attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")]
quantize = jax.jit(quantize_params, static_argnums=0, static_argnames="kind")  # one program, not op by op


@pytest.fixture(scope="module")
def params():
    return peaky_params(QUANT_MODEL)


@pytest.fixture(scope="module")
def quantized(params):
    return {kind: quantize(QUANT_MODEL, params, kind=kind) for kind in ("int8", "nf4")}


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, QUANT_MODEL.vocab_size, size=(3, 11))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    return jnp.asarray(tokens), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def logits_of(config, params, tokens, mask):
    return lm_logits(config, params, decoder_hidden(config, params, tokens, mask)[0])


@pytest.fixture(scope="module")
def adapters():
    """Rank-4 adapters on every target, with random (non-zero) B so A's and B's gradients are both non-zero."""
    lora = init_adapters(QUANT_MODEL, jax.random.key(1), rank=4)
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return {"lora": jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])}


def test_quantize_params_layout(params, quantized, adapters):
    """Each projection's kernel becomes codes + scales (the module docstring's layout, the codes of
    quantize_int8 / quantize_nf4 along the input axis); every other leaf (embeddings, norms, the qkv
    bias, lm_head, a value head, LoRA adapters) is kept as it is; "none" returns the params;
    dequantize_params gives the float tree's structure back."""
    assert quantize_params(QUANT_MODEL, params, kind="none") is params
    for kind, dtype in (("int8", jnp.int8), ("nf4", jnp.uint8)):
        q = quantized[kind]
        for group, name in KERNELS:
            kernel = params["layers"][group][name]["kernel"]
            leaves, d_in, out = q["layers"][group][name], kernel.shape[1], kernel.shape[2:]
            assert set(leaves) - {"bias"} == {f"kernel_{kind}", "kernel_scale"}
            codes, scale = leaves[f"kernel_{kind}"], leaves["kernel_scale"]
            assert codes.dtype == dtype and scale.dtype == jnp.float32
            assert codes.shape == (2, d_in if kind == "int8" else d_in // 2, *out)
            assert scale.shape == (2, 1 if kind == "int8" else d_in // 64, *out)
        assert jax.tree.structure(dequantize_params(QUANT_MODEL, q)) == jax.tree.structure(params)

    full = {**params, "value_head": init_scalar_head(QUANT_MODEL, jax.random.key(5), "value_head"), **adapters}
    q = jax.eval_shape(functools.partial(quantize_params, QUANT_MODEL, kind="int8"), full)  # the tree, not the work
    kept = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(q)}
    for path, x in jax.tree_util.tree_leaves_with_path(full):
        path = jax.tree_util.keystr(path)
        if not any(f"['{name}']['kernel']" in path for _, name in KERNELS):
            assert (kept[path].shape, kept[path].dtype) == (x.shape, x.dtype), path


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_forward_is_the_dequantized_forward(quantized, tokens, kind):
    """Dequantising each layer inside the scan is the same function as dequantising the whole tree first."""
    q = quantized[kind]
    np.testing.assert_allclose(logits_of(QUANT_MODEL, q, *tokens),
                               logits_of(QUANT_MODEL, dequantize_params(QUANT_MODEL, q), *tokens), rtol=0, atol=1e-5)


def test_quantization_error_of_the_logits(tokens):
    """On initial-scale weights both quantised models stay near the float one (RMS error of the centred
    logits, relative), NF4 (4 bits) further than int8 (8 bits)."""
    params = init_params(QUANT_MODEL, jax.random.key(0))
    exact = logits_of(QUANT_MODEL, params, *tokens)
    exact = exact - jnp.mean(exact, axis=-1, keepdims=True)  # log-softmax ignores a shift per row

    def relative_error(kind):
        logits = logits_of(QUANT_MODEL, quantize(QUANT_MODEL, params, kind=kind), *tokens)
        error = logits - jnp.mean(logits, axis=-1, keepdims=True) - exact
        return float(jnp.sqrt(jnp.mean(error ** 2) / jnp.mean(exact ** 2)))

    error = {kind: relative_error(kind) for kind in ("int8", "nf4")}
    assert 0 < error["int8"] < error["nf4"] < 0.25, error


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_adapter_gradients_on_a_quantized_base(quantized, adapters, kind):
    """The LoRA SFT loss (sft_nll composes {**base, **adapters}) and its gradients w.r.t. the adapters
    on a quantised base equal those on the dequantised float base."""
    q = quantized[kind]
    rng = np.random.default_rng(3)
    batch = {"prompt": rng.integers(3, 61, (3, 5)), "prompt_mask": [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]],
             "response": rng.integers(3, 61, (3, 4)), "response_mask": [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda ad, base: sft_nll(QUANT_MODEL, ad, batch, base=base)[0]))
    loss_q, grads_q = loss_and_grad(adapters, q)
    loss_f, grads_f = loss_and_grad(adapters, dequantize_params(QUANT_MODEL, q))
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-6)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads_q))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads_q, grads_f)


def test_backward_keeps_no_float_kernels(params, quantized, adapters, tokens):
    """The adapters' backward pass saves the codes, never a float copy of a stacked kernel (the
    dequantised kernels are recomputed layer by layer); a float base's kernels are saved, as a check
    that the residuals would show them. With and without model.remat."""
    kernel_shapes = {params["layers"][g][n]["kernel"].shape for g, n in KERNELS}

    def saved_float_kernels(config, base):  # the shapes of the float residuals jax.vjp keeps (traced, not run)
        fn = lambda ad: decoder_hidden(config, {**base, **ad}, *tokens)[0].sum()  # noqa: E731
        backward = jax.eval_shape(lambda ad: jax.vjp(fn, ad)[1], adapters)
        return {r.shape for r in jax.tree.leaves(backward) if jnp.issubdtype(r.dtype, jnp.floating)} & kernel_shapes

    assert saved_float_kernels(QUANT_MODEL, params) == kernel_shapes
    for config in (QUANT_MODEL, dataclasses.replace(QUANT_MODEL, remat=True, remat_policy="dots")):
        for kind in ("int8", "nf4"):
            assert saved_float_kernels(config, quantized[kind]) == set(), (config, kind)


def test_samplers_on_a_quantized_base(quantized):
    """The jitted sampler and the slot-refill engine (prefill, then decode steps with a KV cache) run on
    NF4 params and give the dequantised base's greedy tokens."""
    q = quantized["nf4"]
    rng = np.random.default_rng(4)
    prompts = jnp.asarray(rng.integers(3, 61, (4, 6)))
    mask = jnp.asarray(np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 5 + [1], [0, 1, 1, 1, 1, 1]]))
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    greedy = make_sampler(QUANT_MODEL, sampling)
    on_q = greedy(q, prompts, mask, jax.random.key(0))
    on_float = greedy(dequantize_params(QUANT_MODEL, q), prompts, mask, jax.random.key(0))
    np.testing.assert_array_equal(on_q.tokens, on_float.tokens)
    np.testing.assert_allclose(on_q.logprobs, on_float.logprobs, atol=1e-5)
    engine, _ = make_generator(QUANT_MODEL, sampling, slots=2)(q, prompts, mask, jax.random.key(0))
    np.testing.assert_array_equal(engine.tokens, on_q.tokens)


def test_stored_bytes_of_the_projections(params, quantized):
    """int8: 8 bits per weight plus a float32 scale per output channel (≈ 1/4 of float32); NF4: 4 bits
    plus a float32 absmax per block of 64 (4.5 bits: 4.5/32 of float32)."""
    def projection_bytes(p):  # the kernels' leaves (not the qkv bias)
        return sum(x.nbytes for g, n in KERNELS for leaf, x in p["layers"][g][n].items() if leaf != "bias")

    weights = sum(params["layers"][g][n]["kernel"].size for g, n in KERNELS)
    outputs = sum(params["layers"][g][n]["kernel"][:, 0].size for g, n in KERNELS)  # [L, out…] per kernel
    fp32 = projection_bytes(params)
    assert fp32 == 4 * weights
    int8, nf4 = projection_bytes(quantized["int8"]), projection_bytes(quantized["nf4"])
    assert int8 == weights + 4 * outputs and abs(int8 / fp32 - 1 / 4) < 0.02
    assert nf4 == weights // 2 + 4 * weights // 64 and nf4 / fp32 == 4.5 / 32


def test_quantize_params_errors(params, quantized):
    with pytest.raises(ValueError, match="lora.quantize_base: 'fp8' is not one of"):
        quantize_params(QUANT_MODEL, params, kind="fp8")
    # SAMPLER_MODEL: hidden 48 and intermediate 80, no multiple of 64 (shapes are all the checks need)
    shapes = jax.eval_shape(lambda: init_params(SAMPLER_MODEL, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"blocks of 64 .* layers/attn/qkv_proj's input dimension 48 "
                                         r"\(model.hidden_size\)"):
        quantize_params(SAMPLER_MODEL, shapes, kind="nf4")
    with pytest.raises(ValueError, match=r"down_proj's input dimension 80 \(model.intermediate_size\)"):
        quantize_params(SAMPLER_MODEL, shapes, kind="nf4", block=48)
    q = jax.eval_shape(functools.partial(quantize_params, SAMPLER_MODEL, kind="nf4", block=16), shapes)  # 16 | 48, 80
    assert q["layers"]["mlp"]["down_proj"]["kernel_scale"].shape == (2, 80 // 16, 48)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_params(QUANT_MODEL, quantized["int8"], kind="nf4")
