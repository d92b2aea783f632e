"""The hybrid Mamba/attention model core: config, modules, conversion from a Llama teacher, generation.
Knows nothing of Ray, Prefect, MLflow or DVC."""
from components.model.config import HybridConfig
from components.model.convert import convert
from components.model.generate import GenerationOutput, generate
from components.model.hybrid import HybridForCausalLM

__all__ = ["GenerationOutput", "HybridConfig", "HybridForCausalLM", "convert", "generate"]
