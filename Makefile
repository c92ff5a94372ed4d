# flowmill: `make run` trains the digits MMDiT end to end; `make test` passes the tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
FLOWMILL := $(VENV)/bin/flowmill
STAMP := $(VENV)/.installed
DIGITS := datasets/digits
RUN_DIR ?= runs/mmdit-digits-$(shell date -u +%Y%m%d-%H%M%S)
PROMPTS := zero one two three four five six seven eight nine

export MLFLOW_DISABLE_TELEMETRY := true
export DS_BUILD_OPS := 0

.PHONY: run latent test install data clean slurm-up slurm-down slurm-status chromium

# Installs once; a second make does nothing until pyproject.toml or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(DIGITS)/manifest.json: | $(STAMP)
	$(FLOWMILL) data pack builtin:digits $(DIGITS)

$(DIGITS)/text_tokenizer.model: $(DIGITS)/manifest.json
	$(FLOWMILL) data tokenizer $(DIGITS)/text_tokenizer --text builtin:digit-captions --vocab-size 80 --model-type bpe

data: $(DIGITS)/text_tokenizer.model

run: data
	$(FLOWMILL) launch local --nproc 2 configs/mmdit_digits.yaml run.dir=$(RUN_DIR)
	$(FLOWMILL) sample $(RUN_DIR) --num-samples 8 --steps 25 --cfg 3.0 --out $(RUN_DIR)/samples/final \
		$(foreach d,$(PROMPTS),--prompt "a handwritten digit $(d)")
	@echo "run dir:      $(RUN_DIR)"
	@echo "samples:      $(RUN_DIR)/samples/final/grid.png"
	@echo "MLflow store: $(abspath runs)/mlflow.db (artifacts in $(abspath runs)/mlartifacts); browse with: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath runs)/mlflow.db"

# Latent flow matching on the digits, as SD3 trains: an autoencoder (runs/vae-digits), the digits
# encoded once into its latents (datasets/digits-latent), then the MMDiT on them, sampled through the VAE.
VAE_RUN := runs/vae-digits
LATENT_RUN ?= runs/mmdit-digits-latent-$(shell date -u +%Y%m%d-%H%M%S)

$(VAE_RUN)/latest: | $(DIGITS)/manifest.json
	$(FLOWMILL) launch local --nproc 2 configs/vae_digits.yaml run.dir=$(VAE_RUN)

$(DIGITS)-latent/manifest.json: $(VAE_RUN)/latest
	$(FLOWMILL) data encode $(DIGITS) $(DIGITS)-latent --vae $(VAE_RUN) --nproc 2 --overwrite

latent: $(DIGITS)-latent/manifest.json $(DIGITS)/text_tokenizer.model
	$(FLOWMILL) launch local --nproc 2 configs/mmdit_digits_latent.yaml run.dir=$(LATENT_RUN)
	$(FLOWMILL) sample $(LATENT_RUN) --num-samples 8 --steps 25 --cfg 3.0 --out $(LATENT_RUN)/samples/final \
		$(foreach d,$(PROMPTS),--prompt "a handwritten digit $(d)")
	@echo "run dir:      $(LATENT_RUN)"
	@echo "samples:      $(LATENT_RUN)/samples/final/grid.png"

# The test suite includes real multi-node SLURM jobs and a headless-browser check of the MLflow UI.
# Run by root, it brings the local cluster up and installs Chromium first; run by another user, it
# runs without them where they are missing: their tests skip, and the last line says so and names the
# command that sets them up. PYTEST_ARGS picks other tests or options (default: all of tests/).
TEST_SETUP := $(if $(filter 0,$(shell id -u)),slurm-up chromium)
PYTEST_ARGS ?= tests

test: $(STAMP) $(TEST_SETUP)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

chromium:
	tools/install_chromium.sh

# A real SLURM cluster on this machine (munge, MariaDB + slurmdbd, slurmctld, two slurmd nodes n1 n2).
slurm-up:
	launchers/slurm_cluster/up.sh

slurm-down:
	launchers/slurm_cluster/down.sh

slurm-status:
	launchers/slurm_cluster/status.sh

clean:
	rm -rf runs datasets
