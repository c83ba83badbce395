"""experiments.lm_cp: the LM of experiments.lm trained with its sequences sharded over 2 gloo processes follows
the one-process run of ``experiments.lm.train`` (same flags) step for step, to float32 rounding, for the Taylor
and the hybrid (with a short convolution) attention."""
from __future__ import annotations

import pytest

from experiments.lm.model import ModelConfig
from experiments.lm.train import TrainConfig, train
from linattn_cuda.distributed.launch import run_ranks


def _config(attention: str, run_dir: str) -> TrainConfig:
    hybrid = {"window": 8, "conv_size": 3, "learn_scale": True}
    return TrainConfig(run_dir=run_dir, model=ModelConfig(attention=attention, width=32, heads=2, context=48,
                                                          hybrid=hybrid),
                       steps=4, batch_size=2, warmup=2, eval_every=4, eval_limit=3, threads=1, progress=False,
                       checkpoint_every=100)


KINDS = ("taylor", "hybrid")


def _train_sharded(rank, world_size, cfg_dicts):
    from experiments.lm_cp.train import train_cp

    results = {}
    for name, cfg in cfg_dicts.items():
        result = train_cp(TrainConfig.from_dict(cfg))
        results[name] = None if result is None else {k: result[k] for k in ("train_loss", "val_loss", "shards")}
    return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_cp")
    configs = {kind: _config(kind, str(root / kind)).as_dict() for kind in KINDS}
    return run_ranks(_train_sharded, 2, configs, timeout=120)[0]


@pytest.mark.parametrize("attention", KINDS)
def test_sharded_training_follows_one_process(tmp_path, sharded, attention):
    one = train(_config(attention, str(tmp_path / "one")))
    sharded = sharded[attention]
    assert sharded["shards"] == [[0, 24], [24, 48]]
    for a, b in zip(sharded["train_loss"], one["train_loss"]):
        assert abs(a - b) <= 2e-6 * abs(b), (sharded["train_loss"], one["train_loss"])
    assert abs(sharded["val_loss"] - one["val_loss"]) <= 2e-6 * one["val_loss"]
    assert one["train_loss"][-1] < one["train_loss"][0]  # it trains
