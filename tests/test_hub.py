"""The Hugging Face Hub, with no network: datasets read from a hub cache in huggingface_hub's own layout (its
offline resolution runs, nothing is mocked), and --push_to_hub up to the upload call."""

import logging
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from helpers import hub_dataset, lora, max_abs_diff, run_main, summary, train_argv, TINY_FLAGS
from cogvideox_lora import hub, settings
from cogvideox_lora.args import parse_args
from cogvideox_lora.data import DatasetError, read_index

DISNEY = "Wild-Heart/Disney-VideoGeneration-Dataset"
SECRET = "hf_pushTestSecretTokenNeverLogged0123456"


def disney_layout(tiny_dataset_dir) -> dict:
    """What the original README's Disney dataset holds: prompts.txt, videos.txt and videos/."""
    return {name: tiny_dataset_dir / name for name in ("prompts.txt", "videos.txt", "videos")}


def hub_argv(model_dir, output_dir, cache_dir, hub_cache, *extra) -> list:
    return ["--pretrained_model_name_or_path", model_dir, "--dataset_name", DISNEY, "--cache_dir", hub_cache,
            "--output_dir", output_dir, "--latent_cache_dir", cache_dir, "--report_to", "none", *TINY_FLAGS, *extra]


@pytest.mark.slow
def test_a_cached_hub_dataset_trains_offline_exactly_like_the_local_folder(tmp_path, tiny_model_dir,
                                                                           tiny_dataset_dir):
    assert constants.HF_HUB_OFFLINE  # conftest: nothing can reach the Hub
    snapshot = hub_dataset(tmp_path / "hub", DISNEY, disney_layout(tiny_dataset_dir))
    run_main(hub_argv(tiny_model_dir, tmp_path / "from_hub", tmp_path / "cache", tmp_path / "hub",
                      "--max_train_steps", 1))
    run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "local", tmp_path / "cache",
                        "--max_train_steps", 1))
    assert summary(tmp_path / "from_hub")["clips"] == 4
    # The local run found every clip in the cache the hub run filled: the same bytes, read from the snapshot.
    assert summary(tmp_path / "local")["encoded_clips"] == 0
    assert max_abs_diff(lora(tmp_path / "from_hub"), lora(tmp_path / "local")) == 0
    clips, problems = read_index(snapshot, "prompts.txt", "videos.txt")
    assert not problems and all(c.video.is_relative_to(snapshot) for c in clips)


def test_offline_without_the_dataset_says_what_to_download(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit) as exit_:
        run_main(hub_argv(tiny_model_dir, tmp_path / "out", tmp_path / "cache", tmp_path / "hub", "--dry_run"))
    message = str(exit_.value.code)
    assert f"--dataset_name {DISNEY}: not in the hub cache ({tmp_path / 'hub'})" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"hf download {DISNEY} --repo-type dataset --cache-dir {tmp_path / 'hub'}" in message
    assert not (tmp_path / "out").exists()


CARD_WITH_CONFIGS = """---
configs:
- config_name: bears
  data_files:
  - split: train
    path: bears/metadata.csv
- config_name: squares
  data_files: squares.jsonl
---
"""


def _resolved(tmp_path, *extra):
    data = hub.resolve_dataset(settings.from_args(parse_args([
        "--pretrained_model_name_or_path", "m", "--dataset_name", "me/clips", "--cache_dir", str(tmp_path / "hub"),
        "--report_to", "none", *extra])).data)
    clips, problems = read_index(data.root, data.caption_column, data.video_column, data.dataset_file, data.id_token)
    assert not problems
    return data, clips


def test_config_names_tables_and_revisions(tmp_path):
    main = hub_dataset(tmp_path / "hub", "me/clips", {
        "README.md": CARD_WITH_CONFIGS, "bears/metadata.csv": "caption,video\na bear,videos/bear.mp4\n",
        "squares.jsonl": '{"caption": "a square", "video": "videos/square.mp4"}\n'})
    pinned_commit = "a" * 40
    pinned = hub_dataset(tmp_path / "hub", "me/clips", {"data.csv": "text,file\nold prompt,old.mp4\n"},
                         commit=pinned_commit, ref="v1")
    (tmp_path / "clips").mkdir()

    data, clips = _resolved(tmp_path, "--dataset_config_name", "bears")
    assert data.dataset_file == str(main / "bears" / "metadata.csv")
    # The table's paths are relative to the dataset, as in a local folder.
    assert [(c.prompt, c.video) for c in clips] == [("a bear", main / "videos" / "bear.mp4")]
    _, clips = _resolved(tmp_path, "--dataset_config_name", "squares", "--id_token", "TOK")
    assert [(c.prompt, c.video) for c in clips] == [("TOK a square", main / "videos" / "square.mp4")]

    # A revision pins another snapshot, found offline by its commit; its only table is read, with the columns named.
    for revision in (pinned_commit, "v1"):
        data, clips = _resolved(tmp_path, "--dataset_revision", revision, "--caption_column", "text",
                                "--video_column", "file", "--instance_data_root", str(tmp_path / "clips"))
        assert data.dataset_file == str(pinned / "data.csv")
        assert [(c.prompt, c.video) for c in clips] == [("old prompt", tmp_path / "clips" / "old.mp4")]

    with pytest.raises(DatasetError, match="--dataset_config_name cats: me/clips has no such config"):
        _resolved(tmp_path, "--dataset_config_name", "cats")
    # Two tables and no config: which one is meant is not guessed.
    hub_dataset(tmp_path / "hub", "me/clips", {"other.csv": "caption,video\n"})
    with pytest.raises(DatasetError, match=r"holds neither prompts.txt and videos.txt nor a single table .*"
                                           r"README.md, bears, other.csv, squares.jsonl"):
        _resolved(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# --push_to_hub, up to the upload


class FakeHub:
    """huggingface_hub's network calls, recording what they were asked; upload_folder records the files it would
    send, filtered by huggingface_hub's own pattern matching."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda api, token=None: self._call("whoami", token=token)
                            or {"name": "me"})
        monkeypatch.setattr(huggingface_hub, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub, "upload_folder", self.upload_folder)

    def _call(self, name, **kwargs):
        self.calls.append((name, kwargs))

    def create_repo(self, repo_id, exist_ok=False, token=None):
        self._call("create_repo", repo_id=repo_id, exist_ok=exist_ok, token=token)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None, token=None):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        self._call("upload_folder", repo_id=repo_id, token=token,
                   files=sorted(filter_repo_objects(files, allow_patterns=allow_patterns)))
        return f"https://huggingface.co/{repo_id}/commit/0"

    def uploaded(self) -> list[str]:
        return next(kw["files"] for name, kw in self.calls if name == "upload_folder")


@pytest.fixture
def pushed(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    fake = FakeHub(monkeypatch)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    argv = train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--max_train_steps", 2,
                      "--checkpointing_steps", 1, "--validation_prompt", "a red square", "--push_to_hub",
                      "--hub_model_id", "me/my-lora", "--hub_token", SECRET, "--tracker_name", "my-project",
                      report_to="tensorboard")
    try:
        run_main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    return tmp_path / "out", fake, records, argv


@pytest.mark.slow
def test_push_uploads_the_lora_card_and_videos_not_the_checkpoints(pushed):
    output_dir, fake, records, argv = pushed
    assert (output_dir / "checkpoint-1").is_dir()
    assert fake.uploaded() == ["README.md", "loss.png", "pytorch_lora_weights.safetensors",
                               "pytorch_lora_weights_comfyui.safetensors", "train_summary.json",
                               "validation/base_p0_v0_a-red-square.mp4",
                               "validation/step-000002_p0_v0_a-red-square.mp4"]
    assert [(name, kw.get("repo_id"), kw["token"]) for name, kw in fake.calls] == [
        ("whoami", None, SECRET), ("create_repo", "me/my-lora", SECRET), ("upload_folder", "me/my-lora", SECRET)]
    # The card names where the LoRA now is.
    assert "pipe.load_lora_weights('me/my-lora'" in (output_dir / "README.md").read_text()
    assert list((output_dir / "logs" / "my-project").glob("events.out.tfevents.*"))  # --tracker_name

    # The token: a warning about the process list, and it is nowhere in the logs or the output folder.
    assert any("--hub_token shows in the process list" in r for r in records)
    assert not any(SECRET in r for r in records)
    assert not any(SECRET.encode() in p.read_bytes() for p in output_dir.rglob("*") if p.is_file())

    output = settings.from_args(parse_args([*map(str, argv), "--push_checkpoints"])).output
    fake.calls.clear()
    hub.push(output)
    assert {"checkpoint-1/pytorch_lora_weights.safetensors", "checkpoint-2/optimizer.bin"} <= set(fake.uploaded())


@pytest.mark.parametrize("situation, message", [
    ("offline", "--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded"),
    ("no token", "--push_to_hub: not logged in to the Hugging Face Hub: run `hf auth login`, or set HF_TOKEN."),
    ("bad token", "--push_to_hub: the Hub does not accept the token (HfHubHTTPError)")])
def test_a_push_that_cannot_succeed_is_refused_before_training(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                               monkeypatch, capsys, situation, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if situation != "offline":
        FakeHub(monkeypatch)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None if situation == "no token" else "hf_stale")

        def refuse(api, token=None):
            request = httpx.Request("GET", "https://huggingface.co/api/whoami-v2")
            raise huggingface_hub.errors.HfHubHTTPError("401 Unauthorized",
                                                        response=httpx.Response(401, request=request))

        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refuse)
    with pytest.raises(SystemExit):
        run_main(train_argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", tmp_path / "cache", "--push_to_hub"))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
