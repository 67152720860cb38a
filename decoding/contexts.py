"""The B*K (question, doc) contexts encoded once, with the decoder's cross-attention keys and values.

Everything the decoder reads from a context depends on the (question, doc) pair alone: the
encoder states, and in every decoder layer the cross-attention keys and values projected from
them. Both RAG decoders run many decoding rows over the same context (W beams, or N
candidates scored under it), so both are computed here once per context, and each decoding
row gets them by index: no second encoder pass, no second key/value projection.

The keys and values reach the decoder as a transformers ``EncoderDecoderCache`` whose
cross-attention part is already filled; the decoder then reads the encoder states only for
their shape, so a broadcast view stands in for them (no copy per row). Models that do not keep
such a cache, or that ignore it, are detected once (`encode_contexts` compares one decoder
step both ways) and get the encoder states copied per row instead.

Dimensions: R0 contexts (B*K), R decoding rows, L source length, H hidden size,
h attention heads, d = H / h.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

# A cached decoder step may differ from an uncached one by rounding only: this many units of the
# logits' precision (float32: ~1e-5 of their scale; bfloat16: ~6%), while another context's logits differ by O(1).
CACHE_CHECK_ULPS = 8


@dataclass
class EncodedContexts:
    """Encoder states of the R0 contexts and, when the model caches them, its cross-attention keys/values.

    Fields:
        states: (R0, L, H) the encoder's last hidden states.
        mask: (R0, L) the contexts' attention mask (padding is never attended to).
        cross: per decoder layer, keys and values (R0, h, L, d) of cross-attention; None: the model
            does not keep them in an ``EncoderDecoderCache``, so each decoding row projects its own.
    """

    states: torch.Tensor
    mask: torch.Tensor
    cross: DynamicCache | None

    def decoder_inputs(self, rows: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of a generator call whose decoding row i reads context rows[i]. rows (R,).

        Returns ``encoder_outputs`` (R, L, H), ``attention_mask`` (R, L) and ``past_key_values``
        (a fresh cache holding only the cross-attention keys/values of the rows, or None).
        """
        if self.cross is None:
            return {"encoder_outputs": BaseModelOutput(last_hidden_state=self.states[rows]),  # (R, L, H) copy
                    "attention_mask": self.mask[rows], "past_key_values": None}
        cross = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in self.cross.layers])
        cross.batch_select_indices(rows)  # per layer (R, h, L, d): one indexed copy, no projection
        shape_only = self.states[:1].expand(rows.shape[0], -1, -1)  # (R, L, H) view, read for its shape only
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=shape_only), "attention_mask": self.mask[rows],
                "past_key_values": EncoderDecoderCache(DynamicCache(), cross)}


def _start_tokens(generator: PreTrainedModel, rows: int, device: torch.device) -> torch.Tensor:
    """(rows, 1) decoder start tokens."""
    return torch.full((rows, 1), int(generator.config.decoder_start_token_id), dtype=torch.long, device=device)


def encode_contexts(generator: PreTrainedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> EncodedContexts:
    """Run the encoder once on (R0, L) contexts and project the cross-attention keys/values once.

    The keys/values come from one decoder step on the start token (use_cache), which also
    checks that the model reads them from the cache: the same step is re-run from the cache
    with the broadcast stand-in for the states and must give the same logits, else ``cross`` is None.
    """
    encoder = generator.get_encoder()
    states = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    plain = EncodedContexts(states, attention_mask, None)
    start = _start_tokens(generator, states.shape[0], states.device)  # (R0, 1)
    out = generator(**plain.decoder_inputs(torch.arange(states.shape[0], device=states.device)),
                    decoder_input_ids=start, use_cache=True, return_dict=True)
    cache = out.past_key_values
    if not isinstance(cache, EncoderDecoderCache) or len(cache.cross_attention_cache.layers) == 0:
        return plain
    contexts = EncodedContexts(states, attention_mask, cache.cross_attention_cache)
    rows = torch.arange(states.shape[0], device=states.device)
    inputs = contexts.decoder_inputs(rows)
    again = generator(**inputs, decoder_input_ids=start, use_cache=True, return_dict=True)
    length = states.shape[1]
    kept = all(layer.keys.shape[-2] == length for layer in inputs["past_key_values"].cross_attention_cache.layers)
    scale = float(out.logits.abs().max()) + 1.0
    tolerance = CACHE_CHECK_ULPS * torch.finfo(out.logits.dtype).eps * scale
    if not kept or not torch.allclose(again.logits.float(), out.logits.float(), atol=tolerance, rtol=0.0):
        return plain  # the model re-projects or ignores the cached keys/values: give it the states themselves
    return contexts
