"""Resumable checkpoints (checkpoints.py): which one a run continues from, and what it refuses to overwrite."""

import pytest

from cogvideox_lora.checkpoints import CheckpointError, checkpoint_to_resume, complete_checkpoints


def test_latest_is_the_newest_complete_checkpoint_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "out"
    assert checkpoint_to_resume(out, None) is None and checkpoint_to_resume(out, "latest") is None  # a new run
    for step in (2, 10, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / ".checkpoint-12.partial").mkdir()  # what a kill while saving leaves
    # By step, not by name (checkpoint-10 sorts before checkpoint-2), and never the partial one.
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert checkpoint_to_resume(out, "latest") == out / "checkpoint-10"
    assert checkpoint_to_resume(out, str(out / "checkpoint-10")) == out / "checkpoint-10"
    with pytest.raises(CheckpointError, match=r"newer than checkpoint-4 \(checkpoint-10\)"):
        checkpoint_to_resume(out, str(out / "checkpoint-4"))
    with pytest.raises(CheckpointError, match="Continue it with --resume_from_checkpoint latest"):
        checkpoint_to_resume(out, None)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-3"
    elsewhere.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="choose an empty --output_dir"):
        checkpoint_to_resume(out, str(elsewhere))
    assert checkpoint_to_resume(tmp_path / "new", str(elsewhere)) == elsewhere
