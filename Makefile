# qwen3-deploy. Two commands for a newcomer:  make quickstart   (end to end on a synthetic model)   make test
# Needs Python >= 3.11 and pip that reaches PyPI (`make install`, which both run first; PY=python3.12 picks another).
PY ?= python3
SEQ ?= 512
WORKSPACE ?= workspace
BACKEND ?= onnx
CHECKPOINT_EMB ?=
CHECKPOINT_RERANK ?=
QS := quickstart

STAMP := build/.installed-$(notdir $(PY))

.PHONY: install test compile quickstart eval clean

# torch first and pinned: it resolves to the local CPU wheel (an unpinned torch pulls GBs of CUDA wheels).
install $(STAMP): pyproject.toml
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .[dev]
	@mkdir -p build && touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# Both tasks at SEQ (comma-separated list for bucket sets). Without CHECKPOINT_* the configs' hub ids are used;
# offline, the error says how to pass a local directory or build a synthetic checkpoint.
compile:
	toolkit compile build_configs/embedding_config_fp16.yaml --seq $(SEQ) --backend $(BACKEND) --workspace $(WORKSPACE) \
		$(if $(CHECKPOINT_EMB),--checkpoint $(CHECKPOINT_EMB))
	toolkit compile build_configs/reranker_config_fp16.yaml --seq $(SEQ) --backend $(BACKEND) --workspace $(WORKSPACE) \
		$(if $(CHECKPOINT_RERANK),--checkpoint $(CHECKPOINT_RERANK))

# End to end on tiny synthetic checkpoints and the bundled data samples:
# synth -> compile (a bucket set of SEQs per task) -> inspect -> demo -> eval (3 datasets) -> perf.
QS_ART := $(QS)/artifacts
quickstart: $(STAMP)
	toolkit synth --task embedding --shape tiny $(QS)/checkpoints/embedding
	toolkit synth --task reranker --shape tiny $(QS)/checkpoints/reranker
	toolkit compile build_configs/embedding_config_fp16.yaml --name quickstart-embedding --seq 64,128,256 \
		--backend $(BACKEND) --batch 4 --checkpoint $(QS)/checkpoints/embedding --workspace $(QS_ART)
	toolkit compile build_configs/reranker_config_fp16.yaml --name quickstart-reranker --seq 128,256 \
		--backend $(BACKEND) --batch 4 --checkpoint $(QS)/checkpoints/reranker --workspace $(QS_ART)
	toolkit inspect $(QS_ART)/quickstart-embedding/$(BACKEND)/seq128
	toolkit demo --task embedding --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)
	toolkit demo --task reranker --artifact $(QS_ART)/quickstart-reranker/$(BACKEND)
	toolkit eval --task embedding --dataset sts12-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND) --json $(QS)/eval_sts12.json
	toolkit eval --task embedding --dataset bq-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND) --json $(QS)/eval_bq.json
	toolkit eval --task reranker --dataset msmarco-sample --artifact $(QS_ART)/quickstart-reranker/$(BACKEND) --json $(QS)/eval_msmarco.json
	perf run --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)/seq128 --percentiles 50,90,99 --iterations 200 --json $(QS)/perf.json
	@echo "quickstart done: artifacts in $(QS_ART), results (JSON) in $(QS)/"

# The evaluations again on quickstart's sets (after `make quickstart`; BACKEND as it was built with).
eval:
	toolkit eval --task embedding --dataset sts12-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)
	toolkit eval --task embedding --dataset bq-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)
	toolkit eval --task reranker --dataset msmarco-sample --artifact $(QS_ART)/quickstart-reranker/$(BACKEND)

# What quickstart and the install stamp made. Never WORKSPACE: it holds the sets `make compile` built from real
# checkpoints (hours at 8B); delete a set's directory to remove it.
clean:
	rm -rf $(QS)
	rm -f build/.installed-*
	@rmdir build 2>/dev/null || true
	@echo "kept: sets compiled into $(WORKSPACE)/ (rm -r $(WORKSPACE)/SET_NAME removes one)"
