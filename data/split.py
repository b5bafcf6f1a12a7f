"""A seeded train / validation / test split of records: disjoint, repeatable, sized as asked."""

import random
import warnings


def clamp_sizes(sizes: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``sizes`` when they fit in ``n`` records, else ``n`` shared out in proportion to them.

    The proportional shares are rounded down, the records left over go to the parts with the
    largest remainders (the first part wins a tie), and then a part that asked for records
    but got none takes one from the largest part, as long as that part keeps at least one.
    So every asked-for part is non-empty whenever ``n`` allows it.

    Raises:
        ValueError: a size is not a non-negative integer.
    """
    if any(not isinstance(size, int) or isinstance(size, bool) or size < 0 for size in sizes):
        raise ValueError(f"sizes must be non-negative integers, got {tuple(sizes)}")
    total = sum(sizes)
    if total <= n:
        return tuple(sizes)
    shares = [size * n // total for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(sizes[i] * n % total), i))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    for i, size in enumerate(sizes):
        largest = max(range(len(shares)), key=lambda j: shares[j])
        if size > 0 and shares[i] == 0 and shares[largest] > 1:
            shares[largest] -= 1
            shares[i] = 1
    return tuple(shares)


def split(
    records: list, sizes: tuple[int, int, int] = (10_000, 2_000, 2_000), seed: int = 42
) -> tuple[list, list, list]:
    """A seeded shuffle of ``records`` cut into (train, validation, test) of ``sizes``: disjoint and repeatable.

    ``random.Random(seed)`` shuffles the record positions; train is the first ``sizes[0]``,
    validation the next ``sizes[1]``, test the next ``sizes[2]``. Records beyond the sum are
    not used. With fewer records than the sum, the sizes are clamped by ``clamp_sizes`` and a
    warning says what was asked and what was given.

    Raises:
        ValueError: ``sizes`` is not three non-negative integers.
    """
    if len(sizes) != 3:
        raise ValueError(f"sizes must be three numbers (train, validation, test), got {tuple(sizes)}")
    used = clamp_sizes(sizes, len(records))
    if used != tuple(sizes):
        warnings.warn(
            f"split: asked for {' + '.join(map(str, sizes))} = {sum(sizes)} records but {len(records)} were given; "
            f"using {' + '.join(map(str, used))} (in proportion)",
            stacklevel=2,
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train_end, validation_end = used[0], used[0] + used[1]
    return (
        [records[i] for i in order[:train_end]],
        [records[i] for i in order[train_end:validation_end]],
        [records[i] for i in order[validation_end:validation_end + used[2]]],
    )
