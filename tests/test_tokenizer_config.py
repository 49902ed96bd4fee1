import pytest

from toolkit.checkpoint import resolve_checkpoint
from toolkit.config import load_build_config, parse_seq_lens
from toolkit.errors import ToolkitError
from toolkit.tasks import RERANKER
from toolkit.tokenizer import ENDOFTEXT_ID, QWEN3_ADDED_TOKENS, build_qwen3_tokenizer


def test_tokenizer_matches_qwen3_ids():
    tok = build_qwen3_tokenizer("<|im_end|>", append_eos=False)
    no, yes = RERANKER.answer_token_ids
    assert tok("yes", add_special_tokens=False).input_ids == [yes] == [9693]
    assert tok("no", add_special_tokens=False).input_ids == [no] == [2152]
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151644, 151645, 151667, 151668]
    assert len(tok) == 151669 and tok.padding_side == "left"
    # special tokens inside text are recognised as single tokens, as the reranker template needs
    assert tok("<|im_start|>user\n", add_special_tokens=False).input_ids[0] == 151644


def test_embedding_tokenizer_appends_endoftext():
    tok = build_qwen3_tokenizer()
    assert tok("Hello world").input_ids == [9707, 1879, ENDOFTEXT_ID]


def test_reference_style_config(tmp_path):
    cfg = load_build_config("build_configs/embedding_config_fp16.yaml")
    assert cfg.task == "embedding" and cfg.seq_lens == (512,) and cfg.dtype == "fp16" and cfg.backends == ("onnx",)
    assert load_build_config("build_configs/reranker_config_fp16.yaml").task == "reranker"
    assert parse_seq_lens("512,128") == (128, 512) and parse_seq_lens([[64], []]) == (64,)
    assert cfg.with_overrides(seq_lens=(64, 128), dtype=None).seq_lens == (64, 128)
    int8 = tmp_path / "int8.yaml"
    int8.write_text("task: embedding\nfrontend: {checkpoint: x, seq: 8}\n"
                    "backend: {dtype: int8, quantization: {preflight: false, smooth_alpha: 0.8}}\n")
    assert load_build_config(int8).preflight is False and load_build_config(int8).smooth_alpha == 0.8
    assert cfg.fp32_linears == "bf16x3" and cfg.with_overrides(fp32_linears="fma").fp32_linears == "fma"
    reranker = tmp_path / "reranker.yaml"
    reranker.write_text("task: reranker\nfrontend: {checkpoint: x, seq: 128, instruction: Find it, "
                        "cache_instruction: false}\n")
    loaded = load_build_config(reranker)
    assert (loaded.instruction, loaded.cache_instruction) == ("Find it", False)


@pytest.mark.parametrize("text, message", [
    ("task: classify\nfrontend: {checkpoint: x, seq: 8}\n", "task must be one of"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: [0]}\n", "sequence lengths"),
    ("task: embedding\nfrontend: {checkpoint: x}\n", "input_ids"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {dtype: int4}\n", "dtype must be"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbogus: 1\n", "unknown key 'bogus'"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8, batchsize: 4}\n", "unknown key 'frontend.batchsize'"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {dtpye: fp32}\n", "unknown key 'backend.dtpye'"),
    ("task: embedding\nfrontend: [1, 2]\n", "frontend must be a mapping"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: [true]}\n", "sequence lengths must be integers"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8, batch: true}\n", "frontend.batch must be of type int"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8, batch: 0}\n", "batch must be a positive integer"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {quantization: {preflight: 1}}\n",
     "backend.quantization.preflight must be of type bool"),
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {fp32_linears: tf32}\n",
     "backend.fp32_linears must be one of"),
    ("- a list\n", "the file must be a mapping"),
    ("task: reranker\nfrontend: {checkpoint: x, seq: 8, cache_instruction: 1}\n",
     "frontend.cache_instruction must be of type bool"),
    ("task: reranker\nfrontend: {checkpoint: x, seq: 8, instruction: '  '}\n",
     "the instruction '  ' is only whitespace"),  # a set caching it could not run: the runtime refuses it
    ("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {kind: []}\n",
     "backend.kind is empty"),  # built nothing and exited 0
])
def test_bad_config_is_refused_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ToolkitError, match=message):
        load_build_config(path)


def test_unreachable_checkpoint_says_how_to_fix(tmp_path):
    with pytest.raises(ToolkitError, match="toolkit synth"):
        resolve_checkpoint("Qwen/Qwen3-Embedding-0.6B")  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(ToolkitError, match="not a hub id"):
        resolve_checkpoint(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ToolkitError, match="no config.json"):
        resolve_checkpoint(tmp_path)


def test_a_checkpoint_s_tokenizer_json_gives_the_ids_autotokenizer_does(checkpoints, tmp_path):
    # load_tokenizer runs tokenizer.json with `tokenizers` (AutoTokenizer imports PyTorch); a hub checkpoint names
    # Qwen2Tokenizer, which AutoTokenizer rebuilds from the vocabulary: both must tokenise alike
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from toolkit.checkpoint import load_tokenizer

    hub_style = Path(shutil.copytree(checkpoints["embedding"], tmp_path / "hub",
                                     ignore=shutil.ignore_patterns("*.safetensors")))
    config = json.loads((hub_style / "tokenizer_config.json").read_text())
    (hub_style / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    calibration = Path(__file__).parents[1] / "toolkit" / "data" / "calibration.jsonl"
    texts = [text for line in calibration.read_text().splitlines() for text in json.loads(line).values()]
    texts += ["为什么我无法看到额度", "Instruct: x\nQuery:  héllo\t\r\n wörld 123456", "<|im_start|>user <think>ok"]
    auto = AutoTokenizer.from_pretrained(hub_style)
    assert type(auto).__name__ == "Qwen2Tokenizer"
    lean = load_tokenizer(hub_style)
    assert lean.encode(texts) == auto(texts, add_special_tokens=False).input_ids
    # special: what tokenizer.json marks so (Qwen3's config lists the same 14 as eos and additional special tokens)
    assert lean.special_ids == {ENDOFTEXT_ID + i for i, (_, special) in enumerate(QWEN3_ADDED_TOKENS) if special}


def test_backend_kinds_named_twice_are_built_once_in_order(tmp_path):
    """`kind: [onnx, onnx]` built and validated the same artifact twice."""
    path = tmp_path / "c.yaml"
    path.write_text("task: embedding\nfrontend: {checkpoint: x, seq: 8}\nbackend: {kind: [tvm, onnx, tvm]}\n")
    assert load_build_config(path).backends == ("tvm", "onnx")


@pytest.mark.parametrize("overrides, message", [
    ({"batch_tokens": 0}, "--batch-tokens must be a positive integer, got 0"),
    ({"batch": -1}, "--batch must be a positive integer, got -1"),
    ({"checkpoint": ""}, "--checkpoint is empty: give a hub id or a local path"),
    ({"name": "a/b"}, "--name must be one plain directory name"),
    ({"instruction": "  "}, "the instruction '  ' is only whitespace"),
    ({"dtype": "bf16"}, "use --backend tvm in .*embedding_config_fp16.yaml"),  # the backend is the file's
])
def test_a_bad_command_line_value_is_not_blamed_on_the_config_file(overrides, message):
    """`--batch-tokens 0` said `batch_tokens must be a positive integer, got 0 in build_configs/...yaml`."""
    cfg = load_build_config("build_configs/embedding_config_fp16.yaml")
    with pytest.raises(ToolkitError, match=message) as refused:
        cfg.with_overrides(**overrides)
    blames_the_file = "embedding_config_fp16.yaml" in str(refused.value)
    assert blames_the_file == ("backend" in message), refused.value


def test_a_bad_config_value_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: embedding\nfrontend: {checkpoint: x, seq: 8, batch_tokens: 0}\n")
    with pytest.raises(ToolkitError, match=f"^batch_tokens must be a positive integer, got 0 in {path}$"):
        load_build_config(path)
