"""Model parts (models.py): the family read from the configs, and compiled blocks and float8 base weights, which
compute the plain path's step."""

import copy
import shutil

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
from huggingface_hub import constants

from cogvideox_lora import models, synthetic
from cogvideox_lora.lora import load_lora_state_dict, lora_state_dict
from cogvideox_lora.models import Family, ModelError
from cogvideox_lora.settings import ModelSource
from helpers import BF16, assert_same_step, hub_model, load_tiny, step


REPO_ID = "owner/cogvideox-tiny"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """huggingface_hub's own cache (HF_HUB_CACHE), empty, here."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_model_in_the_standard_hub_cache_is_found_beside_another_cache_dir(tmp_path, hub_cache, tiny_model_dir):
    """The wrapper script passes --cache_dir ~/.cache: a model that `hf download` (or cli_demo.py) put in
    huggingface_hub's cache is read from there, offline, instead of being fetched again into --cache_dir."""
    snapshot = hub_model(hub_cache, REPO_ID, tiny_model_dir)
    source = models.locate(ModelSource(REPO_ID, cache_dir=str(tmp_path / "dot-cache")), loading=True)
    assert source.files == str(snapshot) and source.cache_dir is None and source.path == REPO_ID
    # Read through the snapshot: `hf download` leaves no record of the files a repo lacks (a tokenizer
    # folder's config.json), which transformers needs to load a tokenizer offline through the id.
    models.load_tokenizer(source)
    assert models.read_configs(source)[3].name == "CogVideoX T2V"


def test_the_given_cache_dir_comes_first(tmp_path, hub_cache, tiny_model_dir):
    hub_model(hub_cache, REPO_ID, tiny_model_dir)
    mine = hub_model(tmp_path / "mine", REPO_ID, tiny_model_dir)
    source = models.locate(ModelSource(REPO_ID, cache_dir=str(tmp_path / "mine")), loading=True)
    assert source.files == str(mine) and source.cache_dir == str(tmp_path / "mine")


def test_a_partial_snapshot_is_completed_online_and_named_offline(tmp_path, hub_cache, tiny_model_dir, monkeypatch):
    snapshot = hub_model(hub_cache, REPO_ID, tiny_model_dir)
    shutil.rmtree(snapshot / "tokenizer")
    # The configs are there: a dry run reads them from the snapshot.
    assert models.locate(ModelSource(REPO_ID), loading=False).files == str(snapshot)
    with pytest.raises(models.ModelError) as error:
        models.locate(ModelSource(REPO_ID, cache_dir=str(tmp_path / "dot-cache")), loading=True)
    assert str(error.value) == (f"--pretrained_model_name_or_path {REPO_ID}: {snapshot} lacks tokenizer/. Fetch it "
                                f"with hf download {REPO_ID} --include 'tokenizer/*' (HF_HUB_OFFLINE is set, so "
                                f"nothing is downloaded here).")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = models.locate(ModelSource(REPO_ID, cache_dir=str(tmp_path / "dot-cache")), loading=True)
    # Loading through the id downloads what is missing into the cache that holds the rest.
    assert online.files is None and online.cache_dir is None


def test_a_hub_id_in_no_cache(tmp_path, hub_cache, monkeypatch):
    source = ModelSource(REPO_ID, revision="v1", cache_dir=str(tmp_path / "dot-cache"))
    with pytest.raises(models.ModelError) as error:
        models.locate(source, loading=False)
    message = str(error.value)
    assert f"{REPO_ID}: no such folder here, and not in the hub cache ({tmp_path / 'dot-cache'} and {hub_cache}) " \
           f"while HF_HUB_OFFLINE is set" in message
    assert f"hf download {REPO_ID} --revision v1 --cache-dir '{tmp_path / 'dot-cache'}'" in message
    assert "\n" not in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert models.locate(source, loading=True) == source  # downloaded into --cache_dir when loaded


def test_local_folders_say_what_is_wrong_in_one_line(tmp_path, tiny_model_dir):
    def problem(path, loading=True, flag=models.TRAINER_FLAG):
        with pytest.raises(models.ModelError) as error:
            models.check_model(ModelSource(str(path)), loading, flag)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert problem(tmp_path / "nope") == (
        f"--pretrained_model_name_or_path {tmp_path / 'nope'}: no such folder ({tmp_path / 'nope'}). Give the folder "
        f"that holds model_index.json, or a hub id such as THUDM/CogVideoX-2b; to keep a model in a folder: hf "
        f"download THUDM/CogVideoX-2b --local-dir '{tmp_path / 'nope'}'.")
    assert problem(tiny_model_dir / "transformer", flag="--model_path") == (
        f"--model_path {tiny_model_dir / 'transformer'} is the transformer/ part of the model in {tiny_model_dir}: "
        f"give the model's folder, --model_path {tiny_model_dir}")
    assert "holds no model_index.json, so it is no diffusers model folder" in problem(tmp_path)
    assert "is a file: give the model's folder" in problem(tiny_model_dir / "model_index.json")

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    assert problem(model) == (
        f"--pretrained_model_name_or_path {model}: {model} lacks transformer/, vae/, text_encoder/, tokenizer/. Fetch "
        f"them with hf download THUDM/CogVideoX-2b --include 'text_encoder/*' --include 'tokenizer/*' --include "
        f"'transformer/*' --include 'vae/*' --local-dir '{model}' (with the hub id it came from).")
    # Its configs are all a dry run reads.
    configs = models.check_model(ModelSource(str(model)), loading=False)
    assert configs.family.name == "CogVideoX T2V" and not configs.has_tokenizer


def test_configs_that_cannot_be_downloaded_or_read_are_one_line(tmp_path, tiny_model_dir):
    """Where the hub cannot be reached (here: offline, as without a network), or a config is damaged."""
    with pytest.raises(models.ModelError) as error:
        models.read_configs(ModelSource(REPO_ID, cache_dir=str(tmp_path / "dot-cache")))
    message = str(error.value)
    assert message.startswith(f"--pretrained_model_name_or_path {REPO_ID}: not in the hub cache "
                              f"({tmp_path / 'dot-cache'}), and its configs cannot be downloaded (")
    assert f"download it where there is one: hf download {REPO_ID} --cache-dir '{tmp_path / 'dot-cache'}'" in message
    assert "\n" not in message

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "vae" / "config.json").write_text("{not json")
    with pytest.raises(models.ModelError) as error:
        models.check_model(ModelSource(str(model)), loading=True)
    assert str(error.value).startswith(f"--pretrained_model_name_or_path {model}: its configs in {model} cannot be "
                                       f"read (")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_compiled_blocks_give_the_plain_step(plain, batch):
    compiled = copy.deepcopy(plain)
    models.compile_blocks(compiled)
    # Both as the trainer runs them: compiled blocks with uncast adapter inputs.
    assert_same_step(step(plain, batch), step(compiled, batch, uncast=True), tolerance=1e-2)


@pytest.mark.slow
def test_float8_base_weights_stay_close_to_bf16(tiny_model_dir, plain, batch):
    fp8 = load_tiny(tiny_model_dir, fp8=True)
    load_lora_state_dict(fp8, lora_state_dict(plain))
    block = fp8.transformer_blocks[0]
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.weight.dtype == BF16  # the modulation stays in the compute dtype
    assert all(p.dtype == torch.float32 for p in fp8.parameters() if p.requires_grad)
    # A weight survives the round trip to scaled float8 within its 3-bit mantissa (relative 2^-4).
    reference = plain.transformer_blocks[0].ff.net[2]
    restored = block.ff.net[2].weight.to(BF16) * block.ff.net[2].weight_scale
    big = reference.weight.abs() > reference.weight.abs().amax(dim=1, keepdim=True) / 8
    assert ((restored - reference.weight).abs()[big] / reference.weight.abs()[big]).max() <= 2**-4 + 2**-8
    # Rounding every base weight by up to 6 % moves the step by a few percent at most.
    assert_same_step(step(plain, batch, uncast=True), step(fp8, batch, uncast=True), tolerance=0.05)

    compiled = copy.deepcopy(fp8)
    models.compile_blocks(compiled)
    assert_same_step(step(fp8, batch, uncast=True), step(compiled, batch, uncast=True), tolerance=1e-2)


def test_the_family_is_read_from_the_configs(tiny_model_dir, tiny_5b_model_dir):
    transformer, vae, text_encoder, family = models.read_configs(ModelSource(str(tiny_model_dir)))
    assert family.pipeline_class is CogVideoXPipeline and family.name == "CogVideoX T2V"
    assert not family.image_to_video and not family.trained_in_bf16 and family.patch_size_t is None
    assert (family.native_frames, family.native_height, family.native_width) == (49, 48, 64)
    assert text_encoder["d_model"] == 32
    # Rotary position embeddings mark the 5B family, trained in bf16.
    assert models.read_configs(ModelSource(str(tiny_5b_model_dir)))[3].trained_in_bf16
    # Twice the input channels is image-to-video, whatever model_index.json says.
    with pytest.raises(models.ModelError, match="which is a CogVideoXImageToVideoPipeline model"):
        models.Family.from_configs({**transformer, "in_channels": 8}, vae, "CogVideoXPipeline", "here")
    i2v = models.Family.from_configs({**transformer, "in_channels": 8}, vae, "CogVideoXImageToVideoPipeline", "here")
    assert i2v.image_to_video and i2v.pipeline_class is CogVideoXImageToVideoPipeline


@pytest.mark.parametrize("size, image_to_video, patch_size_t, ofs, learned", [
    ("5b", False, None, False, False), ("5b-i2v", True, None, False, True), ("1.5-5b", False, 2, False, False),
    ("1.5-5b-i2v", True, 2, True, False)])
def test_real_size_families(size, image_to_video, patch_size_t, ofs, learned):
    # On the meta device nothing is allocated: the real sizes are checked without their memory.
    spec = synthetic.SPECS[size]
    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**spec["transformer"])
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(5.57e9, rel=0.01)
    vae = {"block_out_channels": (128, 256, 256, 512), "scaling_factor": 0.7, **spec["vae"]}
    pipeline = "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
    family = Family.from_configs(dict(transformer.config), vae, pipeline, size)
    assert (family.image_to_video, family.patch_size_t, family.ofs, family.learned_positions) == (
        image_to_video, patch_size_t, ofs, learned)
    assert family.image_latent_scale == pytest.approx(1 / 0.7 if patch_size_t else 0.7)
    if learned:
        assert (family.native_frames, family.native_height, family.native_width) == (49, 480, 720)
    with pytest.raises(ModelError, match="model_index.json names"):
        Family.from_configs(dict(transformer.config), vae, "CogVideoXPipeline" if image_to_video else
                            "CogVideoXImageToVideoPipeline", size)
