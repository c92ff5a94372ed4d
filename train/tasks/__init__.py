"""Tasks: what a run learns. A task builds its model, decodes its data and computes its loss.

Tasks are composed into the one training loop (train/loop.py), not subclassed from a
trainer. Each is registered here by name; its ``config_class`` is the run config it trains with.
"""

from __future__ import annotations

import importlib

# name -> "module:Class". Deliberately lazy (start-up time): a task's heavy dependencies
# (transformers for the MMDiT's text encoder, PyAV for video) load only when it is used.
TASKS = {
    "mmdit": "flowmill.train.tasks.mmdit:MMDiTTask",
    "flm": "flowmill.train.tasks.flm:FLMTask",
    "fmlm": "flowmill.train.tasks.fmlm:FMLMTask",
    "mdlm": "flowmill.train.tasks.mdlm:MDLMTask",
    "mmdit_flowmap": "flowmill.train.tasks.mmdit_flowmap:FlowMapTask",
    "video_tokenizer": "flowmill.train.tasks.video_tokenizer:VideoTokenizerTask",
    "autoencoder": "flowmill.train.tasks.autoencoder:AutoencoderTask",
}


def get_task_class(name: str) -> type:
    """The task class registered under ``name``; KeyError listing the valid names."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
