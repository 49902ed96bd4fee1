# qwen3-deploy. Two commands for a newcomer:  make quickstart   (end to end on a synthetic model)   make test
PY ?= python3
SEQ ?= 512
WORKSPACE ?= workspace
BACKEND ?= onnx
CHECKPOINT_EMB ?=
CHECKPOINT_RERANK ?=
QS := quickstart

.PHONY: install test compile quickstart clean

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .[dev]

test:
	$(PY) -m pytest -q tests

# Both tasks at SEQ (comma-separated list for bucket sets). Without CHECKPOINT_* the configs' hub ids are used;
# offline, the error says how to pass a local directory or build a synthetic checkpoint.
compile:
	toolkit compile build_configs/embedding_config_fp16.yaml --seq $(SEQ) --backend $(BACKEND) --workspace $(WORKSPACE) \
		$(if $(CHECKPOINT_EMB),--checkpoint $(CHECKPOINT_EMB))
	toolkit compile build_configs/reranker_config_fp16.yaml --seq $(SEQ) --backend $(BACKEND) --workspace $(WORKSPACE) \
		$(if $(CHECKPOINT_RERANK),--checkpoint $(CHECKPOINT_RERANK))

# End to end on tiny synthetic checkpoints: synth -> compile (bucket set) -> inspect.
quickstart:
	toolkit synth --task embedding --shape tiny $(QS)/checkpoints/embedding
	toolkit synth --task reranker --shape tiny $(QS)/checkpoints/reranker
	$(MAKE) compile SEQ=64,128,256 BACKEND=$(BACKEND) WORKSPACE=$(QS)/artifacts \
		CHECKPOINT_EMB=$(QS)/checkpoints/embedding CHECKPOINT_RERANK=$(QS)/checkpoints/reranker
	toolkit inspect $(QS)/artifacts/qwen3-embedding-0.6b-fp16/onnx/seq128

clean:
	rm -rf $(QS) $(WORKSPACE)
