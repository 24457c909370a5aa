"""Shipped job configs (YAML), installed as package data ``flowdistill.configs``.

Read them through :func:`flowdistill.resources.config_path`.
"""
