"""The folders a run writes, tried before any model loads (writable.py): one inside a file is refused naming the
file; a writable one passes and keeps its times."""

from cogvideox_lora import writable


def test_a_folder_inside_a_file_is_refused_and_a_writable_one_is_left_as_it_was(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    before = out.stat().st_mtime_ns
    problems = writable.problems({"--output_dir": out, "--latent_cache_dir": tmp_path / "notes.txt" / "cache"})
    assert problems == [f"--latent_cache_dir {tmp_path / 'notes.txt' / 'cache'}: {tmp_path / 'notes.txt'} is a "
                        f"file, not a folder: name a folder."]
    assert list(out.iterdir()) == [] and out.stat().st_mtime_ns == before
