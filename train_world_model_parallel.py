"""train_world_model.py with its data collection spread over worker processes.

The original World Models gathered its rollouts on many CPU workers at once. This is the same stage
(same arguments, files and code: it runs train_world_model.main), except that when DATA_DIR has no
episodes the random ones are collected by one worker process per core instead of in one process.
Collection dominates the stage when it has to collect: see the README for the measured speed-up.

Reads / writes: as train_world_model.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import train_world_model
from utils import run_main


@dataclass
class Args(train_world_model.Args):
    workers: int = os.cpu_count() or 2
    """collection worker processes (default: one per core)"""


if __name__ == "__main__":
    run_main(train_world_model.main, Args, description=__doc__)
