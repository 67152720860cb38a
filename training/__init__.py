"""Training and evaluation: data, Lightning modules, DPR pre-training, metrics, command lines."""
