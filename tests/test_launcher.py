"""The trainer's closing message under the wrapper scripts (launcher.py): written to the file they name only under
torch's elastic agent, and the exit goes on."""

import pytest

from cogvideox_lora import launcher


@pytest.mark.parametrize("elastic", [False, True], ids=["alone", "under-the-agent"])
def test_the_exit_message_is_written_only_under_the_agent(tmp_path, monkeypatch, elastic):
    words = tmp_path / "last_words"
    monkeypatch.setenv(launcher.LAST_WORDS_ENV, str(words))
    if elastic:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit, match="error: no such folder"):
        with launcher.last_words():
            raise SystemExit("error: no such folder")
    assert (words.read_text() if words.exists() else None) == ("error: no such folder\n" if elastic else None)
