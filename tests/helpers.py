"""What several test files share: running the trainer (through its command line in a subprocess or in this
process), and tiny transformers with one training step of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_cogvideox_lora.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tiny sizes every training test uses: 9 frames of 48x64 give 3x6x8 latents on the tiny models.
TINY_FLAGS = ["--height", "48", "--width", "64", "--max_num_frames", "9", "--rank", "4", "--lora_alpha", "4",
              "--validation_num_inference_steps", "2", "--seed", "7"]


def train_argv(model_dir, data_dir, output_dir, cache_dir, *extra, report_to="none") -> list[str]:
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_root", str(data_dir),
            "--output_dir", str(output_dir), "--latent_cache_dir", str(cache_dir), "--report_to", report_to,
            *TINY_FLAGS, *map(str, extra)]


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_script(argv, launcher: bool = False, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python train_cogvideox_lora.py ARGS`, or the same through `accelerate launch`; env: variables to add."""
    if launcher:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *argv]
    else:
        command = [sys.executable, str(SCRIPT), *argv]
    return subprocess.run(command, cwd=REPO, env={**subprocess_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n" \
                                   f"stderr:\n{result.stderr[-8000:]}"
    return result


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(argv) -> None:
    """train_cogvideox_lora.main(argv) in this process (no import cost); accelerate's singletons are reset
    afterwards so that the next run may choose another precision. A refusal raises SystemExit, whose message is
    on stderr as the interpreter prints it when the script exits with it."""
    import train_cogvideox_lora

    _reset_accelerate()
    try:
        train_cogvideox_lora.main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        raise
    finally:
        _reset_accelerate()


def summary(output_dir) -> dict:
    return json.loads((Path(output_dir) / "train_summary.json").read_text())


def lora(path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, or of the pytorch_lora_weights.safetensors in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def tree_state(root) -> dict:
    """Every path under root with its size, modification time and bytes, to show that nothing changed."""
    root = Path(root)
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        state[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns,
                                              None if path.is_dir() else path.read_bytes())
    return state


def load_lora_and_collect_warnings(pipe, lora_path) -> list[str]:
    """pipe.load_lora_weights(lora_path), returning what diffusers, peft and transformers warned about it
    (diffusers logs unexpected or missing keys as warnings)."""
    import logging
    import re
    import warnings

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(lora_path)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return records + [str(w.message) for w in caught
                      if re.search(r"unexpected|missing|no lora keys|not found|incompatible", str(w.message), re.I)]


def load_clips(root, caption_column: str, video_column: str, dataset_file: str | None = None,
               id_token: str | None = None, image_column: str | None = None) -> list:
    """The dataset's index as the trainer reads it; raises DatasetError listing every entry that is wrong."""
    from cogvideox_lora.data import DatasetError, read_index

    clips, problems = read_index(root, caption_column, video_column, dataset_file, id_token, image_column)
    if problems:
        raise DatasetError(problems)
    return clips


def hub_dataset(cache, repo_id: str, files: dict, commit: str = "0" * 39 + "1", ref: str = "main") -> Path:
    """A dataset as huggingface_hub keeps it in its cache (HF_HUB_CACHE or --cache_dir): refs/REF holding the
    commit, snapshots/COMMIT/ with the files. files: path in the repo -> text, or a file or folder to copy.
    Returns the snapshot folder."""
    return hub_snapshot(Path(cache) / f"datasets--{repo_id.replace('/', '--')}", files, commit, ref)


def hub_model(cache, repo_id: str, model_dir, commit: str = "0" * 39 + "2", ref: str = "main") -> Path:
    """A model folder laid out as huggingface_hub keeps a model repo in its cache; returns the snapshot folder."""
    files = {p.relative_to(model_dir).as_posix(): p for p in Path(model_dir).rglob("*") if p.is_file()}
    return hub_snapshot(Path(cache) / f"models--{repo_id.replace('/', '--')}", files, commit, ref)


def hub_snapshot(repo: Path, files: dict, commit: str, ref: str) -> Path:
    import shutil

    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        elif Path(content).is_dir():
            shutil.copytree(content, target)
        else:
            shutil.copy(content, target)
    return snapshot


# A stand-in for FlashAttention-4 on the CPU: attention written out in fp32 (out, log-sum-exp and the
# backward from them, as FlashAttention computes it), registered as a kernel of cogvideox_lora.attention's
# custom ops. It counts its calls, to show what a checkpointing policy recomputes.
STAND_IN = "stand-in-math"
STAND_IN_CALLS = {"forward": 0, "backward": 0}


def stand_in_forward(q, k, v, scale):
    STAND_IN_CALLS["forward"] += 1
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) * scale
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ vh
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def stand_in_backward(grad_out, q, k, v, out, lse, scale):
    STAND_IN_CALLS["backward"] += 1
    qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, out, grad_out))
    p = ((qh @ kh.transpose(-1, -2)) * scale - lse[..., None]).exp()
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    dq, dk = ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale
    return tuple(t.transpose(1, 2).to(x.dtype).contiguous() for t, x in ((dq, q), (dk, k), (dv, v)))


def register_stand_in() -> str:
    """Registers the stand-in kernel (fp32 and bf16) and zeroes its call counts; returns its name."""
    from cogvideox_lora import attention

    attention.register_kernel(STAND_IN, stand_in_forward, stand_in_backward, (torch.float32, torch.bfloat16))
    STAND_IN_CALLS.update(forward=0, backward=0)
    return STAND_IN


# Latent frames, height and width of the tiny transformers' inputs in the tests below the trainer.
TINY_LATENT = (3, 6, 8)


def tiny_transformer(num_layers: int = 2, kernel: str | None = None, lora_rank: int = 4, seed: int = 0):
    """A random tiny-5b transformer (rotary embeddings) in fp32 with `num_layers` blocks, frozen, with a LoRA
    adapter of non-zero random weights (so that every LoRA weight gets a gradient), its attention through
    cogvideox_lora.attention's processor with this kernel (None: PyTorch's SDPA)."""
    from diffusers import CogVideoXTransformer3DModel

    from cogvideox_lora import synthetic
    from cogvideox_lora.memory import Plan
    from cogvideox_lora.placement import Placement
    from cogvideox_lora.transformer import TransformerSpec, prepare

    config = {**synthetic.SPECS["tiny-5b"]["transformer"], "num_layers": num_layers}
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**config).requires_grad_(False)
    prepare(transformer, TransformerSpec(torch.float32, lora_rank, lora_rank, seed=seed, kernel=kernel),
            Placement(Plan(), "cpu"))
    generator = torch.Generator().manual_seed(seed + 1)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return transformer


def tiny_inputs(transformer, seed: int = 0) -> dict:
    """Random inputs of one step (a batch of one) for tiny_transformer()."""
    from cogvideox_lora.loss import transformer_inputs

    config = transformer.config
    frames, height, width = TINY_LATENT
    generator = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, frames, config.in_channels, height, width, generator=generator),
                encoder_hidden_states=torch.randn(1, config.max_text_seq_length, config.text_embed_dim,
                                                  generator=generator),
                timestep=torch.tensor([100 + 400 * seed % 900]),
                **transformer_inputs(config, frames, height, width, "cpu"))


def lora_step(transformer, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward with a mean-square loss: the loss and the gradient of every trainable weight."""
    transformer.zero_grad(set_to_none=True)
    out = transformer(**inputs, return_dict=False)[0]
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


def random_lora_b(transformer, seed=0) -> None:
    """A fresh adapter's B is zero, a no-op: random B gives a LoRA that changes the video."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
# One step of the tiny model's transformer in bf16 (the trainer's fast paths are compared with it).
BF16 = torch.bfloat16


def load_tiny(model_dir, fp8: bool = False):
    """The tiny model's transformer as the trainer builds it in bf16, with a rank-4 adapter (float8 weights if fp8)."""
    from cogvideox_lora.memory import Plan
    from cogvideox_lora.placement import Placement
    from cogvideox_lora.settings import ModelSource
    from cogvideox_lora.transformer import TransformerSpec, build

    spec = TransformerSpec(BF16, rank=4, alpha=4, fp8_base_weights=fp8)
    return build(ModelSource(str(model_dir)), spec, Placement(Plan(), "cpu"))[0]


def step(transformer, batch, uncast: bool = False):
    """One bf16-autocast training step: the loss and the LoRA gradients by name."""
    from cogvideox_lora.lora import uncast_adapter_inputs
    from cogvideox_lora.loss import compute_loss, transformer_inputs

    (latents, noise, timesteps, prompt_embeds), alphas_cumprod = batch
    transformer.zero_grad(set_to_none=True)
    uncast_adapter_inputs(transformer, BF16 if uncast else torch.float32)
    with torch.autocast("cpu", dtype=BF16):
        inputs = transformer_inputs(transformer.config, *latents.shape[1:2], *latents.shape[3:], "cpu")
        loss = compute_loss(transformer, (latents, noise, timesteps, prompt_embeds), alphas_cumprod, BF16, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in transformer.named_parameters() if p.requires_grad}


def relative_error(a: dict, b: dict) -> float:
    """The norm of the difference over the norm of the reference, over all LoRA gradients together."""
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    return (diff / sum((a[k] ** 2).sum() for k in a).sqrt()).item()


def assert_same_step(reference, other, tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert all(g.abs().max() > 0 for g in grads_a.values()), "every LoRA weight should have a gradient"
    assert loss_b == pytest.approx(loss_a, rel=tolerance)
    assert relative_error(grads_a, grads_b) < tolerance


def count_decodes(monkeypatch) -> list[str]:
    """The clip names of every decode pass (Video.frames), the check's and encoding's, as they happen."""
    from cogvideox_lora import data

    passes, open_video = [], data.open_video

    def counted(path):
        video = open_video(path)
        decode = video._decode
        video._decode = lambda: passes.append(path.name) or decode()
        return video

    monkeypatch.setattr(data, "open_video", counted)
    return passes
