"""Decoding: RAG-Token greedy / beam search, RAG-Sequence thorough and fast, answers with provenance."""
