"""The non-parametric memory: passage store, corpus encoding, FAISS / torch indexes, retrieval, sharding."""
