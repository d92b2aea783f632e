"""The file MLflow logs as the registered model's code ("models from code"): it names the pyfunc to load,
so nothing is pickled into the registry."""
import mlflow.models

from components.pipeline.pyfunc_model import HybridPyfunc

mlflow.models.set_model(HybridPyfunc())
