"""vicuna: run, serve and fine-tune Vicuna and other LLaMA-family chat models on your own hardware."""

__version__ = "0.1.0"
