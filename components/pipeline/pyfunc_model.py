"""The registered model's MLflow face: a pyfunc wrapper around HybridForCausalLM, its tokenizer (with the chat
template) and components.model.generate.

    model = mlflow.pyfunc.load_model("models:/m1-hybrid@champion")
    model.predict(pd.DataFrame({"prompt": ["What is 7 * 6?"]}), params={"max_new_tokens": 64})
    -> ["... \\boxed{42}"]

Each prompt becomes a user turn (the chat template adds the generation prompt); greedy decoding unless a
temperature > 0 is passed. log_hybrid logs a model directory as this pyfunc: the registry's version and every
training checkpoint MLflow tracks (components/pipeline/mlflow_runs.py) are logged the same way, so each loads by
its URI (`models:/<model_id>`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc

HYBRID_ARTIFACT = "hybrid"
ROOT = Path(__file__).resolve().parent.parent.parent


def signature(max_new_tokens: int = 256):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", max_new_tokens),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", 0),
        ]),
    )


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "pydantic", "pyyaml", "numpy", "tqdm",
                 "pandas"):
        try:
            v = version(name).split("+")[0]
            reqs.append(f"{name}=={v}" if name != "torch" else f"torch>={v.rsplit('.', 1)[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_hybrid(model_dir: str | Path, max_new_tokens: int, model_id: str | None = None, step: int = 0,
               name: str = "model"):
    """Log the hybrid model directory `model_dir` (config.json, weights, tokenizer) as this pyfunc, models from
    code with components/ beside it; into the logged model `model_id` when given (created by the caller with its
    run, tags and params), else a new one of the active run. Returns MLflow's ModelInfo."""
    from components.pipeline import pyfunc_entry_path

    with warnings.catch_warnings():
        # MLflow suggests an input example and type hints: both would make logging load and run the model.
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name, python_model=pyfunc_entry_path(), artifacts={HYBRID_ARTIFACT: str(model_dir)},
            code_paths=[str(ROOT / "components")], signature=signature(max_new_tokens),
            pip_requirements=pip_requirements(), model_id=model_id, step=step)


# The input is validated against the logged signature (a DataFrame with a `prompt` column); MLflow's nudge
# towards type-hint validation at class creation does not apply.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)

    class HybridPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            import torch
            from transformers import AutoTokenizer

            from components.model import HybridForCausalLM

            path = context.artifacts[HYBRID_ARTIFACT]
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = HybridForCausalLM.from_pretrained(path, device=self.device).eval()
            from transformers.utils import logging as hf_logging

            # The directory's config.json describes the hybrid, not a transformers model type: the tokenizer loader
            # says so at warning level, which is noise here.
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.tokenizer = AutoTokenizer.from_pretrained(path)
            finally:
                hf_logging.set_verbosity(level)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

        def _encode(self, prompt: str) -> list[int]:
            tok = self.tokenizer
            if tok.chat_template:
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True)
                # transformers 5 returns a BatchEncoding here, 4.x a list
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return tok(prompt)["input_ids"]

        def predict(self, context, model_input, params=None) -> list[str]:
            from components.model import generate

            p = params or {}
            if hasattr(model_input, "columns"):
                if "prompt" not in model_input.columns:
                    raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
                prompts = [str(x) for x in model_input["prompt"].tolist()]
            elif isinstance(model_input, str):
                prompts = [model_input]
            else:
                prompts = [str(x) for x in model_input]
            temperature = float(p.get("temperature", 0.0))
            out = generate(self.model, [self._encode(x) for x in prompts], max_new_tokens=int(p.get("max_new_tokens", 256)),
                           temperature=temperature, top_p=float(p.get("top_p", 1.0)), greedy=temperature <= 0,
                           seed=int(p.get("seed", 0)), tokenizer=self.tokenizer,
                           pad_token_id=self.tokenizer.pad_token_id)
            return list(out.texts)
