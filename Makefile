# Quick start: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned so pip takes the local CPU wheel, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet -e ".[test]"
	# The FID Inception reference of tests/evaluation: torch-fidelity requires torchvision, which
	# does not run beside the CPU torch wheel; its Inception module needs only torch.
	$(BIN)/pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mixdq_jax pallas_kernels weights_convert tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check mixdq_jax pallas_kernels weights_convert tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(BIN)/mixdq demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
