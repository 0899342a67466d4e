# make demo: create .venv if missing, install, run the demo sweep and write its report.
# make test: same set-up, then the test suite (pytest-xdist: one worker per core; a file stays
# on one worker, so a file whose tests build on each other, as the README examples do, keeps its order).
# make perf-test: the perf scripts' own checks (perf/tests, CPU, toy sizes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_runs

.PHONY: demo test perf-test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/cltk run -m benchmark=split_digits benchmark.scenario=class-il \
		strategy=naive,replay,joint seed=0,1 threads=1 quiet=true output_root=$(DEMO_DIR)/class-il
	$(BIN)/cltk run -m experiment=kcl_split_digits,gkcl_split_digits \
		seed=0,1 threads=1 quiet=true output_root=$(DEMO_DIR)/task-il
	$(BIN)/cltk report $(DEMO_DIR)/class-il $(DEMO_DIR)/task-il -o $(DEMO_DIR)
	@echo "Open $(DEMO_DIR)/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest tests -n auto --dist loadfile

perf-test: $(STAMP)
	$(BIN)/python -m pytest perf/tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs
