"""Bundled machine descriptions (YAML), installed as ``zoplan.topologies``."""
