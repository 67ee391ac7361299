"""Model and generation settings as plain dataclasses, and the command-line flags that fill them.
No torch here: the model commands' flags and the API's request schemas (vicuna.protocol) import it."""

from __future__ import annotations

import argparse
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from vicuna.conversation import template_name
from vicuna.errors import VicunaError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps")


def vicuna_home() -> Path:
    """Where converted models and other caches live: $VICUNA_HOME, default ~/.cache/vicuna."""
    try:
        return Path(os.environ.get("VICUNA_HOME") or Path.home() / ".cache" / "vicuna").expanduser()
    except RuntimeError:  # no $HOME, and no home folder for this user
        raise VicunaError(
            "no home folder to keep vicuna's cache in (HOME is not set); set VICUNA_HOME to a writable folder"
        ) from None


@dataclass
class ModelSettings:
    """What to load and where. `model_path=None` means the built-in model."""

    model_path: str | None = None
    device: str | None = None  # None: the GPU if there is one, else the CPU
    dtype: str = "auto"
    num_gpus: int = 1
    max_gpu_memory: str | None = None  # per GPU, e.g. "20GiB"
    load_8bit: bool = False
    conv_template: str | None = None
    conv_system_msg: str | None = None

    def __post_init__(self) -> None:
        # a Path from Python ended in "expected string or bytes-like object, got 'PosixPath'"
        if isinstance(self.model_path, os.PathLike):
            self.model_path = os.fspath(self.model_path)
        # torch.bfloat16 and torch.device("cuda") from a notebook were refused as "not torch.bfloat16": taken
        # by name (str() of them, without importing torch here)
        if not isinstance(self.dtype, str) and str(self.dtype).startswith("torch."):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if type(self.device).__name__ == "device" and type(self.device).__module__ == "torch":
            self.device = str(self.device)
        if self.dtype not in DTYPES:
            raise VicunaError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.device is not None and self.device not in DEVICES:
            raise VicunaError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.num_gpus < 1:
            raise VicunaError(f"--num-gpus must be at least 1, not {self.num_gpus}")


# a seed of -1 asks for a new seed each time, as llama.cpp and text-generation-webui take it (SillyTavern
# sends it): taken as a fixed seed, every regenerated reply was the same
RANDOM_SEED = -1


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 is greedy decoding."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # 0: off; else tokens less likely than min_p times the most likely one are dropped
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style, as in transformers)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 512  # 0: no reply (a completion that only echoes and scores its prompt)
    min_new_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias

    def __post_init__(self) -> None:
        self._check_types()
        # one string is one stop, as OpenAI's `stop` takes it: as a sequence, stop="###" stopped at any "#";
        # None, as OpenAI's `stop: null`, is none
        self.stop = (
            () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        )
        self.stop_token_ids = () if self.stop_token_ids is None else tuple(self.stop_token_ids)
        if not all(isinstance(s, str) for s in self.stop):
            raise TypeError("stop must be a string or a sequence of strings")
        self.logit_bias = tuple((int(i), float(b)) for i, b in self.logit_bias)
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (
                0 <= self.min_new_tokens <= self.max_new_tokens,
                "min_new_tokens must be in [0, max_new_tokens]",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top logprobs must be in [0, 20]"),
            (all(self.stop), "stop strings must not be empty"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit biases must be in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise VicunaError(message)

    def _check_types(self) -> None:
        """Refuse a number of the wrong kind here, by name: max_new_tokens=64.0 was taken, then the reply
        failed with "'float' object cannot be interpreted as an integer", logprobs=True with topk()'s "must be
        int, not bool", temperature="0.7" with "'>=' not supported between 'str' and 'int'"."""
        optional = ("seed", "logprobs")
        for name in ("top_k", "max_new_tokens", "min_new_tokens", *optional):
            value = getattr(self, name)
            if not (value is None and name in optional) and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral)
            ):
                raise TypeError(f"{name} must be an int, not {value!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, not {value!r}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags FastChat users know, shared by chat, serve, doctor, bench and train."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model-path",
        help="HF-format folder, .gguf file or Hub repo OWNER/NAME (default: the built-in SmolLM2-135M-Instruct)",
    )
    g.add_argument("--device", choices=DEVICES, help="default: the GPU if there is one, else the CPU")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the fastest for this hardware")
    g.add_argument("--num-gpus", type=int, default=1, help="split the layers across this many GPUs")
    g.add_argument(
        "--max-gpu-memory", help="memory to use on each GPU, e.g. 20GiB (default: 90%% of what is free)"
    )
    g.add_argument("--load-8bit", action="store_true", help="int8 weights: about half the memory")
    g.add_argument(
        "--conv-template",
        type=template_name,
        help="prompt template, see `vicuna template list` (default: the model's own, or vicuna_v1.1)",
    )
    g.add_argument("--conv-system-msg", type=utf8_text, help="replace the template's system prompt")


def utf8_text(value: str) -> str:
    """A text flag's value, refused where it is not UTF-8: a terminal that sends GBK (Xshell or SecureCRT
    set to GBK, to a server whose locale is UTF-8) gives escapes that no tokenizer takes, and the chat
    ended with a TypeError at its first message."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not UTF-8 text: set the terminal's encoding to UTF-8") from None
    return value


def model_settings_from_args(args: argparse.Namespace) -> ModelSettings:
    return ModelSettings(
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        num_gpus=args.num_gpus,
        max_gpu_memory=args.max_gpu_memory,
        load_8bit=args.load_8bit,
        conv_template=args.conv_template,
        conv_system_msg=args.conv_system_msg,
    )


__all__ = [
    "DEVICES",
    "DTYPES",
    "ModelSettings",
    "SamplingParams",
    "add_model_arguments",
    "model_settings_from_args",
    "vicuna_home",
]
