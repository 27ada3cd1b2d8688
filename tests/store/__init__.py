"""Tests of the store layer (engine/db, blobs, model, crc, mutation, store, verify, gc).

A package, so that these modules' names (test_store, test_db, ...) never clash
with same-named test files elsewhere in the tree.
"""
