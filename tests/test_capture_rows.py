"""The capture's residual rows against the ground truth Hugging Face computes itself
(``output_hidden_states``), text by text without padding, and its guard for a block that never ran."""

import pytest
import torch

from engine.core.errors import GraftError
from engine.loading.models import ModelSpec, ModelStore
from engine.measure.capture import _ResidualRows, capture

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A short one.",
]


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
        keep = ~enc["special_tokens_mask"][0].bool() & (
            enc["offset_mapping"][0, :, 1] > enc["offset_mapping"][0, :, 0]
        )
        with torch.inference_mode():
            hs = [
                h.cpu()
                for h in m.model(
                    input_ids=enc["input_ids"].to(device), output_hidden_states=True
                ).hidden_states
            ]
        rows = cap.residual[:, cap.text_index == k]  # (L+1, n_k, d), copied to the host when asked
        assert rows.shape[1] == int(keep.sum()) > 0
        # HF's tuple: the input of block 0, then every block's output, the last after the final norm
        for l in range(L):
            assert torch.allclose(rows[l], hs[l][0, keep], atol=1e-5, rtol=1e-4), (name, k, l)
        assert not torch.allclose(
            rows[L], hs[L][0, keep], atol=1e-3
        )  # h_{L-1} is taken before the final norm


def test_a_block_that_never_ran_is_an_error_not_uninitialised_rows():
    rows = _ResidualRows(2, torch.tensor([0, 2]))
    h = torch.arange(12.0).reshape(1, 3, 4)
    rows.put(-1, h)
    rows.put(1, h + 1)
    with pytest.raises(GraftError, match=r"did not run every block .*\[0\]"):
        rows.result()
    rows.put(0, h)
    assert torch.equal(rows.result()[2], (h + 1)[0, [0, 2]])


def test_length_batches_put_like_lengths_together_and_every_text_once():
    from engine.measure.budget import length_batches

    lengths = [5, 40, 7, 40, 1, 12, 7]
    batches = length_batches(lengths, 3)
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]  # longest first; ties keep workload order
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches([], 8) == [] and length_batches([3], 0) == [[0]]


@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-b"])
def test_rows_stay_in_workload_order_whatever_the_batches(name, one_thread):
    """Batches by length reorder the passes, not the rows: batch sizes 1 and 3 (other neighbours,
    other padding) give the same tokens in the same order, and the same residual and module rows to
    float32 round-off; a text with no content tokens ('') adds no row and shifts none."""
    m = ModelStore().get(ModelSpec.parse(name), "cpu", "float32")
    texts = TEXTS[:2] + [""] + TEXTS[2:]
    lin = [x.name for x in m.arch.linear_modules()][:3]
    a = capture(m, texts, modules=lin, module_inputs=lin, batch_size=1)
    b = capture(m, texts, modules=lin, module_inputs=lin, batch_size=3)
    assert a.token_ids == b.token_ids and a.token_ids[2] == []
    assert torch.equal(a.text_index, b.text_index) and 2 not in a.text_index.tolist()
    assert torch.equal(a.offsets, b.offsets)
    assert torch.allclose(a.residual, b.residual, atol=1e-5, rtol=1e-4)
    for k in lin:
        assert torch.allclose(a.modules[k], b.modules[k], atol=1e-5, rtol=1e-4)
        assert torch.allclose(a.module_inputs[k], b.module_inputs[k], atol=1e-5, rtol=1e-4)
    for k, text in enumerate(texts):  # each text's kept tokens, as its own tokenizer call gives them
        enc = m.tokenizer(text, return_special_tokens_mask=True, return_offsets_mapping=True)
        ids = [
            t
            for t, sp, (s, e) in zip(enc["input_ids"], enc["special_tokens_mask"], enc["offset_mapping"])
            if not sp and e > s
        ]
        assert a.token_ids[k] == ids and len(ids) == int((a.text_index == k).sum())


def _gpt2_folder(tmp_path, name, edit):
    """A tiny GPT-2 (tiny-gpt2-a's tokenizer) whose weights ``edit`` changed, saved as a model folder."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = ModelStore().get(ModelSpec.parse("tiny-gpt2-a"), "cpu", "float32").tokenizer
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
    )
    with torch.no_grad():
        edit(m)
    m.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "case, dtype, match",
    [
        (
            "nan-weight",
            "float32",
            r"from block 1 on \(\d+ of \d+ token rows\): its weights hold NaN or inf "
            r"\(first in transformer\.h\.1\.mlp\.c_fc\.weight\)",
        ),
        (
            "overflow",
            "float32",
            r"from block 2 on .*: its weights are finite, so the forward pass overflowed",
        ),
        (
            "overflow16",
            "float16",
            r"from block 2 on .*: float16 overflows in this model: run it in bfloat16 or float32",
        ),
    ],
)
def test_nan_or_inf_activations_are_named_not_passed_on(tmp_path, case, dtype, match):
    """Rows that are not finite would make every diagnostic undefined (T3's SVD failed outright):
    the capture names the first block that gives them, and why."""
    edits = {
        "nan-weight": lambda m: m.transformer.h[1].mlp.c_fc.weight.__setitem__((0, 0), float("nan")),
        "overflow": lambda m: (
            m.transformer.h[2].mlp.c_fc.weight.mul_(1e25),
            m.transformer.h[2].mlp.c_proj.weight.mul_(1e25),
        ),
        "overflow16": lambda m: (
            m.transformer.h[2].mlp.c_fc.weight.mul_(1e4),
            m.transformer.h[2].mlp.c_proj.weight.mul_(1e4),
        ),
    }
    folder = _gpt2_folder(tmp_path, case, edits[case])
    m = ModelStore().get(ModelSpec.parse(folder), "cpu", dtype)
    with pytest.raises(GraftError, match=match):
        capture(m, TEXTS, batch_size=3)
    m16 = ModelStore().get(ModelSpec.parse(_gpt2_folder(tmp_path, "clean", lambda m: None)), "cpu", dtype)
    assert torch.isfinite(
        capture(m16, TEXTS, batch_size=3).residual
    ).all()  # the same model, unedited, passes


def test_large_finite_rows_pass_the_finite_screen():
    """The screen is a float32 sum per layer, which finite rows near the float32 range overflow: those
    rows are checked value by value and pass; one inf among them does not."""
    from types import SimpleNamespace

    from engine.measure.capture import finite_or_raise

    model = SimpleNamespace(label="m", dtype=torch.float32, model=torch.nn.Linear(2, 2))
    rows = torch.full((3, 10, 4), 3e37)  # every sum of a layer overflows float32
    finite_or_raise(model, rows, {"blocks.0.mlp.up": rows[0]})
    rows[2, 7, 1] = float("inf")
    with pytest.raises(GraftError, match=r"from block 1 on \(1 of 10 token rows\): its weights are finite"):
        finite_or_raise(model, rows, {})
