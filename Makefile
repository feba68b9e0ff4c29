# ddim-edit: `make test` and `make demo` work on a fresh clone with nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  := models/shapes
SCORER := models/shapes-scorer
OUT    := out

.PHONY: install test demo model clean chromium

# CPU torch 2.13.0 where there is no CUDA (this workplace keeps that wheel on disk); the default CUDA build otherwise.
# constraints.txt pins the tested set (pyproject.toml states compatible ranges only).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch with CUDA"; $(BIN)/pip install -q 'torch>=2.4,<=2.14.1'; \
	else \
		echo "no CUDA: installing CPU torch 2.13.0"; $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

# The shapes model: weights trained here and shipped in the package (ddim_worker/shapes/weights), written in a second.
$(MODEL)/model_index.json: $(STAMP)
	$(BIN)/ddim-edit make-shapes-model $(MODEL)

# Its scorer: a small CLIP trained here on the same scenes (ddim_worker/shapes/scorer_weights), for --scorer.
$(SCORER)/config.json: $(STAMP)
	$(BIN)/ddim-edit make-shapes-scorer $(SCORER)

model: $(MODEL)/model_index.json $(SCORER)/config.json

# The report test opens report.html in headless Chromium (Debian's package). Installed when we are root with apt;
# elsewhere that one test says it is skipped and why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the report test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "warning: could not install chromium; the headless report test will be skipped"; \
		else echo "warning: chromium not found; the headless report test will be skipped"; fi; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=10

demo: $(STAMP) $(MODEL)/model_index.json $(SCORER)/config.json
	$(BIN)/python -m jobs.demo --model $(MODEL) --scorer $(SCORER) --output $(OUT)

clean:
	rm -rf $(VENV) $(MODEL) $(OUT) *.egg-info
