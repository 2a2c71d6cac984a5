"""Fine-tuning: one loop (:mod:`.loop`), methods that plug in their loss (:mod:`.methods`, registered in
``ns_plugin._registry.trainers``), and EasyRobust-style configs (:mod:`.config`); an EasyRobust/timm
``train_one_epoch``-compatible entry lives in :mod:`ns_plugin.integrations.easyrobust`. arXiv:2403.10476 §4-5 and appendix C.

>>> from ns_plugin.training import load_config, train
>>> summary = train(load_config(method="ns", rounds=2, steps_per_round=5), out="runs/ns")  # doctest: +SKIP
"""
from .._registry import trainers
from . import methods  # registers every method in ``trainers`` (imported once, as timm imports its model modules)
from .config import TrainConfig, load_config, parse_config
from .loop import Trainer, train
from .methods import Method, get_method
from ..evaluation.report import plot_log

__all__ = ["TrainConfig", "load_config", "parse_config", "Trainer", "train", "plot_log", "Method",
           "get_method", "trainers", "methods"]
