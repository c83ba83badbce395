"""Expected failures: a missing dataset, a network error, a checksum mismatch, a refused run folder.

The command lines print such an error as one line (``error: <message>``) and exit with status 2
(:data:`EXIT_USAGE`, argparse's status for a bad command line); anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import sys

EXIT_USAGE = 2

# Packages the experiments import lazily: a missing one is an installation problem, not a bug.
OPTIONAL_PACKAGES = {
    "soundfile": "experiments/requirements-asr.txt",
    "textdistance": "experiments/requirements-asr.txt",
    "tqdm": "experiments/requirements-asr.txt or experiments/requirements-octmnist.txt",
    "matplotlib": "experiments/requirements-asr.txt or experiments/requirements-octmnist.txt",
    "medmnist": "experiments/requirements-octmnist.txt",
}

__all__ = ["EXIT_USAGE", "ExperimentError", "DataMissingError", "report_expected_failure"]


class ExperimentError(RuntimeError):
    """A failure the user can fix (data, network, settings); its message says what and how."""


class DataMissingError(ExperimentError, FileNotFoundError):
    """A dataset file or folder is not there and may not be downloaded."""


def report_expected_failure(exc: BaseException, prog: str) -> int | None:
    """Print ``exc`` as one line on stderr and return :data:`EXIT_USAGE` when it is an expected failure
    (an :class:`ExperimentError`, or a missing optional package); return ``None`` for anything else."""
    if isinstance(exc, ExperimentError):
        message = str(exc)
    elif isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in OPTIONAL_PACKAGES:
        name = exc.name.split(".")[0]
        message = f"this command needs the package {name!r}: pip install -r {OPTIONAL_PACKAGES[name]}"
    else:
        return None
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE
