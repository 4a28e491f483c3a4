"""Test doubles that users' own tests can reuse too: tiny models and a cheap trial function.

They live here, not in the library proper, so that nothing in `widelora` depends on them.
"""
