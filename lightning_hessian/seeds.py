"""One seed from several integers (a run's seed, an epoch, a sample index, a rank, a step): the package's only
way of deriving seeds, so that a draw depends on what it names and nothing else (not on the global RNG, the
process or the interpreter's ``hash``). Pure Python: the numerical core may use it."""

from __future__ import annotations

MULTIPLIER = 1_000_003  # a prime: distinct small (seed, index) pairs give distinct seeds
MODULUS = 2**63 - 1  # a Mersenne prime just under the 64-bit seeds torch.Generator.manual_seed takes


def mix_seed(*values: int, multiplier: int = MULTIPLIER) -> int:
    """``values`` folded into one seed in ``[0, 2**63 - 1)``: ``seed = (seed * multiplier + value) % (2**63 - 1)``
    from ``seed = 0``, so ``mix_seed(s, i) == s * 1_000_003 + i`` for the small non-negative values seeds are.
    Take it modulo ``2**32`` where a 32-bit seed is needed (``np.random.seed``, ``random.seed``).

    ``multiplier`` is fixed by the caller, never per call: ``EpochShuffleSampler`` keeps 100,003 for its epoch
    seed, so its recorded training orders stay what they were.

    >>> mix_seed(7)
    7
    >>> mix_seed(3, 5) == 3 * 1_000_003 + 5, mix_seed(0, 1, 2)
    (True, 1000005)
    >>> mix_seed(2, 9, multiplier=100_003)
    200015
    >>> 0 <= mix_seed(2**62, 2**62, -1) < 2**63 - 1
    True
    """
    seed = 0
    for value in values:
        seed = (seed * multiplier + value) % MODULUS
    return seed
