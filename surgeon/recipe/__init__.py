"""Recipes: the YAML files that drive surgeon pipelines."""
from .load import LoadedRecipe, load_recipe, load_recipe_text
from .schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "load_recipe_text"]
