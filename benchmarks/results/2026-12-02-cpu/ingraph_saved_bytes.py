"""Checkpoint around each compiled block (recompute.around, the trainer's way until 2026-12-02) or inside
it (recompute.inside, the trainer's way since; the output beside this was the same before and after): one fp32 CPU
step of two 2B-width blocks with rank-128 LoRA; what each keeps for the backward pass beside the weights, in
[tokens, width] fp32 tensors, and the difference of loss and LoRA gradients.

    python benchmarks/results/2026-12-02-cpu/ingraph_saved_bytes.py > benchmarks/results/2026-12-02-cpu/ingraph_saved_bytes.txt
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from diffusers import CogVideoXTransformer3DModel  # noqa: E402

import profile_step  # noqa: E402
from cogvideox_lora import attention, models, recompute, synthetic  # noqa: E402
from cogvideox_lora.lora import add_lora  # noqa: E402
from cogvideox_lora.loss import compute_loss, draw_batch, transformer_inputs  # noqa: E402


def build(mode):
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**{**synthetic._SPECS["2b"]["transformer"], "num_layers": 2})
    transformer.requires_grad_(False)
    add_lora(transformer, 128, 128)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    attention.use(transformer, attention.Choice(None, ""))
    if mode == "around":
        recompute.around(transformer, "full")
    else:
        recompute.inside(transformer, "full")
    models.compile_blocks(transformer)
    return transformer


results = {}
frames, height, width = 2, 16, 24
tokens = 226 + frames * height * width // 4
for mode in ("around", "inside"):
    transformer = build(mode)
    config = transformer.config
    torch.manual_seed(1)
    video = {"latent_params": torch.randn(2 * config.in_channels, frames, height, width)}
    prompt = {"prompt_embeds": torch.randn(config.max_text_seq_length, config.text_embed_dim)}
    batch = draw_batch([video], [prompt], [0], 1.0, 0.0, 1000, "cpu")
    kept, loss = profile_step.saved_bytes(transformer, lambda: compute_loss(
        transformer, batch, torch.linspace(0.999, 0.001, 1000), torch.float32,
        transformer_inputs(config, frames, height, width, "cpu")))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    results[mode] = loss.item(), grads
    print(f"{mode}: {kept / (tokens * 1920 * 4):.4f} [tokens, width] fp32 tensors kept, "
          f"loss {loss.item():.6f}")
(loss_a, grads_a), (loss_b, grads_b) = results["around"], results["inside"]
print(f"loss difference {abs(loss_a - loss_b):.3g}, largest LoRA-gradient difference "
      f"{max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a):.3g} over {len(grads_a)} tensors; "
      f"torch {torch.__version__}")
