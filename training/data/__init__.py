"""Data: question files (NQ-Open, DPR CSV, .source/.target, hub), DPR training files, data modules, samplers."""
