"""Training the fuser: dropout, the Gumbel-sigmoid gate with an annealed temperature, and a
backward that recomputes inside each FFN block; and ``c2c-train``, the research recipe end to
end on Hugging Face models (see ``docs/training.md``).

    trainer = FuserTrainer(weights.to(dtype=torch.float32), compute_dtype=torch.bfloat16)
    fused = trainer(sharer_rows, receiver_rows, fusers)      # [R, T, Ht*Dt], differentiable

    run = C2CTrainer(receiver, tokenizer, [(sharer, sharer_tokenizer)], [checkpoint], Recipe())
    run.fit(load_conversations("train.jsonl"), "out")          # out/final: a published checkpoint
"""
from ..reference import annealed_temperature
from .autograd import FuserTrainingFunction, saved_bytes_per_token
from .data import load_conversations
from .loop import C2CTrainer, fresh_checkpoint
from .recipe import Recipe, research_init, response_loss
from .trainer import FuserTrainer, default_compute_dtype, fuse_caches, fuse_rows, gather_rows

__all__ = ["FuserTrainer", "fuse_rows", "fuse_caches", "gather_rows", "saved_bytes_per_token",
           "annealed_temperature", "default_compute_dtype", "FuserTrainingFunction", "C2CTrainer", "Recipe",
           "fresh_checkpoint", "research_init", "response_loss", "load_conversations"]
