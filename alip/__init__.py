"""alip: Adaptive Language-Image Pre-training (ALIP) and its peers on open_clip."""
from .model import register_model_configs

__version__ = "0.1.0"

register_model_configs()
