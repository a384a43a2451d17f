"""The LoRA in core ComfyUI's CogVideoX format: the weights ComfyUI makes of it are those diffusers makes of the
diffusers file, for every family; conversion both ways; errors for what is not such a LoRA."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import CogVideoXTransformer3DModel, DiffusionPipeline
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from helpers import _reset_accelerate, random_lora_b
from cogvideox_lora import comfyui, inference
from cogvideox_lora.args import parse_args
from cogvideox_lora.checkpoints import CheckpointError, checkpoint_to_resume, register_lora_hooks
from cogvideox_lora.comfyui import COMFYUI_LORA_NAME, DIFFUSERS_LORA_NAME, diffusers_layer
from cogvideox_lora.lora import add_lora, save_lora
from cogvideox_lora.model_card import where_each_file_goes
from cogvideox_lora.synthetic import build_model_folder

FAMILIES = ["tiny", "tiny-5b", "tiny-i2v", "tiny-1.5", "tiny-1.5-i2v"]
RANK, ALPHA = 4, 2

# The linear layers of ComfyUI's CogVideoX model (comfy/ldm/cogvideo/model.py): CogVideoXBlock's, and
# CogVideoXTransformer3DModel's outside the blocks. ComfyUI resolves the LoRA key diffusion_model.NAME to its
# parameter diffusion_model.NAME.weight (comfy/lora.py, model_lora_keys_unet).
COMFYUI_BLOCK_LAYERS = ["norm1.linear", "q", "k", "v", "attn_out", "norm2.linear", "ff_proj", "ff_out"]
COMFYUI_OTHER_LAYERS = ["patch_embed.proj", "patch_embed.text_proj", "time_embedding_linear_1",
                        "time_embedding_linear_2", "ofs_embedding_linear_1", "ofs_embedding_linear_2",
                        "norm_out.linear", "proj_out"]


# What each of ComfyUI's layers computes in diffusers' model (ComfyUI's CogVideoXBlock.forward: q, k, v and
# attn_out around the joint attention, ff_proj and ff_out around the tanh GELU; its top-level forward).
SAME_LAYER = [("blocks.0.q", "transformer_blocks.0.attn1.to_q"), ("blocks.1.k", "transformer_blocks.1.attn1.to_k"),
              ("blocks.29.v", "transformer_blocks.29.attn1.to_v"),
              ("blocks.41.attn_out", "transformer_blocks.41.attn1.to_out.0"),
              ("blocks.0.ff_proj", "transformer_blocks.0.ff.net.0.proj"),
              ("blocks.0.ff_out", "transformer_blocks.0.ff.net.2"),
              ("blocks.3.norm1.linear", "transformer_blocks.3.norm1.linear"),
              ("blocks.3.norm2.linear", "transformer_blocks.3.norm2.linear"),
              ("time_embedding_linear_1", "time_embedding.linear_1"),
              ("time_embedding_linear_2", "time_embedding.linear_2"),
              ("ofs_embedding_linear_1", "ofs_embedding.linear_1"),
              ("ofs_embedding_linear_2", "ofs_embedding.linear_2"),
              ("patch_embed.proj", "patch_embed.proj"), ("patch_embed.text_proj", "patch_embed.text_proj"),
              ("norm_out.linear", "norm_out.linear"), ("proj_out", "proj_out")]


@pytest.mark.parametrize("comfyui_name, diffusers_name", SAME_LAYER)
def test_the_names_are_those_of_comfyuis_model(comfyui_name, diffusers_name):
    assert comfyui.comfyui_layer(diffusers_name) == comfyui_name
    assert diffusers_layer(comfyui_name) == diffusers_name


def test_layers_no_lora_adapts_are_refused():
    for name in ["transformer_blocks.0.attn1.norm_q", "transformer_blocks.0.attn1.to_out.1", "norm_final", "blocks"]:
        with pytest.raises(comfyui.LoraFormatError, match="is not a layer"):
            comfyui.comfyui_layer(name)
    with pytest.raises(comfyui.LoraFormatError, match="is not a layer"):
        diffusers_layer("blocks.0.norm_q")


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models") / request.param, size=request.param)


def base_transformer(model_dir):
    return CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")


def trainer_lora(model_dir, folder):
    """The trainer's LoRA (attention projections), rank 4 and alpha 2, with both files in one folder."""
    transformer = base_transformer(model_dir)
    config = add_lora(transformer, rank=RANK, alpha=ALPHA)
    random_lora_b(transformer)
    return save_lora(transformer, folder, config)


def all_linear_lora(model_dir, folder):
    """Every linear (and the patch convolution) of the model, with a rank and an alpha of their own for some."""
    transformer = base_transformer(model_dir)
    targets = [name for name, module in transformer.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, rank_pattern={"proj_out": 2},
                        alpha_pattern={"ff.net.2": 3.0})
    transformer.add_adapter(config)
    random_lora_b(transformer)
    return save_lora(transformer, folder, config)


def apply_as_comfyui(base: dict, lora: dict, strength: float = 1.0) -> tuple[dict, set]:
    """ComfyUI's rule: for each of its model's parameters P.weight whose key P has LoRA matrices in the file,
    W + strength * alpha / rank * up @ down (alpha / rank = 1 without P.alpha); P is named back in diffusers'
    terms through the mapping under test. Returns the weights and the file's keys that were used."""
    num_layers = 1 + max(int(k.split(".")[1]) for k in base if k.startswith("transformer_blocks."))
    layers = [f"blocks.{i}.{name}" for i in range(num_layers) for name in COMFYUI_BLOCK_LAYERS]
    weights = {k: v.clone() for k, v in base.items()}
    used = set()
    for layer in layers + COMFYUI_OTHER_LAYERS:
        key = f"diffusion_model.{layer}"
        down, up, alpha = f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"
        if up not in lora:
            continue
        used |= {down, up} | ({alpha} & lora.keys())
        scale = lora[alpha].item() / lora[down].shape[0] if alpha in lora else 1.0
        name = diffusers_layer(layer) + ".weight"
        weight = weights[name]
        weights[name] = weight + strength * scale * (lora[up].flatten(1) @ lora[down].flatten(1)).reshape(weight.shape)
    return weights, used


def fused_by_diffusers(model_dir, lora_path) -> dict:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("make_lora", [trainer_lora, all_linear_lora], ids=["attention", "all-linear"])
def test_comfyui_gets_the_weights_diffusers_fuses(tmp_path, model_dir, make_lora):
    make_lora(model_dir, tmp_path)
    comfy = load_file(str(tmp_path / COMFYUI_LORA_NAME))
    base = base_transformer(model_dir).state_dict()

    expected, used = apply_as_comfyui(base, comfy)
    assert used == set(comfy)  # every key names a layer of ComfyUI's model: none is "not loaded"
    assert len({k for k in base if not torch.equal(base[k], expected[k])}) == len(comfy) // 3
    # The folder holds both files: diffusers (and so cli_demo.py) picks its own.
    assert_same_weights(fused_by_diffusers(model_dir, tmp_path), expected)

    # alpha != rank: without its per-layer alphas ComfyUI would apply another strength.
    without_alpha, _ = apply_as_comfyui(base, {k: v for k, v in comfy.items() if not k.endswith(".alpha")})
    assert not all(torch.allclose(without_alpha[k], expected[k]) for k in base)


def test_the_round_trip_is_lossless(tmp_path, model_dir, capsys):
    original = all_linear_lora(model_dir, tmp_path / "lora")
    comfy_file = comfyui.main(["to-comfyui", str(original), str(tmp_path / "c.safetensors")])
    back = comfyui.main(["to-diffusers", str(comfy_file), str(tmp_path / "d.safetensors"), "--model", str(model_dir)])
    assert "applied at alpha/rank = 0.5/0.75/1 at strength 1" in capsys.readouterr().out

    before, after = load_file(str(original)), load_file(str(back))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_same_weights(fused_by_diffusers(model_dir, back), fused_by_diffusers(model_dir, original))
    # Converting our own file gives what the trainer wrote beside it.
    assert_same_weights(load_file(str(comfy_file)), load_file(str(tmp_path / "lora" / COMFYUI_LORA_NAME)))
    # A trainer's output folder converts either way: each direction takes the file it converts from.
    from_folder = comfyui.main(["to-diffusers", str(tmp_path / "lora"), str(tmp_path / "f.safetensors")])
    assert_same_weights(load_file(str(from_folder)), after)


def comfyui_variants(comfy: dict) -> dict:
    """The same LoRA as other trainers share it for ComfyUI: kohya-style lora_unet_ keys, and diffusion_model.
    keys with lora_A/lora_B and no alphas (which ComfyUI applies at alpha/rank = 1)."""
    kohya = {}
    for key, tensor in comfy.items():
        suffix = next(s for s in (".lora_down.weight", ".lora_up.weight", ".alpha") if key.endswith(s))
        layer = key.removeprefix("diffusion_model.").removesuffix(suffix)
        kohya[f"lora_unet_{layer.replace('.', '_')}{suffix}"] = tensor
    peft_named = {key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): tensor
                  for key, tensor in comfy.items() if not key.endswith(".alpha")}
    return {"kohya": kohya, "no-alpha": peft_named}


def test_a_comfyui_lora_from_elsewhere_loads_in_diffusers_at_its_strength(tmp_path, tiny_model_dir):
    trainer_lora(tiny_model_dir, tmp_path / "lora")
    comfy_file = tmp_path / "lora" / COMFYUI_LORA_NAME
    reference = load_file(str(comfyui.main(["to-diffusers", str(comfy_file), str(tmp_path / "r.safetensors")])))
    for name, variant in comfyui_variants(load_file(str(comfy_file))).items():
        save_file(variant, str(tmp_path / f"{name}-comfy.safetensors"))
        converted = comfyui.main(["to-diffusers", str(tmp_path / f"{name}-comfy.safetensors"),
                                  str(tmp_path / f"{name}.safetensors")])
        tensors = load_file(str(converted))
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensor, reference[key]) for key, tensor in tensors.items())
        pipe = inference.load_pipeline(str(tiny_model_dir), dtype=torch.float32)
        assert inference.load_lora(pipe, str(converted)) == (ALPHA / RANK if name == "kohya" else 1.0)


def test_inference_picks_the_diffusers_file_of_a_folder_with_both(tmp_path, tiny_model_dir):
    folder = tmp_path / "lora"
    trainer_lora(tiny_model_dir, folder)
    assert sorted(p.name for p in folder.iterdir()) == [DIFFUSERS_LORA_NAME, COMFYUI_LORA_NAME]
    pipe = inference.load_pipeline(str(tiny_model_dir), dtype=torch.float32)
    assert inference.load_lora(pipe, str(folder)) == ALPHA / RANK
    assert any(".lora_A." in name for name, _ in pipe.transformer.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_cli_demo_names_the_converter_for_a_comfyui_lora_before_loading_the_model(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    import cli_demo

    monkeypatch.setattr(inference, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    trainer_lora(tiny_model_dir, tmp_path / "lora")
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "lora" / COMFYUI_LORA_NAME).rename(alone / COMFYUI_LORA_NAME)
    for lora_path in (alone / COMFYUI_LORA_NAME, alone):
        with pytest.raises(SystemExit) as exit_info:
            cli_demo.main(["--prompt", "p", "--model_path", str(tiny_model_dir), "--lora_path", str(lora_path),
                           "--output_path", str(tmp_path / "out.mp4")])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "core ComfyUI's layout" in message
        assert f"to-diffusers {alone / COMFYUI_LORA_NAME} " in message
    assert inference.resolve_lora(str(tmp_path / "lora")).name == DIFFUSERS_LORA_NAME  # the diffusers file: fine



def not_a_lora(tmp_path, tiny_model_dir):
    return next((tiny_model_dir / "transformer").glob("*.safetensors"))


def another_models_lora(tmp_path, tiny_model_dir):
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "flux.safetensors"))
    return tmp_path / "flux.safetensors"


def text_file(tmp_path, tiny_model_dir):
    (tmp_path / "notes.safetensors").write_text("not tensors")
    return tmp_path / "notes.safetensors"


def half_pair(tmp_path, tiny_model_dir):
    save_file({"diffusion_model.blocks.0.q.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "half.safetensors"))
    return tmp_path / "half.safetensors"


@pytest.mark.parametrize("make, command, expected", [
    (not_a_lora, "to-comfyui", "is not a CogVideoX LoRA: its keys (such as"),
    (another_models_lora, "to-comfyui", "single_transformer_blocks.0.attn.to_q is not a layer of a CogVideoX"),
    (text_file, "to-diffusers", "is not a readable .safetensors file"),
    (half_pair, "to-diffusers", "blocks.0.q has its up matrix but not the other one"),
])
def test_what_is_not_a_cogvideox_lora_is_an_error_line(tmp_path, tiny_model_dir, make, command, expected):
    source = make(tmp_path, tiny_model_dir)
    with pytest.raises(SystemExit) as exit_info:
        comfyui.main([command, str(source), str(tmp_path / "out.safetensors")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and str(source) in message and expected in message, message
    assert not (tmp_path / "out.safetensors").exists()


def test_the_output_is_never_overwritten_nor_the_wrong_way_round(tmp_path, tiny_model_dir):
    lora_file = trainer_lora(tiny_model_dir, tmp_path / "lora")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    for argv, expected in [(["to-comfyui", lora_file, taken], "exists already"),
                           (["to-diffusers", lora_file, tmp_path / "x.safetensors"], "in diffusers' layout already"),
                           (["to-comfyui", lora_file.parent, tmp_path / "x.bin"], "*.safetensors")]:
        with pytest.raises(SystemExit) as exit_info:
            comfyui.main(list(map(str, argv)))
        assert str(exit_info.value.code).startswith("error: ") and expected in str(exit_info.value.code)
    assert taken.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "taken.safetensors"]


def test_a_lora_for_another_model_size_is_refused_with_both_shapes(tmp_path, tiny_model_dir):
    layers = comfyui.from_comfyui(load_file(str(trainer_lora(tiny_model_dir, tmp_path).parent / COMFYUI_LORA_NAME)))
    config = CogVideoXTransformer3DModel.load_config(tiny_model_dir, subfolder="transformer")
    comfyui.check_fits(layers, config, "tiny")
    with pytest.raises(comfyui.LoraFormatError, match=r"is 32x32 but the model wider needs 48x48: .*another size"):
        comfyui.check_fits(layers, {**config, "num_attention_heads": 3}, "wider")
    with pytest.raises(comfyui.LoraFormatError, match=r"transformer_blocks\.1\.\S+, which the model shallower does "
                                                      r"not have \(1 blocks\)"):
        comfyui.check_fits(layers, {**config, "num_layers": 1}, "shallower")


def test_a_lora_checked_against_a_model_of_another_kind(tmp_path, tiny_model_dir, tiny_5b_model_dir):
    lora_file = all_linear_lora(tiny_model_dir, tmp_path / "lora")
    other = build_model_folder(tmp_path / "tiny-1.5", size="tiny-1.5")
    with pytest.raises(SystemExit) as exit_info:
        comfyui.main(["to-comfyui", str(lora_file), str(tmp_path / "out.safetensors"), "--model", str(other)])
    assert "another size" in str(exit_info.value.code) and str(lora_file) in str(exit_info.value.code)
    assert not (tmp_path / "out.safetensors").exists()
    # Same layers and shapes: 2B-style and 5B-style differ only in their position embeddings.
    comfyui.main(["to-comfyui", str(lora_file), str(tmp_path / "out.safetensors"), "--model", str(tiny_5b_model_dir)])


def test_alpha_from_the_flag_or_else_rank_for_a_file_without_metadata(tmp_path, tiny_model_dir):
    lora_file = trainer_lora(tiny_model_dir, tmp_path / "lora")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(lora_file)), str(bare))  # what other diffusers trainers write: no metadata
    for extra, alpha in [([], RANK), (["--alpha", "1"], 1.0)]:
        out = comfyui.main(["to-comfyui", str(bare), str(tmp_path / f"{alpha}.safetensors"), *extra])
        assert {t.item() for k, t in load_file(str(out)).items() if k.endswith(".alpha")} == {alpha}
    # rsLoRA scales by alpha / sqrt(rank): ComfyUI's alpha / rank gives the same with alpha * sqrt(rank).
    peft_layers = {k.removeprefix("transformer."): t for k, t in load_file(str(lora_file)).items()}
    layers = comfyui.from_peft(peft_layers, {"r": RANK, "lora_alpha": ALPHA, "use_rslora": True})
    assert {layer.alpha / layer.rank for layer in layers.values()} == {ALPHA / RANK ** 0.5}


# ---------------------------------------------------------------------------------------------------------------
# In the trainer


def test_each_checkpoint_holds_both_files_unless_asked_not_to(tmp_path, tiny_model_dir):
    assert parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                       "--no_comfyui_lora"]).no_comfyui_lora
    for comfyui_copy, expected in [(True, [DIFFUSERS_LORA_NAME, COMFYUI_LORA_NAME]), (False, [DIFFUSERS_LORA_NAME])]:
        transformer = base_transformer(tiny_model_dir)
        config = add_lora(transformer, rank=RANK, alpha=ALPHA)
        accelerator = Accelerator(cpu=True)
        try:
            transformer = accelerator.prepare(transformer)
            register_lora_hooks(accelerator, transformer, config, comfyui_copy=comfyui_copy)
            accelerator.save_state(str(tmp_path / str(comfyui_copy)))
        finally:
            _reset_accelerate()
        assert sorted(p.name for p in (tmp_path / str(comfyui_copy)).glob("*.safetensors")) == sorted(expected)
        save_lora(transformer, tmp_path / f"final-{comfyui_copy}", config, comfyui_copy=comfyui_copy)
        assert sorted(p.name for p in (tmp_path / f"final-{comfyui_copy}").iterdir()) == sorted(expected)


def test_a_comfyui_lora_left_in_the_output_folder_is_an_earlier_run(tmp_path):
    (tmp_path / COMFYUI_LORA_NAME).write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=COMFYUI_LORA_NAME):
        checkpoint_to_resume(tmp_path, None)


def test_the_comfyui_file_carries_the_alpha_per_layer_not_in_metadata(tmp_path, tiny_model_dir):
    """ComfyUI reads each layer's alpha tensor and ignores the file's metadata."""
    from safetensors import safe_open

    trainer_lora(tiny_model_dir, tmp_path)
    with safe_open(str(tmp_path / COMFYUI_LORA_NAME), framework="pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
        alphas = [f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")]
    assert all(a.shape == () and a.dtype == torch.float32 for a in alphas)
    assert [a.item() for a in alphas] == [float(ALPHA)] * 2 * 4  # 2 blocks, 4 projections each


def test_the_model_card_says_which_file_goes_where():
    rows = {line.split(" | ")[0]: line for line in where_each_file_goes(True).splitlines() if line.startswith("| ")}
    assert COMFYUI_LORA_NAME in rows["| core ComfyUI (its built-in CogVideoX)"]
    assert "ComfyUI/models/loras/" in rows["| core ComfyUI (its built-in CogVideoX)"]
    assert DIFFUSERS_LORA_NAME in rows["| kijai's ComfyUI-CogVideoXWrapper"]
    assert "to-comfyui" in where_each_file_goes(False) and "to-comfyui" not in where_each_file_goes(True)
