"""qwen-vl: the Qwen-VL family of vision-language models, fast and safe."""
