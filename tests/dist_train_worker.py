"""Worker for the multi-process tests: ``[--config YAML] [--resume] [--distiller NAME] key=value ...``
trains through :func:`flowdistill.api.train` (run under torchrun with gloo, or alone)."""

import sys

from flowdistill.api import train
from flowdistill.config import load_config

if __name__ == "__main__":
    args, config, resume, distiller = sys.argv[1:], None, False, "flow_matching"
    if "--resume" in args:
        args.remove("--resume")
        resume = True
    if "--config" in args:
        i = args.index("--config")
        config = args[i + 1]
        del args[i:i + 2]
    if "--distiller" in args:
        i = args.index("--distiller")
        distiller = args[i + 1]
        del args[i:i + 2]
    train(load_config(config, args, default_distiller=distiller), resume=resume)
