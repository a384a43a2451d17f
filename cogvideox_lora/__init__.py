"""Parts of the CogVideoX LoRA trainer; `train_cogvideox_lora.py` puts them together."""
