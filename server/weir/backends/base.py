"""The contract between the data plane and a model backend.

A backend turns one batch of named numpy inputs into named numpy outputs. It is called from
executor threads, never on the event loop, and may be called from several threads at once (up
to the model's instance count). Batching belongs to the server, not to the backend.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (shaped as the signature says, batch dim first when the model
        batches) and return at least the outputs named in ``output_names``."""
        ...

    def unload(self) -> None:
        """Release what the backend holds; called once no request can reach it any more."""
        ...
