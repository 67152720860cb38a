"""The offline demo: the synthetic world (rag-make-world), the demo stages and rag-demo."""
