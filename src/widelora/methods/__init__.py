"""widelora.methods: one module per method, each registering itself in a registry.

Init schemes (`widelora.methods.init` registry): the zero-product schemes in `init.py`, `pissa.py`,
`lora_one.py`, `lora_ga.py`. Optimizers (`widelora.methods.optim` registry): AdamW in `optim.py`,
`loraplus.py`, the LoRA-One / scaled-GD preconditioner in `lora_one.py`. Placement: `plop.py`. Shared pieces:
`gradients.py` (full-gradient estimation), `gradient_svd.py` (what LoRA-One and LoRA-GA share), `adam.py` (the
Adam update). Importing the package registers every method.
"""

from widelora.methods import init, lora_ga, lora_one, loraplus, optim, pissa  # noqa: F401  (registration)
