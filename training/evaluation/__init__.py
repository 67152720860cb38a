"""Evaluation: prediction records with provenance, EM / F1 / recall@k, rag-eval and rag-score."""
