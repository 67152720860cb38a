"""Training and evaluation, one sub-package per kind of work (each stands above what it uses).

    config       Hydra configs composed for every command line and the tests
    data/        question and DPR readers, data modules, the resumable sampler
    evaluation/  prediction records, metrics, rag-eval, rag-score
    lit/         Lightning modules (RAG, DPR), callbacks, optimizer and schedule, checkpoint IO, rag-train
    demo/        the synthetic demo world, rag-make-world, the demo stages and rag-demo
"""
