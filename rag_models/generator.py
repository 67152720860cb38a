"""The generator: any transformers seq2seq model (BART by default) and how its inputs are formatted.

Shapes: B questions, K docs per question, L source length, T target length, V vocab.

Two input formats, chosen by name:
- ``question_first`` (default): ``question // title / text``. The question and the
  passages are tokenized separately, once each, and the passage is truncated to fit.
  The question reaches the generator whole unless it is longer than `Generator.question_budget`;
  then its beginning is kept (see `MIN_PASSAGE_TOKENS`).
- ``transformers``: transformers' RagRetriever format ``title / text // question``
  truncated as one string (a long passage can cut the question off), padded to
  ``max_source_length``; token for token what its retriever produces, for parity.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rag_models.errors import InputError
from rag_models.text_limits import clip_for_tokens

TITLE_SEP = " / "  # between a passage's title and its text (as transformers' RagConfig)
DOC_SEP = " // "  # between the question and the passage (as transformers' RagConfig)
# Passage tokens every question_first input keeps, however long its question: a question longer than
# max_source_length - special tokens - this is cut to its beginning. 64 BART tokens hold the separator, the
# title and the first ~40 words of a 100-word DPR passage, so an answer near a passage's start stays readable;
# real questions (NQ: ~10 tokens, max_question_length 64 for the retriever) are never cut by it. When
# max_source_length is small the reserve is half of the room instead, so the question keeps the other half.
MIN_PASSAGE_TOKENS = 64


def _clean_title(title: str) -> str:
    """Drop the quotes that wrap some DPR Wikipedia titles (as transformers does)."""
    return title.removeprefix('"').removesuffix('"')


def _special_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text ([bos], [eos] for BART)."""
    with_special = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare) :]
    raise InputError("cannot locate the special tokens of the generator tokenizer", setting="generator",
                     fix="use a tokenizer that adds its special tokens around the text")


def _pad_rows(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into (N, L) input_ids and attention_mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (N, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _question_first(gen: "Generator", questions: list[str], titles: list[list[str]],
                    texts: list[list[str]]) -> tuple[Tensor, Tensor]:
    """``question // title / text``; a question over `Generator.question_budget` keeps its beginning."""
    tok = gen.tokenizer
    q_ids = tok([gen.prefix + q.strip() for q in questions], add_special_tokens=False)["input_ids"]
    passages = [clip_for_tokens(f"{gen.doc_sep}{_clean_title(t)}{gen.title_sep}{x}", gen.max_source_length)
                for ts, xs in zip(titles, texts) for t, x in zip(ts, xs)]  # long ones cut before tokenizing
    p_ids = tok(passages, add_special_tokens=False)["input_ids"]  # B*K lists
    head, tail = gen.special_frame
    k = len(titles[0])
    rows = []
    for b, question in enumerate(q_ids):
        question = question[: gen.question_budget]  # the beginning of an overlong question (MIN_PASSAGE_TOKENS)
        budget = gen.max_source_length - len(head) - len(tail) - len(question)
        for j in range(k):
            rows.append(head + question + p_ids[b * k + j][:budget] + tail)
    return _pad_rows(rows, tok.pad_token_id)  # (B*K, L)


def _transformers_format(gen: "Generator", questions: list[str], titles: list[list[str]],
                         texts: list[list[str]]) -> tuple[Tensor, Tensor]:
    """transformers' RagRetriever format ``title / text // question``, padded to max_source_length."""
    strings = [
        (gen.prefix + clip_for_tokens(_clean_title(t) + gen.title_sep + x, gen.max_source_length) + gen.doc_sep
         + q).replace("  ", " ")
        for q, ts, xs in zip(questions, titles, texts)
        for t, x in zip(ts, xs)
    ]
    enc = gen.tokenizer(strings, max_length=gen.max_source_length, padding="max_length", truncation=True,
                        return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]  # (B*K, L)


# input_format -> function building the (B*K, L) generator inputs
INPUT_FORMATS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "question_first": _question_first,
    "transformers": _transformers_format,
}


class Generator(nn.Module):
    """A transformers seq2seq model with RAG input formatting and BART target conventions.

    Args:
        model: the seq2seq model (e.g. BartForConditionalGeneration); its config must define
            ``decoder_start_token_id``. Its ``config.prefix`` (T5's task prefix), if any, goes before each question.
        tokenizer: the model's tokenizer; it must add special tokens around a text ([bos] ... [eos] for BART),
            and its ``pad_token_id`` pads inputs and targets.
        max_source_length: L, the most tokens of one (question, doc) generator input, special tokens
            included; at most the model's ``max_position_embeddings``. "question_first" truncates the passage
            to fit, and cuts a question longer than `question_budget` to its beginning; "transformers"
            truncates the whole string and pads every row to exactly L.
        max_target_length: T, the most tokens of one answer target (special tokens included); longer
            answers are truncated by `prepare_targets`.
        input_format: how a question and a doc become one input, a key of `INPUT_FORMATS`:
            "question_first" (``question // title / text``) or "transformers" (``title / text // question``,
            token for token transformers' RagRetriever, for parity).
        title_sep: between a passage's title and its text (transformers' ``RagConfig.title_sep``).
        doc_sep: between the question and the passage (transformers' ``RagConfig.doc_sep``).

    Raises InputError for an unknown ``input_format``, a ``max_source_length`` or ``max_target_length`` above
    the model's positions (or too small for any text),
    a config without ``decoder_start_token_id``, or a tokenizer whose special tokens cannot be located.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_source_length: int = 300,
        max_target_length: int = 64,
        input_format: str = "question_first",
        title_sep: str = TITLE_SEP,
        doc_sep: str = DOC_SEP,
    ) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise InputError(f"unknown input_format {input_format!r}", setting="model.input_format",
                             fix=f"use one of {sorted(INPUT_FORMATS)}")
        limit = getattr(model.config, "max_position_embeddings", None)
        for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
            if limit is not None and value > limit:
                raise InputError(f"{name} {value} exceeds the generator's {limit} positions",
                                 setting=f"model.{name}", fix=f"set it to at most {limit}")
            if value < 2:
                raise InputError(f"{name} {value} leaves no room for any text", setting=f"model.{name}",
                                 fix="set it to at least 8")
        if model.config.decoder_start_token_id is None:
            raise InputError("the generator config has no decoder_start_token_id", setting="model.generator",
                             fix="use a seq2seq checkpoint that defines it (BART, T5)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.input_format = input_format
        self.title_sep = title_sep
        self.doc_sep = doc_sep
        self.special_frame = _special_frame(tokenizer)
        if self.question_budget < 1:
            raise InputError(f"max_source_length {max_source_length} leaves no room beside the special tokens",
                             setting="model.max_source_length", fix="set it to at least 8")
        self.prefix = getattr(model.config, "prefix", None) or ""  # T5-style task prefix, as transformers' RAG
        self._format = INPUT_FORMATS[input_format]

    @property
    def question_budget(self) -> int:
        """The most question tokens a "question_first" input keeps: the room beside the special tokens,
        less `MIN_PASSAGE_TOKENS` for the passage (half the room when that is smaller)."""
        room = self.max_source_length - sum(len(part) for part in self.special_frame)
        return room - min(MIN_PASSAGE_TOKENS, room // 2)

    def question_cuts(self, questions: list[str], *, closed_book: bool = False) -> list[tuple[int, int]]:
        """(tokens, tokens kept) of each question in this generator's inputs; kept < tokens: it is cut.

        ``closed_book``: the inputs of `build_question_inputs` (the question alone, up to
        ``max_source_length`` with special tokens). The "transformers" format reads the question after
        the question encoder's truncation and truncates the whole string: no cut of its own is reported.
        """
        prefixed = [self.prefix + q.strip() for q in questions]
        if closed_book:
            lengths = [len(ids) for ids in self.tokenizer(prefixed)["input_ids"]]
            return [(n, min(n, self.max_source_length)) for n in lengths]
        lengths = [len(ids) for ids in self.tokenizer(prefixed, add_special_tokens=False)["input_ids"]]
        if self.input_format != "question_first":
            return [(n, n) for n in lengths]
        return [(n, min(n, self.question_budget)) for n in lengths]

    @property
    def pad_token_id(self) -> int:
        """Id of the padding token (ignored by the losses)."""
        return self.tokenizer.pad_token_id

    @property
    def bos_token_id(self) -> int | None:
        """Id of the token every target starts with, or None (T5 has none)."""
        head = self.special_frame[0]
        return head[0] if head else None

    @property
    def decoder_start_token_id(self) -> int:
        """The decoder's first input token (eos = 2 for BART)."""
        return self.model.config.decoder_start_token_id

    def build_inputs(self, questions: list[str], titles: list[list[str]],
                     texts: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Tokenize every (question, doc) pair: -> input_ids (B*K, L), attention_mask (B*K, L).

        Row b*K+k is question b with its doc k. All questions need the same K docs.
        """
        if not (len(questions) == len(titles) == len(texts)) or not questions:
            raise InputError(
                f"{len(questions)} questions but {len(titles)} title lists and {len(texts)} text lists",
                setting="retrieved docs",
                fix="pass one list of K titles and one of K texts per question",
            )
        k = len(titles[0])
        if k == 0 or any(len(t) != k or len(x) != k for t, x in zip(titles, texts)):
            raise InputError("every question needs the same number K > 0 of titles and texts", setting="retrieved docs",
                             fix="retrieve n_docs passages for each question")
        return self._format(self, questions, titles, texts)

    def build_question_inputs(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        """The questions alone, for the closed-book baseline: input_ids (B, L), attention_mask (B, L).

        Prefixed like the RAG inputs and truncated to ``max_source_length``.
        """
        enc = self.tokenizer([self.prefix + q.strip() for q in questions], max_length=self.max_source_length,
                             truncation=True, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def prepare_targets(self, answers: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenize answers: -> decoder_input_ids (B, T), target (B, T).

        ``target`` is the tokenizer's ids ([bos, ..., eos] for BART), padded; the
        decoder input is ``target`` shifted right behind ``decoder_start_token_id``,
        so ``logits[:, t]`` predicts ``target[:, t]`` (the convention of marginalize.py).

        Answers get one leading space: in a passage an answer follows a space, so
        byte-level BPE encodes it as "Ġword" pieces there; tokenizing the bare answer
        would give different pieces and the reader could not copy them (measured on
        the demo world: reader-alone test EM 0.39 -> 0.51 after 300 steps).
        SentencePiece tokenizers (T5) treat the leading space as a word start anyway.
        """
        enc = self.tokenizer(
            [" " + a.strip() for a in answers], max_length=self.max_target_length, truncation=True, padding=True,
            return_tensors="pt",
        )
        target = enc["input_ids"]  # (B, T)
        decoder_input_ids = torch.full_like(target, self.pad_token_id)  # (B, T)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = target[:, :-1]
        return decoder_input_ids, target

    def forward(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """Teacher-forced logits: (B*K, L) sources, (B*K, T) decoder inputs -> (B*K, T, V)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         use_cache=False)
        return out.logits

    def decode(self, ids: Tensor) -> list[str]:
        """Token ids (N, T) -> N strings, special tokens skipped, whitespace stripped."""
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def save_pretrained(self, out_dir: str) -> None:
        """Write the seq2seq model and its tokenizer into ``out_dir`` (callers make it atomic)."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
