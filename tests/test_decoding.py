"""Decoding on its own terms: beam bookkeeping, padding, scores against brute force, fast vs
thorough, bad settings, answer() with provenance on a real index, rag-ask, and the configs."""
from __future__ import annotations

import inspect
import io
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from decoding.answer import STRATEGIES, Answer, DecodingSettings, answer, decode_retrieved
from decoding.ask_cli import main as ask_main
from decoding.beam import SearchSettings, beam_search, greedy_search, process_logprobs, repeated_ngram_tokens
from decoding.contexts import EncodedContexts, encode_contexts
from decoding.rag_sequence import rag_sequence_generate
from decoding.rag_token import rag_token_generate
from decoding.retrieve import retrieve
from decoding.scoring import teacher_forced_logprobs
from rag_models.errors import InputError
from rag_models.tiny_models import TinyBartSize, tiny_bart
from rag_models.tokenization import train_bart_tokenizer

TEXTS = [
    "Quenby lies on the river Varn in the region of Oster.",
    "Marrowick was founded in 1742 by Elsa Tarn; its main export is copper.",
    "which river flows through Quenby? who founded Marrowick?",
] * 10
B, K, L = 2, 3, 10
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "decoding"


@pytest.fixture(scope="module")
def tiny():
    """A tiny BART whose answers depend on the docs (init_std 0.1), BART-large's forced BOS, unpadded inputs."""
    size = TinyBartSize(d_model=64, layers=2, heads=2, ffn_dim=128, vocab_size=300, init_std=0.1)
    bart = tiny_bart(train_bart_tokenizer(TEXTS, 300), size, seed=0)
    bart.generation_config.forced_bos_token_id = 0
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (B * K, L), generator=gen)  # (B*K, L)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"bart": bart, "ids": ids, "mask": torch.ones_like(ids), "scores": torch.randn(B, K, generator=gen) * 2}


def brute_force_loglik(bart, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
    """log p(y|x) by one plain forward of the generator; pads and the forced first BOS not counted."""
    with torch.no_grad():
        logits = bart(input_ids=ids[None], attention_mask=mask[None], decoder_input_ids=y[None, :-1]).logits[0]
    token_lp = logits.log_softmax(-1).gather(1, y[1:, None]).squeeze(1)  # (T-1,)
    keep = y[1:] != bart.config.pad_token_id
    keep[0] = False  # the forced BOS (every hypothesis starts with it)
    return float(token_lp[keep].sum())


# ---------------------------------------------------------------- beam bookkeeping (no model)

MARKOV = torch.log_softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(3)) * 2, dim=-1)  # (V, V), eos = 2


def _markov_step(tokens: torch.Tensor, origin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(next | last token): a model whose exact n-best can be enumerated; extra = the same log-probs."""
    return MARKOV[tokens], MARKOV[tokens][:, None, :]  # (R, V), (R, 1, V)


def _exhaustive(max_length: int, n: int) -> list[tuple[tuple[int, ...], float]]:
    """Every finished sequence (ends with eos, or reaches max_length), best n by summed log-prob."""
    found = []
    for length in range(1, max_length):
        for body in itertools.product(range(5), repeat=length):
            ended_early = any(t == 2 for t in body[:-1])
            if ended_early or (body[-1] != 2 and length < max_length - 1):
                continue
            seq = (2, *body)
            found.append((seq, sum(float(MARKOV[a, b]) for a, b in zip(seq, seq[1:]))))
    return sorted(found, key=lambda pair: -pair[1])[:n]


def test_beam_search_with_room_for_every_prefix_is_exact():
    # length_penalty 0 and early_stopping "never": the canonical search; 64 beams hold every prefix.
    s = SearchSettings(num_beams=64, max_length=4, num_return_sequences=5, length_penalty=0.0, early_stopping="never",
                       decoder_start_token_id=2, eos_token_ids=(2,), pad_token_id=9)  # pad: no real token
    out = beam_search(_markov_step, 1, s, torch.device("cpu"), extra_dims=1)
    best = _exhaustive(4, 5)
    for row, (seq, score) in zip(out.sequences.tolist(), best):
        assert tuple(t for t in row if t != 9) == seq
    assert torch.allclose(out.scores, torch.tensor([score for _, score in best]), atol=1e-5)
    assert torch.allclose(out.token_logprobs.sum(1), out.scores, atol=1e-5)  # no processor: raw == processed
    assert torch.allclose(out.extra[:, 0], out.scores, atol=1e-5)  # extra scores follow their hypotheses


def test_greedy_and_min_length():
    s = SearchSettings(max_length=6, min_length=4, decoder_start_token_id=2, eos_token_ids=(2,), pad_token_id=9)
    out = greedy_search(_markov_step, 1, s, torch.device("cpu"), extra_dims=1)
    row = out.sequences[0].tolist()
    assert float(out.extra[0, 0]) == pytest.approx(float(out.token_logprobs.sum()), abs=1e-5)
    assert 2 not in row[1:3]  # EOS forbidden before 4 tokens (start included)
    expected = [2]
    for _ in range(len(row) - 1):
        scores = MARKOV[expected[-1]].clone()
        if len(expected) < 4:
            scores[2] = -math.inf
        expected.append(int(scores.argmax()))
        if expected[-1] == 2:
            break
    assert row == expected


# ---------------------------------------------------------------- decoders against brute force


def test_padding_is_ignored(tiny):
    pad = tiny["bart"].config.pad_token_id
    padded = torch.cat([tiny["ids"], torch.full((B * K, 4), pad)], dim=1)  # (B*K, L+4)
    mask = torch.cat([tiny["mask"], torch.zeros(B * K, 4, dtype=torch.long)], dim=1)
    search = dict(num_beams=3, max_length=8, min_length=3)
    for decode in (rag_token_generate, lambda *a, **kw: rag_sequence_generate(*a, mode="thorough", **kw),
                   lambda *a, **kw: rag_sequence_generate(*a, mode="fast", **kw)):
        plain = decode(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], **search)
        more = decode(tiny["bart"], padded, mask, tiny["scores"], **search)
        assert torch.equal(plain.sequences, more.sequences)
        assert torch.allclose(plain.scores, more.scores, atol=1e-5)
        assert torch.allclose(plain.doc_posteriors, more.doc_posteriors, atol=1e-5)


def _check_provenance(tiny, result, r: int, finite_only: bool = False) -> None:
    """doc_loglik against a plain forward per (hypothesis, doc); posteriors from the doc prior."""
    prior = tiny["scores"].log_softmax(-1)  # (B, K)
    for row in range(B * r):
        b = row // r
        for k in range(K):
            got = float(result.doc_loglik[row, k])
            if finite_only and math.isinf(got):
                assert result.doc_posteriors[row, k] == 0
                continue
            want = brute_force_loglik(tiny["bart"], tiny["ids"][b * K + k], tiny["mask"][b * K + k],
                                      result.sequences[row])
            assert got == pytest.approx(want, abs=1e-4)
        joint = prior[b] + result.doc_loglik[row]
        assert torch.allclose(result.doc_posteriors[row], torch.softmax(joint, -1), atol=1e-5)
    assert torch.allclose(result.doc_posteriors.sum(-1), torch.ones(B * r), atol=1e-5)


def test_rag_token_provenance_is_teacher_forced(tiny):
    result = rag_token_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], num_beams=3,
                                num_return_sequences=2, max_length=8, min_length=3)
    _check_provenance(tiny, result, 2)


def test_thorough_scores_every_candidate_under_every_doc(tiny):
    result = rag_sequence_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], mode="thorough",
                                   num_beams=3, num_return_sequences=3, max_length=8, min_length=3)
    _check_provenance(tiny, result, 3)
    marginal = (tiny["scores"].log_softmax(-1).repeat_interleave(3, 0) + result.doc_loglik).logsumexp(-1)
    assert torch.allclose(result.scores, marginal, atol=1e-5)
    assert torch.all(result.scores.view(B, 3)[:, :-1] >= result.scores.view(B, 3)[:, 1:])  # best first


def test_fast_is_thorough_restricted_to_the_producing_docs(tiny):
    search = dict(num_beams=3, num_return_sequences=3, max_length=8, min_length=3)
    fast = rag_sequence_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], mode="fast", **search)
    thorough = rag_sequence_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], mode="thorough", **search)
    _check_provenance(tiny, fast, 3, finite_only=True)  # the beams' plain sums are the true log-likelihoods
    assert torch.isfinite(fast.doc_loglik).any(-1).all()  # every hypothesis came from some doc
    assert torch.isinf(fast.doc_loglik).any()  # and some doc did not produce it: fast differs from thorough
    matched = 0
    for row, seq in enumerate(fast.sequences.tolist()):
        same = [i for i, other in enumerate(thorough.sequences.tolist()) if other == seq and i // 3 == row // 3]
        matched += len(same)
        for i in same:  # dropping docs can only lower log p(y|x)
            assert fast.scores[row] <= thorough.scores[i] + 1e-5
            finite = torch.isfinite(fast.doc_loglik[row])
            assert torch.allclose(fast.doc_loglik[row][finite], thorough.doc_loglik[i][finite], atol=1e-4)
    assert matched > 0  # the comparison above did run


@pytest.mark.parametrize(
    "settings,setting",
    [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=0), "num_beams"),
        (dict(max_length=1), "max_length"),
        (dict(max_length=5, min_length=6), "min_length"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(n_docs=K + 1), "n_docs"),
        (dict(mode="slow"), "mode"),
    ],
)
def test_bad_settings_raise_input_error(tiny, settings, setting):
    with pytest.raises(InputError, match=setting):
        rag_sequence_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], **settings)
    if "mode" not in settings:
        with pytest.raises(InputError, match=setting):
            rag_token_generate(tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"], **settings)


def test_mismatched_inputs_raise_input_error(tiny):
    with pytest.raises(InputError, match="context_input_ids"):
        rag_token_generate(tiny["bart"], tiny["ids"][:-1], tiny["mask"][:-1], tiny["scores"])
    with pytest.raises(InputError, match="context_attention_mask"):
        rag_sequence_generate(tiny["bart"], tiny["ids"], tiny["mask"][:, :-1], tiny["scores"])


# ---------------------------------------------------------------- answer(), rag-ask, configs


@pytest.fixture(scope="module")
def rag_parts(tiny_setup, tmp_path_factory):
    """A RagModel checkpoint (tiny, untrained) over the session's tiny world and its Flat index."""
    from index.passage_files import iter_passages
    from index.retrieval import Retriever
    from rag_models.checkpoint import build_rag_model, save_rag_model

    root = tmp_path_factory.mktemp("answer")
    models = tiny_setup.models
    model = build_rag_model(question_encoder=str(models.question_encoder), generator=str(models.generator),
                            n_docs=3, max_question_length=32, max_passage_length=128, max_source_length=128)
    save_rag_model(model, root / "rag")
    questions = [json.loads(line)["question"] for line in tiny_setup.world.test.read_text().splitlines()[:3]]
    towns = [passage.title for passage in iter_passages(tiny_setup.world.v1_passages)]
    return {"model": model, "retriever": Retriever.from_dir(tiny_setup.index_dir), "checkpoint": root / "rag",
            "index": tiny_setup.index_dir, "questions": questions, "towns": towns}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_answer_gives_provenance(rag_parts, strategy):
    model, retriever, questions = rag_parts["model"], rag_parts["retriever"], rag_parts["questions"]
    model.train()  # answer() must decode without dropout and give the mode back
    settings = DecodingSettings(strategy=strategy, num_beams=2, num_return_sequences=2, max_length=6)
    answers = answer(questions, retriever, model, settings, batch_size=2)
    assert model.training
    model.eval()
    enc = model.tokenize_questions(questions)
    with torch.no_grad():
        docs = retriever.retrieve(model.embed_questions(enc["input_ids"], enc["attention_mask"]), 3)
    assert len(answers) == len(questions)
    for i, found in enumerate(answers):
        assert isinstance(found, Answer) and isinstance(found.text, str) and math.isfinite(found.score)
        assert found.doc_ids == docs.ids[i].tolist() and found.titles == docs.titles[i]
        assert all(title in rag_parts["towns"] for title in found.titles)
        assert sum(found.posteriors) == pytest.approx(1.0, abs=1e-5)
        assert len(found.alternatives) == (0 if strategy == "greedy" else 1)
        assert found.supporting(1)[0][1] == max(found.posteriors)
    # Decoding from a deeper retrieval reads its first n_docs: the same answers as retrieving exactly n_docs.
    deeper = retrieve(model, retriever, questions, 5)
    again = decode_retrieved(questions, model, deeper, replace(settings, n_docs=3))
    assert [(a.text, a.doc_ids, a.score) for a in again] == [(a.text, a.doc_ids, a.score) for a in answers]


def test_answer_rejects_bad_settings(rag_parts):
    with pytest.raises(InputError, match="decoding.strategy"):
        answer(rag_parts["questions"], rag_parts["retriever"], rag_parts["model"], DecodingSettings(strategy="nucleus"))
    with pytest.raises(InputError, match="num_return_sequences"):
        answer(rag_parts["questions"], rag_parts["retriever"], rag_parts["model"],
               DecodingSettings(strategy="beam", num_beams=1, num_return_sequences=2))
    shallow = retrieve(rag_parts["model"], rag_parts["retriever"], rag_parts["questions"], 2)
    with pytest.raises(InputError, match="n_docs"):  # a retrieval shallower than the docs to read
        decode_retrieved(rag_parts["questions"], rag_parts["model"], shallow, DecodingSettings(n_docs=3))


def test_rag_ask_prints_answers_with_supporting_titles(rag_parts, capsys, monkeypatch):
    base = ["--checkpoint", str(rag_parts["checkpoint"]), "--index", str(rag_parts["index"]), "--max-length", "6",
            "--num-beams", "2"]
    assert ask_main([*base, "--strategy", "fast", rag_parts["questions"][0]]) == 0
    out = first = capsys.readouterr().out
    assert out.startswith(f"Q: {rag_parts['questions'][0]}\nA: ") and "from: " in out
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(rag_parts["questions"][:2]) + "\n\n"))
    assert ask_main([*base, "--strategy", "greedy", "--top-docs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("from: ") == 2
    # The index's search knobs reach the retriever: exact re-ranking changes nothing on a Flat index,
    # and a knob the index lacks is refused, naming the setting.
    question = rag_parts["questions"][0]
    assert ask_main([*base, "--strategy", "fast", "--refine", "2", "--mmap", question]) == 0
    assert capsys.readouterr().out == first
    with pytest.raises(SystemExit) as stop:  # every command fails the same way: SystemExit(2), one line
        ask_main([*base, "--strategy", "fast", "--nprobe", "4", question])
    assert stop.value.code == 2 and "rag-ask: error:" in (err := capsys.readouterr().err) and "index.nprobe" in err


def test_rag_ask_reports_a_missing_checkpoint(rag_parts, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        ask_main(["--checkpoint", str(tmp_path / "nothing"), "--index", str(rag_parts["index"]), "q?"])
    assert stop.value.code == 2 and "rag-ask: error:" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_decoding_configs_instantiate_into_decoder_arguments(path):
    settings = instantiate(OmegaConf.load(path))
    assert isinstance(settings, DecodingSettings)
    if path.stem == "default":  # the model's own decoder, filled in by for_model
        assert settings.strategy is None and settings.num_beams is None
        settings = replace(settings, strategy="thorough")
    assert settings.strategy == path.stem or path.stem == "default"
    decoder = STRATEGIES[settings.strategy]
    # every search setting is an argument of the strategy's decoder
    inspect.signature(decoder).bind(None, None, None, None, n_docs=3, **settings.search_kwargs())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_what_transformers_bans(n: int):
    """Imported checkpoints may decode with no_repeat_ngram_size (BART-large's is 3): same bans as transformers."""
    gen = torch.Generator().manual_seed(n)
    for length in range(1, 9):
        history = torch.randint(0, 4, (6, length), generator=gen)  # small vocab: many repeats
        scores = torch.zeros(6, 7)
        theirs = NoRepeatNGramLogitsProcessor(n)(history, scores.clone()) == -math.inf
        assert torch.equal(repeated_ngram_tokens(history, n, 7), theirs)
    settings = SearchSettings(max_length=9, no_repeat_ngram_size=2)
    history = torch.tensor([[2, 5, 6, 5]])
    processed = process_logprobs(torch.zeros(1, 8), 4, settings, history)
    assert processed[0, 6] == -math.inf and torch.isfinite(processed[0, 5])  # "5 6" again is banned


def test_contexts_project_cross_attention_once_and_score_as_without(tiny):
    """The thorough pass reads each context's cross-attention keys/values from one projection, with equal scores."""
    model, ids, mask = tiny["bart"], tiny["ids"], tiny["mask"]
    with torch.no_grad():
        contexts = encode_contexts(model, ids, mask)
        assert contexts.cross is not None  # BART keeps them in an EncoderDecoderCache
        assert contexts.cross.layers[0].keys.shape[0] == ids.shape[0]  # one projection per context
        rows = torch.tensor([2, 0, 2, 1, 0])  # (M,) several candidates per context
        tokens = torch.randint(4, model.config.vocab_size, (5, 6), generator=torch.Generator().manual_seed(3))
        tokens[:, 0] = model.config.decoder_start_token_id
        cached = teacher_forced_logprobs(model, contexts, rows, tokens, chunk_elements=1)  # one row per chunk
        plain = teacher_forced_logprobs(model, EncodedContexts(contexts.states, mask, None), rows, tokens)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
    assert bool((cached[:, 1:] < 0).all())


def test_score_chunk_elements_bounds_memory_not_results(tiny):
    """Scoring one row per chunk gives the scores of one chunk for all; a non-positive cap is refused by name."""
    args = (tiny["bart"], tiny["ids"], tiny["mask"], tiny["scores"])
    search = dict(num_beams=2, max_length=6, min_length=6)
    whole = rag_sequence_generate(*args, **search)
    rows = rag_sequence_generate(*args, score_chunk_elements=1, **search)
    assert torch.equal(whole.sequences, rows.sequences)
    torch.testing.assert_close(whole.scores, rows.scores, atol=1e-5, rtol=0)
    assert "score_chunk_elements" in DecodingSettings(strategy="thorough").search_kwargs()
    assert "score_chunk_elements" not in DecodingSettings(strategy="beam").search_kwargs()
    with pytest.raises(InputError, match="score_chunk_elements"):
        rag_sequence_generate(*args, score_chunk_elements=0, **search)
