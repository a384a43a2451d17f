"""The LoRA's model card (model_card.py): written in the Hub's format, never over a README.md of the user's."""

from huggingface_hub import ModelCard

from cogvideox_lora import models, settings
from cogvideox_lora.args import parse_args
from cogvideox_lora.model_card import MARKER_TAG, card_text, write_model_card


def test_the_card_says_how_to_load_the_lora_and_leaves_the_users_readme_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run = settings.from_args(parse_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--instance_data_root", str(tmp_path),
        "--output_dir", str(out), "--rank", "4", "--lora_alpha", "8", "--id_token", "BW_STYLE",
        "--validation_prompt", "a red square:::a brown bear", "--max_train_steps", "7"]))
    family = models.read_configs(run.model)[3]
    videos = [out / "validation" / f"step-000007_p{p}_v0.mp4" for p in (0, 1)]
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    assert write_model_card(run, family, 7, videos) is None
    assert (out / "README.md").read_text() == "my notes\n"

    (out / "README.md").unlink()
    card = ModelCard.load(write_model_card(run, family, 7, videos))
    assert MARKER_TAG in card.data.tags and "text-to-video" in card.data.tags
    assert card.data.base_model == str(tiny_model_dir) and card.data.instance_prompt == "BW_STYLE"
    assert [w["text"] for w in card.data.widget] == ["a red square", "a brown bear"]
    assert card.data.widget[1]["output"]["url"] == "validation/step-000007_p1_v0.mp4"
    assert f"pipe.load_lora_weights({str(out)!r}, adapter_name=\"lora\")" in card.text
    assert "| optimizer steps | 7 |" in card.text and "(updates scaled by 2)" in card.text
    # A later run (a resume) replaces this trainer's own card.
    assert write_model_card(run, family, 9, videos) == out / "README.md"
    assert "| optimizer steps | 9 |" in (out / "README.md").read_text()


def test_the_cards_code_asks_for_a_frame_count_the_pipelines_make(tmp_path, tiny_model_dir):
    # 13 frames train (4k+1) without validation videos, but a pipeline asked for 13 returns 16: the card asks for 9.
    run = settings.from_args(parse_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--instance_data_root", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--max_num_frames", "13"]))
    text = card_text(run, models.read_configs(run.model)[3], 3, [])
    assert "num_frames=9," in text and "num_frames=13" not in text
