"""Distillation and the two SFT stages: one trainer (loss = kl_weight * KL + ce_weight * CE), run in-process or
as a Ray Train TorchTrainer, with checkpoints that resume exactly."""
