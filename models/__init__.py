"""flowmill.models: plain PyTorch models (no DeepSpeed, MLflow or submitit inside).

``load_model(PATH)`` turns a flowmill model folder or a run dir into a model in eval mode
(a run gives its EMA weights); an MMDiT is then called as ``model(img, t, txt, vec)``.
"""


def load_model(path, device="cpu"):
    """A model folder, run dir or checkpoint folder → the model in eval mode (EMA weights for a run).

    Reading a run dir needs flowmill.train's knowledge of the run layout, imported here on
    first use (it imports no DeepSpeed, MLflow or submitit).
    """
    from flowmill.train.model_io import load_model as load

    return load(path, device)
