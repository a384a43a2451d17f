"""The frame counts a model trains on (4k+1) and generates (8k+1) (frame_counts.py), and what a refusal offers."""

from cogvideox_lora import frame_counts


def test_a_count_the_pipelines_cannot_make_names_the_two_nearest():
    assert [frame_counts.generation_problem("--num_frames", n) for n in (9, 17, 49)] == [None, None, None]
    assert frame_counts.generation_problem("--num_frames", 13) == (
        "--num_frames 13: CogVideoX generates 8k+1 frames (13 would come out 16), an odd number of latent frames: "
        "use 9 or 17.")
    assert frame_counts.generated_frames(13) == 16 and frame_counts.generated_frames(10) == 9
    assert frame_counts.generated_at_most(48) == 41


def test_training_takes_4k_plus_1():
    assert frame_counts.training_problem("--max_num_frames", 13) is None
    assert frame_counts.training_problem("--max_num_frames", 12) == "--max_num_frames 12 is not 4k+1: use 9 or 13."
    assert frame_counts.latent_frames(49) == 13
