"""How much GPU memory a training step will take, from the configs alone, before anything is loaded."""

from dataclasses import dataclass

GIB = 2**30

# Activations a transformer block keeps for its backward pass, in units of one [tokens, width] bf16
# tensor. Fitted to peaks measured on an H100 at 49x480x720 (BENCHMARKS.md): eager 2B without
# checkpointing kept ~19 such tensors a block, compiled blocks ~14.5 (fused elementwise ops keep fewer).
ACTIVATIONS_PER_BLOCK = {False: 19.4, True: 14.5}
OVERHEAD_GIB = 0.4  # cuBLAS/cuDNN workspaces, the loss and the small tensors around the blocks


@dataclass
class MemoryEstimate:
    weights_gib: float
    adapter_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.adapter_gib + self.activations_gib + OVERHEAD_GIB

    def __str__(self) -> str:
        return (f"about {self.total_gib:.1f} GiB: frozen weights {self.weights_gib:.1f}, LoRA with gradients "
                f"and optimizer states {self.adapter_gib:.1f}, activations {self.activations_gib:.1f}, "
                f"other {OVERHEAD_GIB:.1f}")


def transformer_parameters(config: dict) -> int:
    """Parameter count of a CogVideoXTransformer3DModel from its config (blocks, embeddings, output)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    time_dim, text_dim = config["time_embed_dim"], config["text_embed_dim"]
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    # Per block: q, k, v, out (4 w^2), a 4x feed-forward (8 w^2), two adaptive norms of 6 w from the time embedding.
    block = 12 * width**2 + 12 * width * time_dim
    embeddings = config["in_channels"] * p * p * p_t * width + text_dim * width + 2 * time_dim * width
    output = width * p * p * p_t * config["out_channels"] + 2 * width * time_dim
    return config["num_layers"] * block + embeddings + output


def estimate(config: dict, latent_frames: int, latent_height: int, latent_width: int, batch_size: int,
             rank: int, checkpointing: bool, compiled: bool, weight_bytes: float, optimizer_state_bytes: float,
             float8_blocks: bool = False):
    """Peak memory of a training step; optimizer_state_bytes is per adapter weight (8 for Adam, 2 for 8-bit).

    float8_blocks: the attention and feed-forward weights (12 w^2 a block) take one byte each.
    """
    width = config["num_attention_heads"] * config["attention_head_dim"]
    p, p_t = config["patch_size"], config.get("patch_size_t") or 1
    # 1.5 patches latent frames in pairs, after the pipelines pad an odd count with one frame.
    tokens = config["max_text_seq_length"] + -(-latent_frames // p_t) * (latent_height // p) * (latent_width // p)
    layers = config["num_layers"]
    adapter = layers * 4 * 2 * width * rank  # A and B of q, k, v, out in every block
    one_tensor = batch_size * tokens * width * 2
    block = ACTIVATIONS_PER_BLOCK[compiled] * one_tensor
    # With checkpointing only each block's input is kept, and one block's activations at a time.
    activations = layers * one_tensor + block if checkpointing else layers * block
    weights = transformer_parameters(config) * weight_bytes
    if float8_blocks:
        weights -= layers * 12 * width**2 * (weight_bytes - 1)
    return MemoryEstimate(weights_gib=weights / GIB,
                          adapter_gib=adapter * (4 + 4 + optimizer_state_bytes) / GIB,
                          activations_gib=activations / GIB)
