# Two commands on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv  ## set up, then train the default recipe on 4 ranks
	$(BIN)/torchrun --nproc_per_node=4 -m ddp.train

test: venv  ## set up, then run the test suite
	$(BIN)/python -m pytest -q

bench: venv  ## the benchmark suite (installs Lightning and Accelerate into .venv first; ~30 min)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench all
	$(BIN)/python -m bench.checkpoint_save
	$(BIN)/python -m bench.checkpoint_save --model big --rounds 5

clean:
	rm -rf $(VENV) runs
