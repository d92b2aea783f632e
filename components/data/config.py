"""Settings of the curate stage (filled in by the data-curation work)."""
from components.config_base import Section


class DataConfig(Section):
    pass
