# make demo: the main job on the embedded default (local Ray, local MLflow store, phantom data).
# make test: ruff (configured in pyproject.toml), then the test suite. Both create .venv and install with
# constraints.txt when needed.
# make gpu-check: on a GPU machine, with any python that has torch, transformers, numpy, pyyaml and safetensors
# (no .venv, no Ray/MLflow/nibabel): PY=/path/to/python make gpu-check [GPU_CHECK_OUT=DIR].
PY ?= python3
GPU_CHECK_OUT ?= runs/gpu-check-$(shell date +%Y%m%d-%H%M%S)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[test]"
	@# bytecode on every core (pip compiles on one: 78 s -> 63 s here), for what is ever imported: not the libraries'
	@# own test folders nor transformers' model families other than BERT (21,800 -> 15,400 files, 33 s -> 24 s); like
	@# pip, files that are not valid Python 3.11 (a torch test file in 3.12 syntax) are skipped, so compileall's exit
	@# status is not the install's
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/|/transformers/models/(?!auto/|bert/)[^/]+/' $(VENV)/lib \
		> /dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ganbert demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check platform tests jobs benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: $(STAMP)
	$(BIN)/ganbert bench step --preset tiny
	$(BIN)/ganbert bench step --preset demo

gpu-check:
	PYTHONPATH=platform $(PY) -m ganbert.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs .pytest_cache
