"""Worker for the multi-process embed test: ``PIPELINE_DIR PROMPTS --out ROOT ...`` runs
:func:`flowdistill.integrations.diffusers.prompt_cache.cmd_embed` (under torchrun, or alone)."""

import argparse
import sys

from flowdistill.integrations.diffusers.prompt_cache import add_embed_parser, cmd_embed

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="embed_worker")
    add_embed_parser(parser.add_subparsers(dest="command"), [])
    cmd_embed(parser.parse_args(["embed", *sys.argv[1:]]))
