# robustq: `make book` and `make test` each set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := $(or $(ROBUSTQ_DATA),/usr/share/datasets/fashion-mnist)
export ROBUSTQ_CACHE ?= $(CURDIR)/.cache/robustq
export PYTHONHASHSEED := 0
# The pinned CPU kernels and threads (robustq/kernels.py, which every robustq process also applies
# before torch loads; tests/test_kernels.py keeps the two lists equal): the same floats on every
# x86-64 machine. ROBUSTQ_NATIVE_KERNELS=1 opts out (numbers then differ from book/reference/).
ifeq ($(filter-out 0,$(ROBUSTQ_NATIVE_KERNELS)),)
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
ifeq ($(shell uname -m),x86_64)
export ATEN_CPU_CAPABILITY ?= avx2
export ONEDNN_MAX_CPU_ISA ?= AVX2
export MKL_CBWR ?= COMPATIBLE
export NPY_DISABLE_CPU_FEATURES ?= X86_V4 AVX512_ICL AVX512_SPR
endif
endif

.PHONY: setup data book check-browser test compat bench clean

setup: $(STAMP) data  ## venv with pinned deps, the dataset

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[book,test]'
	@touch $@

data: $(STAMP)  ## Fashion-MNIST: the Debian package (installed when root with apt), else torchvision's download; gunzipped for torchvision
	@if [ ! -f "$(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz" ] && [ -z "$${ROBUSTQ_DATA:-}" ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	fi
	@# gunzip into $$ROBUSTQ_CACHE/data/ (once; again when a .gz changes); without the Debian package
	@# and ROBUSTQ_DATA, download through torchvision first; offline, one line with the fix
	$(PY) -m robustq.data

book: setup  ## train the book's models (two at a time), execute every notebook (profile book), write (under CI: compare) book/reference/, build the HTML book, check its pages (also in a browser)
	$(PY) book/execute.py --profile book
	$(VENV)/bin/jupyter-book build book --warningiserror --nitpick --keep-going
	$(PY) book/check_offline.py book/_build/html
	$(PY) book/check_pages.py book/_build/html
	@$(MAKE) --no-print-directory check-browser
	@echo "Book: $(CURDIR)/book/_build/html/index.html"

check-browser:  ## the built book in headless Chromium at 1024 px (Debian's, installed when root with apt), first screens saved
	@if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing headless Chromium (Debian package chromium-headless-shell)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium-headless-shell >/dev/null; } || echo "could not install it: the browser check is skipped"; \
	fi
	$(PY) book/check_browser.py book/_build/html

# Two pytest workers of one thread each (two torch processes of two threads each slow each other
# several-fold on two cores): the smoke notebooks and the tests that read their records on one,
# everything else on the other (tests/conftest.py groups them).
test: setup  ## notebook lint, workflow schema; unit, property and doctests; notebooks under the smoke profile
	$(VENV)/bin/ruff check --extend-select E501 notebooks
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	ROBUSTQ_PROFILE=smoke OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope \
	  --hypothesis-profile=make-test --durations=25 --nbval-lax tests robustq notebooks

# The GPU machine has torch 2.11 and no network: the package must run there as it is.
COMPAT_VENV := .venv-torch2.11
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0
COMPAT_METHODS := baseline symreg_satnl_asam grad_l1 qat_lsq

compat: data  ## the package on torch 2.11 (the GPU machine's): import, and a smoke training of four methods
	@test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir $(COMPAT_PINS) \
	  $$(grep -iE '^(numpy|pandas|scipy|filelock|tqdm|submitit|cloudpickle|typing.extensions)==' constraints.txt)
	@cache=$$(mktemp -d) && for method in $(COMPAT_METHODS); do \
	  ROBUSTQ_CACHE=$$cache PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m robustq train --method $$method \
	    --profile smoke --no-progress >/dev/null || exit 1; echo "torch 2.11: $$method trained"; done; rm -rf $$cache

bench: setup  ## speed ratios (printed, not asserted)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done

clean:  ## remove build outputs and the experiment cache (keeps the venv)
	rm -rf book/_build book/notebooks book/status.md book/findings.md book/findings_lead.md book/findings_summary.md .cache
