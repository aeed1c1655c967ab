"""devft edge runtime: what runs on the device. Never imports torch, transformers or peft
(the ExecuTorch backend alone imports torch, lazily, because its training API links it)."""

__version__ = "0.1.0"
