"""The patched model against the unpatched Hugging Face model, fp32, left-padded batches of mixed lengths."""
import numpy as np
import pytest
import torch

from toolkit.backends import TorchReference
from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
from toolkit.tasks import TASKS, l2_normalize, yes_probability
from toolkit.text import left_pad
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
