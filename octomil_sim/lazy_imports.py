"""Defer ``flwr_datasets.visualization`` until something uses it.

``import flwr_datasets`` (which any ``flwr_datasets.partitioner`` import runs) imports its plotting
subpackage, and with it seaborn, scipy.stats and pandas: about 1.2 s of every process that touches a
partition here (the driver's data check, each Ray actor), for plots this framework never draws.
``defer_flwr_datasets_plots()`` registers that subpackage as a module whose code runs on the first attribute looked up in it (PEP 562
``__getattr__``): ``flwr_datasets.visualization.plot_label_distributions`` and the rest still work.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

_NAME = "flwr_datasets.visualization"


def defer_flwr_datasets_plots() -> None:
    if _NAME in sys.modules or "flwr_datasets" in sys.modules:
        return  # already imported (or being imported) the eager way: nothing to save
    package = importlib.util.find_spec("flwr_datasets")  # locates it without running its __init__
    if package is None or package.submodule_search_locations is None:
        return
    spec = importlib.machinery.PathFinder.find_spec(_NAME, list(package.submodule_search_locations))
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)  # __spec__, __path__ and __package__ set, code not run

    def load_on_first_use(name: str):
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = load_on_first_use
    sys.modules[_NAME] = module
