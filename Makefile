# Quick start: `make run` (the embedded-swarm example) and `make test` (the whole suite).
# Both create .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/distqat-train require_progress=true

test: $(STAMP)
	$(BIN)/python -m pytest --durations=30

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/startup.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/pipeline_throughput.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/main_job.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/adaptive_diloco.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/diloco_benchmark.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/data_server.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/quant_benchmark.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/stream_reliability.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/stream_pingpong.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/call_breakdown.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/failover.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/wan.py

clean:
	rm -rf $(VENV) logs .pytest_cache
