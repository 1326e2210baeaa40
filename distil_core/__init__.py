"""distil_core: one triple-loss distillation run (DistilBERT recipe), with no Ray and no Optuna."""
