"""The study specs that ship with hposvc, installed as the package ``hposvc._studies``.

This file makes that package a regular one: editable installs (``pip install -e .``)
cannot map a namespace package nested in hposvc. See hposvc/builtin.py.
"""
