"""The relative grid's keys: a float64 magnitude's exponent and top MANTISSA_BITS mantissa bits.

Shared by the torch accumulators and the compiled loops: plain integers, importing nothing, so
that the loops load without torch.
"""

MANTISSA_BITS = 8
SHIFT = 52 - MANTISSA_BITS  # key = float64 bits >> SHIFT
FIRST_NORMAL = 1 << MANTISSA_BITS  # keys below it: zero or subnormal |tau|, counted as zero
KEYS = 1 << (63 - SHIFT)  # every key of a float64 >= 0, NaN's included
