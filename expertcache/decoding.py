"""One sequence fed to a model across forwards, with the KV cache the model makes for itself."""

from __future__ import annotations

import torch
from torch import nn

LEAN_ATTR = "_expertcache_lean"  # a model's LeanDecoder, set by the engine where its decode steps can take it


class Decoding:
    """A sequence's state between forwards, kept as generate keeps it: the model makes its own
    cache at its first call (MiniMax makes one of its own kind), and positions are passed, never
    read off the cache (MiniMax's first layer keeps no keys). `crop` drops positions from the end,
    by the cache's own crop or, where the cache cannot drop positions (linear attention states),
    by feeding the kept tokens again from an empty cache. On such a cache, tokens after the first
    forward go one per forward: transformers' Jamba and MiniMax restart their recurrent state when
    several tokens come after a filled cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.past = None
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def feed(self, ids: list[int], *, logits_to_keep: int = 1) -> torch.Tensor:
        """Forward `ids` after what was fed before; returns the last `logits_to_keep` logits [n, V]."""
        if len(ids) > 1 and self.past is not None and not getattr(self.past, "is_croppable", True):
            return torch.cat([self.feed([t], logits_to_keep=1) for t in ids])[-logits_to_keep:]
        pos = len(self.tokens)
        lean = self.model.__dict__.get(LEAN_ATTR)
        if len(ids) == 1 and logits_to_keep == 1 and self.past is not None and lean is not None and lean.usable(self.past):
            logits = lean.step(ids[0], pos, self.past)  # the same step without transformers' module calls (lean.py)
            self.tokens += ids
            return logits
        out = self.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(pos, pos + len(ids))[None],
                         past_key_values=self.past, use_cache=True, logits_to_keep=logits_to_keep)
        self.past = out.past_key_values
        self.tokens += ids
        return out.logits[0]

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens."""
        if length >= len(self.tokens):
            return
        if self.past is not None and getattr(self.past, "is_croppable", True) and length > 0:
            self.past.crop(length - len(self.tokens))  # transformers 5: a negative count of tokens to drop
            del self.tokens[length:]
            return
        kept, self.past, self.tokens = self.tokens[:length], None, []
        if kept:
            self.feed(kept)
