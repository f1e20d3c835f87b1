"""The README's import example runs and gives the seed numbers it claims."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    np.testing.assert_allclose(ns["rewards"][0], [-0.1, -0.1, 4.9], rtol=1e-6)
    np.testing.assert_allclose(ns["advantages"][0], [2.56725, 1.755, 0.9], rtol=1e-6)
    loss, (clip_fraction, approx_kl) = ns["losses"](ns["logprobs"], ns["values"])
    assert np.isfinite(loss) and float(clip_fraction) == 0.0 and float(approx_kl) == 0.0
    # KL 3 per sequence is below the target 6: e = clip(3/6 − 1) = −0.2, β = 0.1·(1 − 0.2·1/10⁴).
    np.testing.assert_allclose(ns["kl_state"].kl_coef, 0.1 * (1 - 0.2 / 10_000), rtol=1e-6)
