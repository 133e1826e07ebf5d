"""The demo model's training settings: a frozen dataclass `expertcache train-demo` builds from its
flags and demo/training.py runs (kept apart so the command line reads them without torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

EXPERTS_IMPLS = ("grouped_mm", "eager", "batched_mm")  # transformers' experts implementations to train with
FAMILIES = ("mixtral", "llama")  # what train-demo trains: the demo MoE, or a dense parent for `refactor`
# the demo tokenizer's chat template (the server's too for a tokenizer without one): role-prefixed
# turns, then the assistant's prefix. The demo model saw no dialogue in training: a chat turn is
# a text to continue.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)



@dataclass(frozen=True)
class DemoTrainingSettings:
    """One training run: where it writes, how long it runs, its data, model shape and optimiser."""

    # run
    out_dir: Path = Path("runs/demo")  # run folder (checkpoints, tokenizer, tokens)
    resume: bool = False  # continue from out_dir/ckpt
    seed: int = 1234
    threads: int = 2  # torch CPU threads while training
    max_steps: int | None = None  # step budget (schedule by steps)
    end_at: str | None = None  # UTC wall-clock end "HH:MM" or ISO time (schedule by time)
    save_every_min: float = 10.0  # checkpoint period in minutes
    eval_items: int = 200  # last-word multiple-choice items scored at each checkpoint (0: off)
    export_to: Path | None = None  # also export the first and the final checkpoint here
    # data
    train_text: tuple[Path, ...] | None = None  # train on these files instead of the corpus
    no_extra_lowercase: bool = False  # skip the extra lowercase TinyStories file
    tinystories_share: float = 0.65  # token share of cased TinyStories
    lowercase_share: float = 0.15  # token share of lowercase TinyStories
    seq_len: int = 256
    batch_size: int = 8
    # model
    family: str = "mixtral"  # "mixtral" (the demo MoE) or "llama" (a dense model: Read-ME's parent)
    tokenizer: Path | None = None  # reuse this tokenizer folder (e.g. the demo's) instead of training one
    vocab_size: int = 8192
    hidden: int = 256
    layers: int = 6
    intermediate: int = 512  # FFN width: per expert (mixtral), of the whole FFN (llama)
    experts: int = 8
    top_k: int = 2
    heads: int = 8
    kv_heads: int = 4
    tie_embeddings: bool = False
    experts_impl: str = "grouped_mm"  # transformers' experts implementation while training
    # optimiser
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    aux_coef: float = 0.02  # router load-balancing loss coefficient
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast

    def to_state(self) -> dict:
        """Plain values, as a checkpoint stores them."""
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["export_to"] = None if self.export_to is None else str(self.export_to)
        out["train_text"] = None if self.train_text is None else [str(t) for t in self.train_text]
        out["tokenizer"] = None if self.tokenizer is None else str(self.tokenizer)
        return out

    @classmethod
    def from_state(cls, saved: dict) -> "DemoTrainingSettings":
        """The settings a checkpoint stored (keys it does not know, from older runs, are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in saved.items() if k in known}
        if kw.get("out_dir") is not None:
            kw["out_dir"] = Path(kw["out_dir"])
        if kw.get("export_to") is not None:
            kw["export_to"] = Path(kw["export_to"])
        if kw.get("train_text") is not None:
            kw["train_text"] = tuple(Path(t) for t in kw["train_text"])
        if kw.get("tokenizer") is not None:
            kw["tokenizer"] = Path(kw["tokenizer"])
        return cls(**kw)


# what a resumed run takes from its own settings rather than from the checkpoint's
RESUME_OVERRIDES = ("max_steps", "end_at", "export_to", "eval_items", "save_every_min", "threads")
