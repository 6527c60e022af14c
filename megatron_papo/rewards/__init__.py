"""Verifiable rewards for PAPO: format, accuracy (math-verify, choice, exact) and a registry.

- ``config``: ``RewardConfig`` (the ``reward`` section: which function, format weight).
- ``boxed``: ``\\boxed{...}`` extraction with balanced braces.
- ``format``: ``format_reward``: reasoning in ``<think>...</think>`` then a ``\\boxed{}`` answer.
- ``accuracy``: ``accuracy_reward`` / ``grade_answer``: the boxed answer against the reference.
- ``registry``: ``RewardOutput``, ``papo_default`` (R = 0.9 * accuracy + 0.1 * format), ``build_reward_fn``.
"""
