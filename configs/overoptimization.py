"""The default pipeline with the KL penalty off: the proxy reward keeps rising, gold falls.

Run:  python -m experiments.run --config configs/overoptimization.py
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("jaxppo_default_config", Path(__file__).with_name("default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    return _default.get_config(kl_coef=0.0, iterations=200)
