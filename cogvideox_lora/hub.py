"""The Hugging Face Hub: datasets read from it, and the trained LoRA pushed to it.

A hub dataset is a snapshot in the hub cache, so once fetched it is read, checked and trained exactly
like a local folder. What needs the network (a download, a push) is checked before any model loads.
"""

import logging
from dataclasses import replace
from pathlib import Path

import huggingface_hub
from huggingface_hub import DatasetCard, constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, \
    RevisionNotFoundError

from .comfyui import COMFYUI_LORA_NAME
from .data import DatasetError
from .lora import LORA_WEIGHTS_NAME
from .settings import DataSource, HubPush, OutputSettings

logger = logging.getLogger(__name__)

PROMPTS_FILE, VIDEOS_FILE = "prompts.txt", "videos.txt"
TABLE_SUFFIXES = (".csv", ".jsonl", ".json")
CARD_FILE = "README.md"


def _download_command(data: DataSource) -> str:
    revision = f" --revision {data.dataset_revision}" if data.dataset_revision else ""
    cache = f" --cache-dir {data.cache_dir}" if data.cache_dir else ""
    return f"hf download {data.dataset_name} --repo-type dataset{revision}{cache}"


def fetch_dataset(data: DataSource) -> Path:
    """The local snapshot of --dataset_name, downloaded into the hub cache (--cache_dir) if it is not there."""
    try:
        # Offline, huggingface_hub would still try to download a revision given as a commit hash.
        return Path(snapshot_download(data.dataset_name, repo_type="dataset", revision=data.dataset_revision,
                                      cache_dir=data.cache_dir, local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError as e:
        raise DatasetError([f"--dataset_name {data.dataset_name}: not in the hub cache "
                            f"({data.cache_dir or constants.HF_HUB_CACHE}) and the hub cannot be reached "
                            f"({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else e}). Download it first "
                            f"where there is a network: {_download_command(data)}"]) from e
    except RevisionNotFoundError as e:
        raise DatasetError([f"--dataset_revision {data.dataset_revision}: no such branch, tag or commit of the "
                            f"dataset {data.dataset_name}."]) from e
    except RepositoryNotFoundError as e:
        raise DatasetError([f"--dataset_name {data.dataset_name}: no such dataset repository on the Hub, or it is "
                            f"private and you are not logged in (hf auth login)."]) from e
    except HfHubHTTPError as e:
        raise DatasetError([f"--dataset_name {data.dataset_name}: download failed ({e})."]) from e


def _config_files(folder: Path, config_name: str) -> list[str]:
    """The data files the dataset card's `configs` give for config_name (its train split where it has splits)."""
    configs = DatasetCard.load(folder / CARD_FILE).data.to_dict().get("configs", []) \
        if (folder / CARD_FILE).is_file() else []
    for config in configs:
        if config.get("config_name") == config_name:
            files = config.get("data_files", [])
            files = [files] if isinstance(files, (str, dict)) else files
            splits = [f for f in files if isinstance(f, dict)]
            if splits:
                split = next((s for s in splits if s.get("split") == "train"), splits[0])
                files = split["path"]
                files = [files] if isinstance(files, str) else files
            return files
    return []


def resolve_dataset(data: DataSource) -> DataSource:
    """The dataset as a local folder: `data` itself, or --dataset_name's snapshot, whichever layout it holds.

    Its prompts.txt/videos.txt (or the files --caption_column and --video_column name), or else one table
    (--dataset_file, the files of --dataset_config_name, or its only CSV/JSON-lines file). With
    --instance_data_root too, as in the diffusers example, the table comes from the hub and the clips
    are read under the root.
    """
    if not data.dataset_name:
        return data
    snapshot = fetch_dataset(data)
    folder, table = snapshot, data.dataset_file
    if data.dataset_config_name:
        files = _config_files(snapshot, data.dataset_config_name)
        if files:
            table = table or files[0]
        elif (snapshot / data.dataset_config_name).is_dir():
            folder = snapshot / data.dataset_config_name
        else:
            raise DatasetError([f"--dataset_config_name {data.dataset_config_name}: {data.dataset_name} has no "
                                f"such config (none in the `configs` of its {CARD_FILE}, nor a folder of that "
                                f"name)."])
    captions, videos = data.caption_column or PROMPTS_FILE, data.video_column or VIDEOS_FILE
    if not table and not ((folder / captions).is_file() and (folder / videos).is_file()):
        tables = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
        if len(tables) != 1:
            raise DatasetError([f"--dataset_name {data.dataset_name} ({folder}) holds neither {captions} and "
                                f"{videos} nor a single table (.csv, .jsonl): it has "
                                f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'no files'}. Name its "
                                f"table with --dataset_file, or its files with --caption_column and --video_column."])
        table = tables[0]
    if table:
        resolved = replace(data, dataset_file=str(folder / table), caption_column=data.caption_column or "caption",
                           video_column=data.video_column or "video")
    else:
        image_column = data.image_column
        if image_column is None and (folder / "images.txt").is_file():
            image_column = str(folder / "images.txt")
        resolved = replace(data, caption_column=str(folder / captions), video_column=str(folder / videos),
                           image_column=image_column)
    if resolved.root is None:
        resolved = replace(resolved, root=str(folder))
    logger.info("Dataset %s: %s", data.dataset_name, resolved.dataset_file or folder)
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Pushing the LoRA


def push_problems(push: HubPush) -> list[str]:
    """Why a push at the end of training would fail, found before the training starts."""
    if not push.enabled:
        return []
    if push.token:
        logger.warning("--hub_token shows in the process list and the shell history of this machine: prefer "
                       "`hf auth login` or the HF_TOKEN environment variable.")
    if constants.HF_HUB_OFFLINE:
        return ["--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or drop --push_to_hub "
                "and upload the output folder later (hf upload REPO OUTPUT_DIR)."]
    token = push.token or huggingface_hub.get_token()
    if not token:
        return ["--push_to_hub: not logged in to the Hugging Face Hub: run `hf auth login`, or set HF_TOKEN."]
    try:
        huggingface_hub.HfApi().whoami(token=token)
    except Exception as e:  # a bad token, or no network: either way the upload would fail
        return [f"--push_to_hub: the Hub does not accept the token ({type(e).__name__}): log in again with "
                f"`hf auth login`, or check the network."]
    return []


def push(output: OutputSettings) -> str:
    """Uploads the LoRA, its model card and the validation videos (and the checkpoints if asked); returns the
    commit's URL."""
    token = output.push.token or huggingface_hub.get_token()
    repo = huggingface_hub.create_repo(output.repo_id(), exist_ok=True, token=token).repo_id
    patterns = [LORA_WEIGHTS_NAME, COMFYUI_LORA_NAME, CARD_FILE, "validation/*", "train_summary.json", "loss.png"]
    if output.push.checkpoints:
        patterns.append("checkpoint-*/*")
    commit = huggingface_hub.upload_folder(repo_id=repo, folder_path=output.output_dir, allow_patterns=patterns,
                                           commit_message="End of training", token=token)
    logger.info("Pushed to https://huggingface.co/%s", repo)
    return str(commit)
