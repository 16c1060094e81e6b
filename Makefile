# ufgir developer entry points. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
UFGIR := $(VENV)/bin/ufgir
DEMO_RUN := runs/demo_quickstart

.PHONY: venv demo test test-slurm bench backbone screenshot lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: it is taken from the local wheel cache; a range would pull a CUDA build.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,export,app]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(UFGIR) train --recipe quickstart --name demo_quickstart --overwrite
	$(UFGIR) eval $(DEMO_RUN)  # its last line: results: <the folder of metrics.json>
	@echo "tensorboard: $(VENV)/bin/tensorboard --logdir $(DEMO_RUN)"

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x --durations=15

# Not part of `make test`: needs root and Debian's slurm-wlm, slurmdbd, munge and mariadb-server. Starts a
# single-node Slurm on this machine (tests/slurm/cluster.sh), submits real jobs, stops it again.
test-slurm: venv
	tests/slurm/cluster.sh start
	SLURM_CONF=$$(tests/slurm/cluster.sh conf) HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x -s --run-slurm \
		--durations=0 tests/test_slurm_cluster.py; rc=$$?; tests/slurm/cluster.sh stop; exit $$rc

bench: venv
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.paired
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --methods linear,ifa,mpncov,vqt,transfg,ffvt,glsim,rams,cal --sizes 224 --precisions bf16 --name cpu_fgir
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.data
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.threads
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.integrity
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.peft
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.reduction

backbone: venv
	HF_HUB_OFFLINE=1 $(UFGIR) pretrain-backbone --out ufgir_cli/assets

# docs/serve.png: `ufgir serve` in headless Chromium (apt-get install chromium); not part of `make test`
screenshot: venv
	HF_HUB_OFFLINE=1 $(PY) docs/screenshot_serve.py

lint: venv
	$(VENV)/bin/ruff check ufgir_cli tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
