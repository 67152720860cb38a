"""Blank questions to rag-ask are refused; absurdly long passages are cut before the tokenizer reads them."""
from __future__ import annotations

import numpy as np
import pytest

from decoding.ask_cli import main as ask_main
from index.encode import make_embed_fn
from rag_models.retriever import load_encoder, tokenize_passages
from rag_models.text_limits import CHARS_PER_TOKEN, clip_for_tokens


@pytest.mark.parametrize("question", ["   ", ""])
def test_rag_ask_refuses_a_blank_question_before_loading_anything(tmp_path, capsys, question):
    with pytest.raises(SystemExit) as exited:  # every command exits 2 on bad input (rag_models/cli_errors.py)
        ask_main(["--checkpoint", str(tmp_path / "absent"), "--index", str(tmp_path / "absent"), "who?", question])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "setting `questions`: question 2 of the command line is" in err
    assert ("empty" if not question else "blank") in err and "Traceback" not in err


class _Recording:
    """A tokenizer that records the longest string it was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, *texts, **kwargs):
        self.longest = max([self.longest, *(len(t) for batch in texts for t in batch)])
        return self.tokenizer(*texts, **kwargs)


def test_a_passage_of_millions_of_characters_is_cut_before_tokenizing(tiny_setup):
    encoder, tokenizer = load_encoder(tiny_setup.models.context_encoder, role="context")
    max_length = 32
    huge = "river town of the north " * 100_000  # 2.4 million characters: a file that lost its line breaks
    recording = _Recording(tokenizer)
    vectors = make_embed_fn(encoder, recording, max_length=max_length)(["Title", "T"], [huge, "short text"])
    assert recording.longest <= max_length * CHARS_PER_TOKEN
    whole = tokenizer(["Title"], [huge], truncation=True, max_length=max_length)["input_ids"]
    clipped = tokenize_passages(tokenizer, ["Title"], [huge], max_length)["input_ids"].tolist()
    assert clipped == whole  # the same tokens as tokenizing everything: the cut only saves the work
    reference = make_embed_fn(encoder, tokenizer, max_length=max_length)(["Title"], [clip_for_tokens(huge, 1000)])
    np.testing.assert_allclose(vectors[:1], reference, rtol=1e-5, atol=1e-6)
