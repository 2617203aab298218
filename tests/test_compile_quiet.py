"""generate(compile=True) compiles without graph breaks of evofast's own making (a data-dependent
branch in an adapter's forward used to print a page of dynamo warnings on BERT)."""
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import evofast  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bert_compiled_forward_has_no_graph_break(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(cfg).eval()
    evofast.patch(model, mask_id=299)
    ids, am = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    kw = dict(gen_length=8, block_length=4, steps=4)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        out = evofast.generate(model, ids, am, compile=True, **kw)
    breaks = [r.getMessage() for r in caplog.records if "Graph break" in r.getMessage()]
    assert not breaks, breaks[0]
    assert torch.equal(out, evofast.generate(model, ids, am, **kw))
