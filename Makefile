# qwen3-deploy. Two commands for a newcomer:  make quickstart   (end to end on a synthetic model)   make test
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

eval:
	toolkit eval --task embedding --dataset sts12-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)
	toolkit eval --task embedding --dataset bq-sample --artifact $(QS_ART)/quickstart-embedding/$(BACKEND)
	toolkit eval --task reranker --dataset msmarco-sample --artifact $(QS_ART)/quickstart-reranker/$(BACKEND)

clean:
	rm -rf $(QS) $(WORKSPACE)
