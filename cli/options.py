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


class OneValueGroup(click.Group):
    """A group whose commands refuse an option of one value given twice: click keeps the last
    silently, so `negate --finetuned A --finetuned B` would negate B alone and exit 0."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            _refuse_repeated_options(command, rest)
        return name, command, rest


def _refuse_repeated_options(command: click.Command, args: list[str]) -> None:
    single = {name: option for option in command.params if isinstance(option, click.Option)
              and not (option.multiple or option.count or option.is_flag) for name in option.opts}
    seen = set()
    for arg in args:
        if arg == "--":
            break
        option = single.get(arg.split("=", 1)[0])
        if option is None:
            continue
        if option.name in seen:
            raise click.UsageError(f"option {max(option.opts, key=len)} is given more than once; it takes one value")
        seen.add(option.name)
