"""Training the fuser: dropout, the Gumbel-sigmoid gate with an annealed temperature, and a
backward that recomputes inside each FFN block (see ``docs/training.md``).

    trainer = FuserTrainer(weights.to(dtype=torch.float32), compute_dtype=torch.bfloat16)
    fused = trainer(sharer_rows, receiver_rows, fusers)      # [R, T, Ht*Dt], differentiable
"""
from ..reference import annealed_temperature
from .autograd import FuserTrainingFunction, saved_bytes_per_token
from .trainer import FuserTrainer, default_compute_dtype, fuse_caches, fuse_rows, gather_rows

__all__ = ["FuserTrainer", "fuse_rows", "fuse_caches", "gather_rows", "saved_bytes_per_token",
           "annealed_temperature", "default_compute_dtype", "FuserTrainingFunction"]
