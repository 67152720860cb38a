"""The model: retriever encoders, generator, marginalization, RagModel. Pure torch + transformers."""
