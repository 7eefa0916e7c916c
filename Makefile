# The commands the README shows. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# served from local disk on our machines; pyproject declares the ranges (torch>=2.4)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo demo-quick bench docs clean fashion-mnist debs mindspore

# uv installs the same wheels as pip in less than half the time (torch's CUDA wheels unpack to ~4 GB; measured
# 43 s against 62 s for the demo's set, 4 s against 30 s for the test extra); pip takes over wherever uv fails.
# $(call installer,FLAGS) defines `install`, taking uv's extra FLAGS.
installer = install() { $(VENV)/bin/uv pip install -q $(1) --python $(PY) "$$@" || $(PY) -m pip install -q "$$@"; }
# The demo's set is compiled to bytecode at install: what every command imports, ready even where
# PYTHONDONTWRITEBYTECODE is set (a command then starts in 4 s instead of 10 on the 2-core VM).
INSTALL = $(call installer,--compile-bytecode)
# The test extra is not: compiling its 20,000 files (jax, transformers and the like that converters pull in, mostly
# never imported) took 26 of its 32 s; the suite writes the bytecode of what it imports as it goes (see `test`).
INSTALL_LAZY = $(call installer,)

# the demo needs the package with its ONNX export and plots; the suite also needs the test extras
$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || $(PY) -m pip install -q --upgrade pip
	$(INSTALL); install $(TORCH_PINS) && install -e '.[export,plot]'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(INSTALL_LAZY); install -e '.[test]'
	touch $@

install: $(VENV)/.installed

# MindSpore for `export --format mindir` and its test, in an environment of its own (it needs protobuf >= 7, which
# tritonclient's grpc refuses); reused when present. The suite finds it through MOBILENETV2_MINDSPORE_PYTHON. It has
# its own uv, so that `make test` builds it while the main environment installs.
MINDSPORE_VENV ?= .venv-mindspore
MS_PY := $(MINDSPORE_VENV)/bin/python
$(MINDSPORE_VENV)/.installed:
	$(PYTHON) -m venv $(MINDSPORE_VENV)
	$(MS_PY) -m pip install -q uv || true
	$(MINDSPORE_VENV)/bin/uv pip install -q --python $(MS_PY) 'mindspore>=2.3,<3' numpy || \
		$(MS_PY) -m pip install -q 'mindspore>=2.3,<3' numpy
	touch $@

mindspore: $(MINDSPORE_VENV)/.installed

# Debian packages, installed when missing and we are root: Fashion-MNIST (the demo and its end-to-end test),
# headless Chromium and its WebDriver (the test of the page `serve` shows), curl (webdataset's opener for http(s)
# shards, which the shard tests serve on loopback). One apt-get call: two at once would wait on dpkg's lock.
APT = if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then apt-get install -y -q $$missing >/dev/null 2>&1 || \
	(apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null); fi
FASHION_DEB = $$([ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || echo dataset-fashion-mnist)

fashion-mnist:
	@missing="$(FASHION_DEB)"; $(APT)

debs:
	@missing=$$(echo $(FASHION_DEB) $$(command -v chromedriver >/dev/null || echo chromium chromium-driver) \
		$$(command -v curl >/dev/null || echo curl)); $(APT)

demo: $(VENV)/.installed-demo fashion-mnist
	$(PY) -m mobilenetv2 demo

demo-quick: $(VENV)/.installed-demo fashion-mnist
	$(PY) -m mobilenetv2 demo --quick --per-class 300 --val-per-class 100 --output runs/demo-quick

# the three installs are independent: run together they take about the longest one's time, not the sum. The suite
# writes the bytecode of what it imports (into .venv and gitignored __pycache__ folders) even where
# PYTHONDONTWRITEBYTECODE is set: otherwise each of its ~60 fresh interpreters compiles it all again.
test:
	$(MAKE) --no-print-directory -j3 install mindspore debs
	PYTHONDONTWRITEBYTECODE= MOBILENETV2_MINDSPORE_PYTHON=$(abspath $(MINDSPORE_VENV))/bin/python \
		$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# the documentation site into site/; --strict: a broken link, anchor or missing page fails the build (the suite builds
# it too, in tests/test_docs.py)
$(VENV)/.installed-docs: $(VENV)/.installed-demo
	$(INSTALL); install -e '.[docs]'
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/head_finetune.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) $(MINDSPORE_VENV) runs build site *.egg-info
