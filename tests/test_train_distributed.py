"""``c2c-train`` under torch.distributed (2 gloo ranks on the CPU): a run with a global batch
split over ranks ends with the weights of a single-process run on the whole batch (DDP-style
gradient averaging, and FSDP2-sharded fusers)."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import distributed_workers as workers  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over the lazy dog"}],
    [{"role": "user", "content": "caches are fused"}, {"role": "assistant", "content": "without copies, one layer"}],
    [{"role": "user", "content": "a fuser reads"}, {"role": "assistant", "content": "the sharer cache"}],
    [{"role": "user", "content": "large language models"}, {"role": "assistant", "content": "talk through caches"}],
]


def run(batch_size, fsdp=False, distributed=True):
    from c2c_kernels.integrations.tiny import tiny_model, tiny_tokenizer
    from c2c_kernels.training import C2CTrainer, Recipe, fresh_checkpoint

    tok = tiny_tokenizer("bytelevel", 320)
    receiver = tiny_model("qwen3", tok, 2, seed=1)
    sharer = tiny_model("qwen2", tok, 3, seed=3)
    ckpt = fresh_checkpoint(receiver, sharer, hidden_dim=16, intermediate_dim=24)
    ckpt = ckpt.with_weights(ckpt.weights._replace(gate_logit=torch.full_like(ckpt.weights.gate_logit, 0.5)))
    recipe = Recipe(batch_size=batch_size, lr=1e-2, warmup_ratio=0.0, loss_normalization="tokens", anneal_steps=4)
    trainer = C2CTrainer(receiver, tok, [(sharer, None)], [ckpt], recipe, fsdp=fsdp, distributed=distributed)
    trainer.plan(len(CONVERSATIONS))
    for window in trainer.windows(CONVERSATIONS, 0):
        trainer.train_step(window)
    return trainer.export()[0].weights


def worker(rank, world_size, fsdp):
    got = run(1, fsdp)
    want = run(world_size, distributed=False)
    for name, a, b in zip(got._fields, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_match_one_process(fsdp):
    workers.launch(worker, 2, fsdp)
