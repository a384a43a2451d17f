# Two commands on a fresh machine: `make demo` (a tiny end-to-end run on the CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel for machines without a GPU; on a GPU machine install your CUDA torch first and
# run with TORCH= (empty) so it is kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# A tiny random CogVideoX and four generated clips, trained through finetune_single_rank.sh (the same
# script and flags as a real run, scaled down by the flags given last), then validated.
demo: install
	rm -rf $(DEMO)
	$(BIN)/python -m cogvideox_lora.synthetic model --size tiny $(DEMO)/model
	$(BIN)/python -m cogvideox_lora.synthetic clips $(DEMO)/data --num_clips 4 --height 48 --width 64 \
		--num_frames 25 --fps 8
	PATH="$(abspath $(BIN)):$$PATH" MODEL_PATH=$(DEMO)/model DATA_ROOT=$(DEMO)/data OUTPUT_DIR=$(DEMO)/output \
		bash finetune_single_rank.sh --height 48 --width 64 --max_num_frames 9 --rank 8 --lora_alpha 8 \
		--max_train_steps 20 --checkpointing_steps 10 --learning_rate 1e-3 --validation_num_inference_steps 8 \
		--validation_prompt "a red square moving on grey" --latent_cache_dir $(DEMO)/cache
	@echo
	@echo "LoRA:             $(DEMO)/output/pytorch_lora_weights.safetensors"
	@echo "Validation video: $$(ls $(DEMO)/output/validation/*.mp4 | tail -1)"

test: install
	$(BIN)/python -m pytest -q tests

# Every module's own tests, without those that train or launch processes (marked slow): under 2 minutes.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(DEMO) $(VENV)
