"""Worker for the two-process test: trains the tiny teacher under torchrun (gloo)."""

import sys

from flowdistill.api import train
from flowdistill.config import load_config

if __name__ == "__main__":
    train(load_config(None, sys.argv[1:]))
