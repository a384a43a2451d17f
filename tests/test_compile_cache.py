"""Compiled kernels kept under the user's cache folder between runs (compile_cache.py)."""

import pytest

from cogvideox_lora import compile_cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for variable in [*compile_cache.VARIABLES, "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return monkeypatch


def test_both_caches_go_under_the_users_cache_folder_unless_pointed_elsewhere(clean_env, tmp_path):
    import os

    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_cache.keep_on_disk()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stands
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(
        tmp_path / "cache" / "cogvideox_lora" / "kernels" / "flash_attention_cute")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"


def test_the_plan_says_when_kernels_compile_and_whether_earlier_ones_are_there(clean_env, tmp_path):
    compile_cache.keep_on_disk()
    assert compile_cache.describe(compiled_blocks=False, flash4=False) is None
    cold = compile_cache.describe(compiled_blocks=True, flash4=True)
    assert "the blocks (torch.compile) and FlashAttention-4 compile in the first step" in cold
    assert "none there yet" in cold and str(tmp_path / "cache" / "cogvideox_lora" / "kernels") in cold
    kept = tmp_path / "cache" / "cogvideox_lora" / "kernels" / "torchinductor"
    kept.mkdir(parents=True)
    (kept / "fxgraph").mkdir()
    assert "kernels of earlier runs are there" in compile_cache.describe(compiled_blocks=True, flash4=False)
