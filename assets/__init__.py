"""Shipped weights (digits classifier, teachers), installed as package data ``flowdistill.assets``.

Read them through :func:`flowdistill.resources.asset_path`.
"""
