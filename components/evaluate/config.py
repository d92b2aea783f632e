"""Settings of the evaluate section (placeholder until that work lands)."""
from components.config_base import Section


class EvalConfig(Section):
    pass
