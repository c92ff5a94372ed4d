"""flowmill.models: plain PyTorch models (no DeepSpeed, MLflow or submitit inside).

``load_model(PATH)`` turns a flowmill model folder or a run dir into a model in eval mode
(a run gives its EMA weights); an MMDiT is then called as ``model(img, t, txt, vec)``.
"""

from flowmill.models.loading import load_model

__all__ = ["load_model"]
