# make install: .venv with the package and its dev extra (re-run only when setup.py changes)
# make demo:    generate demo data, prepare it (printing the data summary), train the tiny student on the CPU,
#               evaluate it on the shipped offline task suite and plot its curves
# make demo-lora: after the demo, a LoRA student on the demo model's HF export (its frozen base):
#               train, evaluate, export a PEFT adapter, and transformers + peft give our greedy reply
# make test:    the test suite (CPU only, simulated devices where a mesh is needed)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_RUN ?= runs/demo
LORA_RUN ?= runs/demo-lora

.PHONY: install demo demo-lora test bench bench-panel clean-demo

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,cpu]"
	touch $(STAMP)

demo: install
	$(PY) tools/make_demo_data.py --out $(DEMO_DATA)
	$(VENV)/bin/imitation-jax prepare $(DEMO_DATA)/train.jsonl --eval $(DEMO_DATA)/eval.jsonl \
	  --tokenizer $(DEMO_DATA)/tokenizer.model --template koala --seq-len 512 --out $(DEMO_DATA)/prepared
	rm -rf $(DEMO_RUN)  # the demo starts fresh each time
	$(VENV)/bin/imitation-jax train configs/tiny.yaml run_dir=$(DEMO_RUN) data.path=$(DEMO_DATA)/prepared
	$(VENV)/bin/imitation-jax eval $(DEMO_RUN) --tasks mini_suite --limit 4 --out $(DEMO_RUN)/eval/final.json
	$(VENV)/bin/imitation-jax plot $(DEMO_RUN) --out $(DEMO_RUN)/plots
	$(VENV)/bin/imitation-jax export-hf $(DEMO_RUN) --out $(DEMO_RUN)/hf --dtype float32
	$(PY) tools/hf_greedy.py $(DEMO_RUN)/hf --run $(DEMO_RUN)  # transformers loads it back: same greedy reply

demo-lora: install
	test -f $(DEMO_RUN)/hf/config.json || $(MAKE) demo
	rm -rf $(LORA_RUN)
	$(VENV)/bin/imitation-jax train configs/tiny.yaml run_dir=$(LORA_RUN) data.path=$(DEMO_DATA)/prepared \
	  init.hf=$(DEMO_RUN)/hf model.lora.rank=8 model.lora.alpha=16 train.steps=60 optim.warmup_steps=10 eval.every_steps=30
	$(VENV)/bin/imitation-jax eval $(LORA_RUN) --tasks mini_suite --limit 4 --out $(LORA_RUN)/eval/final.json
	$(VENV)/bin/imitation-jax export-hf $(LORA_RUN) --adapter --out $(LORA_RUN)/adapter
	$(PY) tools/hf_greedy.py $(DEMO_RUN)/hf --adapter $(LORA_RUN)/adapter --run $(LORA_RUN)  # transformers + peft: same greedy reply

test: install
	$(PY) -m pytest -q -n 2 tests

bench: install
	$(PY) tools/bench_train.py

bench-panel: install
	$(PY) tools/bench_train.py --panel

clean-demo:
	rm -rf $(DEMO_RUN) $(LORA_RUN) $(DEMO_DATA)

# make install-tpu: .venv-tpu with jax[tpu] (libtpu), kept out of .venv: libtpu slows and warns at every
#                   JAX start on machines without a TPU. Only compile-check needs it.
# make test-tpu:    the compile-check tests (LLaMA-7B compiled for a v5e and a v4 slice; minutes)
TPU_VENV ?= .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: install-tpu test-tpu

install-tpu: $(TPU_STAMP)

$(TPU_STAMP): setup.py
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(TPU_VENV)/bin/python -m pip install -q -e ".[tpu,dev]"
	touch $(TPU_STAMP)

test-tpu: install-tpu
	$(TPU_VENV)/bin/python -m pytest -q tests/test_compile_check.py
