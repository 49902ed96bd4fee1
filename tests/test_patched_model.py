"""The patched model against the unpatched Hugging Face model, fp32, left-padded batches of mixed lengths."""
import numpy as np
import pytest
import torch

from toolkit.api import token_rows
from toolkit.backends import TorchReference
from toolkit.errors import ToolkitError
from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
from toolkit.tasks import TASKS, WEB_SEARCH_INSTRUCTION, l2_normalize, yes_probability
from toolkit.text import left_pad, split_cached_prefix
from toolkit.tokenizer import ENDOFTEXT_ID

SEQ = 48


def mixed_rows(tokenizer):
    text = "Left padding keeps the last real token at the end: 左填充。"
    typical = tokenizer.encode_one(text)
    exact = (typical * 10)[: SEQ - 1]
    return [[ENDOFTEXT_ID], typical + [ENDOFTEXT_ID], exact + [ENDOFTEXT_ID]]


@pytest.mark.parametrize("task", ["embedding", "reranker"])
@pytest.mark.parametrize("insert_slice", [True, False])
def test_patched_matches_unpatched_fp32(checkpoints, tokenizers, task, insert_slice):
    ids, mask = left_pad(mixed_rows(tokenizers[task]), SEQ, ENDOFTEXT_ID)
    patched = Qwen3ForDeployment.from_pretrained(checkpoints[task], TASKS[task].output_name, insert_slice=insert_slice)
    with torch.no_grad():
        ours = patched(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    ref = TorchReference(checkpoints[task], TASKS[task]).run(ids, mask)
    if task == "embedding":
        assert ours.shape == (3, 64)
        assert np.abs(l2_normalize(ours) - l2_normalize(ref)).max() <= 1e-4
    else:
        assert ours.shape == (3, 2)
        assert np.abs(yes_probability(ours) - yes_probability(ref)).max() <= 1e-5
        assert np.ptp(yes_probability(ref)) > 0.01  # the synthetic model's scores do vary between inputs


def test_padding_amount_does_not_change_the_result(checkpoints, tokenizers):
    """RoPE is relative, so the same text left-padded to 48 or 96 positions gives the same embedding."""
    rows = mixed_rows(tokenizers["embedding"])[:2]
    model = Qwen3ForDeployment.from_pretrained(checkpoints["embedding"], "last_hidden")
    with torch.no_grad():
        a = model(*map(torch.from_numpy, left_pad(rows, SEQ, ENDOFTEXT_ID))).numpy()
        b = model(*map(torch.from_numpy, left_pad(rows, 2 * SEQ, ENDOFTEXT_ID))).numpy()
    assert np.abs(l2_normalize(a) - l2_normalize(b)).max() < 1e-5


@pytest.mark.parametrize("instruction", [None, WEB_SEARCH_INSTRUCTION], ids=["prefix", "prefix-and-instruction"])
def test_a_cached_prompt_prefix_gives_the_reference_result(checkpoints, tokenizers, instruction):
    """The reranker's prompt start run once (its keys and values held by the layers, read from a streamed model one
    layer at a time) and every row padded after it: the unpatched model's P(yes) on the left-padded rows, for bodies
    of very different lengths in one batch (one of exactly SEQ tokens), with only the rows' own tokens through the
    layers. The start: the 39-token chat prefix, or with it the web-search instruction up to the query (60 tokens);
    the bodies carry the instruction either way."""
    task, tokenizer, seq = TASKS["reranker"], tokenizers["reranker"], 96
    bodies = [task.body(("q", "word " * k)) for k in (0, 8, 40)]  # the last one cut to fill SEQ
    rows = token_rows(task.prompt(tokenizer), tokenizer, bodies, seq, truncation="truncate")
    ids, mask = left_pad(rows, seq, ENDOFTEXT_ID)
    reference = yes_probability(TorchReference(checkpoints["reranker"], task).run(ids, mask))
    model = Qwen3ForDeployment.from_pretrained(checkpoints["reranker"], task.output_name, stream=True)
    prefix = task.prompt_start(tokenizer, instruction)
    model.cache_prefix(prefix, instruction)
    positions = []
    model.layers[0].register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1]))
    with torch.no_grad(), model.resident("", "embed_tokens."):
        ours = yes_probability(model(*map(torch.from_numpy, split_cached_prefix(ids, mask, prefix))).numpy())
    assert len(prefix) == (39 if instruction is None else 60) and positions == [seq - len(prefix)]
    assert np.abs(ours - reference).max() <= 1e-5
    assert np.ptp(reference) > 0.01  # the rows do score differently


def test_rows_go_prefix_first_for_a_cached_prefix():
    ids, mask = left_pad([[1, 2, 3, 4, 5], [1, 2, 9], [1, 2, 9]], 7, 0)
    laid_out, open_to = split_cached_prefix(ids, mask, [1, 2])
    assert laid_out.tolist()[:2] == [[1, 2, 0, 0, 3, 4, 5], [1, 2, 0, 0, 0, 0, 9]]
    assert open_to.tolist()[:2] == [[1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 1]]
    assert split_cached_prefix(ids, mask, [])[0] is ids  # no cached prefix: as they came
    for rows in ([[5, 1, 2, 6]], [[1, 2]]):  # not starting with it; nothing after it
        with pytest.raises(ToolkitError, match="prompt prefix"):
            split_cached_prefix(*left_pad(rows, 7, 0), [1, 2])
