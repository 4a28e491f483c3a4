"""Test doubles that users' own tests can reuse too: tiny models and a cheap trial function.

They live here, not in the library proper, so that nothing in `widelora` depends on them. The toy trial
(`widelora.testing.toy_trial`) is also a registered trial function, ``trial_fn: toy``, for trying the sweep
machinery (stores, resume, reports, Ray) in seconds without a language model; the sweep registry imports it
only when a spec names it.
"""
