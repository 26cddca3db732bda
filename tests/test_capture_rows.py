"""The capture's residual rows against the ground truth Hugging Face computes itself
(``output_hidden_states``), text by text without padding, and its guard for a block that never ran."""
import pytest
import torch

from engine.capture import _ResidualRows, capture
from engine.errors import GraftError
from engine.models import ModelSpec, ModelStore

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees.",
         "Paris is the capital of France, and Berlin is the capital of Germany.", "A short one."]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-b"])
def test_captured_rows_equal_each_texts_own_hidden_states(name, device, one_thread):
    m = ModelStore().get(ModelSpec.parse(name), device, "float32")
    cap = capture(m, TEXTS, batch_size=3)  # padded batches of 3 and 1
    L = m.arch.n_layers
    tok = m.tokenizer
    for k, text in enumerate(TEXTS):
        enc = tok(text, return_tensors="pt", return_special_tokens_mask=True, return_offsets_mapping=True)
        keep = ~enc["special_tokens_mask"][0].bool() & (enc["offset_mapping"][0, :, 1] > enc["offset_mapping"][0, :, 0])
        with torch.inference_mode():
            hs = [h.cpu() for h in m.model(input_ids=enc["input_ids"].to(device), output_hidden_states=True).hidden_states]
        rows = cap.residual[:, cap.text_index == k]  # (L+1, n_k, d), copied to the host when asked
        assert rows.shape[1] == int(keep.sum()) > 0
        # HF's tuple: the input of block 0, then every block's output, the last after the final norm
        for l in range(L):
            assert torch.allclose(rows[l], hs[l][0, keep], atol=1e-5, rtol=1e-4), (name, k, l)
        assert not torch.allclose(rows[L], hs[L][0, keep], atol=1e-3)  # h_{L-1} is taken before the final norm


def test_a_block_that_never_ran_is_an_error_not_uninitialised_rows():
    rows = _ResidualRows(2, torch.tensor([0, 2]))
    h = torch.arange(12.0).reshape(1, 3, 4)
    rows.put(-1, h)
    rows.put(1, h + 1)
    with pytest.raises(GraftError, match=r"did not run every block .*\[0\]"):
        rows.result()
    rows.put(0, h)
    assert torch.equal(rows.result()[2], (h + 1)[0, [0, 2]])
