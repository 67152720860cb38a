"""Lightning: the RAG and DPR modules, callbacks, optimizer and schedules, checkpoint IO, resume, rag-train."""
