"""Tests of the ``modsync`` command (engine/cli).

A package, so that these modules' names never clash with same-named test
files elsewhere in the tree.
"""
