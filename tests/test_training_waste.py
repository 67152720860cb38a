"""The training step's savings are exact: target log-probs without a vocab-wide log-softmax, short padding."""
from __future__ import annotations

import pytest
import torch

from rag_models.docs import RetrievedDocs
from rag_models.generator import Generator
from rag_models.marginalize import token_logprobs
from rag_models.rag import RagModel
from rag_models.retriever import DenseEncoder
from rag_models.tiny_models import TinyBartSize, TinyDprSize, tiny_bart, tiny_dpr_encoder
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_equal_log_softmax_gather_with_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5, 50, generator=gen) * 3).to(dtype).requires_grad_()  # (N, T, V)
    target = torch.randint(0, 50, (6, 5), generator=gen)  # (N, T)
    ours = token_logprobs(logits, target)
    reference_logits = logits.detach().float().requires_grad_()
    reference = reference_logits.log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)  # the (N, T, V) way
    assert ours.dtype == torch.float32  # upcast before the logsumexp, as the log-softmax reference
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    weights = torch.randn(6, 5, generator=gen)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 gradients are rounded to bf16
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad.to(dtype).float(), atol=tolerance, rtol=0)


def _pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) -> (N, length) right-padded, as transformers' retriever pads to max_combined_length."""
    extra = length - ids.shape[1]
    return (torch.cat([ids, ids.new_full((ids.shape[0], extra), pad)], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_padding_to_the_longest_row_gives_the_loss_of_padding_to_max_length(marginalization):
    texts = ["quenby lies on the river varn", "who founded marrowick", "elsa tarn founded it in 1742"]
    bart_tok = train_bart_tokenizer(texts * 5, 300)
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(texts * 5, 100))
    q_encoder = tiny_dpr_encoder("question", len(q_tok), TinyDprSize(hidden_size=16, num_layers=1), seed=0)
    bart = tiny_bart(bart_tok, TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64), seed=1)
    model = RagModel(question_encoder=DenseEncoder(q_encoder), question_tokenizer=q_tok,
                     generator=Generator(bart, bart_tok, max_source_length=64), marginalization=marginalization,
                     n_docs=2).eval()
    docs = RetrievedDocs(ids=torch.zeros(2, 2, dtype=torch.long), scores=torch.zeros(2, 2),
                         vectors=torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(2)),
                         titles=[["Quenby", "Tarn"], ["Marrowick", "Quenby"]],
                         texts=[[texts[0], texts[2]], [texts[2] + " " + texts[0], texts[1]]])
    batch = model.prepare_inputs(["where is quenby", "who founded marrowick in the year 1742"], docs,
                                 ["varn", "elsa tarn"])
    short = batch["context_input_ids"].shape[1]
    assert short < 64 and (batch["context_attention_mask"] == 0).any()  # padded to its longest row only
    pad = bart_tok.pad_token_id
    long_ids, long_mask = _pad_to(batch["context_input_ids"], batch["context_attention_mask"], 64, pad)
    with torch.no_grad():
        tight = model(**batch)
        padded = model(**{**batch, "context_input_ids": long_ids, "context_attention_mask": long_mask})
    torch.testing.assert_close(tight.nll, padded.nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(tight.seq_logits, padded.seq_logits, atol=1e-5, rtol=0)
