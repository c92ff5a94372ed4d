"""Weights between diffusers' ``SD3Transformer2DModel`` and flowmill's MMDiT, and model folders.

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
shards listed in ``diffusion_pytorch_model.safetensors.index.json``). A flowmill model
folder holds ``flowmill_model.json`` (``{"family": ..., "config": {...}}``) and
``model.safetensors``.

The mapping renames keys and concatenates diffusers' separate q, k, v projections into
flowmill's fused ``qkv`` (split again on export), so every tensor is carried exactly.
One exception: diffusers' last block computes text queries whose output it discards
(``context_pre_only``); flowmill does not hold those dead weights, so they are dropped on
import and written as zeros (projection) and ones (norm) on export; this cannot change
the model's output. SD3.5's dual-attention blocks (MMDiT-X) are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowmill.models.mmdit import MMDiT, MMDiTConfig
from flowmill.models.vae import AutoencoderConfig

DIFFUSERS_CLASS = "SD3Transformer2DModel"
# The diffusers release this mapping was checked against (written into exported configs).
DIFFUSERS_VERSION = "0.42.1"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
FLOWMILL_CONFIG = "flowmill_model.json"
FLOWMILL_WEIGHTS = "model.safetensors"

# Model families a flowmill model folder can hold, by the name written in flowmill_model.json.
CONFIG_CLASSES = {"mmdit": MMDiTConfig, "autoencoder": AutoencoderConfig}

# diffusers config keys → MMDiTConfig fields, for the ones that are a plain rename.
_CONFIG_RENAMES = {
    "sample_size": "sample_size",
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "num_layers": "depth",
    "attention_head_dim": "head_dim",
    "num_attention_heads": "num_heads",
    "joint_attention_dim": "txt_dim",
    "pooled_projection_dim": "vec_dim",
    "out_channels": "out_channels",
    "pos_embed_max_size": "pos_embed_max_size",
}
# Keys that SD3-medium's original config.json predates; absent means diffusers' default.
_CONFIG_OPTIONAL = {"dual_attention_layers": (), "qk_norm": None}
_CONFIG_KEYS = set(_CONFIG_RENAMES) | set(_CONFIG_OPTIONAL) | {"caption_projection_dim"}

# Whole-model renames (diffusers → flowmill), outside the blocks.
_TOP_RENAMES = {
    "time_text_embed.timestep_embedder.linear_1": "embed.time.linear_1",
    "time_text_embed.timestep_embedder.linear_2": "embed.time.linear_2",
    "time_text_embed.text_embedder.linear_1": "embed.pooled.linear_1",
    "time_text_embed.text_embedder.linear_2": "embed.pooled.linear_2",
    "context_embedder": "embed.txt",
    "norm_out.linear": "final.mod",
    "proj_out": "final.linear",
}
# Per-block renames (diffusers → flowmill) of linears (weight and bias) and of qk norms (weight).
_IMG_LINEARS = {"norm1.linear": "img.mod", "attn.to_out.0": "img.proj", "ff.net.0.proj": "img.mlp.fc1",
                "ff.net.2": "img.mlp.fc2"}
_TXT_LINEARS = {"norm1_context.linear": "txt.mod", "attn.to_add_out": "txt.proj",
                "ff_context.net.0.proj": "txt.mlp.fc1", "ff_context.net.2": "txt.mlp.fc2"}
_LAST_TXT_LINEARS = {"norm1_context.linear": "txt.mod"}  # the last block's text stream has no output or MLP
_IMG_NORMS = {"attn.norm_q": "img.q_norm", "attn.norm_k": "img.k_norm"}
_TXT_NORMS = {"attn.norm_added_q": "txt.q_norm", "attn.norm_added_k": "txt.k_norm"}
_LAST_TXT_NORMS = {"attn.norm_added_k": "txt.k_norm"}
# Separate diffusers projections concatenated, in this order, into one flowmill linear.
_IMG_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_TXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_LAST_TXT_KV = ("attn.add_k_proj", "attn.add_v_proj")


def config_from_diffusers(diffusers_config: dict) -> MMDiTConfig:
    """The MMDiTConfig of a diffusers ``SD3Transformer2DModel`` config dict."""
    class_name = diffusers_config.get("_class_name", DIFFUSERS_CLASS)
    if class_name != DIFFUSERS_CLASS:
        raise ValueError(f"not an SD3 transformer: _class_name is {class_name!r}, expected {DIFFUSERS_CLASS!r}")
    public = {key: value for key, value in diffusers_config.items() if not key.startswith("_")}
    unknown = sorted(set(public) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unsupported SD3 config key(s) {unknown}; known keys: {', '.join(sorted(_CONFIG_KEYS))}")
    missing = sorted((set(_CONFIG_RENAMES) | {"caption_projection_dim"}) - set(public) - {"out_channels"})
    if missing:
        raise ValueError(f"SD3 config lacks key(s) {missing}")
    settings = {**_CONFIG_OPTIONAL, **public}
    if settings["dual_attention_layers"]:
        raise ValueError("SD3.5 dual-attention blocks (dual_attention_layers="
                         f"{list(settings['dual_attention_layers'])}) are not supported by flowmill's MMDiT")
    if settings["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"unsupported qk_norm {settings['qk_norm']!r}; choose one of: None, 'rms_norm'")
    if settings["pos_embed_max_size"] is None:
        raise ValueError("pos_embed_max_size is None; flowmill's MMDiT needs SD3's cropped positional table")
    if settings.get("out_channels") is None:
        settings["out_channels"] = settings["in_channels"]
    fields = {field: settings[key] for key, field in _CONFIG_RENAMES.items()}
    cfg = MMDiTConfig(**fields, qk_norm=settings["qk_norm"] == "rms_norm")
    if settings["caption_projection_dim"] != cfg.dim:
        raise ValueError(f"caption_projection_dim {settings['caption_projection_dim']} differs from the width "
                         f"num_attention_heads*attention_head_dim = {cfg.dim}; flowmill's MMDiT needs them equal")
    return cfg


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """The diffusers ``SD3Transformer2DModel`` config dict of an MMDiTConfig."""
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' SD3 transformer fixes mlp_ratio at 4, this model has {cfg.mlp_ratio}")
    config = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    config.update({key: getattr(cfg, field) for key, field in _CONFIG_RENAMES.items()})
    config.update(caption_projection_dim=cfg.dim, dual_attention_layers=[],
                  qk_norm="rms_norm" if cfg.qk_norm else None)
    return config


def _expected_shapes(cfg: MMDiTConfig) -> dict[str, torch.Size]:
    """Names and shapes of a flowmill MMDiT state dict, without allocating it."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _check_keys(what: str, state_dict: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} does not match the config: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                         f" ({len(missing)}), unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                         f" ({len(unexpected)})")
    wrong = [f"{name}: {tuple(state_dict[name].shape)} != {tuple(shape)}"
             for name, shape in expected.items() if state_dict[name].shape != shape]
    if wrong:
        raise ValueError(f"{what} has tensors of the wrong shape: {wrong[:8]}")


def _block_key_pairs(cfg: MMDiTConfig, index: int) -> list[tuple[str, str]]:
    """(diffusers, flowmill) names of the tensors of block ``index`` that map one to one."""
    last = index == cfg.depth - 1
    src, dst = f"transformer_blocks.{index}.", f"blocks.{index}."
    linears = {**_IMG_LINEARS, **(_LAST_TXT_LINEARS if last else _TXT_LINEARS)}
    pairs = [(src + theirs + suffix, dst + ours + suffix)
             for theirs, ours in linears.items() for suffix in (".weight", ".bias")]
    if cfg.qk_norm:
        norms = {**_IMG_NORMS, **(_LAST_TXT_NORMS if last else _TXT_NORMS)}
        pairs += [(src + theirs + ".weight", dst + ours + ".weight") for theirs, ours in norms.items()]
    return pairs


def _one_to_one_pairs(cfg: MMDiTConfig) -> list[tuple[str, str]]:
    """(diffusers, flowmill) names of every tensor that is only renamed."""
    pairs = [(theirs + suffix, ours + suffix)
             for theirs, ours in _TOP_RENAMES.items() for suffix in (".weight", ".bias")]
    pairs.append(("pos_embed.proj.bias", "embed.patch.bias"))
    for index in range(cfg.depth):
        pairs += _block_key_pairs(cfg, index)
    return pairs


def _fused_linears(cfg: MMDiTConfig, index: int) -> list[tuple[str, tuple[str, ...]]]:
    """(flowmill name, diffusers names concatenated into it) for the fused linears of block ``index``."""
    last = index == cfg.depth - 1
    return [(f"blocks.{index}.img.qkv", tuple(f"transformer_blocks.{index}.{part}" for part in _IMG_QKV)),
            (f"blocks.{index}.txt.kv" if last else f"blocks.{index}.txt.qkv",
             tuple(f"transformer_blocks.{index}.{part}" for part in (_LAST_TXT_KV if last else _TXT_QKV)))]


def _diffusers_expected(cfg: MMDiTConfig) -> dict[str, torch.Size]:
    """Names and shapes of a diffusers SD3 state dict for this config."""
    dim = cfg.dim
    ours = _expected_shapes(cfg)
    shapes = {theirs: ours[mine] for theirs, mine in _one_to_one_pairs(cfg)}
    shapes["pos_embed.pos_embed"] = torch.Size([1, cfg.pos_embed_max_size ** 2, dim])
    shapes["pos_embed.proj.weight"] = torch.Size([dim, cfg.in_channels, cfg.patch_size, cfg.patch_size])
    for index in range(cfg.depth):
        prefix = f"transformer_blocks.{index}."
        for name in _IMG_QKV + _TXT_QKV:
            shapes[prefix + name + ".weight"] = torch.Size([dim, dim])
            shapes[prefix + name + ".bias"] = torch.Size([dim])
        if cfg.qk_norm and index == cfg.depth - 1:
            shapes[prefix + "attn.norm_added_q.weight"] = torch.Size([cfg.head_dim])
    return shapes


def diffusers_to_flowmill(state_dict: dict[str, torch.Tensor], diffusers_config: dict):
    """diffusers SD3 transformer (state dict, config dict) → (MMDiTConfig, flowmill state dict).

    Raises ValueError naming what is wrong when the config is not a supported SD3
    transformer or the state dict misses keys, has extra keys or wrong shapes.
    """
    cfg = config_from_diffusers(diffusers_config)
    _check_keys("SD3 state dict", state_dict, _diffusers_expected(cfg))
    ours = {mine: state_dict[theirs] for theirs, mine in _one_to_one_pairs(cfg)}
    patch = state_dict["pos_embed.proj.weight"]
    ours["embed.patch.weight"] = patch.reshape(patch.shape[0], -1)
    side = cfg.pos_embed_max_size
    ours["embed.pe"] = state_dict["pos_embed.pos_embed"].reshape(side, side, cfg.dim)
    for index in range(cfg.depth):
        for name, parts in _fused_linears(cfg, index):
            for suffix in (".weight", ".bias"):
                ours[name + suffix] = torch.cat([state_dict[part + suffix] for part in parts])
    _check_keys("converted state dict", ours, _expected_shapes(cfg))
    return cfg, ours


def flowmill_to_diffusers(cfg: MMDiTConfig, state_dict: dict[str, torch.Tensor]):
    """(MMDiTConfig, flowmill state dict) → (diffusers config dict, diffusers SD3 state dict).

    The last block's dead text-query weights, which flowmill does not hold, are written
    as zeros (``add_q_proj``) and ones (``norm_added_q``).
    """
    if cfg.flow_map:
        raise ValueError("a flow-map MMDiT (flow_map=True) has an end-time input SD3 has no place for")
    config = config_to_diffusers(cfg)
    _check_keys("flowmill MMDiT state dict", state_dict, _expected_shapes(cfg))
    theirs = {their: state_dict[mine] for their, mine in _one_to_one_pairs(cfg)}
    theirs["pos_embed.proj.weight"] = state_dict["embed.patch.weight"].reshape(
        cfg.dim, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    theirs["pos_embed.pos_embed"] = state_dict["embed.pe"].reshape(1, cfg.pos_embed_max_size ** 2, cfg.dim)
    dim = cfg.dim
    for index in range(cfg.depth):
        for name, parts in _fused_linears(cfg, index):
            for suffix in (".weight", ".bias"):
                for part, chunk in zip(parts, state_dict[name + suffix].split(dim), strict=True):
                    theirs[part + suffix] = chunk
    prefix = f"transformer_blocks.{cfg.depth - 1}."
    reference = state_dict["final.linear.weight"]
    theirs[prefix + "attn.add_q_proj.weight"] = reference.new_zeros(dim, dim)
    theirs[prefix + "attn.add_q_proj.bias"] = reference.new_zeros(dim)
    if cfg.qk_norm:
        theirs[prefix + "attn.norm_added_q.weight"] = reference.new_ones(cfg.head_dim)
    return config, theirs


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path.parent} is not a model folder: {path.name} is missing")
    return json.loads(path.read_text())


def _save_tensors(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    # safetensors refuses views and shared storage; clone() gives each tensor its own.
    save_file({name: tensor.detach().contiguous().clone() for name, tensor in state_dict.items()},
              str(path), metadata={"format": "pt"})


def load_diffusers_folder(path: str | Path):
    """A diffusers SD3 transformer folder → (MMDiTConfig, flowmill state dict)."""
    folder = Path(path)
    config = _read_json(folder / DIFFUSERS_CONFIG)
    config_from_diffusers(config)  # refuse what is not an SD3 transformer before reading gigabytes of weights
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        state_dict = load_file(str(folder / DIFFUSERS_WEIGHTS))
    elif (folder / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(str(folder / shard)))
    else:
        raise ValueError(f"{folder} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")
    return diffusers_to_flowmill(state_dict, config)


def save_diffusers_folder(path: str | Path, cfg: MMDiTConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a flowmill MMDiT as a diffusers SD3 transformer folder (config.json + safetensors)."""
    config, theirs = flowmill_to_diffusers(cfg, state_dict)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(folder / DIFFUSERS_WEIGHTS, theirs)
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_model_folder(path: str | Path, family: str, cfg, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``flowmill_model.json`` ({"family", "config"}) and ``model.safetensors``."""
    if family not in CONFIG_CLASSES:
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(CONFIG_CLASSES)}")
    if not isinstance(cfg, CONFIG_CLASSES[family]):
        raise ValueError(f"family {family!r} needs a {CONFIG_CLASSES[family].__name__}, got {type(cfg).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(folder / FLOWMILL_WEIGHTS, state_dict)
    meta = {"family": family, "config": dataclasses.asdict(cfg)}
    (folder / FLOWMILL_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_model_folder(path: str | Path):
    """A flowmill model folder → (family, config dataclass, state dict)."""
    folder = Path(path)
    meta = _read_json(folder / FLOWMILL_CONFIG)
    family = meta.get("family")
    if family not in CONFIG_CLASSES:
        raise ValueError(f"{folder / FLOWMILL_CONFIG}: unknown model family {family!r}; "
                         f"choose one of: {', '.join(CONFIG_CLASSES)}")
    config_class = CONFIG_CLASSES[family]
    fields = {field.name for field in dataclasses.fields(config_class)}
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{folder / FLOWMILL_CONFIG}: no \"config\" object")
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise ValueError(f"{folder / FLOWMILL_CONFIG}: unknown {config_class.__name__} field(s) {unknown}; "
                         f"valid fields: {', '.join(sorted(fields))}")
    cfg = config_class(**meta["config"])
    if not (folder / FLOWMILL_WEIGHTS).is_file():
        raise ValueError(f"{folder} is not a model folder: {FLOWMILL_WEIGHTS} is missing")
    return family, cfg, load_file(str(folder / FLOWMILL_WEIGHTS))
