# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: demo demo-maintenance test venv venv-dev mosquitto nats tools lint artifacts bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Device + simulation install (no TensorFlow).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[sim]'
	touch $@

# Everything, including the build extra (TensorFlow) and test tools.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

demo: venv
	$(BIN)/fedge sim --devices 10 --rounds 20 --partition iid --seed 0 --out runs/demo

# The predictive-maintenance fleet: 20 progpy pumps over serial ports, 30 rounds, four policies
# scored (about 1-2 minutes on a 2-core machine; README "Predictive maintenance").
demo-maintenance: venv
	$(BIN)/fedge sim --scenario maintenance --seed 0 --out runs/maintenance

mosquitto:
	@sh deploy/ensure-mosquitto.sh

# nats-server, for the NATS cluster test (deploy/ensure-nats.sh installs it with apt as root).
nats:
	@sh deploy/ensure-nats.sh

# systemd-analyze, for the unit checks (deploy/ensure-tools.sh installs it with apt as root).
tools:
	@sh deploy/ensure-tools.sh

test: venv-dev mosquitto nats tools
	$(BIN)/python -m pytest

lint: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol models agent aggregator firmware_bridge fleet fedge

artifacts: venv-dev
	for spec in models/specs/*.json; do \
		$(BIN)/fedge models build $$spec -o models/artifacts/$$(basename $$spec .json).tflite; \
	done

bench: venv-dev
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
