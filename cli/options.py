"""Option types that several commands share, so that each value is checked the same way."""

import click

# Every seed consumer takes this range: numpy's legacy seeding (transformers' set_seed, used in
# training) stops at 2**32 - 1, and data split's hash key at 2**63 - 1.
SEED = click.IntRange(0, 2**32 - 1)
