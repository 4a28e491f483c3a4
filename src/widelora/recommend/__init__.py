"""Defaults that win without a sweep: `recommend` decides a whole LoRA setup from the theory and a short
probe.

`recommend(model, batches, steps=...)` returns a `Recommendation` that `widelora.attach(model, setup=rec)`,
`widelora.create_optimizer(model, setup=rec)`, `widelora finetune --auto` and `setup: recommended` in sweep
specs accept. The pieces: `rules` (width-aware ratio and factors), `probe` (the LR range test read by the
feature monitor), `edge` (its stopping rule), `head` (a fresh head's own learning rate), `snapshot` (exact
restore), `lr_finder` (the fastai-style baseline).
"""

from widelora.recommend.api import recommend
from widelora.recommend.setup import Recommendation

__all__ = ["Recommendation", "recommend"]
