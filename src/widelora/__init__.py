"""widelora: principled LoRA finetuning.

Width-aware initialization (Init[A]), LoRA+, gradient-informed inits (LoRA-One, LoRA-GA), PLoP placement, and
instruments that show whether features are learned — on widelora's own layers and on PEFT models alike.
"""

from widelora.lora.attach import attach, match_targets, merge, set_fused, unload, unmerge
from widelora.lora.io import load_adapter, save_adapter
from widelora.lora.layer import LoRALinear
from widelora.lora.pairs import LoRAPair, lora_pairs
from widelora.methods.init import InitUpdate, available_schemes, initialize, register_init
from widelora.methods.optim import available_methods, create_optimizer, register_optimizer

__version__ = "0.1.0"

__all__ = [
    "InitUpdate",
    "LoRALinear",
    "LoRAPair",
    "attach",
    "available_methods",
    "available_schemes",
    "create_optimizer",
    "initialize",
    "load_adapter",
    "lora_pairs",
    "match_targets",
    "merge",
    "register_init",
    "register_optimizer",
    "save_adapter",
    "set_fused",
    "unload",
    "unmerge",
]
