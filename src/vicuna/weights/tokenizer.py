"""A model folder's tokenizer against its config: checked when a model loads and after every merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vicuna.errors import ModelLoadError

# What LLaMA's SentencePiece tokenizer calls them: the values to write where a folder's files left them blank.
LLAMA_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


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
                f"(special_tokens_map.json / tokenizer_config.json '{kind}_token' is blank or missing; "
                f"LLaMA's is {LLAMA_SPECIAL_TOKENS[f'{kind}_token']!r})"
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


def blank_special_tokens_error(folder: Path) -> str | None:
    """Why the folder's tokenizer cannot load, where its tokenizer_config.json or special_tokens_map.json
    sets a special token to "", with what to write instead; None where none is blank. decapoda-research's
    early LLaMA conversion, copied into many tutorials and mirrors, left all three blank, and transformers'
    LLaMA tokenizer then fails with nothing but "RecursionError: maximum recursion depth exceeded" (its
    blank unk_token is looked up as an unknown token, endlessly)."""
    blank = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            fields = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for field in LLAMA_SPECIAL_TOKENS if isinstance(fields, dict) else ():
            value = fields.get(field)
            if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
                value = value.get("content")
            if value == "":
                blank.append(f"{name} '{field}'")
    if not blank:
        return None
    values = ", ".join(f'"{field}": "{token}"' for field, token in LLAMA_SPECIAL_TOKENS.items())
    return (
        f"{folder}: cannot load the tokenizer: {', '.join(blank)} "
        f"{'is' if len(blank) == 1 else 'are'} blank (as in decapoda-research's early LLaMA conversion); "
        f"write the tokens there (LLaMA's: {values}) or take these files from another copy of the model"
    )
