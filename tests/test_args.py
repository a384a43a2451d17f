"""The command line (args.py): flags and the checks that need no model."""

import pytest

from cogvideox_lora.args import parse_args


@pytest.mark.parametrize("flags", [["--offload", "activations"], ["--blocks_to_swap", "2"],
                                   ["--checkpointing_policy", "keep_attention"]])
def test_offloading_without_checkpointing_is_refused(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_root", str(tmp_path),
                    "--output_dir", str(tmp_path / "out"), *flags])
    assert raised.value.code == 2
    assert f"{' '.join(flags)} work(s) with --gradient_checkpointing" in capsys.readouterr().err
