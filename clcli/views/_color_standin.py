"""Stand-in for the colour helper's ``clcli.views.batched_color`` (issue 23) until it is merged: identity.

``apply_photometric(x, group, rng)`` will apply a group's jitter, grayscale, blur and solarisation to a
float batch in [0, 1]; ``apply_special(x, group, rng)`` will return a pipeline's special output (CPC's
patch grid) or ``None``. Delete this module when ``batched_color`` is on main.
"""

from __future__ import annotations

import torch

from clcli.recipe import ViewGroup
from clcli.views.sample_random import SampleRandom


def apply_photometric(x: torch.Tensor, group: ViewGroup, rng: SampleRandom) -> torch.Tensor:
    return x


def apply_special(x: torch.Tensor, group: ViewGroup, rng: SampleRandom) -> torch.Tensor | None:
    return None
