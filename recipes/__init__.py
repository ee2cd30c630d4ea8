"""The shipped recipes, installed with corex as package data (``corex recipes`` lists them)."""
