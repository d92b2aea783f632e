"""Settings of the pipeline section (placeholder until that work lands)."""
from components.config_base import Section


class PipelineConfig(Section):
    pass
