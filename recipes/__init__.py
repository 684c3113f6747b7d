"""Shipped recipes (installed as the package `cirgen_recipes`)."""
