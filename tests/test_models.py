"""Finding a model's files (a local folder, a hub cache's snapshot) and saying what is missing in one line."""

import shutil

import pytest
from huggingface_hub import constants

from helpers import hub_model
from cogvideox_lora import models
from cogvideox_lora.settings import ModelSource

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
