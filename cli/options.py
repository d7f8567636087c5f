"""Option types that several commands share, so that each value is checked the same way."""

import click

# Every seed consumer takes this range: numpy's legacy seeding (transformers' set_seed, used in
# training) stops at 2**32 - 1, and data split's hash key at 2**63 - 1.
SEED = click.IntRange(0, 2**32 - 1)


class ScaleList(click.ParamType):
    """`1.0` (one model), `0.1,0.5,1.0` or `0.1:1.0:0.1` (start:stop:step, stop included): a list
    writes one model per scale under OUTPUT, from one read of the inputs."""

    name = "scale[s]"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float, list)):
            return value
        text = str(value).strip()
        try:
            if ":" in text:
                start, stop, step = (float(part) for part in text.split(":"))
                return _range(start, stop, step, self, param, ctx)
            if "," in text:
                return [float(part) for part in text.split(",")]
            return float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number, a list a,b,c or a range start:stop:step", param, ctx)


def _range(start, stop, step, kind, param, ctx) -> list[float]:
    if not step > 0 or stop < start:
        kind.fail(f"range {start}:{stop}:{step} needs step > 0 and stop >= start", param, ctx)
    count = int(round((stop - start) / step)) + 1
    if count > 1000:
        kind.fail(f"range {start}:{stop}:{step} has {count} scales; at most 1000", param, ctx)
    return [round(start + i * step, 12) for i in range(count) if start + i * step <= stop + step * 1e-9]


SCALES = ScaleList()
