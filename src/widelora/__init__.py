"""widelora: principled LoRA finetuning.

Width-aware initialization (Init[A]), LoRA+, gradient-informed inits (LoRA-One, LoRA-GA), PLoP placement, and
instruments that show whether features are learned — on widelora's own layers and on PEFT models alike.
"""

from widelora.api import attach
from widelora.features import FeatureMonitor, monitor
from widelora.lora.attach import match_targets, merge, set_fused, set_shared_input, unload, unmerge
from widelora.lora.io import save_adapter
from widelora.lora.layer import LoRALinear
from widelora.lora.load import load_adapter
from widelora.lora.pairs import LoRAPair, lora_pairs
from widelora.methods.init import InitUpdate, available_schemes, initialize, register_init
from widelora.methods.optim import available_methods, create_optimizer, register_optimizer
from widelora.methods.plop import PlacementResult, place
from widelora.recommend import Recommendation, recommend

__version__ = "0.1.0"

__all__ = [
    "FeatureMonitor",
    "InitUpdate",
    "LoRALinear",
    "LoRAPair",
    "PlacementResult",
    "Recommendation",
    "attach",
    "available_methods",
    "available_schemes",
    "create_optimizer",
    "initialize",
    "load_adapter",
    "lora_pairs",
    "match_targets",
    "merge",
    "monitor",
    "place",
    "recommend",
    "register_init",
    "register_optimizer",
    "save_adapter",
    "set_fused",
    "set_shared_input",
    "unload",
    "unmerge",
]


def __getattr__(name: str) -> object:
    """`widelora.train` (with `widelora.train.hf`) loads on first use, so that `import widelora` stays
    light."""
    if name == "train":
        import importlib

        return importlib.import_module("widelora.train")
    raise AttributeError(f"module 'widelora' has no attribute {name!r}")
