"""Recipes: multi-stage jobs (couple, distil, train, report) as one YAML file, resumable stage by
stage (:mod:`flowdistill.recipes.spec` for the format, :mod:`flowdistill.recipes.runner` to run)."""

from flowdistill.recipes.runner import run_recipe, run_stage
from flowdistill.recipes.spec import Recipe, Stage, load_recipe

__all__ = ["Recipe", "Stage", "load_recipe", "run_recipe", "run_stage"]
