"""The judge: a small causal LM that flowmill trains once per packed text dataset and caches.

Generative perplexity needs a reference autoregressive model. Instead of a downloaded one
(GPT-2 and friends use another tokenizer and never saw the data), flowmill trains a
``CausalLM`` on the training split of the packed text itself, with plain PyTorch on one
process, and keeps it in ``cache_dir/judge-<key>/``. The key hashes the dataset's shards
(their sha256 in the manifest, which pins the tokenizer too) and the judge's settings, so
every run on the same data with the same settings (FLM, FMLM, the benchmark) is scored by
the same judge, trained once. In a job, rank 0 trains it and the other ranks load its cached
copy (``judge_of_job``).

A cached judge is a folder with ``model.safetensors`` and ``judge.json`` (key, settings,
data, held-out perplexity); it is written to a temporary folder and renamed into place, so
a crash never leaves a half judge behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flowmill.data.decode import TokenDecoder
from flowmill.data.loader import StreamingLoader
from flowmill.data.remote import Storage
from flowmill.data.shards import read_manifest
from flowmill.errors import UsageError
from flowmill.models.causal_lm import CausalLM, CausalLMConfig
from flowmill.train.distributed import DistEnv
from flowmill.train.text_metrics import mean_nll

log = logging.getLogger("flowmill")

JUDGE_FILE = "judge.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class JudgeConfig:
    """Where the judge is cached and how it is trained (the settings are part of its cache key)."""

    cache_dir: str | None = None  # folder of cached judges; None: evaluations report no generative perplexity
    dim: int = 256  # transformer width
    depth: int = 4  # causal blocks
    num_heads: int = 4  # attention heads per block
    dropout: float = 0.1  # dropout while training (tinyshakespeare is small enough to overfit)
    steps: int = 2000  # AdamW steps on the training split
    batch_size: int = 32  # sequences per step
    lr: float = 1e-3  # peak learning rate (linear warmup over 5% of the steps, cosine decay to 10%)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    seed: int = 0  # initial weights, dropout and data order


@dataclass
class TextDataInfo:
    """What a packed text dataset's manifest says about its token sequences."""

    vocab_size: int  # pieces of the tokenizer the data was packed with
    seq_len: int  # tokens per sequence
    text_tokenizer_sha256: str  # sha256 of that tokenizer's .model file
    shards_sha256: list[str]  # sha256 of every shard, in manifest order


def text_data_info(path: str | Path, storage: Storage | None = None) -> TextDataInfo:
    """The manifest facts of a dataset packed by ``flowmill data pack text`` (remote: read with
    ``storage``); ValueError for anything else."""
    manifest = read_manifest(path, storage)
    params = manifest["made"]["params"]
    if params["source"] != "text":
        raise ValueError(f"{path} holds {params['source']!r} samples, not packed text (make it with `flowmill data pack text`)")
    return TextDataInfo(
        vocab_size=int(manifest["made"]["notes"]["vocab_size"]),
        seq_len=int(params["args"]["seq_len"]),
        text_tokenizer_sha256=params["args"]["text_tokenizer_sha256"],
        shards_sha256=[shard["sha256"] for shard in manifest["shards"]],
    )


def judge_key(info: TextDataInfo, config: JudgeConfig) -> str:
    """Hex digest naming the judge of ``info``'s data trained with ``config`` (cache_dir excluded)."""
    settings = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    payload = {"shards": info.shards_sha256, "vocab_size": info.vocab_size, "seq_len": info.seq_len, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_config(info: TextDataInfo, config: JudgeConfig) -> CausalLMConfig:
    return CausalLMConfig(
        vocab_size=info.vocab_size, seq_len=info.seq_len, dim=config.dim, depth=config.depth,
        num_heads=config.num_heads, dropout=config.dropout,
    )


def judge_dir(data_path: str | Path, config: JudgeConfig, storage: Storage | None = None) -> Path:
    """The cache folder of the judge of ``data_path`` (it may not exist yet)."""
    if config.cache_dir is None:
        raise ValueError("judge.cache_dir is not set; give a folder for cached judges")
    return Path(config.cache_dir) / f"judge-{judge_key(text_data_info(data_path, storage), config)[:16]}"


def load_judge(folder: Path) -> tuple[CausalLM, dict]:
    """A cached judge in eval mode and its ``judge.json`` record."""
    record = json.loads((folder / JUDGE_FILE).read_text())
    model = CausalLM(CausalLMConfig(**record["model"]))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.eval(), record


def load_or_train_judge(
    data_path: str | Path, config: JudgeConfig, val_path: str | Path | None = None, storage: Storage | None = None
) -> tuple[CausalLM, dict]:
    """The judge of the training split ``data_path``: loaded from the cache, or trained and cached first.

    ``val_path`` (held-out text packed with the same tokenizer) is scored once after training;
    its perplexity lands in the record as ``val_ppl``. Remote data is read with ``storage``.
    Returns the model (eval mode, CPU) and its record.
    """
    folder = judge_dir(data_path, config, storage)
    if (folder / JUDGE_FILE).is_file():
        return load_judge(folder)
    log.info("training the judge for %s (%d steps; cached in %s)", data_path, config.steps, folder)
    started = time.perf_counter()
    # The caller's global RNG stream stays as it was; evaluations run under no_grad.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(config.seed)
        model, train_ppl = train_judge(data_path, config, storage)
    info = text_data_info(data_path, storage)
    record = {
        "key": judge_key(info, config), "settings": asdict(config), "model": asdict(model_config(info, config)),
        "data": str(data_path), "train_ppl": train_ppl, "train_seconds": time.perf_counter() - started,
    }
    if val_path is not None:
        record.update(val_data=str(val_path), val_ppl=math.exp(mean_nll(model, held_out_tokens(val_path, info, storage))))
    save_judge(model, record, folder)
    return model, record


def judge_of_job(
    data_path: str | Path, config: JudgeConfig, env: DistEnv, val_path: str | Path | None = None, storage: Storage | None = None
) -> tuple[CausalLM, dict]:
    """``load_or_train_judge`` for every rank of a job (collective): rank 0 loads or trains it while the
    others wait, then they load its cached copy. judge.cache_dir must be a folder every rank sees."""
    if env.is_main:
        judge = load_or_train_judge(data_path, config, val_path, storage)
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        return judge
    folder = judge_dir(data_path, config, storage)
    if not (folder / JUDGE_FILE).is_file():
        raise UsageError(f"judge.cache_dir: rank {env.rank} does not see the judge rank 0 cached in {folder}; "
                         "put judge.cache_dir on a filesystem every node shares")
    return load_judge(folder)


def held_out_tokens(val_path: str | Path, info: TextDataInfo, storage: Storage | None = None) -> torch.Tensor:
    """Every sequence of ``val_path`` (N, L) long; ValueError if it was packed with another tokenizer or length."""
    val = text_data_info(val_path, storage)
    if (val.text_tokenizer_sha256, val.seq_len) != (info.text_tokenizer_sha256, info.seq_len):
        raise ValueError(f"{val_path} was packed with another tokenizer or sequence length than the judge's training data")
    loader = StreamingLoader(
        val_path, rank=0, world_size=1, batch_size=256, num_workers=0, seed=0,
        decode=TokenDecoder(info.seq_len, info.vocab_size), shuffle_buffer=0, resampled=False, storage=storage,
    )
    return torch.cat([batch["tokens"] for batch in loader])


def train_judge(data_path: str | Path, config: JudgeConfig, storage: Storage | None = None) -> tuple[CausalLM, float]:
    """A ``CausalLM`` trained with next-token cross-entropy on ``data_path`` (remote: read with ``storage``);
    returns it (eval mode) and the perplexity of its last 5% of training batches."""
    info = text_data_info(data_path, storage)
    model = CausalLM(model_config(info, config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = StreamingLoader(
        data_path, rank=0, world_size=1, batch_size=config.batch_size, num_workers=0, seed=config.seed,
        decode=TokenDecoder(info.seq_len, info.vocab_size), shuffle_buffer=1024, resampled=True, storage=storage,
    )
    batches = iter(loader)
    tail = []
    model.train()
    for step in range(config.steps):
        tokens = next(batches)["tokens"]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step >= config.steps - max(1, config.steps // 20):
            tail.append(loss.item())
        if (step + 1) % max(1, config.steps // 10) == 0:
            log.info("judge step %d/%d: loss %.3f", step + 1, config.steps, loss.item())
    return model.eval(), math.exp(sum(tail) / len(tail))


def save_judge(model: CausalLM, record: dict, folder: Path) -> None:
    """Write the judge into ``folder`` atomically (another process may have cached the same judge first)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial / WEIGHTS_FILE)
    (partial / JUDGE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.rename(partial, folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # an identical judge got there first
