"""A checkpoint's tokenizer.json through the tokenizers library, without importing transformers.

transformers' tokenizer import costs memory and start-up time (docs/memory.md). A plain fast tokenizer (its
tokenizer_config.json names TokenizersBackend or PreTrainedTokenizerFast and sets nothing that
transformers would apply in Python: a BOS/EOS switch, a prefix space, space clean-up) encodes and
decodes exactly as the tokenizers library does, so `FastTokenizer` does it directly: the same ids
and text (tests/core/test_tokenizer.py compares it with AutoTokenizer). Anything else a caller asks
of it (a chat template's rendering, batch calls) goes to transformers' own tokenizer, loaded then.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer_config.json keys that change nothing in how transformers encodes or decodes one text
INERT_KEYS = frozenset({"backend", "bos_token", "eos_token", "pad_token", "unk_token", "is_local", "local_files_only",
                        "model_max_length", "tokenizer_class", "chat_template", "model_input_names",
                        "padding_side", "truncation_side", "clean_up_tokenization_spaces", "name_or_path"})
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


class FastTokenizer:
    """encode / decode and the special tokens' ids of a plain fast tokenizer, as transformers gives
    them; every other attribute from transformers' tokenizer of the same folder, loaded on first use."""

    def __init__(self, model_dir: Path, backend, config: dict) -> None:
        self.model_dir, self._backend = model_dir, backend
        self._full = None
        self._lock = threading.Lock()
        for name in SPECIAL:
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            setattr(self, name, token)
            setattr(self, name + "_id", backend.token_to_id(token) if isinstance(token, str) else None)
        template = model_dir / "chat_template.jinja"
        self.chat_template = config.get("chat_template") or (template.read_text() if template.is_file() else None)

    def encode(self, text: str, add_special_tokens: bool = True, verbose: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def transformers_tokenizer(self):
        """transformers' tokenizer of the same folder (loaded once, on first use)."""
        with self._lock:
            if self._full is None:
                from transformers import AutoTokenizer

                self._full = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            return self._full

    def apply_chat_template(self, *args, **kwargs):
        return self.transformers_tokenizer().apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.transformers_tokenizer()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_full", "_backend", "_lock", "model_dir"):
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer(), name)


def load(model_dir: Path) -> FastTokenizer | None:
    """The folder's tokenizer as a FastTokenizer where it is a plain fast tokenizer, else None (the
    caller loads transformers'); never raises."""
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        if not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_CLASSES or set(config) - INERT_KEYS:
            return None
        if config.get("clean_up_tokenization_spaces"):
            return None
        from tokenizers import Tokenizer

        return FastTokenizer(model_dir, Tokenizer.from_file(str(model_dir / "tokenizer.json")), config)
    except Exception:  # no such files, a file tokenizers cannot read: transformers' loader says what is wrong
        return None
