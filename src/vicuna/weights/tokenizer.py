"""A model folder's tokenizer against its config: checked when a model loads and after every merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vicuna.errors import ModelLoadError


def check_tokenizer(tokenizer: Any, config: Any, folder: Path) -> None:
    """The two tokenizer faults that make a model garble or never stop."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows "
            "(config.json vocab_size); the tokenizer belongs to another model"
        )
    for kind in ("eos", "bos"):
        token, token_id = getattr(tokenizer, f"{kind}_token"), getattr(tokenizer, f"{kind}_token_id")
        if kind == "bos" and not uses_bos(tokenizer, config):
            continue
        if not token or token_id is None:
            hint = " so replies would never stop" if kind == "eos" else ""
            raise ModelLoadError(
                f"{folder}: the tokenizer defines no {kind.upper()} token{hint} "
                f"(special_tokens_map.json / tokenizer_config.json '{kind}_token' is blank or missing)"
            )
        if vocab is not None and token_id >= vocab:
            raise ModelLoadError(
                f"{folder}: {kind.upper()} token id {token_id} is outside the vocabulary ({vocab})"
            )


def uses_bos(tokenizer: Any, config: Any) -> bool:
    """Whether prompts for this model begin with a BOS token. Not where the config names none, nor where
    the model's own chat template never writes one: Qwen2's config names a `bos_token_id` that its
    tokenizer (`bos_token: null`) and chat template leave out, and its prompts have no BOS."""
    if getattr(config, "bos_token_id", None) is None:
        return False
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use"): any of them may be used
        template = "".join(t for t in template.values() if isinstance(t, str))
    return not isinstance(template, str) or "bos_token" in template
