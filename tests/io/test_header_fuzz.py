"""A seeded, bounded fuzzer over safetensors headers (issue 12): a few hundred mutants of a tiny
file, each merged as the base or as a fine-tune. Each is either a one-line TaskvecError naming
the mutated file with nothing left beside the output, or a merge equal to a float64 reference
computed from the stored bytes; and our reader accepts a mutant only if safetensors does."""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from taskvec.errors import TaskvecError
from taskvec.io.safetensors_file import read_header
from taskvec.merge import merge_checkpoints

from helpers import assert_close_to_reference, error_bound, load_dir, negated_mean_f64

SEED = 12
SCALE = 0.5
ROLES = ("base", "ft0", "ft1")


def tiny_tensors(model: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(model)
    noise = (lambda *shape: torch.randn(*shape, generator=generator) * 1e-2) if model else (lambda *s: 0)
    base = torch.Generator().manual_seed(100)
    return {
        "w": torch.randn(3, 4, generator=base) + noise(3, 4),
        "b": torch.randn(4, generator=base) + noise(4),
        "h": (torch.randn(5, generator=base) + noise(5)).half(),
        "n": torch.arange(3) * (model + 1),  # an integer buffer: copied from the base
    }


def split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def json_mutants(raw: bytes, rng: random.Random) -> list[bytes]:
    """Valid JSON, hostile values: what a byte flip rarely reaches."""
    header, data = split(raw)
    names = [n for n in header if n != "__metadata__"]
    out = []

    def change(edit):
        copy = json.loads(json.dumps(header))
        edit(copy)
        out.append(join(copy, data))

    for name in rng.sample(names, 2):
        for dtype in (["F32"], {"F32": 1}, "F33", "f32", 1, None, "I32", "U32", "BF16", "F64"):
            change(lambda h, n=name, d=dtype: h[n].update(dtype=d))
        shape = header[name]["shape"]
        for bad in ([True] + shape[1:], [-1] + shape[1:], [1.5] + shape[1:], [2**64] + shape[1:],
                    [2**63, 2**63, 0], [2**32, 2**32, 0] + shape, [0, 2**40, 2**40], [2**64 - 1, 0], [], "3", None,
                    shape + [1], [1] + shape, list(reversed(shape)), [float("nan")], [10**30] * 3):
            change(lambda h, n=name, s=bad: h[n].update(shape=s))
        begin, end = header[name]["data_offsets"]
        for bad in ([end, begin], [begin, end, end], [begin], [begin, 2**64], [begin - 1, end - 1],
                    [begin + 1, end + 1], [float(begin), end], [True, end], None, [begin, end + 8]):
            change(lambda h, n=name, o=bad: h[n].update(data_offsets=o))
        change(lambda h, n=name: h[n].pop("shape"))
        change(lambda h, n=name: h[n].update(extra=1))
        change(lambda h, n=name: h.update({n: [h[n]]}))
        for new in ("", name + "x", "__metadata__", "a\nb", "\ud800", names[0], "é" * 3, "x" * 300):
            change(lambda h, n=name, m=new: h.update({m: h.pop(n)}))
    first, second = names[0], names[1]
    change(lambda h: h[first].update(data_offsets=h[second]["data_offsets"]))
    change(lambda h: (h[first].update(data_offsets=h[second]["data_offsets"]),
                      h[second].update(data_offsets=header[first]["data_offsets"])))
    for metadata in ({"format": 1}, [], None, "pt", {"format": ["pt"]}, {"format": "\udc00"}, {},
                     {"format": "pt", "taskvec": "x" * 1000}):
        change(lambda h, m=metadata: h.update(__metadata__=m))
    change(lambda h: h.pop("__metadata__", None))
    change(lambda h: h.clear())
    text = json.dumps(header)
    body = json.dumps(header[first])
    out += [
        join(text.replace(body, body[:-1] + ', "dtype": "F32"}'), data),  # a field given twice
        join(text[:-1] + ', "__metadata__": {"format": "pt"}}', data),
        join(text[:-1] + f', "{first}": {body}}}', data),  # a tensor given twice
        join("[" * 100_000 + "]" * 100_000, data),  # nested deeper than any parser's limit
        join(text[:-1] + ', "deep": ' + "[" * 200 + "]" * 200 + "}", data),
        join(text.replace(f'"{first}"', '"' + "\\ud83d\\ude00" + '"'), data),  # a valid surrogate pair
        join("{}", b""),
        join(text, data[:-4]),
        join(text, data + bytes(8)),
        join(" " + text, data),
        join(text.replace(" ", "\t"), data),
        join(text.replace("[", "[ ").replace(",", " ,"), data),
        join(text[:-1] + ', "x": NaN}', data),
        join(text.replace("[0, ", "[-0, ", 1), data),  # an integer to Python, a float to serde
        join("\ufeff" + text, data),
    ]
    rng.shuffle(out)
    return out


def byte_mutants(raw: bytes, rng: random.Random, count: int) -> list[bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    out = []
    for delta in range(1, 17):  # a header length a few bytes off: the JSON may still parse
        out += [struct.pack("<Q", length + sign * delta) + raw[8:] for sign in (-1, 1)]
    out += [raw[:cut] for cut in sorted(rng.sample(range(len(raw)), 12))]
    out += [raw + bytes(rng.randrange(256) for _ in range(n)) for n in (1, 3, 8, 16)]
    out += [struct.pack("<Q", value) + raw[8:] for value in (0, 2, 2**64 - 1, 100_000_001, len(raw))]
    while len(out) < count:
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 4))):
            at = rng.randrange(8, 8 + length)
            kind = rng.choice(("flip", "byte", "insert", "delete", "digit"))
            if kind == "flip":
                data[at] ^= 1 << rng.randrange(8)
            elif kind == "byte":
                data[at] = rng.choice(b'{}[]",:0123456789 -.eEtruefalsn\\\x00\x80\xff')
            elif kind == "insert":
                data.insert(at, rng.randrange(256))
            elif kind == "delete":
                del data[at]
            elif chr(data[at]).isdigit():
                data[at] = ord(rng.choice("0123456789"))
        out.append(bytes(data))
    return out


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """(role, mutant bytes, originals) for every mutant, over a base and two fine-tunes."""
    root = tmp_path_factory.mktemp("fuzz-originals")
    originals = {}
    for model, role in enumerate(ROLES):
        save_file(tiny_tensors(model), root / f"{role}.safetensors", metadata={"format": "pt"})
        originals[role] = (root / f"{role}.safetensors").read_bytes()
    rng = random.Random(SEED)
    out = []
    for role in ROLES:
        raw = originals[role]
        out += [(role, m) for m in json_mutants(raw, rng) + byte_mutants(raw, rng, 64)]
    return out, originals


def library_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
            handle.metadata()
        return True
    except Exception:  # safetensors raises several types; each means "refused"
        return False


def test_every_mutant_is_a_one_line_error_or_an_exact_merge(mutants, tmp_path):
    mutants, originals = mutants
    outcomes = {"refused": 0, "merged": 0}
    for number, (role, mutant) in enumerate(mutants):
        case = tmp_path / f"{number:04d}"
        dirs = {}
        for name in ROLES:
            dirs[name] = case / name
            dirs[name].mkdir(parents=True)
            (dirs[name] / "model.safetensors").write_bytes(mutant if name == role else originals[name])
        parent = case / "outputs"
        parent.mkdir()
        out = parent / "out"
        what = f"mutant {number} as {role}: {mutant[:120]!r}"
        try:
            merge_checkpoints([dirs["ft0"], dirs["ft1"]], out, base=dirs["base"], scale=SCALE, progress=False)
        except TaskvecError as err:
            message = str(err)
            assert "\n" not in message and str(dirs[role]) in message, f"{what}: {message!r}"
            assert list(parent.iterdir()) == [], f"{what}: left {list(parent.iterdir())}"
            outcomes["refused"] += 1
        else:
            stored = {name: load_file(dirs[name] / "model.safetensors") for name in ROLES}
            merged = load_dir(out)
            assert merged.keys() == stored["base"].keys(), what
            for name, base in stored["base"].items():
                finetuned = [stored["ft0"][name], stored["ft1"][name]]
                if not base.is_floating_point():
                    assert torch.equal(merged[name], base), f"{what}: {name}"
                    continue
                reference = negated_mean_f64(base, finetuned, SCALE)
                bound = error_bound(base, finetuned, 1 + SCALE, -SCALE / 2, reference, merged[name].dtype)
                assert_close_to_reference(merged[name], reference, bound, f"{what}: {name}")
            outcomes["merged"] += 1
        assert (case / role / "model.safetensors").read_bytes() == mutant, f"{what}: input changed"
    assert min(outcomes.values()) >= 10, outcomes  # the fuzzer reaches both outcomes


def test_our_reader_accepts_only_what_safetensors_accepts(mutants, tmp_path):
    mutants, _ = mutants
    accepted = 0
    for number, (role, mutant) in enumerate(mutants):
        path = tmp_path / f"{number:04d}.safetensors"
        path.write_bytes(mutant)
        try:
            read_header(path)
        except TaskvecError as err:
            assert "\n" not in str(err) and str(path) in str(err), f"mutant {number}: {err!r}"
            continue
        accepted += 1
        assert library_accepts(path), f"mutant {number} ({role}), refused by safetensors: {mutant[:200]!r}"
    assert accepted >= 10
