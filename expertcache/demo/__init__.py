"""The bundled demo model: its shipped files (weights, tokenizer, MODEL_CARD.md), the recipe that
trains and exports it (training.py) and where its corpus lives (corpus.py). The engine finds the
shipped files by path and never imports this package."""
