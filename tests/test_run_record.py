"""The run record (run_record.py): what a checkpoint was trained on, read back, and what a resumed run is refused or
told when its model, size, rank, batch or clips differ."""

import logging
from dataclasses import replace

import torch
from diffusers import CogVideoXPipeline

from cogvideox_lora import run_record
from cogvideox_lora.run_record import RunRecord


RECORD = RunRecord(model="CogVideoX T2V, 2 blocks of 4", size="9x48x64", rank=4, lora_alpha=4.0, processes=2,
                   batch_size=1, gradient_accumulation_steps=2,
                   clips={"videos/a.mp4": "1", "videos/b.mp4": "2", "videos/c.mp4": "3"})


def checkpoint(tmp_path, record=RECORD, rank=None):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    if record is not None:
        run_record.write(record, folder)
    if rank is not None:
        CogVideoXPipeline.save_lora_weights(
            folder, transformer_lora_layers={"proj.lora_A.weight": torch.zeros(rank, 8),
                                             "proj.lora_B.weight": torch.zeros(8, rank)},
            transformer_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": ["proj"]})
    return folder


def test_the_record_reads_back_as_written(tmp_path):
    assert run_record.read(checkpoint(tmp_path)) == RECORD


def test_the_same_run_resumes_without_a_word(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert run_record.resume_problems(checkpoint(tmp_path, rank=4), RECORD) == []
    assert not caplog.records


def test_another_model_size_or_rank_is_refused_with_both_values(tmp_path):
    folder = checkpoint(tmp_path, rank=8)
    problems = run_record.resume_problems(folder, replace(RECORD, model="CogVideoX1.5 I2V, 2 blocks of 4",
                                                          size="13x48x64"))
    assert problems == [
        f"{folder} holds a LoRA of --rank 8 --lora_alpha 8, and this run has --rank 4 --lora_alpha 4: resume with "
        f"the checkpoint's, or start a new run in another --output_dir.",
        "checkpoint-4 was trained on model CogVideoX T2V, 2 blocks of 4, and this run is CogVideoX1.5 I2V, 2 blocks "
        "of 4: resume with the checkpoint's, or start a new run in another --output_dir.",
        "checkpoint-4 was trained on frame size (--max_num_frames x --height x --width) 9x48x64, and this run is "
        "13x48x64: resume with the checkpoint's, or start a new run in another --output_dir."]


def test_the_process_count_may_change_where_the_global_batch_does_not(tmp_path, caplog):
    folder = checkpoint(tmp_path)
    caplog.set_level(logging.WARNING)
    assert run_record.resume_problems(folder, replace(RECORD, processes=1, batch_size=2)) == []
    assert caplog.messages == ["checkpoint-4 was trained on 2 process(es), this run has 1: the global batch is the "
                               "same, 4 (1 process(es) x --train_batch_size 2 x --gradient_accumulation_steps 2), "
                               "so the run continues as it would have."]
    # The same global batch made of another accumulation takes other batches: refused.
    for other in (replace(RECORD, processes=1), replace(RECORD, batch_size=2, gradient_accumulation_steps=1)):
        problems = run_record.resume_problems(folder, other)
        assert len(problems) == 1 and problems[0].startswith(
            "checkpoint-4 was trained with a global batch of 4 (2 process(es) x --train_batch_size 1 x "
            "--gradient_accumulation_steps 2), and this run has ")


def test_clips_added_removed_or_recaptioned_are_said(tmp_path, caplog):
    folder = checkpoint(tmp_path)
    caplog.set_level(logging.WARNING)
    now = replace(RECORD, clips={"videos/a.mp4": "1", "videos/b.mp4": "changed", "videos/d.mp4": "4",
                                 "videos/e.mp4": "5"})
    assert run_record.resume_problems(folder, now) == []
    assert caplog.messages == [
        "The dataset changed since checkpoint-4 (3 clips then, 4 now): 2 added (videos/d.mp4, videos/e.mp4); 1 "
        "removed (videos/c.mp4); 1 with another prompt or image (videos/b.mp4). The resumed run trains on the clips "
        "of now, so its epochs differ from those the stopped run would have had."]


def test_a_checkpoint_without_a_record_is_still_checked_for_its_rank(tmp_path, caplog):
    folder = checkpoint(tmp_path, record=None, rank=8)
    caplog.set_level(logging.WARNING)
    problems = run_record.resume_problems(folder, RECORD)
    assert len(problems) == 1 and "--rank 8 --lora_alpha 8, and this run has --rank 4" in problems[0]
    assert "records no model, size or batch" in caplog.messages[0]


def test_a_damaged_record_or_lora_file_is_named(tmp_path):
    folder = checkpoint(tmp_path, rank=4)
    (folder / run_record.RECORD_NAME).write_bytes(b"PK\x03\x04\x80 a pickle, not JSON")
    problems = run_record.resume_problems(folder, RECORD)
    assert len(problems) == 1 and problems[0].startswith(
        f"{folder / run_record.RECORD_NAME} cannot be read (UnicodeDecodeError: ")
    assert problems[0].endswith(": the checkpoint is damaged. Resume from an earlier checkpoint-N of this run, or "
                                "start again in a new --output_dir.")
    run_record.write(RECORD, folder)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\xff" * 16)
    problems = run_record.resume_problems(folder, RECORD)
    assert len(problems) == 1 and problems[0].startswith(f"{folder / 'pytorch_lora_weights.safetensors'} cannot be "
                                                         f"read (")


def test_buckets_are_part_of_the_size():
    from cogvideox_lora.data import Buckets

    plain = run_record.describe_size(9, 48, 64, None)
    listed = run_record.describe_size(9, 48, 64, Buckets((48, 64), (64,), (5, 9)))
    auto = run_record.describe_size(9, 48, 64, Buckets((48,), (64,), (9,), 48 * 64))
    assert len({plain, listed, auto}) == 3
    assert listed == "9x48x64 with buckets of frames 5,9, heights 48,64, widths 64"


def test_clips_are_named_relative_to_the_dataset_root_however_it_is_written(tmp_path):
    from types import SimpleNamespace

    clips = [SimpleNamespace(video=tmp_path / "data" / "videos" / "a.mp4", prompt="p", image=None),
             SimpleNamespace(video=tmp_path / "database" / "b.mp4", prompt="p", image=None)]
    for root in (tmp_path / "data", f"{tmp_path}/data/", str(tmp_path / "data")):
        assert list(run_record.clip_digests(clips, root)) == ["videos/a.mp4", str(tmp_path / "database" / "b.mp4")]
    assert list(run_record.clip_digests(clips, None)) == [str(c.video) for c in clips]
    assert list(run_record.clip_digests(clips, "/")) == [str(c.video)[1:] for c in clips]
