# The course's two commands (see README.md):
#   make lab    install everything into .venv (first time only) and open the course in JupyterLab
#   make test   install if needed, then run every notebook (small, offline, CPU) and the unit tests
PYTHON ?= python3
VENV   := .venv
# torch first, pinned, so pip never swaps it: a CPU wheel on the course machines, the CUDA wheel on a GPU
# box. For another CUDA version: make TORCH="torch==2.13.0 --index-url <your PyTorch wheel index>" lab
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp

.PHONY: install lab test standin data diagrams clean-outputs

# The course with all its optional parts (pyproject.toml): JupyterLab, the test tools, DeepSpeed.
# Colab's setup cells install fewer: see README.md.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[lab,test,deepspeed]"
	$(VENV)/bin/python -m helpers.env --build-deepspeed-op
	touch $(STAMP)

install: $(STAMP)

# jupyter refuses to start as root (Docker, cloud notebooks) without --allow-root: pass it to root only.
# Either way the server listens on this machine only and keeps its login token.
LAB_UID ?= $(shell id -u)
LAB_FLAGS = --ip=127.0.0.1 $(if $(filter 0,$(LAB_UID)),--allow-root)

lab: install
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Offline on purpose: the test run must never reach the Hub (the stand-in model serves).
test: install
	HF_HUB_OFFLINE=1 COURSE_SMOKE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/python -m pytest \
	    --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -q -rs --durations=15

# Rebuild what the course ships (deterministic; see data/README.md and lessons/00_setup_and_tour.md).
data: install
	$(VENV)/bin/python data/generate.py
standin: install
	$(VENV)/bin/python -m helpers.standin build
# The pictures in img/, drawn by one deterministic script (`python img/diagrams.py --check` compares).
diagrams: install
	$(VENV)/bin/python img/diagrams.py

clean-outputs:
	rm -rf outputs
